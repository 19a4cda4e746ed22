"""The main job (``make demo`` / ``ken demo``): fine-tune a real model on real data with
``KENCallback``, report what KEN kept and what it cost, and reload the saved subnetwork."""

from __future__ import annotations

import json
import time
import warnings
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path

from transformers import PrinterCallback, ProgressCallback, Trainer, TrainerCallback
from transformers.utils import logging as transformers_logging

from ..callback import KENCallback
from ..modeling import AutoKENModelForSequenceClassification
from ..storage.folder import PROCESSOR_FILES
from ..storage.subnetwork_file import SUBNETWORK_NAME
from .finetune import build_trainer, load_splits, load_tokenizer, new_classifier
from .run_settings import DemoSettings


@contextmanager
def quiet_load_report() -> Iterator[None]:
    """transformers' warnings silenced within the block: loading the pre-trained model with
    a new two-class head makes transformers report the head's weights as MISSING from the
    checkpoint, which is expected here (the head is new, and KEN stores it whole)."""
    verbosity = transformers_logging.get_verbosity()
    transformers_logging.set_verbosity_error()
    try:
        yield
    finally:
        transformers_logging.set_verbosity(verbosity)


class TrainerLogs(TrainerCallback):
    """Keeps what the Trainer logs (losses, evaluations, KEN's summary), for the demo's
    table, instead of the dicts the Trainer prints between its progress bars.

    Attributes:
        logs: each log entry, a ``{name: value}`` dict, in order (main process only).

    Example:
        ```python
        logs = TrainerLogs()
        trainer, seconds = fine_tune_with_ken(settings, callback, logs=logs)
        rows = log_rows(logs.logs)
        ```
    """

    def __init__(self) -> None:
        self.logs: list[dict] = []

    def on_log(self, args, state, control, logs=None, **kwargs) -> None:
        """Keep a copy of ``logs`` (the main process's)."""
        if state.is_world_process_zero and logs:
            self.logs.append(dict(logs))


class _BarsOnly(ProgressCallback):
    """The Trainer's progress bars without the log dicts it writes between them."""

    def on_log(self, args, state, control, logs=None, **kwargs) -> None:
        pass  # TrainerLogs keeps them for the table


def fine_tune_with_ken(
    settings: DemoSettings, callback, *, logs: TrainerLogs | None = None
) -> tuple[Trainer, float]:
    """Fine-tune ``settings.model`` with ``callback`` attached; returns the Trainer (whose
    model now holds the KEN result) and the training seconds. With ``logs``, what the
    Trainer logs goes there, not to the screen (the progress bars stay)."""
    tokenizer = load_tokenizer(settings)
    train, held_out = load_splits(settings, tokenizer)
    with quiet_load_report():
        model = new_classifier(settings, tokenizer)
    trainer = build_trainer(settings, model, tokenizer, train, held_out, callbacks=[callback])
    if logs is not None:
        if trainer.pop_callback(ProgressCallback) is not None:
            trainer.add_callback(_BarsOnly)
        trainer.pop_callback(PrinterCallback)  # what disable_tqdm prints instead
        trainer.add_callback(logs)
    start = time.perf_counter()
    trainer.train()
    return trainer, time.perf_counter() - start


