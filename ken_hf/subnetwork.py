"""``KENSubnetwork``: which positions of which tensors KEN kept, and their fine-tuned values.

The data flows one way: weights -> masks (layer 1, ``ken_hf.selection``) -> subnetwork ->
file. A subnetwork can be saved, pushed to the Hub, applied to a base model and taken off
it again, leaving the base exactly as it was.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .config import KENConfig
from .fingerprint import tensor_fingerprint
from .selection import select_by_rule
from .selection.rows import as_rows
from .serialization import (
    SUBNETWORK_NAME,
    PrunedTensor,
    StoredSubnetwork,
    read_subnetwork,
    write_subnetwork,
)

Weights = torch.nn.Module | Mapping[str, torch.Tensor]
# Selects masks for tensors grouped by k:
# ({k: {name: fine-tuned}}, {name: pre-trained}, config, progress) -> {name: mask}.
MaskSelector = Callable[
    [dict[int, dict[str, torch.Tensor]], Mapping[str, torch.Tensor], KENConfig, bool],
    dict[str, torch.Tensor],
]


def select_masks(
    groups: dict[int, dict[str, torch.Tensor]],
    pretrained: Mapping[str, torch.Tensor],
    config: KENConfig,
    progress: bool,
) -> dict[str, torch.Tensor]:
    """Masks by ``config.rule`` for tensors grouped by their k, in this process."""
    masks: dict[str, torch.Tensor] = {}
    for k, tensors in groups.items():
        masks.update(
            select_by_rule(
                tensors,
                k,
                rule=config.rule,
                pretrained=pretrained,
                compat=config.compat,
                seed=config.seed,
                progress=progress,
            )
        )
    return masks


def _flat(parameter: torch.Tensor) -> torch.Tensor:
    """A flat view of a parameter's storage (parameters are contiguous)."""
    if not parameter.is_contiguous():
        raise ValueError("KEN writes into contiguous parameters only")
    return parameter.detach().view(-1)


def _write_at(parameter: torch.Tensor, positions: torch.Tensor, values: torch.Tensor) -> None:
    """Write ``values`` ``[count]`` at the flat ``positions`` ``[count]`` of ``parameter``."""
    flat = _flat(parameter)
    flat.index_copy_(0, positions.to(flat.device), values.to(flat.device, flat.dtype))


def _newly_initialised(base: Weights) -> set[str]:
    """Parameters of a base model that its own checkpoint does not hold (none for a state
    dict or a model not loaded from a checkpoint)."""
    source = getattr(base, "name_or_path", "") if isinstance(base, torch.nn.Module) else ""
    if not source:
        return set()
    from .hub import new_parameters

    return new_parameters(base, source)


def delta_statistics(
    finetuned: torch.Tensor, base: torch.Tensor, mask: torch.Tensor, *, block: int = 2**20
) -> list[float | None]:
    """``[mean |fine-tuned - pre-trained| over the kept positions, ... over the reset ones]``
    (None where there are none), for tensors and bool ``mask`` of one shape; computed in
    flat blocks of ``block`` values so that memory stays small next to the tensor."""
    finetuned, mask = finetuned.detach().reshape(-1), mask.reshape(-1)
    base = base.detach().reshape(-1)
    kept = total = 0.0
    for start in range(0, finetuned.numel(), block):
        piece = slice(start, start + block)
        change = (finetuned[piece].double() - base[piece].to(finetuned.device).double()).abs()
        total += float(change.sum())
        kept += float(torch.masked_select(change, mask[piece].to(change.device)).sum())
    # count_nonzero: a bool sum() would widen the whole mask to int64 first
    count, numel = int(torch.count_nonzero(mask)), finetuned.numel()
    return [
        kept / count if count else None,
        (total - kept) / (numel - count) if numel > count else None,
    ]


def pruned_tensor(mask: torch.Tensor, finetuned: torch.Tensor, base: torch.Tensor) -> PrunedTensor:
    """The ``PrunedTensor`` of ``finetuned`` kept at ``mask`` (same shape), with the delta
    statistics against ``base`` recorded."""
    pruned = PrunedTensor.from_mask(mask, finetuned)
    pruned.delta_kept, pruned.delta_reset = delta_statistics(finetuned, base, mask)
    return pruned


