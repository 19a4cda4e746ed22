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

from collections.abc import Collection, Iterator
from contextlib import contextmanager

import torch
from tqdm.auto import tqdm

from ..config import KENConfig
from ..storage.checkpoints import tensors_of
from ..subnetwork import KENSubnetwork
from .base_source import BaseSource
from .plan import WHOLE, dominant_dtype, plan_tensors, process_tensor, rebuild_into, specs_of


def sharding_of(model: torch.nn.Module) -> str | None:
    """``"fsdp2"`` (DTensor parameters), ``"deepspeed"`` (ZeRO-3 partitioned parameters) or
    None (every parameter whole on every rank)."""
    for parameter in model.parameters():
        if _is_dtensor(parameter):
            return "fsdp2"
        if hasattr(parameter, "ds_id"):
            return "deepspeed"
    return None


def check_sharded_training(
    trainer: object, model: torch.nn.Module, *, auto_k: bool, pretrained_source: str
) -> str | None:
    """The sharding of a Trainer's ``model`` (``sharding_of``), for ``KENCallback``.

    Raises:
        NotImplementedError: FSDP version 1 (the Trainer's ``is_fsdp_enabled`` with no
            FSDP2 parameter), or ``auto_k`` or ``pretrained_source="checkpoint"`` with any
            sharding, with the reason.
    """
    sharding = sharding_of(model)
    if getattr(trainer, "is_fsdp_enabled", False) and sharding is None:
        raise NotImplementedError(
            "KENCallback needs FSDP2 (fsdp_version: 2 in the FSDP config): FSDP version 1 "
            "shards flattened groups of parameters, and KEN selects per parameter row"
        )
    if sharding and auto_k:
        raise NotImplementedError(
            f"KENCallback: auto_k is not available with sharded training ({sharding}); give "
            "k or keep_ratio"
        )
    if sharding and pretrained_source == "checkpoint":
        raise NotImplementedError(
            f"KENCallback: pretrained_source='checkpoint' is not available with sharded "
            f"training ({sharding}) yet: the main process holds a snapshot of the pre-trained "
            "values; use pretrained_source='auto' or 'snapshot'"
        )
    return sharding


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


def full_shape(tensor: torch.Tensor) -> tuple[int, ...]:
    """The whole tensor's shape (a ZeRO-3 partitioned parameter reports an empty one)."""
    return tuple(getattr(tensor, "ds_shape", None) or tensor.shape)


def prune_sharded(
    model: torch.nn.Module,
    pretrained: dict[str, torch.Tensor],
    config: KENConfig,
    *,
    new_tensors: Collection[str],
    main: bool,
    source: BaseSource | None = None,
    progress: bool = True,
) -> KENSubnetwork | None:
    """The sharded driver of the pipeline: KEN over a sharded model in place, one gathered
    tensor at a time, as ``prune_model`` does over a whole one. Every rank gathers every
    tensor in name order; the main process plans, runs the step and rebuilds each tensor,
    which is scattered back. ``pretrained`` (the main process's snapshot) is ignored
    elsewhere. Returns the subnetwork on the main process, None elsewhere."""
    tensors = tensors_of(model)
    plans = {}
    if main:
        specs = {name: (full_shape(t), t.dtype) for name, t in tensors.items()}
        prefix = getattr(model, "base_model_prefix", None) or None
        planned = plan_tensors(
            specs, specs_of(pretrained), config, new_tensors=new_tensors, prefix=prefix
        )
        plans = {plan.name: plan for plan in planned}

    def records():
        # Each record is consumed (its kept values copied out) before the tensor is
        # rebuilt and scattered back, when the generator resumes.
        for name in tqdm(sorted(tensors), desc="KEN (sharded)", disable=not (main and progress)):
            with gathered(tensors[name], write_back=True) as full:
                plan = plans.get(name)
                if plan is None:
                    continue
                base = pretrained[plan.base_name].to(full.device) if plan.base_name else None
                record = process_tensor(plan, full, base, config)
                yield record
                if base is not None:
                    rebuild_into(full, base, record)

    if not main:
        for _ in records():
            pass
        return None
    base_dtype = dominant_dtype(specs[name] for name, plan in plans.items() if plan.fate != WHOLE)
    return KENSubnetwork.from_records(
        records(), config, model=model, source=source, base_dtype=base_dtype
    )
