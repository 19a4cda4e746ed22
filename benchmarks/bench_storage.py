"""Bytes on disk, save and load times of KEN subnetworks: format version 2 (kept values as a
compressed lossless delta against the base) against version 1 (kept values as they are),
the full fine-tuned checkpoint, that checkpoint zstd-compressed, byte-grouped + zstd
(ZipNN-style, no base) and LoRA adapters (plain and zstd-compressed). Prints a table and
writes benchmarks/results/bench_storage.json.

Models: all-MiniLM-L6-v2 (4,000 movie snippets, 2 epochs, as ``ken demo``) and SmolLM2-135M
(1,600 snippets, 1 epoch, as the SmolLM2 comparison), fine-tuned for sequence
classification with a transformers Trainer (cached under ~/.cache/ken-hf/bench); each in
float32 and in bfloat16 (base and fine-tune both cast). Budgets: keep 25/50/75/100 % and
k = 300. Version 1 files are written by a copy of its layout here (the library reads
version 1 but writes version 2 only). Torch runs one thread, so the MB/s are one core's.

    python benchmarks/bench_storage.py [--models minilm smollm2] [--dtypes float32 bfloat16]
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import torch
import xxhash
import zstandard
from peft import LoraConfig, TaskType, get_peft_model
from transformers import AutoModelForSequenceClassification

from ken_hf import AutoKENModelForSequenceClassification, KENConfig, KENModel, KENSubnetwork
from ken_hf.config import CONFIG_NAME
from ken_hf.experiments.assets import cache_dir
from ken_hf.experiments.finetune import (
    build_trainer,
    load_splits,
    load_tokenizer,
    model_source,
    new_classifier,
)
from ken_hf.experiments.run_settings import FineTuneSettings
from ken_hf.storage.checkpoints import new_parameters
from ken_hf.storage.delta_codec import pack_bits, to_planes
from ken_hf.storage.format import FORMAT, checksum, index_dtype, smaller_encoding
from ken_hf.storage.safetensors_io import SafetensorsWriter
from ken_hf.storage.subnetwork_file import SUBNETWORK_NAME

RESULTS = Path(__file__).resolve().parent / "results"
BUDGETS = ({"keep_ratio": 0.25}, {"keep_ratio": 0.5}, {"keep_ratio": 0.75},
           {"keep_ratio": 1.0}, {"k": 300})  # fmt: skip
TASKS = {
    "minilm": FineTuneSettings(model="packaged:all-MiniLM-L6-v2", train_size=4000, epochs=2),
    "smollm2": FineTuneSettings(
        model="packaged:SmolLM2-135M-Instruct", train_size=1600, eval_size=400, epochs=1
    ),
}


def fine_tuned(label: str) -> Path:
    """A real fine-tune of the task's model, trained once and cached."""
    folder = cache_dir() / "bench" / f"{label}-finetuned"
    if (folder / "model.safetensors").is_file():
        return folder
    settings = TASKS[label]
    tokenizer = load_tokenizer(settings)
    train, held_out = load_splits(settings, tokenizer)
    model = new_classifier(settings, tokenizer)
    build_trainer(settings, model, tokenizer, train, held_out, output_dir=folder / "run").train()
    model.save_pretrained(folder)
    return folder


def write_version_1(subnetwork: KENSubnetwork, path: Path) -> None:
    """The version 1 layout: kept values as they are, positions as a bitmask or an index
    list (the smaller), whole tensors raw; readable by ken-hf's version 1 reader."""
    entries = {}
    with SafetensorsWriter(path) as writer:
        for name in sorted([*subnetwork.pruned, *subnetwork.whole]):
            if name in subnetwork.whole:
                tensor = subnetwork.whole[name].contiguous()
                writer.add(f"whole.{name}", tensor)
                entries[name] = {"kind": "whole", "shape": list(tensor.shape),
                                 "dtype": str(tensor.dtype).removeprefix("torch."),
                                 "checksums": [checksum(tensor, list(tensor.shape))]}  # fmt: skip
                continue
            pruned = subnetwork.pruned[name]
            shape, numel = list(pruned.shape), pruned.shape.numel()
            encoding = smaller_encoding(numel, pruned.positions.numel())
            where = pruned.positions.to(index_dtype(numel))
            if encoding == "mask":
                packed = pack_bits(pruned.mask().reshape(-1))
                where = torch.frombuffer(bytearray(packed), dtype=torch.uint8)
            writer.add(f"pruned.{name}.values", pruned.values)
            writer.add(f"pruned.{name}.{encoding}", where)
            entries[name] = {
                "kind": "pruned",
                "shape": shape,
                "count": pruned.positions.numel(),
                "dtype": str(pruned.dtype).removeprefix("torch."),
                "encoding": encoding,
                "delta": [pruned.delta_kept, pruned.delta_reset],
                "checksums": [checksum(pruned.values, shape), checksum(where, shape)],
            }
        document = json.dumps({"tensors": entries, "fingerprints": subnetwork.fingerprints})
        writer.metadata = {"format": FORMAT, "format_version": "1", "ken": document,
                           "digest": xxhash.xxh3_64_hexdigest(document.encode())}  # fmt: skip


