"""Speed of ken_select against the per-row oracle (the published code's shape), on real rows.

Prints a table and writes benchmarks/results/bench_select.json. Rows come from the real
all-MiniLM-L6-v2 checkpoint: its 384- and 1536-wide rows as they are, and 768-, 3072- and
4096-wide rows made by concatenating consecutive real rows (no packaged model has rows of
those widths). For each width and k, the oracle runs on a few rows and ken_select on a
batch as large as one default chunk of rows (at most 4096) that contains them; the two
must agree on those rows. ken_select is timed twice in the same run: as it runs by default
(on CPU, the compiled kernels of ken_hf/selection/compiled.py) and on its torch path
(``KEN_HF_SELECT_BACKEND=torch``, the path CUDA tensors take), best of ``--repeats``.

Also measured: the one-time cost of the compiled kernels (a fresh process compiling them
into an empty numba cache, then a fresh process loading them from that cache), selection
over every tensor of a BERT-base-shaped model (110M parameters, random init, k=300) on both
paths, and the peak extra memory (RSS) of selecting one 4096x11008 fp32 matrix.

    python benchmarks/bench_select.py [--quick] [--repeats N] [--no-torch-path]
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
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file

from ken_hf import ken_select, ken_select_many
from ken_hf.experiments.assets import minilm_path
from ken_hf.selection.ken import BACKEND_VARIABLE
from ken_hf.selection.rows import DEFAULT_MAX_MEMORY, rows_per_chunk

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from oracle import oracle_select  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
WIDTHS = (384, 768, 1536, 3072, 4096)
FRACTIONS = (0.25, 0.50, 0.75)


def real_rows(weights: dict[str, torch.Tensor], width: int, count: int) -> torch.Tensor:
    """``count`` rows of ``width`` values taken from real MiniLM weights."""
    source = (
        weights["encoder.layer.3.output.dense.weight"]  # [384, 1536]
        if width % 1536 == 0
        else weights["embeddings.word_embeddings.weight"]  # [30522, 384]
    )
    flat = source.flatten()
    needed = count * width
    reps = -(-needed // flat.numel())
    return flat.repeat(reps)[:needed].reshape(count, width).contiguous()


@contextmanager
def backend(name: str):
    """Select CPU rows with one implementation inside the block ("auto": the default)."""
    before = os.environ.get(BACKEND_VARIABLE)
    os.environ[BACKEND_VARIABLE] = name
    try:
        yield
    finally:
        if before is None:
            del os.environ[BACKEND_VARIABLE]
        else:
            os.environ[BACKEND_VARIABLE] = before


def time_oracle(rows: torch.Tensor, k: int) -> tuple[float, np.ndarray]:
    start = time.perf_counter()
    masks = oracle_select(rows.numpy(), k)[0]
    return (time.perf_counter() - start) / rows.shape[0], masks


def time_fast(rows: torch.Tensor, k: int, path: str, repeats: int) -> tuple[float, torch.Tensor]:
    """Best of ``repeats`` seconds per row of ``ken_select`` on ``path``, and its mask."""
    best = float("inf")
    with backend(path):
        for _ in range(repeats):
            start = time.perf_counter()
            mask = ken_select(rows, k)
            best = min(best, time.perf_counter() - start)
    return best / rows.shape[0], mask


def bench_rows(weights, quick: bool, repeats: int, torch_path: bool) -> list[dict]:
    results = []
    for width in WIDTHS:
        # A realistic batch: as many rows as one default chunk holds (at most 4096).
        batch = min(4096, rows_per_chunk(width, DEFAULT_MAX_MEMORY))
        batch //= 8 if quick else 1
        oracle_count = 4 if quick else max(4, min(24, 12_000 // width))
        rows = real_rows(weights, width, batch)
        ks = [round(fraction * width) for fraction in FRACTIONS]
        if width == 768:
            ks.append(300)  # the published code's reference point: ~10 ms per row
        for k in ks:
            fast_per_row, mask = time_fast(rows, k, "auto", repeats)
            oracle_per_row, expected = time_oracle(rows[:oracle_count], k)
            identical = bool((mask[:oracle_count].numpy() == expected).all())
            r = {
                "width": width,
                "k": k,
                "fraction": k / width,
                "batch_rows": batch,
                "oracle_rows": oracle_count,
                "ken_select_us_per_row": fast_per_row * 1e6,
                "oracle_us_per_row": oracle_per_row * 1e6,
                "speedup": oracle_per_row / fast_per_row,
                "identical": identical,
            }
            if torch_path:
                torch_per_row, torch_mask = time_fast(rows, k, "torch", repeats)
                r["torch_path_us_per_row"] = torch_per_row * 1e6
                r["torch_path_speedup"] = oracle_per_row / torch_per_row
                r["torch_path_identical"] = bool(torch.equal(torch_mask, mask))
            results.append(r)
            torch_columns = (
                f"{r['torch_path_us_per_row']:12.1f} {r['torch_path_speedup']:8.1f}x "
                f"{str(r['torch_path_identical']):>9s}"
                if torch_path
                else ""
            )
            print(
                f"{width:6d} {k:6d} {r['ken_select_us_per_row']:12.1f} "
                f"{r['oracle_us_per_row']:12.1f} {r['speedup']:8.1f}x {str(identical):>9s} "
                + torch_columns,
                flush=True,
            )
    return results


# A fresh process: the first ken_select (imports numba, compiles or loads the kernels) and
# the second one, on the same rows.
_FIRST_CALL_PROBE = """
import time, torch
start = time.perf_counter()
from ken_hf import ken_select
imported = time.perf_counter() - start
rows = torch.randn(64, 768)
times = []
for _ in range(2):
    start = time.perf_counter()
    ken_select(rows, 300)
    times.append(time.perf_counter() - start)
