"""The ``ken`` command line."""

from __future__ import annotations

import argparse
import sys
import time
from collections import defaultdict


def _family(name: str) -> str:
    """Tensor family of a parameter name: its name without layer numbers."""
    return ".".join(part for part in name.split(".") if not part.isdigit())


def demo(args: argparse.Namespace) -> int:
    """KEN selection over every tensor of the real all-MiniLM-L6-v2 checkpoint."""
    from safetensors.torch import load_file

    from .assets import minilm_path
    from .selection import ken_select_many

    weights = {
        name: weight
        for name, weight in load_file(str(minilm_path() / "model.safetensors")).items()
        if weight.is_floating_point()  # skips the position_ids buffer
    }
    values = sum(w.numel() for w in weights.values())
    print(f"all-MiniLM-L6-v2: {len(weights)} tensors, {values:,} values, k={args.k}")
    families: dict[str, dict[str, object]] = defaultdict(dict)
    for name, weight in weights.items():
        families[_family(name)][name] = weight
    print(f"{'tensor family':58s} {'values':>11s} {'kept':>7s} {'seconds':>8s}")
    total_kept = total = 0
    total_time = 0.0
    for family, tensors in families.items():
        start = time.perf_counter()
        masks = ken_select_many(tensors, args.k, progress=args.progress)
        elapsed = time.perf_counter() - start
        kept = sum(int(m.sum()) for m in masks.values())
        count = sum(m.numel() for m in masks.values())
        total_kept, total, total_time = total_kept + kept, total + count, total_time + elapsed
        print(f"{family:58s} {count:11,d} {kept / count:7.1%} {elapsed:8.2f}")
    print(f"{'all':58s} {total:11,d} {total_kept / total:7.1%} {total_time:8.2f}")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="ken", description="KEN pruning for Hugging Face models")
    commands = parser.add_subparsers(dest="command", required=True)
    demo_parser = commands.add_parser("demo", help="run KEN on the packaged all-MiniLM-L6-v2")
    demo_parser.add_argument("--k", type=int, default=96, help="values kept per row")
    demo_parser.add_argument("--progress", action="store_true", help="show progress bars")
    demo_parser.set_defaults(run=demo)
    args = parser.parse_args(argv)
    return args.run(args)


if __name__ == "__main__":
    sys.exit(main())
