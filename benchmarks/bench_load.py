"""Loading a KEN subnetwork against a plain ``from_pretrained``, and switching subnetworks.

For each model and dtype (the fine-tunes of ``bench_storage.py``, cached under
~/.cache/ken-hf/bench): subnetworks at keep 25 %, 50 % and 100 % are selected and saved in
format version 2 and, for 25 % and 100 %, in version 1 too; the merged model (base +
keep 25 %) is saved as a plain transformers checkpoint. Timed, each the median (and min)
of ``--repeats`` runs after one warm-up, files in the page cache, one torch thread:

- plain: ``AutoModelForSequenceClassification.from_pretrained(merged)`` + first forward;
- KEN v2 / v1: ``AutoKENModelForSequenceClassification.from_pretrained(subnetwork)`` +
  first forward (the base loaded, checked against the fingerprints, the subnetwork written);
- switch: ``KENModel.set_subnetwork`` between two loaded subnetworks (keep 25 % <-> 50 %).

Ratios: load = KEN v2 keep 25 % / plain; switch = switch / KEN v2 keep 25 % reload.
Where a KEN load's time goes, each step timed the same way and given as a ratio to plain:
the base's ``from_pretrained`` + first forward; the same wrapped in ``KENModel`` (the
mapped weights copied, every tensor fingerprinted); that and the subnetwork file opened
(``KENSubnetwork.from_pretrained``: the folder's files read, the header checked).
Prints a table and writes benchmarks/results/bench_load.json.

    python benchmarks/bench_load.py [--models minilm smollm2] [--dtypes float32 bfloat16]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_storage import TASKS, fine_tuned, load_model, write_version_1  # noqa: E402

from ken_hf import (  # noqa: E402
    AutoKENModelForSequenceClassification,
    KENConfig,
    KENModel,
    KENSubnetwork,
)
from ken_hf.config import CONFIG_NAME  # noqa: E402
from ken_hf.experiments.finetune import load_tokenizer, model_source  # noqa: E402
from ken_hf.storage.checkpoints import new_parameters  # noqa: E402
from ken_hf.storage.subnetwork_file import SUBNETWORK_NAME  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
KEEP = (0.25, 0.5, 1.0)
VERSION_1 = (0.25, 1.0)
PROBE = {"input_ids": torch.tensor([[1, 2, 3, 4, 5, 6, 7, 8]])}


def timed(action, repeats: int) -> dict[str, float]:
    """Median and min seconds of ``repeats`` runs of ``action``, after one warm-up run."""
    action()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        action()
        times.append(time.perf_counter() - start)
    return {"median": statistics.median(times), "min": min(times)}


def prepare(label: str, dtype: torch.dtype, work: Path) -> dict[str, Path]:
    """Save the subnetworks (v2 at every ``KEEP``, v1 at ``VERSION_1``) and the merged
    model (keep 25 %); returns their folders by name."""
    base_path = model_source(TASKS[label])
    base, tuned = load_model(base_path, dtype), load_model(fine_tuned(label), dtype)
    tuned.config.pad_token_id = base.config.pad_token_id = load_tokenizer(TASKS[label]).pad_token_id
    new = new_parameters(tuned, base_path)
    folders = {}
    for keep in KEEP:
        config = KENConfig(keep_ratio=keep, base_model_name_or_path=base_path)
        subnetwork = KENSubnetwork.from_weights(
            base, tuned, config, new_tensors=new, progress=False
        )
        v2 = folders[f"v2-{keep}"] = work / f"{label}-{dtype}-keep{keep}-v2"
        subnetwork.save_pretrained(v2)
        if keep in VERSION_1:
            v1 = folders[f"v1-{keep}"] = work / f"{label}-{dtype}-keep{keep}-v1"
            v1.mkdir()
            for file in v2.iterdir():
                if file.name not in (SUBNETWORK_NAME, CONFIG_NAME):
                    (v1 / file.name).write_bytes(file.read_bytes())
            # A version 1 folder's config names no subnetwork digest (version 1 had none).
            values = json.loads((v2 / CONFIG_NAME).read_text())
            (v1 / CONFIG_NAME).write_text(json.dumps({**values, "subnetwork_digest": None}))
            write_version_1(subnetwork, v1 / SUBNETWORK_NAME)
    merged = AutoKENModelForSequenceClassification.from_pretrained(folders["v2-0.25"])
    folders["merged"] = work / f"{label}-{dtype}-merged"
    merged.merge_and_unload().save_pretrained(folders["merged"])
    return folders


def bench(label: str, dtype: torch.dtype, work: Path, repeats: int) -> dict:
    folders = prepare(label, dtype, work)
    result = {
        "plain": timed(lambda: load_model(folders["merged"], dtype)(**PROBE), repeats),
        "plain_load_only": timed(lambda: load_model(folders["merged"], dtype), repeats),
    }
    for key in [f"v2-{keep}" for keep in KEEP] + [f"v1-{keep}" for keep in VERSION_1]:
        result[key] = timed(
            lambda key=key: AutoKENModelForSequenceClassification.from_pretrained(folders[key])(
                **PROBE
            ),
            repeats,
        )
    base_path = model_source(TASKS[label])
    result["steps"] = {
        "base + forward": timed(lambda: load_model(base_path, dtype)(**PROBE), repeats),
        "base in KENModel + forward": timed(
            lambda: KENModel(load_model(base_path, dtype))(**PROBE), repeats
        ),
        "base in KENModel, subnetwork opened": timed(
            lambda: (
                KENModel(load_model(base_path, dtype)),
                KENSubnetwork.from_pretrained(folders["v2-0.25"]),
            ),
            repeats,
        ),
    }
    model = KENModel(load_model(base_path, dtype))
    for keep in (0.25, 0.5):
        model.load_subnetwork(folders[f"v2-{keep}"], str(keep))
    names = iter(["0.25", "0.5"] * (repeats + 1))
    result["switch"] = timed(lambda: model.set_subnetwork(next(names)), 2 * repeats - 1)
    plain = result["plain"]["median"]
    result["load_ratio"] = result["v2-0.25"]["median"] / plain
    result["switch_ratio"] = result["switch"]["median"] / result["v2-0.25"]["median"]
    result["v2_of_v1"] = {
        str(keep): result[f"v2-{keep}"]["median"] / result[f"v1-{keep}"]["median"]
        for keep in VERSION_1
    }
    print(
        f"{label:8s} {str(dtype):15s} plain {result['plain']['median']:.3f} s  "
        f"KEN v2 25% {result['v2-0.25']['median']:.3f} s ({result['load_ratio']:.2f}x)  "
        f"v1 25% {result['v1-0.25']['median']:.3f} s  "
        f"v2/v1 100% {result['v2-1.0']['median']:.3f}/{result['v1-1.0']['median']:.3f} s  "
        f"switch {result['switch']['median'] * 1000:.0f} ms ({result['switch_ratio']:.2f}x)",
        flush=True,
    )
    for step, times in result["steps"].items():
        print(f"    {step}: {times['median']:.3f} s ({times['median'] / plain:.2f}x plain)")
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--models", nargs="+", default=list(TASKS))
    parser.add_argument("--dtypes", nargs="+", default=["float32", "bfloat16"])
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--output", type=Path, default=RESULTS / "bench_load.json")
    args = parser.parse_args()
    torch.set_num_threads(1)
    report = {}
    with tempfile.TemporaryDirectory() as scratch:
        for label in args.models:
            for dtype in args.dtypes:
                report[f"{label}-{dtype}"] = bench(
                    label, getattr(torch, dtype), Path(scratch), args.repeats
                )
    args.output.parent.mkdir(exist_ok=True)
    args.output.write_text(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