print(imported, times[0], times[1])
"""


def bench_first_call() -> dict:
    """One-time cost of the compiled kernels, each step in a fresh process: compiling them
    into an empty numba cache, then loading them from that cache."""
    result = {}
    with tempfile.TemporaryDirectory() as cache:
        env = dict(os.environ, NUMBA_CACHE_DIR=cache)
        env.pop(BACKEND_VARIABLE, None)
        for step in ("compile", "cached"):
            out = subprocess.run(
                [sys.executable, "-c", _FIRST_CALL_PROBE],
                capture_output=True,
                text=True,
                check=True,
                env=env,
            ).stdout.split()
            imported, first, second = (float(v) for v in out)
            result[step] = {
                "import_seconds": imported,
                "first_call_seconds": first,
                "second_call_seconds": second,
                "one_time_seconds": first - second,
            }
    return result


def bench_bert_base(k: int, path: str) -> dict:
    from transformers import BertConfig, BertModel

    torch.manual_seed(0)
    model = BertModel(BertConfig())  # bert-base shape: 12 layers, hidden 768, 110M parameters
    weights = {name: p.detach() for name, p in model.named_parameters()}
    params = sum(w.numel() for w in weights.values())
    with backend(path):
        start = time.perf_counter()
        masks = ken_select_many(weights, k)
        seconds = time.perf_counter() - start
    kept = sum(int(m.sum()) for m in masks.values())
    return {
        "path": path,
        "parameters": params,
        "k": k,
        "seconds": seconds,
        "kept_fraction": kept / params,
        "masks": masks,
    }


# Peak resident memory from /proc (VmHWM): getrusage's ru_maxrss would carry the parent's
# peak across fork and exec, hiding the child's own.
_MEMORY_PROBE = """
import sys, time, torch
from ken_hf import ken_select

def high_water_mark():
    for line in open("/proc/self/status"):
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024

