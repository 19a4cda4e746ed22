"""KEN on sharded training (FSDP2, DeepSpeed ZeRO-3): full tensors, one at a time.

Each parameter is gathered whole from every rank in turn (all ranks take part, in the same
order), the main process selects and rebuilds it, and what the main process wrote is
scattered back into every rank's shard. Only the main process holds the pre-trained
snapshot (one full copy of the weights, on its host) and the subnetwork; no process ever
holds more than one gathered tensor at a time.

FSDP version 1 shards flattened groups of parameters, not parameters: it is refused, with
the advice to use FSDP2 (``fsdp_version: 2`` in the accelerate or Trainer FSDP config).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
from tqdm.auto import tqdm

from .config import KENConfig
from .fingerprint import tensor_fingerprint
from .selection.rows import as_rows
from .serialization import PrunedTensor
from .subnetwork import (
    KENSubnetwork,
    placement,
    pruned_tensor,
    reset_to_subnetwork,
    select_masks,
)


def sharding_of(model: torch.nn.Module) -> str | None:
    """``"fsdp2"`` (DTensor parameters), ``"deepspeed"`` (ZeRO-3 partitioned parameters) or
    None (every parameter whole on every rank)."""
    for parameter in model.parameters():
        if _is_dtensor(parameter):
            return "fsdp2"
        if hasattr(parameter, "ds_id"):
            return "deepspeed"
    return None


def _is_dtensor(tensor: torch.Tensor) -> bool:
    from torch.distributed.tensor import DTensor

    return isinstance(tensor, DTensor)


def full_numel(parameter: torch.Tensor) -> int:
    """Values of the whole parameter (a ZeRO-3 partitioned one reports 0 locally)."""
    return getattr(parameter, "ds_numel", None) or parameter.numel()


@contextmanager
def gathered(parameter: torch.Tensor, *, write_back: bool = False) -> Iterator[torch.Tensor]:
    """The whole of ``parameter``, gathered from every rank (every rank must enter, in the
    same order). With ``write_back``, what rank 0 leaves in the yielded tensor replaces every
    rank's shard on exit. An unsharded parameter is yielded as it is."""
    with torch.no_grad():
        if _is_dtensor(parameter):  # FSDP2
            from torch.distributed.tensor import distribute_tensor

            full = parameter.full_tensor()
            yield full
            if write_back:
                mine = distribute_tensor(full, parameter.device_mesh, parameter.placements)
                parameter.to_local().copy_(mine.to_local())
        elif hasattr(parameter, "ds_id"):  # DeepSpeed ZeRO-3
            import deepspeed

            with deepspeed.zero.GatheredParameters(
                [parameter], modifier_rank=0 if write_back else None
            ):
                yield parameter.data
        else:
            yield parameter.detach()


def snapshot_sharded(
    model: torch.nn.Module, device: torch.device, *, main: bool
) -> dict[str, torch.Tensor]:
    """``{name: full copy on device}`` of every parameter on the main process; ``{}``
    elsewhere. Gathers one parameter at a time."""
    snapshot = {}
    for name, parameter in model.named_parameters():
        with gathered(parameter) as full:
            if main:
                snapshot[name] = full.detach().to(device, copy=True)
    return snapshot


def prune_sharded(
    model: torch.nn.Module,
    pretrained: dict[str, torch.Tensor],
    config: KENConfig,
    *,
    new_tensors: set[str],
    main: bool,
    progress: bool = True,
) -> KENSubnetwork | None:
    """KEN over a sharded model in place, one gathered parameter at a time, as
    ``prune_model`` does over a whole one. ``pretrained`` (the main process's snapshot) is
    ignored elsewhere. Returns the subnetwork on the main process, None elsewhere."""
    pruned: dict[str, PrunedTensor] = {}
    whole: dict[str, torch.Tensor] = {}
    fingerprints: dict[str, str] = {}
    named = list(model.named_parameters())
    for name, parameter in tqdm(named, desc="KEN (sharded)", disable=not (main and progress)):
        with gathered(parameter, write_back=True) as full:
            if not main or not full.is_floating_point():
                continue
            in_base = name in pretrained and name not in new_tensors
            fate = placement(name, config, in_base=in_base)
            if fate == "whole":
                whole[name] = full.detach().to("cpu", copy=True)
                continue
            base = pretrained[name]
            fingerprints[name] = tensor_fingerprint(base)
            if fate == "pruned":
                k = config.k_for(as_rows(full).shape[1])
                mask = select_masks({k: {name: full}}, {name: base}, config, False)[name]
                pruned[name] = pruned_tensor(mask, full, base)
            reset_to_subnetwork(full, base.to(full.device), pruned.get(name))
    if not main:
        return None
    return KENSubnetwork.of_model(model, config, pruned, whole, fingerprints)
