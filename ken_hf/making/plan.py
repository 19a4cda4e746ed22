"""One way through for every tensor: a plan (what happens to each tensor, decided from names,
shapes and dtypes alone, before any work) and a step (one tensor pair in, one record out).

Four drivers call them and differ only in where tensors come from and where records go:
``KENSubnetwork.from_weights`` (a model or state dict in memory), ``InPlacePrune`` (a model
in training, a tensor at a time: ``ken_hf.making.in_place``), ``prune_checkpoints``
(memory-mapped checkpoints, ``ken_hf.making.from_checkpoints``) and ``prune_sharded``
(tensors gathered from FSDP2 / ZeRO-3 shards, ``ken_hf.making.sharded``). Every rule and
edge case lives here, once:

- KEN sees the floating-point tensors of the fine-tuned model's state: its parameters and
  its persistent buffers (tied tensors once); integer tensors are left to the base.
- A tensor the base does not hold, or named in ``new_tensors`` (newly initialised, such as a
  classification head), or listed in ``modules_to_save``, is stored whole.
- Any other tensor is pruned when ``KENConfig`` targets it and reset to its pre-trained
  values otherwise; both record the base tensor's fingerprint.
- The plan is in name order, so that every driver writes the same file for the same pair.
"""

from __future__ import annotations

import math
from collections.abc import Collection, Iterable, Mapping
from dataclasses import dataclass

import torch

from ..config import KENConfig
from ..errors import KENError
from ..selection import select_by_rule
from ..selection.rows import DEFAULT_MAX_MEMORY
from ..storage.checkpoints import LazyTensors, match_names
from ..storage.delta_codec import BITS_DTYPES, bit_difference
from ..storage.format import dtype_name
from ..storage.safetensors_io import FLOAT_DTYPES
from ..utils.fingerprint import tensor_fingerprint

PRUNED, WHOLE, RESET = "pruned", "whole", "reset"
# (shape, dtype) of a tensor, known before it is read.
TensorSpec = tuple[tuple[int, ...], torch.dtype | None]


class PlanError(KENError):
    """A base and a fine-tune that do not belong together (shapes, dtypes, no tensor in
    common), found before any selection."""


@dataclass(frozen=True)
class TensorPlan:
    """What happens to one fine-tuned tensor.

    Attributes:
        name: the tensor's name in the fine-tuned model.
        fate: ``PRUNED`` (k values per row kept), ``WHOLE`` (stored whole) or ``RESET``
            (back to its pre-trained values).
        base_name: its name in the base (None when stored whole because it is new).
        k: values kept per row (pruned tensors only).
        base_rows: for a tensor that grew along its first dimension (embeddings and heads
            of a vocabulary that gained tokens): the rows the base has. Those rows are
            pruned or reset as the fate says; the rows after them have no pre-trained
            values and are stored whole (None: the shapes are equal).
    """

    name: str
    fate: str
    base_name: str | None
    k: int | None = None
    base_rows: int | None = None


@dataclass
class TensorRecord:
    """What the step found for one tensor.

    Attributes:
        plan: the tensor's plan.
        finetuned: the fine-tuned tensor (what a ``WHOLE`` tensor stores).
        mask: bool, ``finetuned``'s shape: the kept positions (``PRUNED`` only).
        fingerprint: of the base tensor (``PRUNED`` and ``RESET``).
        delta: ``[mean |change| over kept positions, ... over reset ones]`` (``PRUNED``).
        kept: ``[K]`` the fine-tuned values at the kept positions, on the CPU (``PRUNED``).
        changed: bool ``[K]``: kept values whose bits differ from the base's (``PRUNED``).
        difference: integers ``[C]``: their zigzag-coded bit-pattern differences from the
            base (``PRUNED``; see ``ken_hf.storage.delta_codec.bit_difference``).
        added: ``[rows - base_rows, ...]`` the rows a grown tensor has beyond the base's,
            on the CPU (``plan.base_rows`` set; ``finetuned`` and ``mask`` then cover the
            base's rows only).
    """

    plan: TensorPlan
    finetuned: torch.Tensor
    mask: torch.Tensor | None = None
    fingerprint: str | None = None
    delta: list[float | None] | None = None
    kept: torch.Tensor | None = None
    changed: torch.Tensor | None = None
    difference: torch.Tensor | None = None
    added: torch.Tensor | None = None


