"""The ``ken`` command line: thin wrappers over the library's functions."""

from __future__ import annotations

import argparse
import sys


def _finetune_arguments(parser: argparse.ArgumentParser, defaults) -> None:
    """The arguments every training command shares (``defaults``: a FineTuneSettings)."""
    from .finetune import PACKAGED_DATASET, PACKAGED_MODELS

    parser.add_argument(
        "--model",
        default=defaults.model,
        help=f"Hub id or folder, or one of {', '.join(PACKAGED_MODELS)} "
        "(default: packaged all-MiniLM-L6-v2)",
    )
    parser.add_argument(
        "--dataset",
        default=defaults.dataset,
        help=f"Hub id or folder with text/label columns (default: {PACKAGED_DATASET}, packaged)",
    )
    parser.add_argument(
        "--metric", default=defaults.metric, help="evaluate metric name or Hub id (accuracy)"
    )
    parser.add_argument("--train-size", type=int, default=defaults.train_size)
    parser.add_argument("--eval-size", type=int, default=defaults.eval_size)
    parser.add_argument("--epochs", type=float, default=defaults.epochs)
    parser.add_argument("--learning-rate", type=float, default=defaults.learning_rate)
    parser.add_argument("--batch-size", type=int, default=defaults.batch_size)
    parser.add_argument("--max-length", type=int, default=defaults.max_length)
    parser.add_argument("--output-dir", default=defaults.output_dir)


def _finetune_fields(args: argparse.Namespace) -> dict:
    return {
        "model": args.model,
        "dataset": args.dataset,
        "metric": args.metric,
        "train_size": args.train_size,
        "eval_size": args.eval_size,
        "epochs": args.epochs,
        "learning_rate": args.learning_rate,
        "batch_size": args.batch_size,
        "max_length": args.max_length,
        "output_dir": args.output_dir,
    }


def _demo(args: argparse.Namespace) -> int:
    from .demo import DemoSettings, run_demo

    run_demo(DemoSettings(**_finetune_fields(args), keep_ratio=args.keep_ratio, seed=args.seed))
    return 0


def _compare(args: argparse.Namespace) -> int:
    from .compare import CompareSettings, run_comparison
    from .finetune import FineTuneSettings

    settings = CompareSettings(
        task=FineTuneSettings(**_finetune_fields(args)),
        seeds=tuple(args.seeds),
        keep_ratios=tuple(args.keep_ratios),
        paper_k=args.paper_k or None,
        rules=tuple(args.rules),
        lora_ranks=tuple(args.lora_ranks),
        lora_learning_rate=args.lora_learning_rate,
    )
    results = run_comparison(settings)
    from .compare import markdown_table

    print("\n" + markdown_table(results))
    print(f"results: {settings.task.output_dir}/results.{{json,md,png}}")
    return 0


def _viz(args: argparse.Namespace) -> int:
    from .viz import write_report

    report = write_report(args.path, args.out, tensors=args.tensor or None)
    print(f"KENviz report: {report}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    from .demo import DemoSettings

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
    _finetune_arguments(demo, defaults)
    demo.add_argument("--keep-ratio", type=float, default=defaults.keep_ratio)
    demo.add_argument("--seed", type=int, default=defaults.seed)
    demo.set_defaults(run=_demo)

    from .compare import CompareSettings
    from .selection import RULES

    compared = CompareSettings()
    compare = commands.add_parser(
        "compare",
        help="KEN against LoRA and sparse baselines on one task and budget",
        description="Full fine-tune, KEN and sparse baselines (largest change, random, KEN on "
        "the change) at several k, and LoRA at several ranks, over several seeds; writes "
        "results.json, results.md and results.png into --output-dir.",
    )
    _finetune_arguments(compare, compared.task)
    compare.add_argument("--seeds", type=int, nargs="+", default=list(compared.seeds))
    compare.add_argument("--keep-ratios", type=float, nargs="+", default=list(compared.keep_ratios))
    compare.add_argument(
        "--paper-k",
        type=int,
        default=compared.paper_k,
        help=f"an absolute k per row as well (default {compared.paper_k}; 0 for none)",
    )
    compare.add_argument(
        "--rules", nargs="+", choices=RULES, default=list(compared.rules), help="sparse rules"
    )
    compare.add_argument("--lora-ranks", type=int, nargs="+", default=list(compared.lora_ranks))
    compare.add_argument("--lora-learning-rate", type=float, default=compared.lora_learning_rate)
    compare.set_defaults(run=_compare)

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