def folder_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.iterdir() if p.is_file())


def seconds(action, repeats: int = 3) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        action()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def zstd_bytes(data: bytes, level: int = 3) -> int:
    return len(zstandard.ZstdCompressor(level=level).compress(data))


def byte_grouped_bytes(model: torch.nn.Module) -> int:
    """ZipNN-style, without a base: each tensor's byte planes zstd-compressed."""
    return sum(zstd_bytes(to_planes(t.detach().cpu())) for t in model.state_dict().values())


def load_model(path, dtype: torch.dtype) -> torch.nn.Module:
    return AutoModelForSequenceClassification.from_pretrained(path, num_labels=2, dtype=dtype)


def bench(label: str, dtype: torch.dtype, work: Path) -> dict:
    name = str(dtype).removeprefix("torch.")
    base_path = model_source(TASKS[label])
    tuned_folder = fine_tuned(label)
    base, tuned = load_model(base_path, dtype), load_model(tuned_folder, dtype)
    tuned.config.pad_token_id = base.config.pad_token_id = load_tokenizer(TASKS[label]).pad_token_id
    new = new_parameters(tuned, base_path)
    full_dir = work / f"{label}-{name}-full"
    tuned.save_pretrained(full_dir)
    full = folder_bytes(full_dir)
    full_file = (full_dir / "model.safetensors").read_bytes()
    result = {
        "full_bytes": full,
        "full_zstd_bytes": zstd_bytes(full_file),
        "byte_grouped_zstd_bytes": byte_grouped_bytes(tuned),
        "lora": {},
        "budgets": [],
    }
    for rank in (8, 32):
        lora = get_peft_model(
            load_model(base_path, dtype),
            LoraConfig(
                task_type=TaskType.SEQ_CLS, r=rank, lora_alpha=2 * rank, target_modules="all-linear"
            ),  # fmt: skip
        )
        lora_dir = work / f"{label}-{name}-lora{rank}"
        lora.save_pretrained(lora_dir)
        adapter = (lora_dir / "adapter_model.safetensors").read_bytes()
        result["lora"][f"r{rank}"] = {"bytes": folder_bytes(lora_dir),
                                      "zstd_bytes": zstd_bytes(adapter)}  # fmt: skip
    probe = {"input_ids": torch.tensor([[1, 2, 3, 4, 5, 6, 7, 8]])}
    full_ready = seconds(lambda: load_model(full_dir, dtype)(**probe))
    for budget in BUDGETS:
        config = KENConfig(**budget, base_model_name_or_path=base_path)
        start = time.perf_counter()
        subnetwork = KENSubnetwork.from_weights(
            base, tuned, config, new_tensors=new, progress=False
        )
        selection = time.perf_counter() - start
        tag = "-".join(f"{key}{value}" for key, value in budget.items())
        v2, v1 = work / f"{label}-{name}-{tag}-v2", work / f"{label}-{name}-{tag}-v1"
        save_v2 = seconds(lambda: subnetwork.save_pretrained(v2), repeats=1)  # noqa: B023
        v1.mkdir(exist_ok=True)
        for file in v2.iterdir():
            if file.name not in (SUBNETWORK_NAME, CONFIG_NAME):
                (v1 / file.name).write_bytes(file.read_bytes())
        # A version 1 folder's config names no subnetwork digest (version 1 had none).
        config_values = json.loads((v2 / CONFIG_NAME).read_text())
        (v1 / CONFIG_NAME).write_text(json.dumps({**config_values, "subnetwork_digest": None}))
        save_v1 = seconds(lambda: write_version_1(subnetwork, v1 / SUBNETWORK_NAME), repeats=1)  # noqa: B023
        kept_bytes = sum(p.positions.numel() for p in subnetwork.pruned.values()) * (
            torch.empty((), dtype=dtype).element_size()
        )
        row = {
            **budget,
            "kept_fraction": subnetwork.kept_fraction(),
            "changed_fraction": sum(p.difference.numel() for p in subnetwork.pruned.values())
            / max(1, sum(p.positions.numel() for p in subnetwork.pruned.values())),
            "v1_bytes": (v1 / SUBNETWORK_NAME).stat().st_size,
            "v2_bytes": (v2 / SUBNETWORK_NAME).stat().st_size,
            "v2_folder_bytes": folder_bytes(v2),
            "selection_seconds": selection,
            "save_v1_seconds": save_v1,
            "save_v2_seconds": save_v2,
            "compression_mb_per_s": kept_bytes / save_v2 / 1e6,
            "ready_v1_seconds": seconds(  # load + first forward
                lambda: AutoKENModelForSequenceClassification.from_pretrained(v1)(**probe)  # noqa: B023
            ),
            "ready_v2_seconds": seconds(
                lambda: AutoKENModelForSequenceClassification.from_pretrained(v2)(**probe)  # noqa: B023
            ),
            "ready_full_seconds": full_ready,
        }
        row["v2_of_full"] = row["v2_bytes"] / full
        row["v2_of_v1"] = row["v2_bytes"] / row["v1_bytes"]
        result["budgets"].append(row)
        label_budget = f"k={budget['k']}" if "k" in budget else f"keep {budget['keep_ratio']:.2f}"
        print(
            f"{label:8s} {name:9s} {label_budget:10s} v1 {row['v1_bytes'] / 2**20:7.2f} MiB  "
            f"v2 {row['v2_bytes'] / 2**20:7.2f} MiB ({row['v2_of_full']:6.1%} of full, "
            f"{row['v2_of_v1']:5.1%} of v1)  changed {row['changed_fraction']:.1%}  "
            f"save v1/v2 {save_v1:.2f}/{save_v2:.2f} s ({row['compression_mb_per_s']:.0f} MB/s)  "
            f"ready full/v1/v2 {full_ready:.3f}/{row['ready_v1_seconds']:.3f}/"
            f"{row['ready_v2_seconds']:.3f} s",
            flush=True,
        )
    # Switching between two loaded subnetworks writes only their kept values.
    model = KENModel(load_model(base_path, dtype))
    for ratio in (0.25, 0.5):
        model.load_subnetwork(work / f"{label}-{name}-keep_ratio{ratio}-v2", str(ratio))
    names = iter(["0.25", "0.5"] * 10)
    result["switch_seconds"] = seconds(lambda: model.set_subnetwork(next(names)), repeats=5)
    result["plain_load_seconds"] = seconds(lambda: load_model(full_dir, dtype))
    result["ken_load_seconds"] = seconds(
        lambda: AutoKENModelForSequenceClassification.from_pretrained(
            work / f"{label}-{name}-keep_ratio0.25-v2"
        )
    )
    print(
        f"{label:8s} {name:9s} load: full {result['plain_load_seconds']:.3f} s, KEN (keep 0.25) "
        f"{result['ken_load_seconds']:.3f} s; switch {result['switch_seconds'] * 1000:.0f} ms",
        flush=True,
    )
    print(
        f"{label:8s} {name:9s} full {full / 2**20:.1f} MiB, "
        f"zstd {result['full_zstd_bytes'] / 2**20:.1f} MiB, "
        f"byte-grouped+zstd {result['byte_grouped_zstd_bytes'] / 2**20:.1f} MiB, LoRA "
        + ", ".join(
            f"{r} {v['bytes'] / 2**20:.2f} MiB (zstd {v['zstd_bytes'] / 2**20:.2f})"
            for r, v in result["lora"].items()
        ),
        flush=True,
    )
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--models", nargs="+", default=list(TASKS))
    parser.add_argument("--dtypes", nargs="+", default=["float32", "bfloat16"])
    args = parser.parse_args()
    torch.set_num_threads(1)
    report = {}
    with tempfile.TemporaryDirectory() as scratch:
        for label in args.models:
            for dtype in args.dtypes:
                report[f"{label}-{dtype}"] = bench(label, getattr(torch, dtype), Path(scratch))
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "bench_storage.json").write_text(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
