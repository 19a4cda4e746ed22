"""One text-classification fine-tune set up the same way for every job that trains
(the demo, the comparisons): the task's data, a fresh classifier, a ``Trainer``."""

from __future__ import annotations

from pathlib import Path

import torch
from datasets import Dataset, load_dataset
from transformers import (
    AutoModelForSequenceClassification,
    AutoTokenizer,
    DataCollatorWithPadding,
    PreTrainedModel,
    Trainer,
    TrainerCallback,
    TrainingArguments,
)

from .metrics import classification_metrics
from .run_settings import PACKAGED_DATASET, PACKAGED_MODELS, FineTuneSettings
from .tasks import movie_review_splits


def model_source(settings: FineTuneSettings) -> str:
    """The folder or Hub id ``from_pretrained`` reads for ``settings.model``."""
    name = settings.model or "packaged:all-MiniLM-L6-v2"
    return str(PACKAGED_MODELS[name]()) if name in PACKAGED_MODELS else name


def model_label(settings: FineTuneSettings) -> str:
    """A short name of ``settings.model`` for tables and titles."""
    return (settings.model or "packaged:all-MiniLM-L6-v2").removeprefix("packaged:")


def load_splits(settings: FineTuneSettings, tokenizer) -> tuple[Dataset, Dataset]:
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


def load_tokenizer(settings: FineTuneSettings):
    """The model's tokenizer, with a padding token (decoders such as Llama have none)."""
    source = model_source(settings)
    try:
        tokenizer = AutoTokenizer.from_pretrained(source)
    except (OSError, ValueError) as error:  # transformers' own messages do not name the model
        raise OSError(f"model {source}: {error}") from error
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def new_classifier(settings: FineTuneSettings, tokenizer) -> PreTrainedModel:
    """The pre-trained model with a new two-class head, initialised from ``settings.seed``."""
    torch.manual_seed(settings.seed)
    model = AutoModelForSequenceClassification.from_pretrained(model_source(settings), num_labels=2)
    model.config.pad_token_id = tokenizer.pad_token_id
    return model


def build_trainer(
    settings: FineTuneSettings,
    model: torch.nn.Module,
    tokenizer,
    train: Dataset,
    held_out: Dataset,
    *,
    callbacks: list[TrainerCallback] | None = None,
    learning_rate: float | None = None,
    output_dir: str | Path | None = None,
) -> Trainer:
    """A ``Trainer`` for ``settings`` (no checkpoints, no reporting); ``learning_rate`` and
    ``output_dir`` override the settings' own."""
    args = TrainingArguments(
        output_dir=str(output_dir or settings.output_dir),
        num_train_epochs=settings.epochs,
        learning_rate=learning_rate or settings.learning_rate,
        per_device_train_batch_size=settings.batch_size,
        per_device_eval_batch_size=64,
        save_strategy="no",
        report_to=[],
        seed=settings.seed,
        logging_steps=50,
    )
    return Trainer(
        model=model,
        args=args,
        train_dataset=train,
        eval_dataset=held_out,
        data_collator=DataCollatorWithPadding(tokenizer),
        processing_class=tokenizer,
        compute_metrics=classification_metrics(settings.metric),
        callbacks=callbacks,
    )
