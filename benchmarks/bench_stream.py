"""Streaming KEN on a checkpoint pair larger than memory likes: `ken prune` and `ken apply`
(peak RSS, wall time, MB/s) against the Python API with both models loaded, and a
projection to a 7B model; with ``--shape 7b``, the 7B model itself.

The pair is synthetic and Llama-shaped (default: vocab 32000, hidden 2048, MLP 8192, 24
layers, untied head: 1.74B parameters, 3.5 GB in bf16 each; ``--shape 7b``: Llama-2-7B's
shape, 6.74B parameters, 13.5 GB each): the base is N(0, 0.02) noise, the fine-tune is the
base plus N(0, 0.001) noise, written once as sharded safetensors under
``$KEN_HF_CACHE/bench-llama`` (or ``bench-llama-7b``; no real model of this size ships in
the packaged assets). With ``--shape 7b`` only ``ken prune`` (one process) and ``ken apply``
run, and the table reports the measured figures instead of a projection.
Each measured run is a fresh process; its peak RSS is its own VmHWM. ``ken prune`` runs
three ways, with the torch threads set for each: one process with one thread, one process
with two threads, and two processes with one thread each under torchrun (``--standalone``,
gloo: the ranks share the tensors, rank 0 writes); for that run the peak RSS is the
largest of the two processes' (their sum is in the JSON) and the time is the slower
process's, start-up included, launcher excluded (in the JSON too). The outputs are compared
byte for byte.

    python benchmarks/bench_stream.py [--k 64] [--shape 7b]

Prints a table and writes benchmarks/results/bench_stream.json (bench_stream_7b.json).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from transformers import LlamaConfig, LlamaForCausalLM

from ken_hf.experiments.assets import cache_dir
from ken_hf.storage.safetensors_io import SafetensorsFile, ShardedWriter
from ken_hf.storage.subnetwork_file import SUBNETWORK_NAME
from ken_hf.utils.atomic_files import FolderWriter

RESULTS = Path(__file__).resolve().parent / "results"
SHAPES = {
    "1.7b": {
        "vocab_size": 32000,
        "hidden_size": 2048,
        "intermediate_size": 8192,
        "num_hidden_layers": 24,
        "num_attention_heads": 16,
        "num_key_value_heads": 16,
        "tie_word_embeddings": False,
    },
    "7b": {  # Llama-2-7B
        "vocab_size": 32000,
        "hidden_size": 4096,
        "intermediate_size": 11008,
        "num_hidden_layers": 32,
        "num_attention_heads": 32,
        "num_key_value_heads": 32,
        "tie_word_embeddings": False,
    },
}
# Llama-2-7B, for the projection from the smaller shape.
SEVEN_B = {"parameters": 6_738_415_616, "largest_tensor_values": 32000 * 4096}

# Runs in a fresh process: the work, then its own peak RSS (VmHWM) and seconds as JSON.
_PROBE = """
import json, resource, sys, time
start = time.perf_counter()
{work}
seconds = time.perf_counter() - start
peak = next(int(l.split()[1]) * 1024 for l in open("/proc/self/status") if l.startswith("VmHWM:"))
usage = resource.getrusage(resource.RUSAGE_SELF)
cpu = usage.ru_utime + usage.ru_stime
print(json.dumps({{"peak_rss": peak, "seconds": seconds, "cpu_seconds": cpu}}))
"""
# What `ken prune` holds before its first tensor: imports, the model class it looks up, the
# selection's kernels warmed up. The projection scales what lies above this.
_IMPORTS_ONLY = (
    "import torch, transformers, ken_hf.cli, ken_hf.making.from_checkpoints; "
    "transformers.LlamaForCausalLM; "
    "from ken_hf.selection import ken_select; ken_select(torch.randn(4, 64), 8)"
)
_CLI = "from ken_hf.cli import main; assert main({args!r}) == 0"
_PYTHON_API = """
from safetensors.torch import load_file
from pathlib import Path
from ken_hf import KENConfig, KENSubnetwork
def load(folder):
    weights = {{}}
    for shard in sorted(Path(folder).glob("model-*.safetensors")):
        weights.update(load_file(str(shard)))
    return weights