def placement(name: str, config: KENConfig, *, in_base: bool) -> str:
    """Where a fine-tuned floating-point tensor goes: ``"whole"`` (stored whole: listed in
    ``modules_to_save``, or not in the base, such as a new head), ``"pruned"`` (KEN keeps k
    values per row) or ``"reset"`` (back to its pre-trained values)."""
    if not in_base or config.saves_whole(name):
        return "whole"
    return "pruned" if config.targets(name) else "reset"


class BaseMismatchError(ValueError):
    """A subnetwork applied to a base model it was not made from."""


def parameters_of(weights: Weights) -> dict[str, torch.Tensor]:
    """Named tensors of a model (its parameters, tied ones once) or of a state dict."""
    if isinstance(weights, torch.nn.Module):
        return {name: p for name, p in weights.named_parameters()}
    return dict(weights)


def fingerprints_of(weights: Weights) -> dict[str, str]:
    """``{name: fingerprint}`` of every floating-point tensor of ``weights``."""
    return {
        name: tensor_fingerprint(t)
        for name, t in parameters_of(weights).items()
        if t.is_floating_point()
    }


@dataclass
class KENSubnetwork:
    """The KEN subnetwork of a fine-tuned model against its base.

    Attributes:
        config: the ``KENConfig`` it was made with.
        pruned: ``{name: PrunedTensor}`` kept positions and values of each pruned tensor.
        whole: ``{name: tensor}`` tensors stored whole (``modules_to_save``, new heads).
        fingerprints: ``{name: hex}`` of every base tensor the result depends on.
    """

    config: KENConfig
    pruned: dict[str, PrunedTensor]
    whole: dict[str, torch.Tensor]
    fingerprints: dict[str, str]
    model_config: dict | None = None
    metrics: dict[str, float] = field(default_factory=dict)

    @classmethod
    def from_weights(
        cls,
        base: Weights,
        finetuned: Weights,
        config: KENConfig,
        *,
        new_tensors: frozenset[str] | set[str] | None = None,
        progress: bool = True,
        selector: MaskSelector = select_masks,
    ) -> KENSubnetwork:
        """Select the subnetwork of ``finetuned`` (a model or state dict) against ``base``.

        Every floating-point tensor of ``finetuned`` is pruned, stored whole or left to the
        base, as ``config`` says. Tensors absent from ``base`` or named in ``new_tensors``
        (newly initialised ones, such as a classification head: their "pre-trained" values
        are random) are stored whole and not fingerprinted. ``new_tensors=None`` finds them
        when ``base`` is a model loaded from a checkpoint: the parameters that checkpoint
        does not hold. ``selector`` computes the masks (the training layer passes one that
        shares the work among distributed ranks).
        """
        if new_tensors is None:
            new_tensors = _newly_initialised(base)
        base_tensors = {
            name: t for name, t in parameters_of(base).items() if name not in new_tensors
        }
        finetuned_tensors = {
            name: t for name, t in parameters_of(finetuned).items() if t.is_floating_point()
        }
        to_prune: dict[int, dict[str, torch.Tensor]] = {}
        whole: dict[str, torch.Tensor] = {}
        for name, tensor in finetuned_tensors.items():
            fate = placement(name, config, in_base=name in base_tensors)
            if fate == "whole":
                whole[name] = tensor.detach().clone()
                continue
            if base_tensors[name].shape != tensor.shape:
                raise ValueError(
                    f"tensor {name!r}: base shape {tuple(base_tensors[name].shape)} differs "
                    f"from fine-tuned shape {tuple(tensor.shape)}"
                )
            if fate == "pruned":
                k = config.k_for(as_rows(tensor).shape[1])
                to_prune.setdefault(k, {})[name] = tensor.detach()
        masks = selector(to_prune, base_tensors, config, progress)
        pruned = {}
        for name, mask in masks.items():
            pruned[name] = pruned_tensor(mask, finetuned_tensors[name], base_tensors[name])
        fingerprints = {
            name: tensor_fingerprint(base_tensors[name])
            for name in finetuned_tensors
            if name in base_tensors
        }
        if isinstance(finetuned, torch.nn.Module):
            return cls.of_model(finetuned, config, pruned, whole, fingerprints)
        return cls(config, pruned, whole, fingerprints)

    @classmethod
    def of_model(
        cls,
        model: torch.nn.Module,
        config: KENConfig,
        pruned: dict[str, PrunedTensor],
        whole: dict[str, torch.Tensor],
        fingerprints: dict[str, str],
    ) -> KENSubnetwork:
        """A subnetwork of ``model``: its config (``config.json``) is kept, and ``config``
        gets the model's class and source where it does not name them."""
        if not hasattr(model, "config"):
            return cls(config, pruned, whole, fingerprints)
        # FSDP2 subclasses the model's class on the fly: record the class it came from.
        model_class = next(
            c for c in type(model).__mro__ if not c.__module__.startswith("torch.distributed")
        )
        config = dataclasses.replace(
            config,
            model_class=config.model_class or model_class.__name__,
            base_model_name_or_path=config.base_model_name_or_path
            or getattr(model, "name_or_path", None)
            or None,
        )
        return cls(config, pruned, whole, fingerprints, model.config.to_dict())

    # -- what it holds ------------------------------------------------------------------
    def kept_fraction(self) -> float:
        """Share of the pruned tensors' values that keep their fine-tuned value."""
        total = sum(p.shape.numel() for p in self.pruned.values())
        return sum(p.positions.numel() for p in self.pruned.values()) / total if total else 1.0

    def kept_values(self) -> int:
        """Values that keep their fine-tuned value: kept positions plus whole tensors."""
        return sum(p.positions.numel() for p in self.pruned.values()) + sum(
            t.numel() for t in self.whole.values()
        )

    def reset_fraction(self, model_parameters: int) -> float:
        """Share of all ``model_parameters`` that end at their pre-trained value."""
        return 1.0 - self.kept_values() / model_parameters

    def mask(self, name: str) -> torch.Tensor:
        """Bool tensor of the kept positions of pruned tensor ``name``."""
        return self.pruned[name].mask()

    # -- applying to a model ------------------------------------------------------------
    def check_base(self, fingerprints: Mapping[str, str]) -> None:
        """Raise ``BaseMismatchError`` naming the first tensor (in the model's order, given
        by ``fingerprints``) whose base differs, or a base tensor the model lacks."""
        missing = [name for name in self.fingerprints if name not in fingerprints]
        if missing:
            raise BaseMismatchError(
                f"tensor {missing[0]!r} of the subnetwork's base is missing from the model "
                f"({len(missing)} missing)"
            )
        for name, actual in fingerprints.items():
            if name in self.fingerprints and actual != self.fingerprints[name]:
                raise BaseMismatchError(
                    f"tensor {name!r} differs from the base this subnetwork was made from "
                    f"(another model, revision, dtype or a changed value)"
                )

    def apply_to(
        self, model: torch.nn.Module, *, base_fingerprints: Mapping[str, str] | None = None
    ) -> dict[str, torch.Tensor]:
        """Write the subnetwork into ``model``, which must hold the base weights.

        Everything is checked before any weight changes. Returns the base values it
        overwrote (``{name: values}``), which ``restore`` puts back. Costs time in
        proportion to the kept values (flat gathers and scatters).
        """
        parameters = parameters_of(model)
        self.check_base(base_fingerprints or fingerprints_of(model))
        for name in list(self.pruned) + list(self.whole):
            if name not in parameters:
                raise BaseMismatchError(f"tensor {name!r} is not a parameter of the model")
            expected = self.pruned[name].shape if name in self.pruned else self.whole[name].shape
            if parameters[name].shape != expected:
                raise BaseMismatchError(
                    f"tensor {name!r}: model shape {tuple(parameters[name].shape)}, "
                    f"subnetwork shape {tuple(expected)}"
                )
        saved: dict[str, torch.Tensor] = {}
        with torch.no_grad():
            for name, pruned in self.pruned.items():
                flat = _flat(parameters[name])
                saved[name] = flat.index_select(0, pruned.positions.to(flat.device))
                _write_at(parameters[name], pruned.positions, pruned.values)
            for name, tensor in self.whole.items():
                saved[name] = parameters[name].detach().clone()
                parameters[name].copy_(tensor)
        return saved

    def restore(self, model: torch.nn.Module, saved: Mapping[str, torch.Tensor]) -> None:
        """Put back the base values ``apply_to`` returned: the model is the base again."""
        parameters = parameters_of(model)
        with torch.no_grad():
            for name, pruned in self.pruned.items():
                _write_at(parameters[name], pruned.positions, saved[name])
            for name in self.whole:
                parameters[name].copy_(saved[name])

    # -- files and the Hub --------------------------------------------------------------
    def save_pretrained(self, save_directory: str | os.PathLike) -> None:
        """Write ``ken_config.json``, ``ken_subnetwork.safetensors``, the model's
        ``config.json`` and a model card into ``save_directory``, atomically."""
        from .card import model_card
        from .io import atomic_folder, write_text_atomic

        with atomic_folder(save_directory) as staging:
            self.config.save_pretrained(staging)
            write_subnetwork(
                StoredSubnetwork(self.pruned, self.whole, self.fingerprints),
                staging / SUBNETWORK_NAME,
            )
            if self.model_config is not None:
                import json

                write_text_atomic(
                    staging / "config.json", json.dumps(self.model_config, indent=2, sort_keys=True)
                )
            write_text_atomic(staging / "README.md", model_card(self.config, staging, self.metrics))

    @classmethod
    def from_pretrained(
        cls, name_or_path: str | os.PathLike, *, revision: str | None = None, **hub_kwargs
    ) -> KENSubnetwork:
        """Read a subnetwork folder, local or on the Hub; everything is validated."""
        import json

        from .hub import resolve_folder

        folder = resolve_folder(name_or_path, revision=revision, **hub_kwargs)
        config = KENConfig.from_pretrained(folder)
        stored = read_subnetwork(folder / SUBNETWORK_NAME)
        model_config = None
        if (folder / "config.json").is_file():
            model_config = json.loads((folder / "config.json").read_text(encoding="utf-8"))
        return cls(config, stored.pruned, stored.whole, stored.fingerprints, model_config)

    def push_to_hub(self, repo_id: str, **push_kwargs) -> str:
        """Publish only the subnetwork folder to ``repo_id``; returns the commit URL."""
        import tempfile

        from .hub import push_folder

        with tempfile.TemporaryDirectory() as scratch:
            folder = Path(scratch) / "ken"
            self.save_pretrained(folder)
            return push_folder(folder, repo_id, **push_kwargs)


