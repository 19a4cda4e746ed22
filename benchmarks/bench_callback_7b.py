"""KENCallback's end of training on a loaded 7B model: host memory over the model's own.

The synthetic Llama-2-7B-shaped pair of ``bench_stream.py --shape 7b`` (bf16, sharded
safetensors; written there first if missing): the base is loaded with ``from_pretrained``,
the callback's train-begin event runs (the base checkpoint located, every tensor compared
and fingerprinted: no copy held), the fine-tuned values are then copied into the model in
place (what training would have left; no optimizer, no training step), the peak RSS is
reset, and the callback's train-end event runs: KEN at k = 64 per row over every tensor, a
tensor at a time, the subnetwork written. The figure is that event's peak RSS (VmHWM) over
the RSS just before it; the bound to compare with is 2 x the largest tensor + 256 MiB.
The model runs in a Trainer built for the events (``use_cpu=True``); ``train()`` is not
called.

    python benchmarks/bench_callback_7b.py [--k 64]

Prints a table and writes benchmarks/results/bench_callback_7b.json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import tempfile
import time
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"


def _status(field: str) -> int:
    """A size field of /proc/self/status (``VmHWM``, ``VmRSS``) in bytes."""
    with open("/proc/self/status") as status:
        line = next(line for line in status if line.startswith(field + ":"))
    return int(line.split()[1]) * 1024


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--k", type=int, default=64, help="values kept per row (default 64)")
    args = parser.parse_args()

    import torch
    from bench_stream import SHAPES, write_pair
    from transformers import LlamaForCausalLM, Trainer, TrainingArguments

    from ken_hf import KENCallback
    from ken_hf.experiments.assets import cache_dir
    from ken_hf.storage.checkpoints import Checkpoint

    folder = cache_dir() / "bench-llama-7b"
    pair = write_pair(folder, SHAPES["7b"])
    figures: dict = {"start_rss": _status("VmRSS")}
    start = time.perf_counter()
    model = LlamaForCausalLM.from_pretrained(folder / "base", dtype=torch.bfloat16)
    figures["load_seconds"] = time.perf_counter() - start
    parameters = list(model.parameters())
    figures["parameter_bytes"] = sum(p.numel() * p.element_size() for p in parameters)
    figures["largest_tensor_bytes"] = max(p.numel() * p.element_size() for p in parameters)
    with tempfile.TemporaryDirectory() as scratch:
        callback = KENCallback(k=args.k, evaluate=False, save_dir=str(Path(scratch) / "ken"))
        trainer = Trainer(
            model=model,
            args=TrainingArguments(
                output_dir=scratch, use_cpu=True, report_to=[], disable_tqdm=True
            ),
            callbacks=[callback],
        )
        callback.bind(trainer)
        events = (trainer.args, trainer.state, trainer.control)
        start = time.perf_counter()
        callback.on_train_begin(*events)
        figures["begin_seconds"] = time.perf_counter() - start
        start = time.perf_counter()
        tensors = dict(model.named_parameters())
        with Checkpoint(folder / "finetuned") as finetuned, torch.no_grad():
            for name in finetuned.names:
                tensors[name].copy_(finetuned.read(name))
        figures["finetune_copy_seconds"] = time.perf_counter() - start
        figures["rss_before_end"] = _status("VmRSS")
        Path("/proc/self/clear_refs").write_text("5")
        start, cpu = time.perf_counter(), time.process_time()
        callback.on_train_end(*events)
        figures["end_seconds"] = time.perf_counter() - start
        figures["end_cpu_seconds"] = time.process_time() - cpu
        figures["peak_end"] = _status("VmHWM")
        figures["subnetwork_bytes"] = (
            Path(scratch) / "ken" / "ken_subnetwork.safetensors"
        ).stat().st_size
        figures["kept_fraction"] = callback.report["ken_kept_fraction"]
    added = figures["peak_end"] - figures["rss_before_end"]
    bound = 2 * figures["largest_tensor_bytes"] + 256 * 2**20
    gib, mib = 2**30, 2**20
    results = {
        "machine": {
            "cpus": torch.get_num_threads(),
            "memory_bytes": os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"),
            "platform": platform.platform(),
        },
        "pair": pair,
        "k": args.k,
        "end_added_bytes": added,
        "bound_bytes": bound,
        "bound_met": added <= bound,
        **figures,
    }
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "bench_callback_7b.json").write_text(json.dumps(results, indent=2) + "\n")
    print(f"Llama-2-7B shape, bf16 ({figures['parameter_bytes'] / gib:.2f} GiB of parameters, "
          f"largest tensor {figures['largest_tensor_bytes'] / mib:.0f} MiB), KENCallback k = "
          f"{args.k}, {results['machine']['cpus']} threads")  # fmt: skip
    print("| RSS before the end | peak RSS, end of training | added | bound | met | "
          "train begin | train end (wall / CPU) |")  # fmt: skip
    print("|---|---|---|---|---|---|---|")
    print(f"| {figures['rss_before_end'] / gib:.2f} GiB | {figures['peak_end'] / gib:.2f} GiB "
          f"| {added / mib:.0f} MiB | {bound / mib:.0f} MiB | {'yes' if added <= bound else 'no'} "
          f"| {figures['begin_seconds']:.0f} s | {figures['end_seconds']:.0f} s / "
          f"{figures['end_cpu_seconds']:.0f} s |")  # fmt: skip


if __name__ == "__main__":
    main()
