"""Selection rules by name, over many tensors: KEN and the rules it is compared against.

- ``"ken"``: KEN on the fine-tuned values (the paper's method);
- ``"ken_delta"``: KEN's rule applied to the change ``finetuned - pretrained`` instead of
  the fine-tuned values (a variant, not the paper's method);
- ``"largest_delta"``: the k largest ``|finetuned - pretrained|`` per row;
- ``"random"``: k positions per row drawn at random (seeded per tensor name).

All return masks of KEN's shape (k per row, rows as KEN sees them), so that every rule's
result is stored, applied and compared the same way. Tensors may require grad (a model's
parameters): the rules read them detached.

Memory: ``ken_delta`` forms the changes a chunk of rows at a time (the chunks ``ken`` selects
on, within ``max_memory``), and ``largest_delta`` a tensor at a time, so neither holds a
model-sized copy; ``pretrained`` may be a lazy mapping (``ken_hf.storage.checkpoints.LazyTensors``)
whose tensors are read on access: each is read once per rule call.
"""

from __future__ import annotations

import zlib
from collections.abc import Mapping

import torch

from ..errors import KENConfigError, KENError
from .baselines import largest_delta_select, random_select
from .ken import ken_select_many
from .rows import DEFAULT_MAX_MEMORY

RULES = ("ken", "ken_delta", "largest_delta", "random")
# Rules that look at the pre-trained values as well as the fine-tuned ones.
NEEDS_PRETRAINED = frozenset({"ken_delta", "largest_delta"})


def check_rule(rule: str) -> str:
    if rule not in RULES:
        raise KENConfigError(f"unknown selection rule {rule!r}; choose one of {', '.join(RULES)}")
    return rule


def select_by_rule(
    finetuned: Mapping[str, torch.Tensor],
    k: int,
    *,
    rule: str = "ken",
    pretrained: Mapping[str, torch.Tensor] | None = None,
    compat: bool = False,
    seed: int = 0,
    progress: bool = False,
    max_memory: int = DEFAULT_MAX_MEMORY,
) -> dict[str, torch.Tensor]:
    """``{name: bool mask of finetuned[name]'s shape}`` by ``rule`` with ``k`` kept per row.

    ``pretrained`` (same names and shapes) is needed by ``ken_delta`` and ``largest_delta``.
    ``compat`` applies to ``ken`` only. ``random`` draws from ``seed`` mixed with each
    tensor's name, so a tensor's mask does not depend on which other tensors are selected.
    ``max_memory``: the KEN rules' working memory per chunk of rows (see ``ken_select``).
    """
    check_rule(rule)
    # detached: the torch path (CUDA) writes into out= buffers, which autograd refuses
    finetuned = {name: tensor.detach() for name, tensor in finetuned.items()}
    if compat and rule != "ken":
        raise KENError(f"compat reproduces the published KEN code; it has no {rule!r} mode")
    if rule in NEEDS_PRETRAINED:
        if pretrained is None:
            raise KENError(f"rule {rule!r} needs the pre-trained tensors")
        missing = [name for name in finetuned if name not in pretrained]
        if missing:
            raise KENError(f"rule {rule!r}: no pre-trained tensor {missing[0]!r}")
    if rule == "ken":
        return ken_select_many(
            finetuned, k, compat=compat, progress=progress, max_memory=max_memory
        )
    if rule == "ken_delta":
        return ken_select_many(
            finetuned, k, minus=pretrained, progress=progress, max_memory=max_memory
        )
    if rule == "largest_delta":
        return {
            name: largest_delta_select(tensor, k, pretrained=pretrained[name].detach(), name=name)
            for name, tensor in finetuned.items()
        }
    return {
        name: random_select(tensor, k, seed=seed ^ zlib.crc32(name.encode()), name=name)
        for name, tensor in finetuned.items()
    }