base, finetuned = load({base!r}), load({finetuned!r})
subnetwork = KENSubnetwork.from_weights(base, finetuned, KENConfig(k={k}))
subnetwork.save_pretrained({out!r})
"""


def write_pair(folder: Path, shape: dict) -> dict:
    """Write base and fine-tune once (1 GB shards); returns the config's numbers."""
    config = LlamaConfig(**shape, dtype="bfloat16")
    config.architectures = ["LlamaForCausalLM"]
    with torch.device("meta"):
        shapes = {n: p.shape for n, p in LlamaForCausalLM(config).named_parameters()}
    done = folder / "done"
    if not done.exists():
        shutil.rmtree(folder, ignore_errors=True)
        with contextlib.ExitStack() as stack:
            writers = {}
            for kind in ("base", "finetuned"):
                target = stack.enter_context(FolderWriter(folder / kind, commit="config.json"))
                target.write_text("config.json", config.to_json_string())
                writers[kind] = stack.enter_context(ShardedWriter(target, 10**9))
            generator = torch.Generator().manual_seed(0)
            for name, shape in shapes.items():
                base = torch.randn(shape, generator=generator) * 0.02
                change = torch.randn(shape, generator=generator) * 0.001
                writers["base"].add(name, base.to(torch.bfloat16))
                writers["finetuned"].add(name, (base + change).to(torch.bfloat16))
                del base, change
        done.touch()
    parameters = sum(s.numel() for s in shapes.values())
    return {
        "parameters": parameters,
        "bytes_each": parameters * 2,
        "largest_tensor_values": max(s.numel() for s in shapes.values()),
    }


def measure(work: str, *, threads: int | None = None, processes: int = 1) -> dict:
    """Peak RSS and seconds of ``work`` in a fresh process (``threads``: its torch threads,
    default the machine's), or in each of ``processes`` started by torchrun: then the
    largest peak, their sum, the slowest process's seconds and the launcher's wall time."""
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)} if threads else None
    probe = _PROBE.format(work=work)
    command = [sys.executable, "-c", probe]
    if processes > 1:
        script = Path(tempfile.mkdtemp()) / "probe.py"
        script.write_text(probe)
        command = [sys.executable, "-m", "torch.distributed.run", "--standalone",
                   "--nproc_per_node", str(processes), str(script)]  # fmt: skip
    load = os.getloadavg()[0]  # other jobs on the machine, if any, before the run
    start = time.perf_counter()
    out = subprocess.run(command, capture_output=True, text=True, env=env)
    wall = time.perf_counter() - start
    if out.returncode:
        raise RuntimeError(out.stderr[-3000:])
    reports = [json.loads(line) for line in out.stdout.splitlines() if line.startswith("{")]
    if processes == 1:
        return {**reports[-1], "threads": threads, "load_before": load}
    return {
        "peak_rss": max(r["peak_rss"] for r in reports),
        "peak_rss_sum": sum(r["peak_rss"] for r in reports),
        "seconds": max(r["seconds"] for r in reports),
        "cpu_seconds": sum(r["cpu_seconds"] for r in reports),
        "cpu_seconds_per_process": sorted(r["cpu_seconds"] for r in reports),
        "load_before": load,
        "launcher_seconds": wall,
        "processes": processes,
        "threads": threads,
    }


