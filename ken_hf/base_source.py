"""Which checkpoint a base model or state dict came from, and which of the fine-tune's
tensors it lacks (newly initialised, such as a classification head).

A subnetwork records its base checkpoint and stores whole the tensors that checkpoint
lacks, so the base must be known exactly: candidates are tried in order and accepted only
when some of their tensors equal the base's bit for bit (``first_difference``). When none
is, the caller either has the new tensors named or stops with ``cannot_tell``.
"""

from __future__ import annotations

from collections.abc import Collection, Mapping
from dataclasses import dataclass

import torch

from .checkpoints import (
    Checkpoint,
    CheckpointError,
    first_difference,
    new_tensor_names,
    tensors_of,
)
from .config import KENConfig

Weights = torch.nn.Module | Mapping[str, torch.Tensor]


@dataclass(frozen=True)
class BaseSource:
    """The checkpoint a base was loaded from, and which tensors it does not hold."""

    name_or_path: str
    revision: str | None
    missing: frozenset[str]


def _candidates(
    base: Weights, finetuned: Weights, config: KENConfig
) -> list[tuple[str, str | None]]:
    """``[(name_or_path, revision)]`` that may hold the base: the config's when it names one
    (alone), else the base model's source, else the fine-tune's (a fine-tune loaded from
    its base's checkpoint names it; one loaded from its own folder fails the check)."""
    if config.base_model_name_or_path:
        return [(config.base_model_name_or_path, config.base_model_revision)]
    found = []
    for model in (base, finetuned):
        source = getattr(model, "name_or_path", "") if isinstance(model, torch.nn.Module) else ""
        if source and source not in [c for c, _ in found]:
            found.append((source, getattr(getattr(model, "config", None), "_commit_hash", None)))
    return found


def locate_base(
    base: Weights, finetuned: Weights, config: KENConfig, base_tensors: Mapping[str, torch.Tensor]
) -> tuple[BaseSource | None, list[str]]:
    """The checkpoint that holds ``base_tensors`` (some of its tensors compared bit for bit)
    among the candidates, and why each other candidate was not it. A checkpoint named in
    ``config`` that cannot be read or does not hold the base is an error."""
    prefix = getattr(finetuned, "base_model_prefix", None) or None
    names = [n for n, t in tensors_of(finetuned).items() if t.is_floating_point()]
    reasons = []
    for source, revision in _candidates(base, finetuned, config):
        try:
            with Checkpoint(source, revision=revision) as checkpoint:
                differs = first_difference(checkpoint, base_tensors, prefix)
                missing = new_tensor_names(names, checkpoint, prefix)
        except (CheckpointError, OSError) as error:
            reason = f"{source!r} cannot be read ({error})"
        else:
            if differs is None:
                return BaseSource(source, revision, frozenset(missing)), reasons
            reason = f"{source!r} does not hold the base given (tensor {differs!r} differs)"
        if config.base_model_name_or_path:
            raise ValueError(f"KENConfig.base_model_name_or_path: {reason}")
        reasons.append(reason)
    return None, reasons


def cannot_tell(finetuned: Weights, names: Collection[str], reasons: list[str]) -> ValueError:
    """The error for a base whose checkpoint, and so whose new tensors, are unknown: it names
    the likely new tensors (those outside the model's ``base_model_prefix``) and the fix."""
    prefix = getattr(finetuned, "base_model_prefix", "") or ""
    likely = sorted(n for n in names if prefix and not n.startswith(prefix + "."))
    why = "; ".join(reasons) or "the base is a state dict or a model not loaded from a checkpoint"
    return ValueError(
        "cannot tell which tensors of the base are newly initialised, nor which checkpoint "
        f"the base is ({why}). Pass new_tensors= naming them (likely: {likely or 'none'}; "
        "an empty set if none is), or the base model as from_pretrained loaded it, or "
        "KENConfig(base_model_name_or_path=...) naming the base checkpoint"
    )
