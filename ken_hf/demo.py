"""The main job (``make demo`` / ``ken demo``): fine-tune a real model on real data with
``KENCallback``, report what KEN kept and what it cost, and reload the saved subnetwork."""

from __future__ import annotations

import dataclasses
import time
from pathlib import Path

import torch
from datasets import Dataset, load_dataset
from transformers import (
    AutoModelForSequenceClassification,
    AutoTokenizer,
    DataCollatorWithPadding,
    Trainer,
    TrainingArguments,
)

from .assets import minilm_path
from .callback import KENCallback
from .metrics import classification_metrics
from .modeling import AutoKENModelForSequenceClassification
from .serialization import SUBNETWORK_NAME
from .tasks import movie_review_splits

PACKAGED_DATASET = "movie-snippets"


@dataclasses.dataclass
class DemoSettings:
    """What the demo fine-tunes, on what, and how long."""

    model: str | None = None  # Hub id or folder; None = the packaged all-MiniLM-L6-v2
    dataset: str = PACKAGED_DATASET  # Hub id or folder with text/label columns
    train_size: int = 4000
    eval_size: int = 2000
    epochs: float = 2.0
    learning_rate: float = 5e-5
    batch_size: int = 32
    max_length: int = 64
    keep_ratio: float = 0.75
    seed: int = 0
    output_dir: str = "runs/demo"
    metric: str = "accuracy"


def load_splits(settings: DemoSettings, tokenizer) -> tuple[Dataset, Dataset]:
    """Tokenized train and held-out splits: the packaged movie snippets, or a Hub/local
    dataset with a ``label`` column and a ``text`` (or ``sentence``) column."""
    if settings.dataset == PACKAGED_DATASET:
        return movie_review_splits(
            tokenizer,
            train_size=settings.train_size,
            eval_size=settings.eval_size,
            max_length=settings.max_length,
            seed=settings.seed,
        )
    if Path(settings.dataset).is_dir() and (Path(settings.dataset) / "dataset_dict.json").exists():
        from datasets import load_from_disk

        data = load_from_disk(settings.dataset)
    else:
        data = load_dataset(settings.dataset)
    held_out = next(s for s in ("validation", "test") if s in data)
    text = next(c for c in ("text", "sentence", "review") if c in data["train"].column_names)

    def prepare(split: Dataset, size: int) -> Dataset:
        split = split.shuffle(seed=settings.seed).select(range(min(size, len(split))))
        return split.map(
            lambda batch: tokenizer(batch[text], truncation=True, max_length=settings.max_length),
            batched=True,
            remove_columns=[c for c in split.column_names if c != "label"],
        )

    return prepare(data["train"], settings.train_size), prepare(data[held_out], settings.eval_size)


def fine_tune_with_ken(settings: DemoSettings, callback: KENCallback) -> tuple[Trainer, float]:
    """Fine-tune ``settings.model`` with ``callback`` attached; returns the Trainer (whose
    model now holds the KEN result) and the training seconds."""
    model_name = settings.model or str(minilm_path())
    tokenizer = AutoTokenizer.from_pretrained(model_name)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    train, held_out = load_splits(settings, tokenizer)
    torch.manual_seed(settings.seed)
    model = AutoModelForSequenceClassification.from_pretrained(model_name, num_labels=2)
    model.config.pad_token_id = tokenizer.pad_token_id
    args = TrainingArguments(
        output_dir=settings.output_dir,
        num_train_epochs=settings.epochs,
        learning_rate=settings.learning_rate,
        per_device_train_batch_size=settings.batch_size,
        per_device_eval_batch_size=64,
        save_strategy="no",
        report_to=[],
        seed=settings.seed,
        logging_steps=50,
    )
    trainer = Trainer(
        model=model,
        args=args,
        train_dataset=train,
        eval_dataset=held_out,
        data_collator=DataCollatorWithPadding(tokenizer),
        processing_class=tokenizer,
        compute_metrics=classification_metrics(settings.metric),
        callbacks=[callback],
    )
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
    from .viz import write_report

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
