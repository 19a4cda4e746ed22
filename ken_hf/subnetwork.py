"""``KENSubnetwork``: which positions of which tensors KEN kept, and their fine-tuned values;
and the in-memory driver of the pipeline (``from_weights``, ``prune_model``).

The data flows one way: weights -> plan and masks (``ken_hf.pipeline``) -> subnetwork ->
file. A subnetwork can be saved, pushed to the Hub, applied to a base model and taken off
it again, leaving the base exactly as it was.
"""

from __future__ import annotations

import dataclasses
import os
import tempfile
import warnings
from collections.abc import Callable, Collection, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from .base_source import BaseSource, Weights, cannot_tell, locate_base
from .checkpoints import read_model_config, tensors_of
from .config import KENConfig
from .delta_codec import DEFAULT_LEVEL, DEFAULT_THREADS, bits_of
from .errors import KENConfigError, KENError
from .fingerprint import tensor_fingerprint
from .hub import push_folder, resolve_folder
from .pipeline import (
    PRUNED,
    WHOLE,
    TensorPlan,
    TensorRecord,
    dominant_dtype,
    plan_tensors,
    process_tensor,
    rebuild_into,
    select_masks,
    specs_of,
)
from .serialization import (
    DecodedOnAccess,
    PrunedTensor,
    StoredSubnetwork,
    open_subnetwork,
)
from .subnetwork_folder import SUBNETWORK_FILES, saved_files, write_folder
from .subnetwork_format import positions_of

# Selects masks for the pruned plans: (plans, fine-tuned, base, config, progress) -> masks.
MaskSelector = Callable[
    [list[TensorPlan], Mapping[str, torch.Tensor], Mapping[str, torch.Tensor], KENConfig, bool],
    dict[str, torch.Tensor],
]


def select_in_process(plans, finetuned, base, config, progress) -> dict[str, torch.Tensor]:
    """The default ``MaskSelector``: every mask selected in this process."""
    return select_masks(plans, finetuned, base, config, progress=progress)


class BaseMismatchError(KENError):
    """A subnetwork applied to a base model it was not made from."""


def fingerprints_of(weights: Weights) -> dict[str, str]:
    """``{name: fingerprint}`` of every floating-point tensor of ``weights``."""
    return {
        name: tensor_fingerprint(t)
        for name, t in tensors_of(weights).items()
        if t.is_floating_point()
    }


def _flat(parameter: torch.Tensor) -> torch.Tensor:
    """A flat view of a parameter's storage (parameters are contiguous)."""
    if not parameter.is_contiguous():
        raise ValueError("KEN writes into contiguous parameters only")
    return parameter.detach().view(-1)


