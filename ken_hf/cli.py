"""The ``ken`` command line: thin wrappers over the library's functions.

Every input the user can get wrong (an argument, a file, a folder, a Hub id) ends with one
line ``ken <command>: error: ...`` on stderr and exit code 2, never a traceback: ken-hf
refuses such inputs with a ``KENError``, and the file system and the Hub fail with an
``OSError``. Any other exception is a bug in ken-hf and keeps its traceback. Arguments are
checked while they are parsed, before anything is read or written.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
from typing import NoReturn

from .errors import KENError, MissingExtraError

# What the library raises for inputs it cannot use: KENError (files, folders, settings),
# OSError (missing files, Hub ids that do not resolve: huggingface_hub's errors are OSErrors).
USER_ERRORS = (KENError, OSError)
MAX_MESSAGE = 400  # characters of an error line; third-party messages can run long


class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Help that shows every option's default: ``(default: X)`` after its help, unless the
    help says it already (a default the option's value cannot show, such as the packaged
    model) or there is none to show (a flag, or an option that is off unless given)."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if "default" in text or action.default in (None, argparse.SUPPRESS) or action.nargs == 0:
            return text
        return super()._get_help_string(action)


class _Parser(argparse.ArgumentParser):
    """An argument parser whose errors are one line, like every other error of ``ken``, and
    whose help shows each option's default (every subcommand's parser is one too)."""

    def __init__(self, *args, **kwargs) -> None:
        kwargs.setdefault("formatter_class", _HelpFormatter)
        super().__init__(*args, **kwargs)

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def _positive_int(text: str) -> int:
    """An integer of at least 1 (argparse type)."""
    value = _number(int, text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text!r}")
    return value


def _non_negative_int(text: str) -> int:
    """An integer of at least 0 (argparse type)."""
    value = _number(int, text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be 0 or more, got {text!r}")
    return value


def _positive_float(text: str) -> float:
    """A number above 0 (argparse type)."""
    value = _number(float, text)
    if not value > 0:
        raise argparse.ArgumentTypeError(f"must be positive, got {text!r}")
    return value


def _compression_level(text: str) -> int:
    """A zstd level, 1 to 22 (argparse type)."""
    value = _number(int, text)
    if not 1 <= value <= 22:
        raise argparse.ArgumentTypeError(f"must be a zstd level from 1 to 22, got {text!r}")
    return value


def _ratio(text: str) -> float:
    """A share in (0, 1] (argparse type)."""
    value = _number(float, text)
    if not 0 < value <= 1:
        raise argparse.ArgumentTypeError(f"must be in (0, 1], got {text!r}")
    return value


def _number(kind: type[int] | type[float], text: str) -> int | float:
    """``text`` read as ``kind``, or the argparse error saying it is not a number."""
    try:
        return kind(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None


def _subfolder(text: str) -> str:
    """A relative path inside a folder or Hub repository (argparse type)."""
    parts = text.replace("\\", "/").split("/")
    if text.startswith(("/", "\\")) or ".." in parts:
        raise argparse.ArgumentTypeError(
            f"{text!r} must be a relative path inside the folder or repository (no leading "
            "'/', no '..')"
        )
    return text


_SIZE_UNITS = {"KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "KB": 10**3, "MB": 10**6, "GB": 10**9}


def _size(text: str) -> int:
    """``"5GB"``, ``"500MB"``, ``"1GiB"`` or a plain number of bytes."""
    upper = text.strip().upper()
    unit = next((u for u in _SIZE_UNITS if upper.endswith(u)), None)
    number = upper.removesuffix(unit) if unit else upper.removesuffix("B")
    try:
        value = int(float(number) * (_SIZE_UNITS[unit] if unit else 1))
    except (ValueError, OverflowError):
        raise argparse.ArgumentTypeError(
            f"cannot read {text!r} as a size (e.g. 5GB, 500MB, 1GiB)"
        ) from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be positive, got {text!r}")
    return value


def _device(text: str) -> str:
    """A device the selection can run on: ``cpu``, or ``cuda[:i]`` when torch sees it."""
    import torch

    try:
        device = torch.device(text)
    except RuntimeError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a device (cpu or cuda)") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise argparse.ArgumentTypeError(
                f"{text!r} requested, but torch.cuda.is_available() is False"
            )
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise argparse.ArgumentTypeError(
                f"{text!r}: torch sees {torch.cuda.device_count()} CUDA device(s)"
            )
    elif device.type != "cpu":
        raise argparse.ArgumentTypeError(f"{text!r}: the selection runs on cpu or cuda")
    return text


def _finetune_arguments(parser: argparse.ArgumentParser, defaults) -> None:
    """The arguments every training command shares (``defaults``: a FineTuneSettings)."""
    from .experiments.run_settings import PACKAGED_DATASET, PACKAGED_MODELS

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
    parser.add_argument("--metric", default=defaults.metric, help="evaluate metric name or Hub id")
    parser.add_argument(
        "--train-size",
        type=_positive_int,
        default=defaults.train_size,
        help="training examples (at most the data set's)",
    )
    parser.add_argument(
        "--eval-size",
        type=_positive_int,
        default=defaults.eval_size,
        help="held-out examples evaluated before and after KEN",
    )
    parser.add_argument(
        "--epochs", type=_positive_float, default=defaults.epochs, help="training epochs"
    )
    parser.add_argument(
        "--learning-rate",
        type=_positive_float,
        default=defaults.learning_rate,
        help="learning rate of the full fine-tune",
    )
    parser.add_argument(
        "--batch-size",
        type=_positive_int,
        default=defaults.batch_size,
        help="training examples per step",
    )
    parser.add_argument(
        "--max-length",
        type=_positive_int,
        default=defaults.max_length,
        help="tokens per example (longer ones are cut)",
    )
    parser.add_argument(
        "--output-dir",
        default=defaults.output_dir,
        help="where the run writes (the subnetwork goes into its ken/ folder)",
    )


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


@contextlib.contextmanager
def _needs_extra(extra: str):
    """Imports inside: a third-party module they miss is ``MissingExtraError`` naming the
    ken-hf extra that installs it."""
    try:
        yield
    except ModuleNotFoundError as error:
        if (error.name or "ken_hf").partition(".")[0] == "ken_hf":
            raise
        raise MissingExtraError(
            f'{error.name} is not installed: pip install "ken-hf[{extra}]"'
        ) from error


def _demo(args: argparse.Namespace) -> int:
    with _needs_extra("experiments"):
        from .experiments.demo import run_demo
        from .experiments.run_settings import DemoSettings

    run_demo(DemoSettings(**_finetune_fields(args), keep_ratio=args.keep_ratio, seed=args.seed))
    return 0


def _compare(args: argparse.Namespace) -> int:
    with _needs_extra("experiments"):
        from .experiments.compare import markdown_table, run_comparison
        from .experiments.run_settings import CompareSettings, FineTuneSettings

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
    print("\n" + markdown_table(results))
    print(f"results: {settings.task.output_dir}/results.{{json,md,png}}")
    return 0


def _prune(args: argparse.Namespace) -> int:
    from .config import KENConfig
    from .making.distributed import launched_group
    from .making.from_checkpoints import prune_checkpoints

    config = KENConfig(
        k=args.k,
        keep_ratio=args.keep_ratio,
        compat=args.compat,
        rule=args.rule,
        target_modules=args.target_modules,
        exclude_modules=args.exclude_modules,
        modules_to_save=args.modules_to_save,
    )
    # Under torchrun / accelerate launch: the ranks share the tensors, rank 0 writes.
    with launched_group(args.device) as launch:
        result = prune_checkpoints(
            args.base,
            args.finetuned,
            config,
            args.out,
            device=launch.device,
            progress=launch.main,
            compression_level=args.compression_level,
            compression_threads=args.compression_threads,
        )
    if not launch.main:
        return 0
    print(
        f"subnetwork: {args.out} ({result['bytes'] / 2**20:.1f} MiB, "
        f"{result['kept_fraction']:.1%} of pruned values kept, {result['tensors']} tensors)"
    )
    return 0


def _apply(args: argparse.Namespace) -> int:
    from .making.from_checkpoints import apply_checkpoint

    result = apply_checkpoint(
        args.base,
        args.ken,
        args.out,
        max_shard_size=args.max_shard_size,
        subfolder=args.subfolder,
        revision=args.revision,
    )
    print(
        f"checkpoint: {args.out} ({result['bytes'] / 2**30:.2f} GiB, {result['tensors']} tensors)"
    )
    return 0


def _inspect(args: argparse.Namespace) -> int:
    from .making.from_checkpoints import inspect_subnetwork

    info = inspect_subnetwork(args.path, subfolder=args.subfolder, revision=args.revision)
    if args.json:
        print(json.dumps(info, indent=2))
        return 0
    budget = f"k = {info['k']}" if info["k"] else f"keep ratio {info['keep_ratio']:g}"
    rows = [
        (
            "base",
            f"{info['base']}" + (f" @ {info['base_revision']}" if info["base_revision"] else ""),
        ),
        ("model class", info["model_class"]),
        ("selection", f"{budget}, rule {info['rule']}" + (", compat" if info["compat"] else "")),
        ("pruned tensors", f"{info['pruned_tensors']} ({info['pruned_values']:,} values)"),
        ("kept", f"{info['kept_values']:,} ({info['kept_fraction']:.1%})"),
        ("stored whole", f"{info['whole_tensors']} ({info['whole_values']:,} values)"),
        ("file", f"{info['bytes'] / 2**20:.2f} MiB"),
        ("format version", f"{info['format_version']} (ken-hf {info['library_version']})"),
    ]
    for label, value in rows:
        print(f"{label:<16} {value}")
    if args.tensors:
        for name, entry in info["tensors"].items():
            kept = f"{entry['count']:,} kept" if entry["kind"] == "pruned" else "whole"
            print(f"  {name}  {entry['dtype']} {entry['shape']}  {kept}")
    return 0


def _viz(args: argparse.Namespace) -> int:
    from .subnetwork import KENSubnetwork
    from .viz import require_matplotlib, write_report

    require_matplotlib()  # without it, say so before reading anything
    subnetwork = KENSubnetwork.from_pretrained(
        args.path, subfolder=args.subfolder, revision=args.revision
    )
    report = write_report(subnetwork, args.out, tensors=args.tensor or None)
    print(f"KENviz report: {report}")
    return 0


def _push(args: argparse.Namespace) -> int:
    from pathlib import Path

    from .storage.folder import push_subnetwork_folder

    folder = Path(args.folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"{args.folder}: no such folder (FOLDER: a subnetwork folder)")
    # A complete subnetwork, naming a base the Hub has, or refused before any upload.
    url = push_subnetwork_folder(
        folder,
        args.repo_id,
        base_model_name_or_path=args.base_model,
        remedy="--base-model OWNER/NAME",
        argument="--base-model",
        private=args.private or None,
        revision=args.revision,
        path_in_repo=args.subfolder,
    )
    print(f"pushed: {url}")
    return 0


def _hub_location(parser: argparse.ArgumentParser) -> None:
    """``--subfolder`` and ``--revision`` of a command that reads a subnetwork."""
    parser.add_argument(
        "--subfolder",
        type=_subfolder,
        help="folder inside the folder or Hub repository that holds the subnetwork",
    )
    parser.add_argument("--revision", help="branch, tag or commit of the Hub repository")


def _add_demo(commands, options: bool = True) -> None:
    demo = commands.add_parser(
        "demo",
        help="fine-tune with KENCallback on real data, report, reload (needs ken-hf[experiments])",
        description="Fine-tune a model with KENCallback, print what KEN kept and cost, and "
        "reload the saved subnetwork. Defaults: the packaged all-MiniLM-L6-v2 on the packaged "
        "Rotten Tomatoes snippets, offline.",
    )
    if not options:
        return
    from .experiments.run_settings import DemoSettings

    defaults = DemoSettings()
    _finetune_arguments(demo, defaults)
    demo.add_argument(
        "--keep-ratio",
        type=_ratio,
        default=defaults.keep_ratio,
        help="share of each row KEN keeps, in (0, 1]",
    )
    demo.add_argument(
        "--seed",
        type=_non_negative_int,
        default=defaults.seed,
        help="seed of the new head, the data order and the training",
    )
    demo.set_defaults(run=_demo)


def _add_compare(commands, options: bool = True) -> None:
    compare = commands.add_parser(
        "compare",
        help="KEN against LoRA and sparse baselines on one task and budget (needs "
        "ken-hf[experiments])",
        description="Full fine-tune, KEN and sparse baselines (largest change, random, KEN on "
        "the change) at several k, and LoRA at several ranks, over several seeds; writes "
        "results.json, results.md and results.png into --output-dir.",
    )
    if not options:
        return
    from .experiments.run_settings import CompareSettings
    from .selection.rules import RULES

    compared = CompareSettings()
    _finetune_arguments(compare, compared.task)
    compare.add_argument(
        "--seeds",
        type=_non_negative_int,
        nargs="+",
        default=list(compared.seeds),
        help="a full run of every method per seed",
    )
    compare.add_argument(
        "--keep-ratios",
        type=_ratio,
        nargs="+",
        default=list(compared.keep_ratios),
        help="the shares of each row kept, each in (0, 1]",
    )
    compare.add_argument(
        "--paper-k",
        type=_non_negative_int,
        default=compared.paper_k,
        help=f"an absolute k per row as well (default {compared.paper_k}; 0 for none)",
    )
    compare.add_argument(
        "--rules", nargs="+", choices=RULES, default=list(compared.rules), help="sparse rules"
    )
    compare.add_argument(
        "--lora-ranks",
        type=_positive_int,
        nargs="*",
        default=list(compared.lora_ranks),
        help="LoRA ranks (default 8 32; none given: no LoRA runs)",
    )
    compare.add_argument(
        "--lora-learning-rate",
        type=_positive_float,
        default=compared.lora_learning_rate,
        help="learning rate of the LoRA runs",
    )
    compare.set_defaults(run=_compare)


def _add_prune(commands) -> None:
    from .selection.rules import RULES
    from .storage.delta_codec import DEFAULT_LEVEL, DEFAULT_THREADS

    prune = commands.add_parser(
        "prune",
        help="KEN from two checkpoints to a subnetwork folder, a tensor at a time",
        description="Read a base and a fine-tuned checkpoint (folders or Hub ids, sharded "
        "safetensors) tensor by tensor, memory-mapped, and write the KEN subnetwork folder "
        "(kept values as a compressed lossless delta against the base). --keep-ratio 1 "
        "stores the whole fine-tune that way. Memory: about two copies of the largest tensor "
        "plus working memory. Under torchrun or accelerate launch (one machine or several) "
        "the processes share the tensors and rank 0 writes the folder.",
    )
    prune.add_argument("--base", required=True, help="pre-trained checkpoint: Hub id or folder")
    prune.add_argument("--finetuned", required=True, help="fine-tuned checkpoint: Hub id or folder")
    budget = prune.add_mutually_exclusive_group(required=True)
    budget.add_argument("--k", type=_positive_int, help="values kept per row")
    budget.add_argument("--keep-ratio", type=_ratio, help="share of each row kept, in (0, 1]")
    prune.add_argument("--out", required=True, help="subnetwork folder to write")
    prune.add_argument("--compat", action="store_true", help="bit for bit as the published code")
    prune.add_argument("--rule", choices=RULES, default="ken", help="selection rule (ken)")
    prune.add_argument("--target-modules", nargs="+", help="modules KEN prunes (default: all)")
    prune.add_argument("--exclude-modules", nargs="+", help="modules reset to pre-trained")
    prune.add_argument("--modules-to-save", nargs="+", help="modules stored whole")
    prune.add_argument(
        "--device",
        type=_device,
        default="cpu",
        help="where selection runs: cpu or cuda (under a launcher: cuda:LOCAL_RANK)",
    )
    prune.add_argument(
        "--compression-level",
        type=_compression_level,
        default=DEFAULT_LEVEL,
        help=f"zstd level of the stored delta, 1-22 (default {DEFAULT_LEVEL})",
    )
    prune.add_argument(
        "--compression-threads",
        type=_non_negative_int,
        default=DEFAULT_THREADS,
        help="zstd worker threads (default 0: one, the same bytes on every machine)",
    )
    prune.set_defaults(run=_prune)


def _add_apply(commands) -> None:
    apply = commands.add_parser(
        "apply",
        help="base + subnetwork -> a plain merged checkpoint",
        description="Write base + KEN subnetwork as a full Hugging Face checkpoint (sharded "
        "safetensors, config, tokenizer) for servers that do not know KEN. The base is checked "
        "against the subnetwork's fingerprints as it is read.",
    )
    apply.add_argument("--base", required=True, help="pre-trained checkpoint: Hub id or folder")
    apply.add_argument("--ken", required=True, help="subnetwork: Hub id or folder")
    apply.add_argument("--out", required=True, help="checkpoint folder to write")
    apply.add_argument(
        "--max-shard-size", type=_size, default="5GB", help="largest shard (default 5GB)"
    )
    _hub_location(apply)
    apply.set_defaults(run=_apply)


def _add_inspect(commands) -> None:
    inspect = commands.add_parser(
        "inspect",
        help="what a subnetwork holds",
        description="Base, k or keep ratio, rule, tensors, kept fraction, bytes and format "
        "version of a subnetwork folder or Hub id, read from its headers.",
    )
    inspect.add_argument("path", help="subnetwork folder or Hub id")
    inspect.add_argument("--tensors", action="store_true", help="list every tensor")
    inspect.add_argument("--json", action="store_true", help="print JSON")
    _hub_location(inspect)
    inspect.set_defaults(run=_inspect)


def _add_viz(commands) -> None:
    viz = commands.add_parser(
        "viz",
        help="pictures of what KEN kept (PNG files and one HTML report; needs ken-hf[viz])",
        description="Render KENviz views of a saved subnetwork: kept positions, kept "
        "neighbours, the same across layers, and a summary.",
    )
    viz.add_argument("path", help="subnetwork folder or Hub id")
    viz.add_argument(
        "--tensor",
        action="append",
        help="pruned tensor to draw: its full name, a unique end of it "
        "(layer.0.attention.self.query.weight), or a matrix family across layers (query); "
        "repeatable; default: the largest 3",
    )
    viz.add_argument("--out", default="kenviz", help="output folder (default: kenviz)")
    _hub_location(viz)
    viz.set_defaults(run=_viz)


def _add_push(commands) -> None:
    push = commands.add_parser(
        "push",
        help="publish a subnetwork folder to the Hub",
        description="Upload a subnetwork folder (made by ken prune, save_pretrained or "
        "KENCallback) to a Hub model repository, creating the repository when it is missing.",
    )
    push.add_argument("folder", help="subnetwork folder")
    push.add_argument("repo_id", help="Hub repository, e.g. me/minilm-sentiment-ken")
    push.add_argument("--private", action="store_true", help="create the repository private")
    push.add_argument("--revision", help="branch to push to (created when missing)")
    push.add_argument(
        "--subfolder", type=_subfolder, help="folder inside the repository (default: its root)"
    )
    push.add_argument(
        "--base-model",
        metavar="HUB_ID",
        help="the base's Hub id, recorded in the pushed ken_config.json (the folder keeps its "
        "own); needed when the folder names a local base (default: the base it names)",
    )
    push.set_defaults(run=_push)


# Commands whose options come from ken_hf.experiments (their defaults): their parsers get
# those options only when they are the command run, so that no other command (nor `ken
# --help`) imports the experiments or needs ken-hf[experiments] installed.
_EXPERIMENT_COMMANDS = {"demo": _add_demo, "compare": _add_compare}


def build_parser(command: str | None = None) -> argparse.ArgumentParser:
    """The ``ken`` parser: one subcommand per job, each running ``args.run(args)``. With
    ``command`` (the subcommand to be run; ``""``: none), the experiment commands other than
    ``command`` get their name and help only; default: every command with its options."""
    parser = _Parser(prog="ken", description="KEN pruning for Hugging Face models")
    commands = parser.add_subparsers(dest="command", required=True)
    for name, add in _EXPERIMENT_COMMANDS.items():
        add(commands, options=command is None or command == name)
    for add in (_add_prune, _add_apply, _add_inspect, _add_viz, _add_push):
        add(commands)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run ``ken`` with ``argv`` (default: the process's); returns the exit code."""
    argv = sys.argv[1:] if argv is None else list(argv)
    # The subcommand: the first argument not an option (`ken` itself takes only -h).
    command = next((a for a in argv if not a.startswith("-")), "")
    args = build_parser(command).parse_args(argv)
    try:
        return args.run(args)
    except USER_ERRORS as error:
        message = " ".join(str(error).split()) or type(error).__name__
        if len(message) > MAX_MESSAGE:
            message = message[: MAX_MESSAGE - 3] + "..."
        print(f"ken {args.command}: error: {message}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
