"""The model card (README.md) written beside a saved subnetwork."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING

from huggingface_hub import ModelCardData

from .serialization import SubnetworkReader

if TYPE_CHECKING:
    from .config import KENConfig

_AUTO_CLASSES = {
    "ForSequenceClassification": "AutoKENModelForSequenceClassification",
    "ForCausalLM": "AutoKENModelForCausalLM",
    "ForTokenClassification": "AutoKENModelForTokenClassification",
    "ForQuestionAnswering": "AutoKENModelForQuestionAnswering",
    "ForConditionalGeneration": "AutoKENModelForSeq2SeqLM",
}


def model_card(
    config: KENConfig, subnetwork_file: Path, metrics: Mapping[str, float] | None = None
) -> str:
    """Markdown with YAML metadata: base model, library, tags; then what was kept (read from
    the header of ``subnetwork_file``), sizes, ``metrics`` when known, and how to
    load it."""
    data = ModelCardData(
        base_model=config.base_model_name_or_path,
        library_name="ken-hf",
        tags=["ken", "pruning"],
    )
    rule = f"k = {config.k} values per row" if config.k else f"keep ratio {config.keep_ratio:g}"
    stored = subnetwork_file.stat().st_size
    with SubnetworkReader(subnetwork_file) as reader:
        counts = reader.summary()
    pruned_values, kept_values = counts["pruned_values"], counts["kept_values"]
    kept_fraction = kept_values / pruned_values if pruned_values else 1.0
    auto = next(
        (
            name
            for suffix, name in _AUTO_CLASSES.items()
            if (config.model_class or "").endswith(suffix)
        ),
        "AutoKENModel",
    )
    lines = [
        "---",
        data.to_yaml(),
        "---",
        "",
        f"# KEN subnetwork of {config.base_model_name_or_path}",
        "",
        "A [KEN](https://arxiv.org/abs/2402.03142) subnetwork made with "
        f"ken-hf {config.library_version}: only the kept fine-tuned values are stored; "
        "every other value comes from the base model when it is loaded.",
        "",
        f"- Selection: {rule}{' (compatibility mode)' if config.compat else ''}"
        + ("" if config.rule == "ken" else f", rule {config.rule!r} (a baseline, not KEN)"),
        f"- Pruned tensors: {counts['pruned_tensors']}, {kept_values:,} of {pruned_values:,} "
        f"values kept ({kept_fraction:.1%})",
        f"- Stored whole: {counts['whole_tensors']} tensors, {counts['whole_values']:,} values",
        f"- Subnetwork file: {stored / 2**20:.2f} MiB",
        f"- Model class: {config.model_class}",
    ]
    if metrics:
        lines += ["", "| metric | value |", "|---|---|"]
        lines += [f"| {name} | {value:.4f} |" for name, value in sorted(metrics.items())]
    lines += [
        "",
        "## Load",
        "",
        "```python",
        f"from ken_hf import {auto}",
        "",
        f'model = {auto}.from_pretrained("<this repository or folder>")',
        "```",
        "",
    ]
    return "\n".join(lines)