def run_demo(settings: DemoSettings) -> dict:
    """Fine-tune, KEN, report, reload; returns the figures it printed. The table of results
    comes last (``summary_lines``), then the two lines that load the saved subnetwork."""
    # The Trainer pins memory by default; on a machine without an accelerator torch warns.
    warnings.filterwarnings("ignore", message=".*'pin_memory' argument is set as true")
    print(
        "KEN demo: a new two-class head replaces the model's own (transformers' report of "
        "its weights as missing from the checkpoint is not shown: they are new by design)"
    )
    callback = KENCallback(keep_ratio=settings.keep_ratio)
    logs = TrainerLogs()
    trainer, train_seconds = fine_tune_with_ken(settings, callback, logs=logs)
    report = callback.report
    metric = settings.metric
    folder = Path(settings.output_dir) / "ken"
    model = trainer.model
    full_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    # The tokenizer saved beside the subnetwork is not part of its size.
    stored = sum(
        p.stat().st_size for p in folder.iterdir() if p.is_file() and p.name not in PROCESSOR_FILES
    )

    with quiet_load_report():
        reloaded = AutoKENModelForSequenceClassification.from_pretrained(folder)
    in_memory = trainer.predict(trainer.eval_dataset).predictions
    from_disk = (
        Trainer(model=reloaded, args=trainer.args, data_collator=trainer.data_collator)
        .predict(trainer.eval_dataset)
        .predictions
    )
    same_predictions = bool((in_memory.argmax(-1) == from_disk.argmax(-1)).all())
    largest_difference = float(abs(in_memory - from_disk).max())

    before = report["metrics_before"][f"ken_before_{metric}"]
    after = report["metrics_after"][f"ken_after_{metric}"]
    rows = [
        (f"{metric}, full fine-tune", f"{before:.4f}"),
        (f"{metric}, after KEN (keep ratio {settings.keep_ratio:g})", f"{after:.4f}"),
        ("parameters reset to pre-trained", f"{report['ken_reset_fraction']:.1%}"),
        ("subnetwork folder (tokenizer aside)", f"{stored / 2**20:.1f} MiB"),
        ("full checkpoint (parameters)", f"{full_bytes / 2**20:.1f} MiB"),
        ("subnetwork / full", f"{stored / full_bytes:.1%}"),
        *log_rows(logs.logs),
        ("KEN selection", f"{report['ken_selection_seconds']:.1f} s"),
        ("fine-tuning", f"{train_seconds:.0f} s"),
        (
            "reloaded from disk: same predictions",
            f"{same_predictions} (max logit diff {largest_difference:.1e})",
        ),
    ]
    from ..viz import write_report

    report_path = write_report(callback.subnetwork, Path(settings.output_dir) / "kenviz")
    rows += [("subnetwork", str(folder / SUBNETWORK_NAME)), ("KENviz report", str(report_path))]
    title = (
        f"KEN demo: {settings.model or 'all-MiniLM-L6-v2'} on {settings.dataset}, "
        f"{settings.train_size} train / {settings.eval_size} held out"
    )
    print("\n".join(summary_lines(title, rows, folder)))
    return {
        "before": before,
        "after": after,
        "reset_fraction": report["ken_reset_fraction"],
        "subnetwork_bytes": stored,
        "full_bytes": full_bytes,
        "same_predictions": same_predictions,
        "folder": str(folder),
    }


def log_rows(logs: Sequence[Mapping[str, object]]) -> list[tuple[str, str]]:
    """The demo table's rows for what the Trainer logged (``TrainerLogs.logs``).

    Args:
        logs: the Trainer's log entries in order: training steps (``loss``), the end of
            training (``train_loss``) and evaluations (``ken_before_loss``,
            ``ken_after_loss``).

    Returns:
        ``(label, value)`` rows: the training loss at the first and last logged step and
        over the run, and the held-out loss before and after KEN; a row whose figures were
        not logged is left out.

    Example:
        ```python
        log_rows([{"loss": 0.69}, {"loss": 0.41}, {"train_loss": 0.52}])
        # [('training loss, first / last logged step', '0.6900 / 0.4100'), ...]
        ```
    """

    def values(key: str) -> list[float]:
        return [float(entry[key]) for entry in logs if isinstance(entry.get(key), int | float)]

    rows = []
    steps, run = values("loss"), values("train_loss")
    if steps:
        figures = f"{steps[0]:.4f} / {steps[-1]:.4f}"
        rows.append(("training loss, first / last logged step", figures))
    if run:
        rows.append(("training loss, whole run", f"{run[-1]:.4f}"))
    before, after = values("ken_before_loss"), values("ken_after_loss")
    if before and after:
        figures = f"{before[-1]:.4f} / {after[-1]:.4f}"
        rows.append(("held-out loss, full fine-tune / after KEN", figures))
    return rows


def summary_lines(title: str, rows: Sequence[tuple[str, str]], folder: str | Path) -> list[str]:
    """What the demo prints at its end: the table, then the two lines that load the saved
    subnetwork, ready to paste.

    Args:
        title: the table's heading.
        rows: ``(label, value)`` rows, printed as two aligned columns.
        folder: the saved subnetwork folder.

    Returns:
        The lines to print, the last two being the ``import`` and the ``from_pretrained``.

    Example:
        ```python
        print("\n".join(summary_lines("KEN demo", [("kept", "75%")], "runs/demo/ken")))
        ```
    """
    width = max((len(label) for label, _ in rows), default=0)
    table = [f"  {label:<{width}}  {value}" for label, value in rows]
    auto = AutoKENModelForSequenceClassification.__name__
    return [
        "",
        title,
        "",
        *table,
        "",
        "Load the subnetwork (the base comes from the model it names):",
        f"from ken_hf import {auto}",
        # json.dumps: a double-quoted Python string, whatever the folder's name holds
        f"model = {auto}.from_pretrained({json.dumps(str(folder))})",
    ]
