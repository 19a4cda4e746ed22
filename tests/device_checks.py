"""What the device tests and `make gpu-check` (benchmarks/gpu_check.py) both check: the masks
a subnetwork holds against those the CPU selects from the same fine-tuned values."""

from __future__ import annotations

from collections.abc import Mapping

import torch
from transformers import TrainerCallback

from ken_hf import KENSubnetwork, ken_select_many
from ken_hf.storage.checkpoints import tensors_of


class KeepFineTuned(TrainerCallback):
    """Copies the fine-tuned weights to the CPU when training ends, before KENCallback
    changes them (callbacks run in the order they were added: add this one first)."""

    def __init__(self) -> None:
        self.weights: dict[str, torch.Tensor] = {}

    def on_train_end(self, args, state, control, model=None, **kwargs):
        self.weights = {name: t.detach().cpu().clone() for name, t in tensors_of(model).items()}


def masks_differing_from_cpu(
    subnetwork: KENSubnetwork, finetuned: Mapping[str, torch.Tensor]
) -> list[str]:
    """Names of the subnetwork's pruned tensors whose mask differs from the one KEN selects
    on the CPU from ``finetuned`` (the fine-tuned values) with the same k per row."""
    differing = []
    for name, pruned in subnetwork.pruned.items():
        rows = pruned.shape[0] if len(pruned.shape) >= 2 else 1
        k = pruned.positions.numel() // rows
        expected = ken_select_many({name: finetuned[name].cpu()}, k)[name]
        if not torch.equal(subnetwork.mask(name).cpu(), expected):
            differing.append(name)
    return differing
