"""The model card (README.md) written beside a saved subnetwork: YAML metadata the Hub
understands (``base_model``, ``library_name``, ``tags``, the base's ``license`` when its own
card is at hand, ``model-index`` when a task and a data set are known), then what KEN kept,
the metrics before and after KEN, sizes, and how to load it."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING

from huggingface_hub import EvalResult, ModelCardData, try_to_load_from_cache
from huggingface_hub.repocard import metadata_load

from ..utils.hub import is_hub_id
from .subnetwork_file import SubnetworkFileFacts

if TYPE_CHECKING:
    from ..config import KENConfig

# Suffix of a transformers class -> (the AutoKENModel class that loads it, its Hub task).
_AUTO_CLASSES = {
    "ForSequenceClassification": ("AutoKENModelForSequenceClassification", "text-classification"),
    "ForCausalLM": ("AutoKENModelForCausalLM", "text-generation"),
    "ForTokenClassification": ("AutoKENModelForTokenClassification", "token-classification"),
    "ForQuestionAnswering": ("AutoKENModelForQuestionAnswering", "question-answering"),
    "ForConditionalGeneration": ("AutoKENModelForSeq2SeqLM", "text2text-generation"),
}
# Trainer.evaluate's bookkeeping, not measures of the model.
_NOT_METRICS = {"runtime", "samples_per_second", "steps_per_second", "epoch"}


def model_card(
    config: KENConfig,
    facts: SubnetworkFileFacts,
    metrics: Mapping[str, float] | None = None,
    *,
    report: Mapping | None = None,
    dataset: str | None = None,
    tokenizer: bool = False,
    picture: str | None = None,
    base_license: str | None = None,
) -> str:
    """Markdown with YAML metadata, then the base model (linked when a Hub id), the rule,
    k or keep ratio, the share of values reset, sizes (``facts``: counts and sizes of the
    subnetwork file, as its writer or a reader of its header gives them), the metrics
    before and after KEN (``report``'s, else ``metrics``), and how to load it.
    ``dataset``: Hub id of the evaluation data set; with a known task it puts the metrics
    after KEN into the ``model-index`` metadata.
    ``tokenizer``: whether a tokenizer is saved beside the subnetwork (the loading example
    then loads it too). ``picture``: the file name of a KENviz summary PNG beside it.
    ``base_license``: the base's license when known otherwise (from an earlier card of the
    same subnetwork); by default read from the base's own card."""
    counts, full_bytes, stored = facts.counts, facts.full_bytes, facts.file_bytes
    auto, task = next(
        (
            names
            for suffix, names in _AUTO_CLASSES.items()
            if (config.model_class or "").endswith(suffix)
        ),
        ("AutoKENModel", None),
    )
    before, after = _before_after(report, metrics)
    base = config.base_model_name_or_path
    hub_base = base if base and is_hub_id(base) else None
    lines = [
        "---",
        _metadata(config, hub_base, task, dataset, after, base_license).to_yaml(),
        "---",
        "",
        f"# KEN subnetwork of {base}",
        "",
        "A [KEN](https://arxiv.org/abs/2402.03142) subnetwork made with "
        f"ken-hf {config.library_version}: only the kept fine-tuned values are stored; "
        "every other value comes from the base model when it is loaded.",
        "",
        f"- Base model: {_base_link(base, hub_base, config.base_model_revision)}",
        f"- Model class: {config.model_class}",
        f"- Selection: {_rule(config)}",
        f"- Values reset to the base: {_reset_share(counts):.1%} of the pruned and whole "
        f"tensors' values; pruned tensors: {counts['pruned_tensors']}, "
        f"{counts['kept_values']:,} of {counts['pruned_values']:,} values kept",
        f"- Stored whole: {counts['whole_tensors']} tensors, {counts['whole_values']:,} values",
        f"- Size: subnetwork file {stored / 2**20:.2f} MiB; the same tensors in full "
        f"{full_bytes / 2**20:.2f} MiB ({stored / full_bytes:.1%})"
        if full_bytes
        else f"- Size: subnetwork file {stored / 2**20:.2f} MiB",
    ]
    if report and isinstance(report.get("ken_reset_fraction"), float):
        # Untargeted tensors went back to the base too: only the run knows their size.
        lines.append(
            f"- Share of the model's parameters reset: {report['ken_reset_fraction']:.1%} "
            "(ken_report.json)"
        )
    if picture:
        lines += ["", f"![What KEN kept: kept fraction per tensor and layer]({picture})"]
    if before or after:
        lines += ["", "## Metrics", "", "| metric | before KEN | after KEN |", "|---|---|---|"]
        for name in sorted(set(before) | set(after)):
            lines.append(f"| {name} | {_number(before.get(name))} | {_number(after.get(name))} |")
    source = '"<this repository or folder>"'
    load = [f"from ken_hf import {auto}", "", f"model = {auto}.from_pretrained({source})"]
    if tokenizer:
        load = [
            "from transformers import AutoTokenizer",
            *load,
            f"tokenizer = AutoTokenizer.from_pretrained({source})",
        ]
    lines += [
        "",
        "## Load",
        "",
        "```python",
        *load,
        "```",
        "",
        "`from_pretrained` takes `subfolder=` (the folder inside the repository that holds "
        "this card) and `revision=` as transformers does.",
        "",
    ]
    return "\n".join(lines)