def plan_tensors(
    finetuned: Mapping[str, TensorSpec],
    base: Mapping[str, TensorSpec],
    config: KENConfig,
    *,
    new_tensors: Collection[str] = (),
    prefix: str | None = None,
) -> list[TensorPlan]:
    """The plan for every floating-point tensor of ``finetuned``, in name order.

    ``finetuned`` and ``base``: ``{name: (shape, dtype)}``. Names match as ``from_pretrained``
    matches them (``prefix``: the model's ``base_model_prefix``). Raises ``PlanError``
    naming the tensor when a pair differs in shape or dtype, or when nothing matches."""
    names = sorted(name for name, (_, dtype) in finetuned.items() if dtype in FLOAT_DTYPES)
    pairs = match_names(names, base, prefix)
    for name in new_tensors:
        pairs.pop(name, None)
    if names and not pairs and not new_tensors:
        raise PlanError("the base and the fine-tune have no tensor in common")
    plans = []
    for name in names:
        shape, dtype = finetuned[name]
        if name not in pairs or config.saves_whole(name):
            plans.append(TensorPlan(name, WHOLE, pairs.get(name)))
            continue
        base_shape, base_dtype = base[pairs[name]]
        base_rows = _grown_rows(name, tuple(base_shape), tuple(shape))
        if base_dtype != dtype:
            raise PlanError(
                f"tensor {name!r}: base dtype {base_dtype} differs from fine-tuned dtype "
                f"{dtype} (load or convert both in one dtype)"
            )
        if config.targets(name):
            width = math.prod(shape[1:]) if len(shape) >= 2 else math.prod(shape)
            plans.append(TensorPlan(name, PRUNED, pairs[name], config.k_for(width), base_rows))
        else:
            plans.append(TensorPlan(name, RESET, pairs[name], base_rows=base_rows))
    return plans


def _grown_rows(name: str, base_shape: tuple, shape: tuple) -> int | None:
    """The base's rows when the fine-tuned tensor grew along its first dimension only, by
    at most as many rows as the base has (a vocabulary that gained tokens:
    ``resize_token_embeddings``; the loaders accept no more), None when the shapes are
    equal; ``PlanError`` for any other difference."""
    if base_shape == shape:
        return None
    if len(shape) >= 1 and len(base_shape) == len(shape) and base_shape[1:] == shape[1:]:
        if 0 < base_shape[0] < shape[0] <= 2 * base_shape[0]:
            return base_shape[0]
    raise PlanError(
        f"tensor {name!r}: base shape {base_shape} differs from fine-tuned shape {shape} "
        "(only a first dimension that grew, at most twofold, as embeddings of added tokens "
        "do, is supported)"
    )


def dominant_dtype(specs: Iterable[TensorSpec]) -> str | None:
    """The dtype holding most values among tensors of ``specs`` (``"float32"``, ...)."""
    counts: dict[torch.dtype, int] = {}
    for shape, dtype in specs:
        counts[dtype] = counts.get(dtype, 0) + math.prod(shape)
    return dtype_name(max(counts, key=counts.get)) if counts else None


def specs_of(tensors: Mapping[str, torch.Tensor]) -> dict[str, TensorSpec]:
    """``{name: (shape, dtype)}`` of tensors in memory."""
    return {name: (tuple(t.shape), t.dtype) for name, t in tensors.items()}


def select_masks(
    plans: list[TensorPlan],
    finetuned: Mapping[str, torch.Tensor],
    base: Mapping[str, torch.Tensor],
    config: KENConfig,
    *,
    progress: bool = False,
    max_memory: int = DEFAULT_MAX_MEMORY,
) -> dict[str, torch.Tensor]:
    """``{name: bool mask}`` for the ``PRUNED`` plans among ``plans``, by ``config.rule``.
    Tensors of one k are selected together (rows of small tensors share chunks); a mask
    does not depend on which other tensors are selected with it. ``finetuned`` is keyed by
    plan name, ``base`` by base name; ``base`` may be lazy (``LazyTensors``)."""
    groups: dict[int, list[TensorPlan]] = {}
    for plan in plans:
        if plan.fate == PRUNED:
            groups.setdefault(plan.k, []).append(plan)
    masks: dict[str, torch.Tensor] = {}
    for k, group in groups.items():
        base_names = {p.name: p.base_name for p in group}
        # looked up on access: a lazy base (read from a checkpoint) is then read a tensor
        # at a time, and not at all by the rules that do not look at it
        pretrained = LazyTensors(lambda name, names=base_names: base[names[name]], base_names)
        masks.update(
            select_by_rule(
                {p.name: finetuned[p.name].detach()[: p.base_rows] for p in group},
                k,
                rule=config.rule,
                pretrained=pretrained,
                compat=config.compat,
                seed=config.seed,
                progress=progress,
                max_memory=max_memory,
            )
        )
    return masks


