"""The main job (``make demo`` / ``ken demo``): fine-tune a real model on real data with
``KENCallback``, report what KEN kept and what it cost, and reload the saved subnetwork."""

from __future__ import annotations

import time
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from transformers import Trainer
from transformers.utils import logging as transformers_logging

from ..callback import KENCallback
from ..modeling import AutoKENModelForSequenceClassification
from ..serialization import SUBNETWORK_NAME
from ..subnetwork_folder import PROCESSOR_FILES
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


def fine_tune_with_ken(settings: DemoSettings, callback) -> tuple[Trainer, float]:
    """Fine-tune ``settings.model`` with ``callback`` attached; returns the Trainer (whose
    model now holds the KEN result) and the training seconds."""
    tokenizer = load_tokenizer(settings)
    train, held_out = load_splits(settings, tokenizer)
    with quiet_load_report():
        model = new_classifier(settings, tokenizer)
    trainer = build_trainer(settings, model, tokenizer, train, held_out, callbacks=[callback])
    start = time.perf_counter()
    trainer.train()
    return trainer, time.perf_counter() - start


def run_demo(settings: DemoSettings) -> dict:
    """Fine-tune, KEN, report, reload; returns the figures it printed. The table of results
    is the last thing printed."""
    # The Trainer pins memory by default; on a machine without an accelerator torch warns.
    warnings.filterwarnings("ignore", message=".*'pin_memory' argument is set as true")
    print(
        "KEN demo: a new two-class head replaces the model's own (transformers' report of "
        "its weights as missing from the checkpoint is not shown: they are new by design)"
    )
    callback = KENCallback(keep_ratio=settings.keep_ratio)
    trainer, train_seconds = fine_tune_with_ken(settings, callback)
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
    width = max(len(label) for label, _ in rows)
    print(
        f"\nKEN demo: {settings.model or 'all-MiniLM-L6-v2'} on {settings.dataset}, "
        f"{settings.train_size} train / {settings.eval_size} held out\n"
    )
    for label, value in rows:
        print(f"  {label:<{width}}  {value}")
    return {
        "before": before,
        "after": after,
        "reset_fraction": report["ken_reset_fraction"],
        "subnetwork_bytes": stored,
        "full_bytes": full_bytes,
        "same_predictions": same_predictions,
        "folder": str(folder),
    }