def card_metadata(card: str | Path) -> dict[str, str]:
    """What a saved model card's metadata says that the subnetwork's files do not: the
    base's ``license`` and the evaluation ``dataset`` (of its ``model-index``).

    Args:
        card: the ``README.md`` written beside a subnetwork.

    Returns:
        ``{"license": ..., "dataset": ...}`` with the keys the card has; empty when the card
        is missing or unreadable (it only carries these forward, it decides nothing).

    Example:
        ```python
        card_metadata("run/ken/README.md")  # {'license': 'apache-2.0', 'dataset': 'imdb'}
        ```
    """
    try:
        meta = metadata_load(Path(card)) or {}
    except Exception:  # a missing or malformed card carries nothing forward
        return {}
    found = {}
    if isinstance(meta.get("license"), str):
        found["license"] = meta["license"]
    try:
        dataset = meta["model-index"][0]["results"][0]["dataset"]["type"]
    except (KeyError, IndexError, TypeError):
        dataset = None
    if isinstance(dataset, str):
        found["dataset"] = dataset
    return found


def _rule(config: KENConfig) -> str:
    budget = f"k = {config.k} values per row" if config.k else f"keep ratio {config.keep_ratio:g}"
    rule = "KEN" if config.rule == "ken" else f"rule {config.rule!r} (a baseline, not KEN)"
    return f"{rule}, {budget}" + (" (compatibility mode)" if config.compat else "")


def _reset_share(counts: Mapping[str, int]) -> float:
    """The share of the values the file covers (pruned and whole) that are not kept."""
    covered = counts["pruned_values"] + counts["whole_values"]
    kept = counts["kept_values"] + counts["whole_values"]
    return 1.0 - kept / covered if covered else 0.0


def _before_after(
    report: Mapping | None, metrics: Mapping[str, float] | None
) -> tuple[dict[str, float], dict[str, float]]:
    """``{metric: value}`` before and after KEN, prefixes and bookkeeping taken off."""
    sources = {"before": {}, "after": {}}
    if report:
        sources = {
            "before": report.get("metrics_before") or {},
            "after": report.get("metrics_after") or {},
        }
    elif metrics:
        sources = {
            when: {k: v for k, v in metrics.items() if k.startswith(f"ken_{when}_")}
            for when in ("before", "after")
        }
    return tuple(  # type: ignore[return-value]
        {
            key.removeprefix(f"ken_{when}_"): float(value)
            for key, value in values.items()
            if isinstance(value, int | float)
            and key.removeprefix(f"ken_{when}_") not in _NOT_METRICS
        }
        for when, values in sources.items()
    )


def _number(value: float | None) -> str:
    return "-" if value is None else f"{value:.4f}"


def _base_link(base: str | None, hub_base: str | None, revision: str | None) -> str:
    if hub_base is None:
        return f"`{base}` (a local folder)" if base else "not recorded"
    url = f"https://huggingface.co/{hub_base}"
    if revision:
        return f"[{hub_base}]({url}/tree/{revision}) at revision `{revision}`"
    return f"[{hub_base}]({url})"


def _metadata(
    config: KENConfig,
    hub_base: str | None,
    task: str | None,
    dataset: str | None,
    after: Mapping[str, float],
    base_license: str | None = None,
) -> ModelCardData:
    """The card's YAML: ``base_model`` only for a Hub id (the Hub links it), the base's
    license when its card can be read without the network, ``model-index`` when the task,
    ``dataset`` and metrics are all known."""
    results = None
    if task and dataset and after:
        results = [
            EvalResult(
                task_type=task,
                dataset_type=dataset,
                dataset_name=dataset,
                metric_type=name,
                metric_value=value,
                metric_name=f"{name} after KEN",
            )
            for name, value in sorted(after.items())
            if name != "loss"
        ] or None
    return ModelCardData(
        base_model=hub_base,
        library_name="ken-hf",
        license=base_license or _base_license(config),
        pipeline_tag=task,
        tags=["ken", "pruning"],
        eval_results=results,
        model_name=f"{hub_base or config.model_class or 'model'} (KEN)" if results else None,
    )


def _base_license(config: KENConfig) -> str | None:
    """``license`` from the front matter of the base's README.md: in its folder, or in the
    Hub cache for a Hub id (never downloaded for this); None when unknown."""
    base = config.base_model_name_or_path
    if not base:
        return None
    card: str | Path | None = Path(base) / "README.md"
    if not Path(base).is_dir():
        card = None
        if is_hub_id(base):
            cached = try_to_load_from_cache(base, "README.md", revision=config.base_model_revision)
            card = cached if isinstance(cached, str) else None
    if card is None or not Path(card).is_file():
        return None
    try:
        license_ = (metadata_load(Path(card)) or {}).get("license")
    except Exception:  # an unreadable or malformed card says nothing about the license
        return None
    return license_ if isinstance(license_, str) else None
