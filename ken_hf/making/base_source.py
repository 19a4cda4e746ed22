"""Which checkpoint a base model or state dict came from, and which of the fine-tune's
tensors it lacks (newly initialised, such as a classification head).

A subnetwork records its base checkpoint and stores whole the tensors that checkpoint
lacks, so the base must be known exactly: candidates are tried in order and accepted only
when some of their tensors equal the base's bit for bit (``first_difference``). When none
is, the caller either has the new tensors named or stops with ``cannot_tell``.

A checkpoint so found can also stand in for a copy of the pre-trained values
(``record_checkpoint``): every tensor is checked and fingerprinted once, and read again, a
tensor at a time and checked against its fingerprint, only when needed
(``CheckpointValues.open``).
"""

from __future__ import annotations

from collections.abc import Collection, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass

import torch

from ..config import KENConfig
from ..errors import KENConfigError
from ..storage.checkpoints import (
    Checkpoint,
    CheckpointError,
    LazyTensors,
    first_difference,
    match_names,
    new_tensor_names,
    rows_like,
    tensors_of,
)
from ..utils.fingerprint import tensor_fingerprint

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
            raise KENConfigError(f"KENConfig.base_model_name_or_path: {reason}")
        reasons.append(reason)
    return None, reasons


def cannot_tell(finetuned: Weights, names: Collection[str], reasons: list[str]) -> KENConfigError:
    """The error for a base whose checkpoint, and so whose new tensors, are unknown: it names
    the likely new tensors (those outside the model's ``base_model_prefix``) and the fix."""
    prefix = getattr(finetuned, "base_model_prefix", "") or ""
    likely = sorted(n for n in names if prefix and not n.startswith(prefix + "."))
    why = "; ".join(reasons) or "the base is a state dict or a model not loaded from a checkpoint"
    return KENConfigError(
        "cannot tell which tensors of the base are newly initialised, nor which checkpoint "
        f"the base is ({why}). Pass new_tensors= naming them (likely: {likely or 'none'}; "
        "an empty set if none is), or the base model as from_pretrained loaded it, or "
        "KENConfig(base_model_name_or_path=...) naming the base checkpoint"
    )


@dataclass(frozen=True)
class CheckpointValues:
    """A model's pre-trained values, left in their checkpoint: which checkpoint tensor each
    model tensor is, and the dtype and fingerprint (``tensor_fingerprint``) it was recorded
    in. Made by ``record_checkpoint``; read with ``open``."""

    source: BaseSource
    stored: dict[str, str]
    dtypes: dict[str, torch.dtype]
    fingerprints: dict[str, str]
    shapes: dict[str, tuple[int, ...]]

    @property
    def specs(self) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
        """``{model tensor name: (shape, dtype)}`` of the values, known without reading them."""
        return {name: (self.shapes[name], self.dtypes[name]) for name in self.stored}

    @contextmanager
    def open(
        self, devices: Mapping[str, torch.device | str] | None = None
    ) -> Iterator[LazyTensors]:
        """The values as a ``LazyTensors`` over the open checkpoint: each access reads the
        tensor (a fresh copy, of the model tensor's shape), casts it to the recorded dtype,
        checks its fingerprint and moves it to ``devices[name]`` (default: stays on the
        CPU). A tensor that no longer matches (the file was changed or replaced since it was
        recorded) raises ``CheckpointError`` naming it."""
        where = self.source.name_or_path
        with Checkpoint(where, revision=self.source.revision) as checkpoint:
            holds = set(checkpoint.names)

            def read(name: str) -> torch.Tensor:
                stored = self.stored[name]
                if stored not in holds:
                    raise CheckpointError(
                        f"tensor {name!r} ({stored!r}) is no longer in checkpoint {where!r}"
                    )
                value = checkpoint.read(stored).to(self.dtypes[name])
                if tensor_fingerprint(value) != self.fingerprints[name]:
                    raise CheckpointError(
                        f"tensor {name!r} ({stored!r}) of checkpoint {where!r} is no longer "
                        "what it was when its pre-trained values were recorded: the file was "
                        "changed or replaced since"
                    )
                return value.to(devices[name]) if devices is not None else value

            yield LazyTensors(read, self.stored)


def base_rows_of(
    source: BaseSource, tensors: Mapping[str, torch.Tensor], prefix: str | None = None
) -> dict[str, torch.Tensor]:
    """``tensors`` (a model's, by name) cut to the rows the checkpoint of ``source`` holds
    where they grew since (a vocabulary that gained tokens); the others as they are. Reads
    the checkpoint's headers only."""
    with Checkpoint(source.name_or_path, revision=source.revision) as checkpoint:
        stored = match_names(tensors, checkpoint.names, prefix or checkpoint.base_model_prefix)
        cut = {}
        for name, tensor in tensors.items():
            rows = rows_like(tensor, checkpoint.shape(stored[name])) if name in stored else None
            cut[name] = tensor if rows is None else rows
    return cut


def record_checkpoint(
    source: BaseSource,
    tensors: Mapping[str, torch.Tensor],
    *,
    prefix: str | None = None,
    compare: bool = True,
) -> CheckpointValues:
    """Record the checkpoint of ``source`` as the pre-trained values of ``tensors`` (a
    model's, by name): each floating-point tensor it holds (names matched as
    ``match_names`` does; ``prefix``: the model's ``base_model_prefix``, default the
    checkpoint's) is read once, a tensor at a time, cast to the model tensor's dtype and
    fingerprinted. With ``compare``, each must also equal the model's tensor bit for bit
    (the model holds its pre-trained values; a tensor that grew since, its first rows):
    else ``CheckpointError`` names the first that differs. Costs one read of the
    checkpoint; holds one tensor at a time."""
    with Checkpoint(source.name_or_path, revision=source.revision) as checkpoint:
        floating = [name for name, tensor in tensors.items() if tensor.is_floating_point()]
        stored = match_names(floating, checkpoint.names, prefix or checkpoint.base_model_prefix)
        dtypes, fingerprints, shapes = {}, {}, {}
        for name, stored_name in stored.items():
            value = checkpoint.read(stored_name).to(tensors[name].dtype)
            # a grown tensor (a vocabulary that gained tokens) is compared on its base's rows
            tensor = rows_like(tensors[name].detach(), value.shape)
            if compare and (tensor is None or not torch.equal(value.to(tensor.device), tensor)):
                raise CheckpointError(
                    f"tensor {name!r} of the model differs from {stored_name!r} of checkpoint "
                    f"{source.name_or_path!r}"
                )
            dtypes[name], fingerprints[name] = value.dtype, tensor_fingerprint(value)
            shapes[name] = tuple(value.shape)
    return CheckpointValues(source, stored, dtypes, fingerprints, shapes)