def compare_folders(first: Path, second: Path) -> dict:
    """Which files of two subnetwork folders are byte-identical, and whether their
    subnetwork files store the same arrays (header statistics aside)."""
    names = sorted(p.name for p in first.iterdir())
    same = [n for n in names if (first / n).read_bytes() == (second / n).read_bytes()]
    files = [SafetensorsFile(folder / SUBNETWORK_NAME) for folder in (first, second)]
    arrays = files[0].names == files[1].names and all(
        torch.equal(files[0].read(n), files[1].read(n)) for n in files[0].names
    )
    return {"identical_files": same, "differing_files": sorted(set(names) - set(same)),
            "same_arrays": arrays}  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--k", type=int, default=64, help="values kept per row (default 64)")
    parser.add_argument("--skip-python-api", action="store_true")
    parser.add_argument("--shape", choices=sorted(SHAPES), default="1.7b",
                        help="1.7b (default; projected to 7B) or 7b (measured)")  # fmt: skip
    args = parser.parse_args()
    seven_b = args.shape == "7b"
    folder = cache_dir() / ("bench-llama-7b" if seven_b else "bench-llama")
    start = time.perf_counter()
    pair = write_pair(folder, SHAPES[args.shape])
    print(f"pair ready ({time.perf_counter() - start:.0f} s): {pair}")
    work = folder / "runs"
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir()
    base, finetuned = str(folder / "base"), str(folder / "finetuned")
    runs = {"start-up only": measure(_IMPORTS_ONLY)}
    prune = ["prune", "--base", base, "--finetuned", finetuned, "--k", str(args.k), "--out"]
    # The same 2 cores three ways: the fair comparison is 1 x 2 threads against 2 x 1.
    ways = {
        "ken prune": ("ken", 1, 1),
        "ken prune, 1 process x 2 threads": ("ken-1x2", 1, 2),
        "ken prune, 2 processes x 1 thread (torchrun)": ("ken-2x1", 2, 1),
    }
    if seven_b:  # the measurement at scale: one way, then ken apply
        ways = {"ken prune": ("ken", 1, None)}
    for name, (folder, processes, threads) in ways.items():
        runs[name] = measure(
            _CLI.format(args=[*prune, str(work / folder)]), threads=threads, processes=processes
        )
    comparisons = {
        f"{first} vs {second}": compare_folders(work / first, work / second)
        for first, second in (("ken", "ken-2x1"), ("ken", "ken-1x2"))
        if not seven_b
    }
    runs["ken apply"] = measure(
        _CLI.format(
            args=[
                "apply",
                "--base",
                base,
                "--ken",
                str(work / "ken"),
                "--out",
                str(work / "merged"),
            ]
        )  # fmt: skip
    )
    if not (args.skip_python_api or seven_b):  # both 7B models loaded do not fit 24 GB
        runs["Python API, both loaded"] = measure(
            _PYTHON_API.format(base=base, finetuned=finetuned, k=args.k, out=str(work / "api"))
        )
    largest = pair["largest_tensor_values"] * 2
    bound = 2 * largest + 2**30
    baseline = runs["start-up only"]["peak_rss"]
    per_second = pair["parameters"] / runs["ken prune"]["seconds"]
    seven_b_largest = SEVEN_B["largest_tensor_values"] * 2
    projection = {
        "prune_seconds": SEVEN_B["parameters"] / per_second,
        "prune_peak_rss": baseline
        + (runs["ken prune"]["peak_rss"] - baseline) * seven_b_largest / largest,
        "bound": 2 * seven_b_largest + 2**30,
    }
    if seven_b:
        projection = None
    for run in runs.values():
        run["mb_per_second"] = 2 * pair["bytes_each"] / 1e6 / run["seconds"]
    results = {
        "machine": {
            "cpus": torch.get_num_threads(),
            "cores": os.cpu_count(),
            "platform": platform.platform(),
        },
        "k": args.k,
        "pair": pair,
        "bound_bytes": bound,
        "runs": runs,
        "same_output": comparisons,
        "projection_7b": projection,
    }
    RESULTS.mkdir(exist_ok=True)
    name = "bench_stream_7b.json" if seven_b else "bench_stream.json"
    (RESULTS / name).write_text(json.dumps(results, indent=2) + "\n")
    print(f"\n{pair['parameters'] / 1e9:.2f}B parameters, {pair['bytes_each'] / 2**30:.2f} GiB "
          f"per checkpoint (bf16), k={args.k}; bound 2 x largest tensor + 1 GiB = "
          f"{bound / 2**30:.2f} GiB")  # fmt: skip
    print("| run | peak RSS (largest process) | wall time | CPU time | MB/s (both checkpoints) |")
    print("|---|---|---|---|---|")
    for name, run in runs.items():
        print(f"| {name} | {run['peak_rss'] / 2**30:.2f} GiB | {run['seconds']:.0f} s "
              f"| {run['cpu_seconds']:.0f} s | {run['mb_per_second']:.0f} |")  # fmt: skip
    for pair_name, result in comparisons.items():
        print(f"{pair_name}: identical {result['identical_files']}, differing "
              f"{result['differing_files']}, same arrays: {result['same_arrays']}")  # fmt: skip
    if seven_b:
        return
    print(f"\nprojection to 7B ({SEVEN_B['parameters'] / 1e9:.2f}B, bf16): ken prune "
          f"{projection['prune_seconds'] / 60:.0f} min, peak RSS "
          f"{projection['prune_peak_rss'] / 2**30:.2f} GiB (bound "
          f"{projection['bound'] / 2**30:.2f} GiB)")  # fmt: skip


if __name__ == "__main__":
    main()
