"""The main job (``make demo`` / ``ken demo``): fine-tune a real model on real data with
``KENCallback``, report what KEN kept and what it cost, and reload the saved subnetwork."""

from __future__ import annotations

import time
from pathlib import Path

from transformers import Trainer

from ..callback import KENCallback
from ..modeling import AutoKENModelForSequenceClassification
from ..serialization import SUBNETWORK_NAME
from .finetune import build_trainer, load_splits, load_tokenizer, new_classifier
from .run_settings import DemoSettings


def fine_tune_with_ken(settings: DemoSettings, callback) -> tuple[Trainer, float]:
    """Fine-tune ``settings.model`` with ``callback`` attached; returns the Trainer (whose
    model now holds the KEN result) and the training seconds."""
    tokenizer = load_tokenizer(settings)
    train, held_out = load_splits(settings, tokenizer)
    model = new_classifier(settings, tokenizer)
    trainer = build_trainer(settings, model, tokenizer, train, held_out, callbacks=[callback])
    start = time.perf_counter()
    trainer.train()
    return trainer, time.perf_counter() - start


def run_demo(settings: DemoSettings) -> dict:
    """Fine-tune, KEN, report, reload; returns the figures it printed."""
    callback = KENCallback(keep_ratio=settings.keep_ratio)
    trainer, train_seconds = fine_tune_with_ken(settings, callback)
    report = callback.report
    metric = settings.metric
    folder = Path(settings.output_dir) / "ken"
    model = trainer.model
    full_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    stored = sum(p.stat().st_size for p in folder.iterdir())

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
        ("subnetwork folder", f"{stored / 2**20:.1f} MiB"),
        ("full checkpoint (parameters)", f"{full_bytes / 2**20:.1f} MiB"),
        ("subnetwork / full", f"{stored / full_bytes:.1%}"),
        ("KEN selection", f"{report['ken_selection_seconds']:.1f} s"),
        ("fine-tuning", f"{train_seconds:.0f} s"),
        (
            "reloaded from disk: same predictions",
            f"{same_predictions} (max logit diff {largest_difference:.1e})",
        ),
    ]
    width = max(len(label) for label, _ in rows)
    print(
        f"\nKEN demo: {settings.model or 'all-MiniLM-L6-v2'} on {settings.dataset}, "
        f"{settings.train_size} train / {settings.eval_size} held out\n"
    )
    for label, value in rows:
        print(f"  {label:<{width}}  {value}")
    from ..viz import write_report

    report_path = write_report(callback.subnetwork, Path(settings.output_dir) / "kenviz")
    print(f"\n  subnetwork: {folder / SUBNETWORK_NAME}")
    print(f"  KENviz report: {report_path}")
    return {
        "before": before,
        "after": after,
        "reset_fraction": report["ken_reset_fraction"],
        "subnetwork_bytes": stored,
        "full_bytes": full_bytes,
        "same_predictions": same_predictions,
        "folder": str(folder),
    }