def prune_model(
    finetuned: torch.nn.Module,
    base: Weights,
    config: KENConfig,
    *,
    new_tensors: frozenset[str] | set[str] | None = None,
    progress: bool = True,
    selector: MaskSelector = select_masks,
) -> KENSubnetwork:
    """The functional path: select KEN's subnetwork of ``finetuned`` against ``base`` (a
    model or state dict), reset ``finetuned`` in place to what the subnetwork rebuilds
    (kept values fine-tuned, all else pre-trained), and return the subnetwork.
    ``new_tensors`` and ``selector``: as in ``KENSubnetwork.from_weights``."""
    subnetwork = KENSubnetwork.from_weights(
        base, finetuned, config, new_tensors=new_tensors, progress=progress, selector=selector
    )
    base_tensors = parameters_of(base)
    with torch.no_grad():
        for name, parameter in parameters_of(finetuned).items():
            if name in subnetwork.whole or name not in base_tensors:
                continue
            if not parameter.is_floating_point():
                continue
            reset_to_subnetwork(parameter, base_tensors[name], subnetwork.pruned.get(name))
    return subnetwork


def reset_to_subnetwork(
    parameter: torch.Tensor, base: torch.Tensor, pruned: PrunedTensor | None
) -> None:
    """Write into ``parameter`` what a subnetwork rebuilds from ``base`` (same shape): the
    pre-trained values, with the kept fine-tuned values of ``pruned`` (if any) in place."""
    with torch.no_grad():
        parameter.copy_(base)
        if pruned is not None:
            _write_at(parameter, pruned.positions, pruned.values)
