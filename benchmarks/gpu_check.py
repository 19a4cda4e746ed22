"""The GPU check: ken-hf's CUDA paths in one run of a few minutes on one GPU.

1. the CUDA tests (``pytest -k cuda``: selection on CUDA against the oracle, precision
   settings, pruning, loading and the callback on CUDA in bf16, ``ken prune --device cuda``);
2. selection on CUDA against the CPU on real MiniLM rows (n = 384..4096, k = 25/50/75 % and
   k = 300 at n = 768), with TF32 matrix products switched on process-wide: the masks must be
   identical; microseconds per row on each;
3. a short KENCallback run on SmolLM2-135M in bf16 on the GPU (a causal-LM fine-tune of a few
   steps, KEN at keep ratio 0.5 over every weight): the callback's masks must equal those the
   CPU selects from the same fine-tuned values, and the saved subnetwork must reload onto the
   GPU with the pruned model's logits bit for bit.

Prints a table per part and writes ``benchmarks/results/gpu_check.json`` (or ``--out``).
Exits non-zero when any check fails.

    make gpu-check                      # on a machine with a CUDA GPU
    python benchmarks/gpu_check.py --device cpu --quick   # the same steps on the CPU
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from safetensors.torch import load_file

from ken_hf import ken_select_many
from ken_hf.experiments.assets import minilm_path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from bench_select import FRACTIONS, WIDTHS, real_rows  # noqa: E402
from device_checks import KeepFineTuned, masks_differing_from_cpu  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"


def synchronize(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize(device)


def run_cuda_tests(timeout: int) -> dict:
    """``pytest -k cuda`` in a fresh interpreter: the counts of passed, failed, skipped."""
    start = time.perf_counter()
    completed = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-k", "cuda", "-p", "no:cacheprovider", "tests"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    summary = completed.stdout.strip().splitlines()[-1] if completed.stdout.strip() else ""
    counts = {}
    for part in summary.strip("= ").split(","):
        words = part.split()
        if len(words) >= 2 and words[0].isdigit():
            counts[words[1]] = int(words[0])
    if completed.returncode != 0:
        print(completed.stdout[-6000:], completed.stderr[-2000:], sep="\n")
    return {
        "ok": completed.returncode == 0 and counts.get("passed", 0) > 0,
        "summary": summary,
        "seconds": time.perf_counter() - start,
        **counts,
    }


def time_select(rows: torch.Tensor, k: int, repeats: int) -> tuple[float, torch.Tensor]:
    """Best of ``repeats`` microseconds per row of selecting ``rows`` (on their device)."""
    best, mask = float("inf"), None
    for _ in range(repeats):
        synchronize(str(rows.device))
        start = time.perf_counter()
        mask = ken_select_many({"rows": rows}, k)["rows"]
        synchronize(str(rows.device))
        best = min(best, time.perf_counter() - start)
    return best / rows.shape[0] * 1e6, mask


def compare_selection(device: str, quick: bool, repeats: int) -> list[dict]:
    """Masks on ``device`` (TF32 on) against the CPU's default path, on real rows."""
    weights = load_file(str(minilm_path() / "model.safetensors"))
    results = []
    torch.set_float32_matmul_precision("high")  # TF32 where the GPU has it
    torch.backends.cuda.matmul.allow_tf32 = True
    try:
        for width in WIDTHS:
            rows = real_rows(weights, width, 256 if quick else 2048)
            ks = [round(f * width) for f in FRACTIONS] + ([300] if width == 768 else [])
            for k in ks:
                cpu_us, cpu_mask = time_select(rows, k, repeats)
                device_us, device_mask = time_select(rows.to(device), k, repeats)
                results.append(
                    {
                        "width": width,
                        "k": k,
                        "rows": rows.shape[0],
                        "cpu_us_per_row": cpu_us,
                        "device_us_per_row": device_us,
                        "identical": bool(torch.equal(device_mask.cpu(), cpu_mask)),
                    }
                )
    finally:
        torch.set_float32_matmul_precision("highest")
        torch.backends.cuda.matmul.allow_tf32 = False
    return results


