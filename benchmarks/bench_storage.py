"""Bytes on disk and load/switch times of KEN subnetworks, against the full fine-tuned
checkpoint and a LoRA adapter of the same model. Prints a table and writes
benchmarks/results/bench_storage.json.

Models: all-MiniLM-L6-v2 and SmolLM2-135M (both for sequence classification), each
"fine-tuned" by a few real AdamW steps on movie snippets (sizes do not depend on how long
it trained: KEN keeps k values per row whatever they are).

    python benchmarks/bench_storage.py [--models minilm smollm2]
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import torch
from peft import LoraConfig, TaskType, get_peft_model
from transformers import AutoModelForSequenceClassification, AutoTokenizer

from ken_hf import AutoKENModelForSequenceClassification, KENConfig, KENModel, KENSubnetwork
from ken_hf.checkpoints import new_parameters
from ken_hf.experiments.assets import minilm_path, movie_reviews, smollm2_path

RESULTS = Path(__file__).resolve().parent / "results"
RATIOS = (0.25, 0.50, 0.75)


def folder_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.iterdir() if p.is_file())


def load_model(path: str) -> torch.nn.Module:
    model = AutoModelForSequenceClassification.from_pretrained(path, num_labels=2)
    if model.config.pad_token_id is None:
        model.config.pad_token_id = AutoTokenizer.from_pretrained(path).pad_token_id
    return model


def finetune_a_little(model: torch.nn.Module, path: str, steps: int = 2) -> None:
    tokenizer = AutoTokenizer.from_pretrained(path)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    texts, labels = movie_reviews()
    batch = tokenizer(texts[:16], return_tensors="pt", padding=True, truncation=True, max_length=32)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    for _ in range(steps):
        model(**batch, labels=torch.tensor(labels[:16])).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    model.eval()


def median_seconds(action, repeats: int = 3) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        action()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def bench_model(label: str, path: str, work: Path) -> dict:
    torch.manual_seed(0)
    finetuned = load_model(path)
    finetune_a_little(finetuned, path)
    new = new_parameters(finetuned, path)
    full_dir = work / f"{label}-full"
    finetuned.save_pretrained(full_dir)
    full = folder_bytes(full_dir)

    lora_model = get_peft_model(
        load_model(path),
        LoraConfig(task_type=TaskType.SEQ_CLS, r=8, lora_alpha=16, target_modules="all-linear"),
    )
    lora_dir = work / f"{label}-lora"
    lora_model.save_pretrained(lora_dir)
    lora = folder_bytes(lora_dir)

    base = load_model(path)
    rows = []
    folders = {}
    for ratio in RATIOS:
        config = KENConfig(keep_ratio=ratio, base_model_name_or_path=path)
        start = time.perf_counter()
        subnetwork = KENSubnetwork.from_weights(base, finetuned, config, new_tensors=new)
        select_seconds = time.perf_counter() - start
        folder = work / f"{label}-ken-{ratio}"
        subnetwork.save_pretrained(folder)
        folders[ratio] = folder
        stored = folder_bytes(folder)
        whole = sum(t.numel() * t.element_size() for t in subnetwork.whole.values())
        kept = subnetwork.kept_fraction()
        rows.append(
            {
                "keep_ratio": ratio,
                "kept_fraction": kept,
                "subnetwork_bytes": stored,
                "stored_whole_bytes": whole,
                "percent_of_full": 100 * stored / full,
                "vs_kept_fraction_of_full": (stored - whole) / (kept * full),
                "selection_seconds": select_seconds,
            }
        )
        row = rows[-1]
        print(
            f"{label:8s} keep {ratio:4.2f}: {stored / 2**20:8.2f} MiB = "
            f"{row['percent_of_full']:5.1f}% of full, {row['vs_kept_fraction_of_full']:.3f}x "
            f"kept fraction x full (+{whole / 2**20:.2f} MiB whole), "
            f"selection {select_seconds:.1f} s",
            flush=True,
        )

    # transformers maps checkpoint files into memory and reads them lazily, so a plain
    # from_pretrained returns before it has read the weights; "ready" adds one forward pass
    # on a short input, which touches every weight.
    probe = {"input_ids": torch.tensor([[1, 2, 3, 4, 5, 6, 7, 8]])}
    full_load = median_seconds(lambda: load_model(str(full_dir)))
    full_ready = median_seconds(lambda: load_model(str(full_dir))(**probe))
    ken_load = median_seconds(
        lambda: AutoKENModelForSequenceClassification.from_pretrained(folders[0.25])
    )
    ken_ready = median_seconds(
        lambda: AutoKENModelForSequenceClassification.from_pretrained(folders[0.25])(**probe)
    )
    model = KENModel(load_model(path))
    model.load_subnetwork(folders[0.25], "quarter")
    model.load_subnetwork(folders[0.5], "half")
    names = iter(["quarter", "half"] * 10)
    switch = median_seconds(lambda: model.set_subnetwork(next(names)), repeats=5)
    timing = {
        "full_load_seconds": full_load,
        "ken_load_seconds": ken_load,
        "load_ratio": ken_load / full_load,
        "full_ready_seconds": full_ready,
        "ken_ready_seconds": ken_ready,
        "ready_ratio": ken_ready / full_ready,
        "switch_seconds": switch,
        "switch_vs_reload": switch / ken_load,
    }
    print(
        f"{label:8s} load: full {full_load:.3f} s, KEN {ken_load:.3f} s "
        f"({timing['load_ratio']:.1f}x); load + first forward: full {full_ready:.3f} s, "
        f"KEN {ken_ready:.3f} s ({timing['ready_ratio']:.1f}x); switch {switch * 1000:.0f} ms "
        f"({timing['switch_vs_reload']:.3f}x a reload)",
        flush=True,
    )
    print(f"{label:8s} full checkpoint {full / 2**20:.1f} MiB, LoRA r=8 {lora / 2**20:.2f} MiB")
    return {"full_bytes": full, "lora_r8_bytes": lora, "ken": rows, **timing}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--models", nargs="+", default=["minilm", "smollm2"])
    args = parser.parse_args()
    paths = {"minilm": lambda: str(minilm_path()), "smollm2": lambda: str(smollm2_path())}
    report = {}
    with tempfile.TemporaryDirectory() as scratch:
        for label in args.models:
            report[label] = bench_model(label, paths[label](), Path(scratch))
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "bench_storage.json").write_text(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
