"""What the training jobs (``ken demo``, ``ken compare``) are configured with: plain
dataclasses, light to import, so that the command line builds its options without loading
the training stack."""

from __future__ import annotations

import dataclasses

from ..selection.rules import RULES
from .assets import minilm_path, smollm2_path

PACKAGED_DATASET = "movie-snippets"
# Real models that ship in packages here (see assets.py), by a name no Hub id has.
PACKAGED_MODELS = {
    "packaged:all-MiniLM-L6-v2": minilm_path,
    "packaged:SmolLM2-135M-Instruct": smollm2_path,
}


@dataclasses.dataclass
class FineTuneSettings:
    """What is fine-tuned, on what, and how long."""

    model: str | None = None  # Hub id, folder or packaged name; None = packaged MiniLM
    dataset: str = PACKAGED_DATASET  # Hub id or folder with text/label columns
    train_size: int = 4000
    eval_size: int = 2000
    epochs: float = 2.0
    learning_rate: float = 5e-5
    batch_size: int = 32
    max_length: int = 64
    seed: int = 0
    output_dir: str = "runs/finetune"
    metric: str = "accuracy"


@dataclasses.dataclass
class DemoSettings(FineTuneSettings):
    """The fine-tune of the demo, and the keep ratio KEN applies at its end."""

    keep_ratio: float = 0.75
    output_dir: str = "runs/demo"


@dataclasses.dataclass
class CompareSettings:
    """The task and budget shared by every method, and the methods' own settings."""

    task: FineTuneSettings = dataclasses.field(
        default_factory=lambda: FineTuneSettings(output_dir="runs/compare")
    )
    seeds: tuple[int, ...] = (0, 1, 2)
    keep_ratios: tuple[float, ...] = (0.25, 0.5, 0.75)
    paper_k: int | None = 300  # an absolute k per row, as the paper states its k
    rules: tuple[str, ...] = RULES
    lora_ranks: tuple[int, ...] = (8, 32)
    lora_learning_rate: float = 5e-4  # LoRA's usual rate, 10x the full fine-tune's
