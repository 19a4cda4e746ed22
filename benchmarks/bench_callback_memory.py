"""Host memory of ``KENCallback`` on SmolLM2-135M: a snapshot of the pre-trained values
(``pretrained_source="snapshot"``, what the callback did before) against reading them from
the checkpoint the model was loaded from when training ends (``"checkpoint"``).

Each mode runs in a fresh process: ``from_pretrained`` of the float32 SmolLM2-135M-Instruct
folder converted from the packaged GGUF (``ken_hf.experiments.assets.smollm2_path``), a few
AdamW steps of causal-LM training on movie snippets (CPU), then KEN at keep 50 % over every
tensor. The process reports its own peak RSS (VmHWM) for training (from start, model load
included, to the end of the last step) and, after resetting the peak
(``/proc/self/clear_refs``), for the end of training (KEN); its RSS at the last step; and the
seconds the callback took when training began (snapshot, or reading and checking the whole
checkpoint) and when it ended (selection, reset, save). A run without the callback gives
the training's own figures. The subnetwork files of the two modes must be byte-identical.

The goal: KEN at the end adds at most 2 x the largest tensor + 256 MiB over the RSS of the
last step. With ``--before REV``, the callback of git revision REV (unpacked into a
temporary folder) runs beside this checkout's, mode by mode, in the same run.

    python benchmarks/bench_callback_memory.py [--steps 3] [--before REV]

Prints a table and writes benchmarks/results/bench_callback_memory.json.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"
MODES = ("no callback", "snapshot", "checkpoint")


def _status(field: str) -> int:
    """A size field of /proc/self/status (``VmHWM``, ``VmRSS``) in bytes."""
    with open("/proc/self/status") as status:
        line = next(line for line in status if line.startswith(field + ":"))
    return int(line.split()[1]) * 1024


def _cpu_model() -> str:
    with open("/proc/cpuinfo") as cpuinfo:
        names = [line.split(":", 1)[1].strip() for line in cpuinfo if line.startswith("model name")]
    return names[0] if names else platform.machine()


def child(mode: str, steps: int, out: Path) -> dict:
    """One run in this (fresh) process; returns its figures."""
    import torch
    from transformers import (
        AutoModelForCausalLM,
        AutoTokenizer,
        DataCollatorForLanguageModeling,
        Trainer,
        TrainerCallback,
        TrainingArguments,
    )

    from ken_hf import KENCallback
    from ken_hf.experiments.assets import movie_reviews, smollm2_path

    figures: dict = {}

    class Clock(TrainerCallback):
        """Placed before and after the KENCallback: times its begin and end events, and
        reads the peaks around them."""

        def __init__(self, before: bool) -> None:
            self.before = before

        def on_train_begin(self, args, state, control, **kwargs):
            key = "begin_start" if self.before else "begin_end"
            figures[key] = time.perf_counter()

        def on_step_end(self, args, state, control, **kwargs):
            if not self.before:
                figures["rss_last_step"] = _status("VmRSS")

        def on_train_end(self, args, state, control, **kwargs):
            if self.before:  # training is over: its peak, then a fresh peak for KEN
                figures["peak_training"] = _status("VmHWM")
                Path("/proc/self/clear_refs").write_text("5")
                figures["end_start"] = time.perf_counter()

    path = smollm2_path()
    tokenizer = AutoTokenizer.from_pretrained(path)
    texts = movie_reviews()[0][: 4 * steps]
    data = [tokenizer(text, truncation=True, max_length=64) for text in texts]
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(path)
    figures["parameter_bytes"] = sum(p.numel() * p.element_size() for p in model.parameters())
    figures["largest_tensor_bytes"] = max(p.numel() * p.element_size() for p in model.parameters())
    callbacks = [Clock(before=True)]
    ken = None
    if mode != "no callback":
        ken = KENCallback(
            keep_ratio=0.5, evaluate=False, pretrained_source=mode, save_dir=str(out / "ken")
        )
        callbacks.append(ken)
    callbacks.append(Clock(before=False))
    trainer = Trainer(
        model=model,
        args=TrainingArguments(
            output_dir=str(out / "run"),
            max_steps=steps,
            per_device_train_batch_size=4,
            report_to=[],
            save_strategy="no",
            use_cpu=True,
            disable_tqdm=True,
            seed=0,
        ),
        train_dataset=data,
        data_collator=DataCollatorForLanguageModeling(tokenizer, mlm=False),
        callbacks=callbacks,
    )
    trainer.train()
    figures["peak_end"] = _status("VmHWM")
    figures["begin_seconds"] = figures.pop("begin_end") - figures.pop("begin_start")
    figures["end_seconds"] = time.perf_counter() - figures.pop("end_start")
    if ken is not None:
        digest = hashlib.sha256()
        with open(out / "ken" / "ken_subnetwork.safetensors", "rb") as subnetwork:
            for block in iter(lambda: subnetwork.read(2**20), b""):
                digest.update(block)
        figures["subnetwork_sha256"] = digest.hexdigest()
        figures["selection_seconds"] = ken.report["ken_selection_seconds"]
    figures["torch_threads"] = torch.get_num_threads()
    return figures


def measure(mode: str, steps: int, code: Path | None = None) -> dict:
    """One run in a fresh process; ``code``: a folder whose ``ken_hf`` it imports."""
    env = dict(os.environ)
    if code is not None:
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(code), env.get("PYTHONPATH")]))
    with tempfile.TemporaryDirectory() as scratch:
        command = [sys.executable, __file__, "--child", mode, "--steps", str(steps)]
        out = subprocess.run(
            [*command, "--out", scratch], capture_output=True, text=True, check=False, env=env
        )
    if out.returncode:
        raise RuntimeError(out.stderr[-3000:])
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=3, help="training steps (default 3)")
    parser.add_argument("--child", choices=MODES, help=argparse.SUPPRESS)
    parser.add_argument("--out", type=Path, help=argparse.SUPPRESS)
    parser.add_argument(
        "--before", metavar="REV", help="also run the callback of this git revision (default: no)"
    )
    args = parser.parse_args()
    if args.child:
        print(json.dumps(child(args.child, args.steps, args.out)))
        return
    from ken_hf.experiments.assets import smollm2_path

    smollm2_path()  # converted once, outside the measured runs
    with tempfile.TemporaryDirectory() as before_code:
        codes: dict[str, Path | None] = {"now": None}
        if args.before:
            archive = subprocess.run(
                ["git", "archive", args.before, "ken_hf"], capture_output=True, check=True
            ).stdout
            subprocess.run(["tar", "-x", "-C", before_code], input=archive, check=True)
            codes = {f"before ({args.before})": Path(before_code), **codes}
        runs: dict[str, dict] = {}
        for mode in MODES:
            for code, folder in codes.items():
                if mode == "no callback" and folder is not None:
                    continue  # no ken-hf code runs
                key = mode if mode == "no callback" else f"{mode}, {code}"
                start = time.perf_counter()
                runs[key] = measure(mode, args.steps, folder) | {"mode": mode, "code": code}
                print(f"{key}: {time.perf_counter() - start:.0f} s", file=sys.stderr)
    for code in codes:
        digests = {runs[f"{m}, {code}"]["subnetwork_sha256"] for m in ("snapshot", "checkpoint")}
        if len(digests) != 1:
            raise SystemExit(f"{code}: the two modes wrote different subnetworks")
    digests = {run["subnetwork_sha256"] for run in runs.values() if "subnetwork_sha256" in run}
    largest = runs["no callback"]["largest_tensor_bytes"]
    goal = 2 * largest + 256 * 2**20
    for run in runs.values():
        run["end_added_bytes"] = run["peak_end"] - run["rss_last_step"]
        run["end_goal_met"] = run["end_added_bytes"] <= goal
    results = {
        "machine": {
            "cpus": runs["no callback"]["torch_threads"],
            "processor": _cpu_model(),
            "memory_bytes": os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"),
            "platform": platform.platform(),
        },
        "model": "SmolLM2-135M-Instruct, float32",
        "steps": args.steps,
        "keep_ratio": 0.5,
        "end_goal_bytes": goal,
        "subnetworks_identical": len(digests) == 1,
        "runs": runs,
    }
    gib, mib = 2**30, 2**20
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "bench_callback_memory.json").write_text(json.dumps(results, indent=2) + "\n")
    weights = runs["no callback"]["parameter_bytes"]
    machine = results["machine"]
    print(f"\nSmolLM2-135M float32 ({weights / mib:.0f} MiB of parameters, largest tensor "
          f"{largest / mib:.0f} MiB), {args.steps} AdamW steps on the CPU, KEN keep 50 %; "
          f"subnetworks byte-identical: {results['subnetworks_identical']}; "
          f"{machine['processor']}, {machine['cpus']} threads, "
          f"{machine['memory_bytes'] / gib:.0f} GiB")  # fmt: skip
    print(f"goal: the end adds at most 2 x largest tensor + 256 MiB = {goal / mib:.0f} MiB")
    print("| run | peak RSS, training | RSS at the last step | peak RSS, KEN at the end | "
          "added by the end | goal met | train begin | train end |")  # fmt: skip
    print("|---|---|---|---|---|---|---|---|")
    for key, run in runs.items():
        print(f"| {key} | {run['peak_training'] / gib:.2f} GiB | {run['rss_last_step'] / gib:.2f} "
              f"GiB | {run['peak_end'] / gib:.2f} GiB | {run['end_added_bytes'] / mib:.0f} MiB "
              f"| {'yes' if run['end_goal_met'] else 'no'} | {run['begin_seconds']:.2f} s "
              f"| {run['end_seconds']:.1f} s |")  # fmt: skip


if __name__ == "__main__":
    main()