def callback_run(device: str, quick: bool) -> dict:
    """A short bf16 KENCallback run on SmolLM2-135M on ``device``; see the module docstring."""
    from datasets import Dataset
    from transformers import (
        AutoModelForCausalLM,
        AutoTokenizer,
        DataCollatorForLanguageModeling,
        Trainer,
        TrainingArguments,
    )

    from ken_hf import AutoKENModelForCausalLM, KENCallback
    from ken_hf.experiments.assets import movie_reviews, smollm2_path

    path = smollm2_path(2 if quick else None)
    tokenizer = AutoTokenizer.from_pretrained(path)
    texts = movie_reviews()[0][: 64 if quick else 512]
    data = Dataset.from_dict({"text": texts}).map(
        lambda b: tokenizer(b["text"], truncation=True, max_length=64),
        batched=True,
        remove_columns=["text"],
    )
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.bfloat16).to(device)
    keep = KeepFineTuned()
    with tempfile.TemporaryDirectory() as folder:
        callback = KENCallback(keep_ratio=0.5, save_dir=f"{folder}/ken")
        trainer = Trainer(
            model=model,
            args=TrainingArguments(
                output_dir=f"{folder}/run",
                max_steps=4 if quick else 20,
                per_device_train_batch_size=16,
                learning_rate=1e-4,
                bf16=True,
                report_to=[],
                save_strategy="no",
                disable_tqdm=True,
                use_cpu=device == "cpu",
                seed=0,
            ),
            train_dataset=data,
            eval_dataset=data.select(range(32)),
            data_collator=DataCollatorForLanguageModeling(tokenizer, mlm=False),
            callbacks=[keep, callback],
        )
        start = time.perf_counter()
        trainer.train()
        seconds = time.perf_counter() - start
        subnetwork = callback.subnetwork
        mismatched = masks_differing_from_cpu(subnetwork, keep.weights)
        batch = tokenizer(texts[:4], return_tensors="pt", padding=True).to(device)
        loaded = AutoKENModelForCausalLM.from_pretrained(f"{folder}/ken", device_map=device)
        with torch.no_grad():
            same_logits = torch.equal(loaded(**batch).logits, model.eval()(**batch).logits)
    report = callback.report
    return {
        "ok": not mismatched and same_logits,
        "model": path.name,
        "dtype": str(model.dtype),
        "train_seconds_with_ken": seconds,
        "ken_selection_seconds": report["ken_selection_seconds"],
        "loss_before": report["metrics_before"].get("ken_before_loss"),
        "loss_after": report["metrics_after"].get("ken_after_loss"),
        "reset_fraction": report["ken_reset_fraction"],
        "pruned_tensors": len(subnetwork.pruned),
        "masks_equal_cpu": not mismatched,
        "mismatched": mismatched[:5],
        "reloaded_logits_identical": same_logits,
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", default="cuda", help="cuda (default), cuda:1, or cpu")
    parser.add_argument("--quick", action="store_true", help="fewer rows, 2-layer SmolLM2")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument(
        "--out", type=Path, help="JSON results (default on a GPU: results/gpu_check.json)"
    )
    args = parser.parse_args()
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        parser.error("no CUDA GPU visible to torch (torch.cuda.is_available() is False)")
    on_gpu = args.device.startswith("cuda")
    machine = {
        "torch": torch.__version__,
        "device": torch.cuda.get_device_name(args.device) if on_gpu else platform.processor(),
        "cpu_threads": torch.get_num_threads(),
    }
    print(f"device: {machine['device']}, torch {machine['torch']}", flush=True)

    # The CUDA tests exist only on a GPU; on the CPU they are skipped, so the step is too.
    tests = run_cuda_tests(timeout=240) if on_gpu else {"ok": True, "summary": "not run (CPU)"}
    print(f"\n1. CUDA tests: {tests['summary']}", flush=True)

    print("\n2. Selection, TF32 on", flush=True)
    print(f"{'width':>6} {'k':>5} {'CPU us/row':>11} {'device us/row':>14} {'identical':>9}")
    selection = compare_selection(args.device, args.quick, args.repeats)
    for r in selection:
        print(
            f"{r['width']:6d} {r['k']:5d} {r['cpu_us_per_row']:11.1f} "
            f"{r['device_us_per_row']:14.1f} {str(r['identical']):>9s}",
            flush=True,
        )

    print("\n3. KENCallback on SmolLM2 in bf16", flush=True)
    callback = callback_run(args.device, args.quick)
    for key, value in callback.items():
        print(f"  {key}: {value}")

    ok = tests["ok"] and all(r["identical"] for r in selection) and callback["ok"]
    result = {
        "machine": machine,
        "device": args.device,
        "quick": args.quick,
        "tests": tests,
        "selection": selection,
        "callback": callback,
        "ok": ok,
    }
    out = args.out or (RESULTS / "gpu_check.json" if on_gpu else None)
    if out is not None:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"\n{'PASSED' if ok else 'FAILED'}" + (f"; written to {out}" if out else ""))
    return 0 if ok else 1


if __name__ == "__main__":
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    sys.exit(main())