# Load the selection's code first (numba, compiled kernels): a one-time cost, reported apart.
before_warm_up = high_water_mark()
ken_select(torch.randn(4, 64), 8)
warm_up = high_water_mark() - before_warm_up
weight = torch.empty(4096, 11008).normal_(0, 0.02)  # no temporary: the peak so far is this
base = high_water_mark()
start = time.perf_counter()
mask = ken_select(weight, int(sys.argv[1]))
seconds = time.perf_counter() - start
print(high_water_mark() - base, seconds, warm_up)
"""


def bench_memory(k: int) -> dict:
    """Peak RSS growth while selecting a 4096x11008 fp32 matrix, in a fresh process.

    The growth includes the 43 MiB bool mask that ken_select returns; the growth from loading
    the selection's code (a small selection first) is reported apart."""
    out = subprocess.run(
        [sys.executable, "-c", _MEMORY_PROBE, str(k)], capture_output=True, text=True, check=True
    ).stdout.split()
    return {
        "shape": [4096, 11008],
        "k": k,
        "matrix_bytes": 4096 * 11008 * 4,
        "output_mask_bytes": 4096 * 11008,
        "peak_extra_bytes": int(out[0]),
        "seconds": float(out[1]),
        "code_load_bytes": int(out[2]),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="fewer rows (a smoke run)")
    parser.add_argument("--repeats", type=int, default=3, help="ken_select timings: best of N")
    parser.add_argument(
        "--no-torch-path", action="store_true", help="skip the torch path's timings"
    )
    args = parser.parse_args()
    torch_path = not args.no_torch_path
    weights = load_file(str(minilm_path() / "model.safetensors"))
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {platform.processor()}")
    first_call = bench_first_call()
    for step, label in (("compile", "empty numba cache"), ("cached", "kernels cached")):
        r = first_call[step]
        print(
            f"first ken_select in a fresh process, {label}: {r['first_call_seconds']:.2f} s "
            f"(second call {r['second_call_seconds'] * 1e3:.0f} ms; import ken_hf "
            f"{r['import_seconds']:.2f} s)"
        )
    ken_select(real_rows(weights, 384, 4), 96)  # this process: load the kernels once
    header = ("width", "k", "ken us/row", "oracle us/row", "speedup", "identical")
    if torch_path:
        header += ("torch us/row", "speedup", "identical")
    print(
        (
            "{:>6s} {:>6s} {:>12s} {:>12s} {:>9s} {:>9s}" + " {:>12s} {:>9s} {:>9s}" * torch_path
        ).format(*header)
    )
    rows = bench_rows(weights, args.quick, args.repeats, torch_path)
    bert = [bench_bert_base(300, "auto")]
    if torch_path:
        bert.append(bench_bert_base(300, "torch"))
        same = all(torch.equal(bert[0]["masks"][n], bert[1]["masks"][n]) for n in bert[0]["masks"])
        for b in bert:
            b["identical_paths"] = same
    for b in bert:
        del b["masks"]
        print(
            f"BERT-base shape ({b['parameters'] / 1e6:.1f}M parameters, k=300), "
            f"{'default' if b['path'] == 'auto' else b['path'] + ' path'}: {b['seconds']:.1f} s"
            + (f" (masks identical on both paths: {b['identical_paths']})" if torch_path else "")
        )
    memory = bench_memory(300)
    print(
        f"4096x11008 fp32 (k=300): peak extra memory {memory['peak_extra_bytes'] / 2**20:.0f} MiB "
        f"(matrix {memory['matrix_bytes'] / 2**20:.0f} MiB), {memory['seconds']:.1f} s; "
        f"loading the selection's code first: {memory['code_load_bytes'] / 2**20:.0f} MiB"
    )
    RESULTS.mkdir(exist_ok=True)
    report = {
        "device": "cpu",
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "repeats": args.repeats,
        "first_call": first_call,
        "rows": rows,
        "bert_base": bert[0],
        "bert_base_torch_path": bert[1] if torch_path else None,
        "memory": memory,
    }
    (RESULTS / "bench_select.json").write_text(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
