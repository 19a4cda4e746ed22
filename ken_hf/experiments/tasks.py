"""The demo task: binary sentiment of Rotten Tomatoes snippets, as Hugging Face datasets."""

from __future__ import annotations

import random

from datasets import Dataset

from .assets import movie_reviews


def movie_review_splits(
    tokenizer, *, train_size: int, eval_size: int, max_length: int = 64, seed: int = 0
) -> tuple[Dataset, Dataset]:
    """Disjoint tokenized train and held-out splits of the packaged movie snippets.

    The snippets are shuffled with ``seed`` (the file is ordered by sentiment score), then
    the first ``train_size`` train and the next ``eval_size`` are held out.
    """
    texts, labels = movie_reviews()
    if train_size + eval_size > len(texts):
        raise ValueError(f"only {len(texts)} snippets; asked for {train_size} + {eval_size}")
    order = list(range(len(texts)))
    random.Random(seed).shuffle(order)

    def split(indices: list[int]) -> Dataset:
        data = Dataset.from_dict(
            {"text": [texts[i] for i in indices], "label": [labels[i] for i in indices]}
        )
        return data.map(
            lambda batch: tokenizer(batch["text"], truncation=True, max_length=max_length),
            batched=True,
            remove_columns=["text"],
        )

    return split(order[:train_size]), split(order[train_size : train_size + eval_size])