def process_tensor(
    plan: TensorPlan,
    finetuned: torch.Tensor,
    base: torch.Tensor | None,
    config: KENConfig,
    *,
    mask: torch.Tensor | None = None,
    max_memory: int = DEFAULT_MAX_MEMORY,
) -> TensorRecord:
    """The step: one fine-tuned tensor and its base tensor (None for ``WHOLE``) in, one
    record out. A ``PRUNED`` tensor's ``mask`` is selected here unless given (a driver that
    selects many tensors at once passes it)."""
    finetuned = finetuned.detach()
    if plan.fate == WHOLE:
        return TensorRecord(plan, finetuned)
    base = base.detach()
    fingerprint = tensor_fingerprint(base)
    added = None
    if plan.base_rows is not None:  # the rows beyond the base's are stored whole
        added = finetuned[plan.base_rows :].to("cpu", copy=True)
        finetuned = finetuned[: plan.base_rows]
        if plan.fate == RESET:  # the base's rows reset: nothing of them kept
            mask = torch.zeros(finetuned.shape, dtype=torch.bool, device=finetuned.device)
    if plan.fate == RESET and added is None:
        return TensorRecord(plan, finetuned, fingerprint=fingerprint)
    if mask is None:
        mask = select_masks(
            [plan], {plan.name: finetuned}, {plan.base_name: base}, config, max_memory=max_memory
        )[plan.name]
    kept, changed, difference, delta = kept_changes(finetuned, base, mask)
    return TensorRecord(plan, finetuned, mask, fingerprint, delta, kept, changed, difference, added)


def kept_changes(
    finetuned: torch.Tensor, base: torch.Tensor, mask: torch.Tensor, *, block: int = 2**20
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, list[float | None]]:
    """The kept values of one tensor and how they differ from the base's, on the CPU:
    ``kept`` ``[K]`` (the fine-tuned values where ``mask``, bool of the tensors' shape, is
    set), ``bit_difference``'s ``changed`` ``[K]`` and ``difference`` ``[C]``, and the
    delta statistics ``[mean |fine-tuned - pre-trained| over the kept positions, ... over
    the reset ones]`` (None where there are none).

    One pass of ``block`` values at a time, into arrays allocated once: memory stays at the
    results and one block's work, where whole-tensor selections would build int64 helpers
    as long as the tensor and several temporaries as long as the kept values. The block is
    part of the file's contents: the statistics are float sums, block by block."""
    flat, base_flat = finetuned.reshape(-1), base.reshape(-1)
    flat_mask = mask.reshape(-1).to(flat.device)
    # count_nonzero: a bool sum() would widen the whole mask to int64 first
    count, numel = int(torch.count_nonzero(flat_mask)), flat.numel()
    kept = torch.empty(count, dtype=flat.dtype)
    changed = torch.empty(count, dtype=torch.bool)
    difference = torch.empty(count, dtype=BITS_DTYPES[flat.dtype])
    taken = changes = 0
    kept_sum = total_sum = 0.0
    for start in range(0, numel, block):
        piece = slice(start, start + block)
        base_piece = base_flat[piece].to(flat.device)
        change = (flat[piece].double() - base_piece.double()).abs()
        # numpy's pairwise sums: torch's threaded float64 sum rounds differently with the
        # thread count, and these statistics are written into the file
        total_sum += float(change.cpu().numpy().sum())
        kept_sum += float(torch.masked_select(change, flat_mask[piece]).cpu().numpy().sum())
        values = torch.masked_select(flat[piece], flat_mask[piece]).cpu()
        base_values = torch.masked_select(base_piece, flat_mask[piece]).cpu()
        piece_changed, piece_difference = bit_difference(values, base_values)
        kept[taken : taken + values.numel()] = values
        changed[taken : taken + values.numel()] = piece_changed
        difference[changes : changes + piece_difference.numel()] = piece_difference
        taken, changes = taken + values.numel(), changes + piece_difference.numel()
    difference = difference[:changes]
    if 2 * changes < count:  # most kept values unchanged: not K slots for C values
        difference = difference.clone()
    delta = [
        kept_sum / count if count else None,
        (total_sum - kept_sum) / (numel - count) if numel > count else None,
    ]
    return kept, changed, difference, delta


def rebuild_into(tensor: torch.Tensor, base: torch.Tensor, record: TensorRecord) -> None:
    """Write into ``tensor`` (the fine-tuned one, in place) what the subnetwork rebuilds:
    unchanged when stored whole, else the pre-trained values with the kept fine-tuned
    values in place (in a grown tensor's base rows; its new rows are kept whole)."""
    if record.plan.fate == WHOLE:
        return
    tensor = tensor[: record.plan.base_rows]  # a grown tensor's new rows stay as they are
    with torch.no_grad():
        if record.mask is None:
            tensor.copy_(base)
            return
        # written in place (``out``): no second copy of the tensor
        torch.where(record.mask.to(tensor.device), tensor, base.to(tensor.device), out=tensor)