def _read_at(parameter: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    """The values ``[count]`` at the flat ``positions`` ``[count]`` of ``parameter``."""
    flat = _flat(parameter)
    if flat.device.type != "cpu":
        return flat.index_select(0, positions.to(flat.device))
    # numpy gathers 2-3x faster than index_select (and into memory it allocates faster).
    where = positions.cpu().numpy()
    return torch.from_numpy(np.take(bits_of(flat).numpy(), where)).view(flat.dtype)


def _write_at(parameter: torch.Tensor, positions: torch.Tensor, values: torch.Tensor) -> None:
    """Write ``values`` ``[count]`` at the flat ``positions`` ``[count]`` of ``parameter``."""
    flat = _flat(parameter)
    values = values.to(flat.device, flat.dtype)
    if flat.device.type != "cpu":
        flat.index_copy_(0, positions.to(flat.device), values)
        return
    # numpy scatters 1.4x faster than index_copy_; bit patterns, so bfloat16 too.
    bits_of(flat).numpy()[positions.cpu().numpy()] = bits_of(values.contiguous()).numpy()


def _set_rows(model: torch.nn.Module, parameter: torch.Tensor, data: torch.Tensor) -> None:
    """Give ``parameter`` (an embedding or head along the vocabulary) ``data``, of another
    number of rows, as ``resize_token_embeddings`` would: the modules holding it and, for
    the input embeddings, the model's ``config.vocab_size`` follow."""
    parameter.data = data.contiguous()
    rows = data.shape[0]
    for module in model.modules():
        if getattr(module, "weight", None) is parameter:
            if isinstance(module, torch.nn.Embedding):
                module.num_embeddings = rows
            elif isinstance(module, torch.nn.Linear):
                module.out_features = rows
    embeddings = getattr(model, "get_input_embeddings", lambda: None)()
    config = getattr(model, "config", None)
    if embeddings is not None and embeddings.weight is parameter and config is not None:
        config.vocab_size = rows


@dataclass
class KENSubnetwork:
    """The KEN subnetwork of a fine-tuned model against its base.

    Attributes:
        config: the ``KENConfig`` it was made with (base, dtype and model class recorded).
        pruned: ``{name: PrunedTensor}`` kept positions and values of each pruned tensor
            (read from a file: decoded when first used, see ``DecodedOnAccess``).
        whole: ``{name: tensor}`` tensors stored whole (``modules_to_save``, new heads).
        fingerprints: ``{name: hex}`` of every base tensor the result depends on.
        model_config: the fine-tuned model's ``config.json`` as a dict, when known.
        metrics: evaluation results shown in the model card.
    """

    config: KENConfig
    pruned: Mapping[str, PrunedTensor]
    whole: Mapping[str, torch.Tensor]
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
        new_tensors: Collection[str] | None = None,
        progress: bool = True,
        selector: MaskSelector = select_in_process,
    ) -> KENSubnetwork:
        """Select the subnetwork of ``finetuned`` (a model or state dict) against ``base``.

        Every floating-point tensor of ``finetuned`` is pruned, stored whole or reset, as
        ``ken_hf.pipeline`` plans it. The base checkpoint is recorded and the newly
        initialised tensors (stored whole) are found by locating the checkpoint ``base``
        came from (``locate_base``); ``new_tensors`` names them instead. When neither
        works, a ``KENConfigError`` says what to pass. ``selector`` computes the masks (the
        training layer passes one that shares the work among distributed ranks).
        """
        return _select(base, finetuned, config, new_tensors, progress, selector)[0]

    @classmethod
    def from_records(
        cls,
        records: Iterable[TensorRecord],
        config: KENConfig,
        *,
        model: Weights | None = None,
        source: BaseSource | None = None,
        base_dtype: str | None = None,
    ) -> KENSubnetwork:
        """Gather the pipeline's records: ``config`` gets the base ``source``, its dtype and
        the model's class where it does not name them; ``model``'s config is kept."""
        pruned, whole, fingerprints = {}, {}, {}
        for record in records:
            name = record.plan.name
            if record.fingerprint is not None:
                fingerprints[name] = record.fingerprint
            if record.mask is not None:
                shape = record.mask.shape
                if record.added is not None:
                    shape = torch.Size((shape[0] + record.added.shape[0], *shape[1:]))
                pruned[name] = PrunedTensor(
                    shape,
                    record.finetuned.dtype,
                    positions_of(record.mask.reshape(-1).cpu().numpy()),
                    record.kept,
                    record.changed,
                    record.difference,
                    *record.delta,
                    record.plan.base_rows,
                    record.added,
                )
            elif record.fingerprint is None:
                whole[name] = record.finetuned.detach().to("cpu", copy=True)
        model_config = None
        if isinstance(model, torch.nn.Module) and hasattr(model, "config"):
            # FSDP2 subclasses the model's class on the fly: record the class it came from.
            model_class = next(
                c for c in type(model).__mro__ if not c.__module__.startswith("torch.distributed")
            )
            config = dataclasses.replace(
                config, model_class=config.model_class or model_class.__name__
            )
            # As save_pretrained writes it: the class of this model, whatever class the
            # config was loaded with (servers pick the class from this field).
            model_config = model.config.to_dict() | {"architectures": [model_class.__name__]}
        if source is not None and not config.base_model_name_or_path:
            config = dataclasses.replace(
                config,
                base_model_name_or_path=source.name_or_path,
                base_model_revision=config.base_model_revision or source.revision,
            )
        config = dataclasses.replace(config, base_model_dtype=config.base_model_dtype or base_dtype)
        return cls(config, pruned, whole, fingerprints, model_config)

    # -- what it holds ------------------------------------------------------------------
    def kept_fraction(self) -> float:
        """Share of the pruned tensors' values that keep their fine-tuned value (of a grown
        tensor, its base's rows; a reset tensor stored for its new rows alone is not one)."""
        pruned = [p for p in self.pruned.values() if not p.only_new_rows()]
        total = sum(p.base_numel() for p in pruned)
        return sum(p.positions.numel() for p in pruned) / total if total else 1.0

    def kept_values(self) -> int:
        """Values that keep their fine-tuned value: kept positions, the rows grown tensors
        added and whole tensors."""
        pruned = self.pruned.values()
        return (
            sum(p.positions.numel() for p in pruned)
            + sum(p.added.numel() for p in pruned if p.added is not None)
            + sum(t.numel() for t in self.whole.values())
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

    def base_rows(self, name: str) -> int | None:
        """The base's rows of tensor ``name`` when it grew (a vocabulary that gained
        tokens), else None; for a subnetwork read from a file, from its header."""
        if name not in self.pruned:
            return None
        if isinstance(self.pruned, DecodedOnAccess):
            return self.pruned.entry(name).get("rows")
        return self.pruned[name].base_rows

    def declared(self) -> dict[str, tuple[torch.Size, torch.dtype]]:
        """``{name: (shape, dtype)}`` of every tensor the subnetwork writes, as declared:
        for one read from a file, without decoding anything."""
        specs = {}
        for table in (self.pruned, self.whole):
            for name in table:
                if isinstance(table, DecodedOnAccess):
                    specs[name] = table.spec(name)
                else:
                    specs[name] = (torch.Size(table[name].shape), table[name].dtype)
        return specs

    def check_fits(self, parameters: Mapping[str, torch.Tensor]) -> None:
        """Raise ``BaseMismatchError`` naming the first tensor the subnetwork writes that
        ``parameters`` (a model's tensors) lacks, or holds with another shape or dtype.
        Made before anything is decoded, so a file's declared sizes are bounded by the
        model's."""
        for name, (shape, dtype) in self.declared().items():
            if name not in parameters:
                raise BaseMismatchError(f"tensor {name!r} is not a parameter of the model")
            parameter = parameters[name]
            rows = self.base_rows(name)
            if rows is not None:  # a grown tensor (at most twofold) lands on the base's rows
                shape = torch.Size((rows, *shape[1:]))
            if parameter.shape != shape or parameter.dtype != dtype:
                raise BaseMismatchError(
                    f"tensor {name!r}: model has {parameter.dtype} {tuple(parameter.shape)}, "
                    f"subnetwork {dtype} {tuple(shape)}"
                )

    def apply_to(
        self, model: torch.nn.Module, *, base_fingerprints: Mapping[str, str] | None = None
    ) -> dict[str, torch.Tensor]:
        """Write the subnetwork into ``model``, which must hold the base weights.

        Everything is checked before any weight changes. Returns the base values it
        overwrote (``{name: values}``), which ``restore`` puts back. Costs time in
        proportion to the kept values that differ from the base (flat gathers and
        scatters): the others equal the base already.
        """
        parameters = tensors_of(model)
        self.check_base(base_fingerprints or fingerprints_of(model))
        self.check_fits(parameters)
        # Decoded (and so validated) in full before the first weight is written.
        pruned_tensors, whole_tensors = dict(self.pruned.items()), dict(self.whole.items())
        saved: dict[str, torch.Tensor] = {}
        with torch.no_grad():
            for name, pruned in pruned_tensors.items():
                where = pruned.written_positions()
                saved[name] = _read_at(parameters[name], where)
                if pruned.added is not None:  # the new rows after the base's
                    added = pruned.added.to(parameters[name].device, parameters[name].dtype)
                    _set_rows(model, parameters[name], torch.cat([parameters[name].data, added]))
                _write_at(parameters[name], where, pruned.written_values(saved[name]))
            for name, tensor in whole_tensors.items():
                saved[name] = parameters[name].detach().clone()
                parameters[name].copy_(tensor)
        return saved

    def restore(self, model: torch.nn.Module, saved: Mapping[str, torch.Tensor]) -> None:
        """Put back the base values ``apply_to`` returned: the model is the base again."""
        parameters = tensors_of(model)
        with torch.no_grad():
            for name, pruned in self.pruned.items():
                _write_at(parameters[name], pruned.written_positions(), saved[name])
                if pruned.base_rows is not None:  # back to the base's rows, bit for bit
                    base_rows = parameters[name].data[: pruned.base_rows].clone()
                    _set_rows(model, parameters[name], base_rows)
            for name in self.whole:
                parameters[name].copy_(saved[name])

    # -- files and the Hub --------------------------------------------------------------
    def save_pretrained(
        self,
        save_directory: str | os.PathLike,
        *,
        report: dict | None = None,
        tokenizer: object | None = None,
        dataset: str | None = None,
        picture: bytes | None = None,
        compression_level: int = DEFAULT_LEVEL,
        compression_threads: int = DEFAULT_THREADS,
    ) -> None:
        """Write ``ken_subnetwork.safetensors`` (format version 2: kept values as a
        compressed lossless delta against the base), the model's ``config.json``, a model
        card, ``report`` as ``ken_report.json`` when given, the files of ``tokenizer`` (a
        tokenizer or processor: anything with ``save_pretrained``) when given, and
        ``ken_config.json`` last into ``save_directory`` (see ``FolderWriter``: other files
        there are never touched, and an interrupted save leaves the previous subnetwork
        loadable). ``dataset``: the Hub id of the evaluation data set, named in the model
        card's metadata with the report's metrics. ``picture``: a PNG (the KENviz summary,
        ``ken_hf.viz.summary_png``) saved as ``ken_summary.png`` and shown in the card.
        ``compression_level`` and
        ``compression_threads``: zstd's level (1-22) and worker threads (0: one)."""
        write_folder(
            save_directory,
            self.config,
            StoredSubnetwork(self.pruned, self.whole, self.fingerprints),
            model_config=self.model_config,
            metrics=self.metrics,
            report=report,
            tokenizer=tokenizer,
            dataset=dataset,
            picture=picture,
            compression_level=compression_level,
            compression_threads=compression_threads,
        )

    @classmethod
    def from_pretrained(
        cls,
        name_or_path: str | os.PathLike,
        *,
        subfolder: str | None = None,
        revision: str | None = None,
        **hub_kwargs,
    ) -> KENSubnetwork:
        """Read a subnetwork folder, local or on the Hub, or its ``subfolder`` (at
        ``revision``: a branch, tag or commit, for a Hub id). Every header is validated
        now; each tensor is decoded (and its arrays checked) when first used, after its
        declared shape has been checked against a model (``check_fits``). From
        the Hub, the subnetwork's files and the tokenizer saved with it are downloaded (into
        the Hub cache, so that they load offline afterwards)."""
        folder = resolve_folder(
            name_or_path,
            allow_patterns=SUBNETWORK_FILES,
            subfolder=subfolder,
            revision=revision,
            **hub_kwargs,
        )
        config = KENConfig.from_pretrained(folder)
        subnetwork_file, model_config_file = saved_files(folder, config)
        stored = open_subnetwork(subnetwork_file)
        model_config = None
        if model_config_file is not None:
            model_config = read_model_config(model_config_file)
        return cls(config, stored.pruned, stored.whole, stored.fingerprints, model_config)

    def push_to_hub(self, repo_id: str, **push_kwargs) -> str:
        """Publish only the subnetwork folder to ``repo_id``; returns the commit URL."""
        with tempfile.TemporaryDirectory() as scratch:
            folder = Path(scratch) / "ken"
            self.save_pretrained(folder)
            return push_folder(folder, repo_id, **push_kwargs)


def check_full_model(model: Weights, what: str = "the model") -> None:
    """Raise ``KENConfigError`` when ``model`` carries PEFT adapters (a ``PeftModel``, or
    adapter layers injected into a model): KEN selects among the values a full fine-tune
    changed, and an adapter's base weights never changed."""
    if not isinstance(model, torch.nn.Module):
        return
    adapted = next(
        (type(m).__name__ for m in model.modules() if type(m).__module__.startswith("peft.")),
        None,
    )
    if adapted is not None:
        raise KENConfigError(
            f"{what} is wrapped by PEFT ({adapted}): KEN needs a full fine-tune, whose "
            "weights all trained. Merge the adapter into the model (model = "
            "model.merge_and_unload()) and prune the merged model, or fine-tune without "
            "PEFT and use KEN on that"
        )


def _select(base, finetuned, config, new_tensors, progress, selector):
    """The in-memory driver: plan, masks, one step per tensor. Returns the subnetwork, the
    records (in plan order) and the base's tensors by name."""
    check_full_model(finetuned, "the fine-tuned model")
    base_tensors, tuned = tensors_of(base), tensors_of(finetuned)
    source, reasons = locate_base(base, finetuned, config, base_tensors)
    if new_tensors is None:
        if source is None:
            floating = [n for n, t in tuned.items() if t.is_floating_point()]
            raise cannot_tell(finetuned, floating, reasons)
        new_tensors = source.missing
    elif source is None and not config.base_model_name_or_path:
        warnings.warn(
            "the subnetwork names no base checkpoint ("
            + "; ".join(reasons or ["none known"])
            + "): load it with KENModel.from_pretrained(base_model, folder), or set "
            "KENConfig.base_model_name_or_path",
            stacklevel=3,
        )
    base_specs = specs_of(base_tensors)  # a lazy base (read from a checkpoint): one pass
    plans = plan_tensors(
        specs_of(tuned),
        base_specs,
        config,
        new_tensors=new_tensors,
        prefix=getattr(finetuned, "base_model_prefix", None) or None,
    )
    masks = selector(plans, tuned, base_tensors, config, progress)
    records = [
        process_tensor(
            plan,
            tuned[plan.name],
            base_tensors[plan.base_name] if plan.base_name else None,
            config,
            mask=masks.get(plan.name) if plan.fate == PRUNED else None,
        )
        for plan in plans
    ]
    base_dtype = dominant_dtype(base_specs[p.base_name] for p in plans if p.fate != WHOLE)
    subnetwork = KENSubnetwork.from_records(
        records, config, model=finetuned, source=source, base_dtype=base_dtype
    )
    return subnetwork, records, base_tensors


def prune_model(
    finetuned: torch.nn.Module,
    base: Weights,
    config: KENConfig,
    *,
    new_tensors: Collection[str] | None = None,
    progress: bool = True,
    selector: MaskSelector = select_in_process,
) -> KENSubnetwork:
    """The functional path: select KEN's subnetwork of ``finetuned`` against ``base`` (a
    model or state dict), reset ``finetuned`` in place to what the subnetwork rebuilds
    (kept values fine-tuned, all else pre-trained), and return the subnetwork.
    ``new_tensors`` and ``selector``: as in ``KENSubnetwork.from_weights``."""
    subnetwork, records, base_tensors = _select(
        base, finetuned, config, new_tensors, progress, selector
    )
    tuned = tensors_of(finetuned)
    for record in records:
        if record.plan.base_name:
            rebuild_into(tuned[record.plan.name], base_tensors[record.plan.base_name], record)
    return subnetwork
