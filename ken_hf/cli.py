"""The ``ken`` command line: thin wrappers over the library's functions."""

from __future__ import annotations

import argparse
import sys


def _demo(args: argparse.Namespace) -> int:
    from .demo import DemoSettings, run_demo

    settings = DemoSettings(
        model=args.model,
        dataset=args.dataset,
        train_size=args.train_size,
        eval_size=args.eval_size,
        epochs=args.epochs,
        keep_ratio=args.keep_ratio,
        seed=args.seed,
        output_dir=args.output_dir,
    )
    run_demo(settings)
    return 0


def _viz(args: argparse.Namespace) -> int:
    from .viz import write_report

    report = write_report(args.path, args.out, tensors=args.tensor or None)
    print(f"KENviz report: {report}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    from .demo import PACKAGED_DATASET, DemoSettings

    defaults = DemoSettings()
    parser = argparse.ArgumentParser(prog="ken", description="KEN pruning for Hugging Face models")
    commands = parser.add_subparsers(dest="command", required=True)
    demo = commands.add_parser(
        "demo",
        help="fine-tune with KENCallback on real data, report, reload",
        description="Fine-tune a model with KENCallback, print what KEN kept and cost, and "
        "reload the saved subnetwork. Defaults: the packaged all-MiniLM-L6-v2 on the packaged "
        "Rotten Tomatoes snippets, offline.",
    )
    demo.add_argument("--model", default=None, help="Hub id or folder (default: packaged MiniLM)")
    demo.add_argument(
        "--dataset",
        default=PACKAGED_DATASET,
        help=f"Hub id or folder with text/label columns (default: {PACKAGED_DATASET})",
    )
    demo.add_argument("--train-size", type=int, default=defaults.train_size)
    demo.add_argument("--eval-size", type=int, default=defaults.eval_size)
    demo.add_argument("--epochs", type=float, default=defaults.epochs)
    demo.add_argument("--keep-ratio", type=float, default=defaults.keep_ratio)
    demo.add_argument("--seed", type=int, default=defaults.seed)
    demo.add_argument("--output-dir", default=defaults.output_dir)
    demo.set_defaults(run=_demo)

    viz = commands.add_parser(
        "viz",
        help="pictures of what KEN kept (PNG files and one HTML report)",
        description="Render KENviz views of a saved subnetwork: kept positions, kept "
        "neighbours, the same across layers, and a summary.",
    )
    viz.add_argument("path", help="subnetwork folder or Hub id")
    viz.add_argument(
        "--tensor", action="append", help="pruned tensor to draw (repeatable; default: largest 3)"
    )
    viz.add_argument("--out", default="kenviz", help="output folder (default: kenviz)")
    viz.set_defaults(run=_viz)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return args.run(args)
    except (ValueError, FileNotFoundError) as error:
        print(f"ken {args.command}: error: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
