"""``KENSubnetwork``: which positions of which tensors KEN kept, and their fine-tuned values;
and the in-memory driver of the pipeline (``from_weights``, ``prune_model``).

The data flows one way: weights -> plan and masks (``ken_hf.making.plan``) -> subnetwork ->
file. A subnetwork can be saved, pushed to the Hub, applied to a base model and taken off
it again, leaving the base exactly as it was.
"""

from __future__ import annotations

import dataclasses
import json
import os
import tempfile
import warnings
from collections.abc import Collection, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from .config import KENConfig
from .errors import KENConfigError, KENError, shown
from .making.base_source import BaseSource, Weights, cannot_tell, locate_base
from .making.plan import (
    PRUNED,
    WHOLE,
    TensorRecord,
    dominant_dtype,
    plan_tensors,
    process_tensor,
    rebuild_into,
    select_masks,
    specs_of,
)
from .storage.checkpoints import read_model_config, tensors_of
from .storage.delta_codec import DEFAULT_LEVEL, DEFAULT_THREADS, bits_of
from .storage.folder import SUBNETWORK_FILES, open_saved, travelling_base, write_folder
from .storage.format import VALUE_DTYPES, dtype_name, positions_of
from .storage.subnetwork_file import (
    DecodedOnAccess,
    PrunedTensor,
    StoredSubnetwork,
    SubnetworkFileFacts,
    open_subnetwork,
)
from .utils.fingerprint import tensor_fingerprint
from .utils.hub import push_folder, resolve_folder


class BaseMismatchError(KENError):
    """A subnetwork applied to a base model it was not made from.

    Raised before any weight changes, naming the first tensor whose fingerprint differs
    (another model, revision or dtype, or a single changed value), a base tensor the model
    lacks, or a tensor the subnetwork writes that the model lacks or holds with another
    shape or dtype.

    Example:
        ```python
        from ken_hf import BaseMismatchError, KENModel

        try:
            model = KENModel.from_pretrained(other_base_model, "ken/")
        except BaseMismatchError as error:
            print(error)  # names the first tensor that differs
        ```
    """


def fingerprints_of(weights: Weights) -> dict[str, str]:
    """``{name: fingerprint}`` of every floating-point tensor of ``weights``."""
    return {
        name: tensor_fingerprint(t)
        for name, t in tensors_of(weights).items()
        if t.is_floating_point()
    }


def _entry_of(tensor: PrunedTensor | torch.Tensor) -> dict:
    """The header entry fields ``KENSubnetwork.entries`` gives for a tensor in memory."""
    entry = {"shape": list(tensor.shape), "dtype": dtype_name(tensor.dtype)}
    if not isinstance(tensor, PrunedTensor):
        return {"kind": "whole", **entry}
    rows = {} if tensor.base_rows is None else {"rows": tensor.base_rows}
    delta = [tensor.delta_kept, tensor.delta_reset]
    return {"kind": "pruned", **entry, "count": tensor.positions.numel(), "delta": delta, **rows}


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

    Which positions of which tensors KEN kept, and their fine-tuned values: everything
    needed to rebuild the pruned model from its base. It is made by ``from_weights`` or
    ``prune_model`` (or ``KENCallback``), saved with ``save_pretrained``, read with
    ``from_pretrained``, written into a base model with ``apply_to`` and taken off again
    with ``restore``. It refuses a base it was not made from (``BaseMismatchError``). The
    constructor arguments are also its attributes; build one through the methods above.

    Args:
        config: the ``KENConfig`` it was made with (base, dtype and model class recorded).
        pruned: ``{name: PrunedTensor}``: kept positions and values of each pruned tensor
            (read from a file: decoded when first used, see ``DecodedOnAccess``).
        whole: ``{name: tensor}``: tensors stored whole (``modules_to_save``, new heads).
        fingerprints: ``{name: hex}`` of every base tensor the result depends on.
        model_config: the fine-tuned model's ``config.json`` as a dict, when known.
        metrics: ``{name: value}`` evaluation results shown in the model card.

    Example:
        ```python
        from ken_hf import KENConfig, KENSubnetwork

        subnetwork = KENSubnetwork.from_weights(base_model, finetuned_model, KENConfig(k=64))
        print(f"{subnetwork.kept_fraction():.1%} of the pruned values kept")
        subnetwork.save_pretrained("ken/")

        subnetwork = KENSubnetwork.from_pretrained("ken/")
        saved = subnetwork.apply_to(base_model)  # base_model now holds the pruned model
        subnetwork.restore(base_model, saved)  # and is the base again, bit for bit
        ```
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
    ) -> KENSubnetwork:
        """Select the subnetwork of ``finetuned`` against ``base``; neither is changed.

        Every floating-point tensor of ``finetuned`` is pruned, stored whole or reset, as
        ``config`` says (``ken_hf.making.plan`` plans it). The base checkpoint is recorded and
        the newly initialised tensors (stored whole) are found by locating the checkpoint
        ``base`` came from (``locate_base``); ``new_tensors`` names them instead.

        Args:
            base: the pre-trained model, or its state dict ``{name: tensor}`` (such as
                ``ken_hf.storage.checkpoints.LazyTensors``, read a tensor at a time).
            finetuned: the fully fine-tuned model (or its state dict), of the base's
                architecture; a tensor may have grown along its first dimension (a
                vocabulary that gained tokens), at most twofold.
            config: what to keep and where.
            new_tensors: names of ``finetuned``'s newly initialised tensors (an empty set if
                none is); None: found from the base's checkpoint.
            progress: show a progress bar over the rows.

        Returns:
            The subnetwork; its config records the base checkpoint, the base dtype and the
            model class where ``config`` does not name them.

        Raises:
            KENConfigError: the base's checkpoint and new tensors cannot be told and
                ``new_tensors`` is None (the message says what to pass), the checkpoint that
                ``config.base_model_name_or_path`` names does not hold ``base``, or
                ``finetuned`` carries PEFT adapters.
            KENError: a pair of tensors differs in shape or dtype, the two share no
                tensor, or a tensor holds NaN or Inf.

        Example:
            ```python
            from transformers import AutoModelForSequenceClassification
            from ken_hf import KENConfig, KENSubnetwork

            base = AutoModelForSequenceClassification.from_pretrained("bert-base-uncased")
            tuned = AutoModelForSequenceClassification.from_pretrained("out/checkpoint-500")
            subnetwork = KENSubnetwork.from_weights(base, tuned, KENConfig(keep_ratio=0.3))
            ```
        """
        return _select(base, finetuned, config, new_tensors, progress)[0]

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
        """Build a subnetwork from the records of ``ken_hf.making.plan``'s per-tensor step.

        The building block of ``from_weights`` and the streaming path; most code calls
        those instead. ``config`` gets the base ``source``, its dtype and the model's class
        where it does not name them.

        Args:
            records: one ``TensorRecord`` per fine-tuned tensor, as ``process_tensor``
                returns them.
            config: the config the records were made with.
            model: the fine-tuned model: its class and ``config.json`` are recorded when it
                is a transformers model.
            source: the checkpoint the base was loaded from, recorded as the base.
            base_dtype: the base's dtype name (e.g. ``"float32"``), recorded as
                ``base_model_dtype``.

        Returns:
            The subnetwork, holding the records' kept values on the CPU.
        """
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
        config, model_config = with_provenance(config, model, source, base_dtype)
        return cls(config, pruned, whole, fingerprints, model_config)

    # -- what it holds ------------------------------------------------------------------
    def kept_fraction(self) -> float:
        """Share of the pruned tensors' values that keep their fine-tuned value.

        Of a grown tensor, its base's rows count; a reset tensor stored for its new rows
        alone does not.

        Returns:
            Kept positions over the values of the pruned tensors, in [0, 1]; 1.0 when
            nothing is pruned.
        """
        pruned = [p for p in self.pruned.values() if not p.only_new_rows()]
        total = sum(p.base_numel() for p in pruned)
        return sum(p.positions.numel() for p in pruned) / total if total else 1.0

    def kept_values(self) -> int:
        """Number of values that keep their fine-tuned value.

        Returns:
            Kept positions, plus the values of the rows grown tensors added, plus the
            values of whole tensors.
        """
        pruned = self.pruned.values()
        return (
            sum(p.positions.numel() for p in pruned)
            + sum(p.added.numel() for p in pruned if p.added is not None)
            + sum(t.numel() for t in self.whole.values())
        )

    def reset_fraction(self, model_parameters: int) -> float:
        """Share of all ``model_parameters`` that end at their pre-trained value.

        Args:
            model_parameters: the model's total number of parameter values (e.g.
                ``sum(p.numel() for p in model.parameters())``).

        Returns:
            ``1 - kept_values() / model_parameters``.
        """
        return 1.0 - self.kept_values() / model_parameters

    def counts(self) -> dict[str, int]:
        """How many tensors and values it prunes, keeps and stores whole.

        Counted as ``kept_fraction`` counts (of a grown tensor, its base's rows; a reset
        tensor stored for its new rows alone is not pruned), and for a subnetwork read from
        a file from its header alone: nothing is decoded.

        Returns:
            ``{"pruned_tensors", "pruned_values", "kept_values", "whole_tensors",
            "whole_values"}``, as ``ken inspect`` and the model card report them:
            ``kept_values`` are the kept positions of the pruned tensors (unlike
            ``kept_values()``, which adds the whole tensors and grown rows).

        Example:
            ```python
            counts = subnetwork.counts()
            print(counts["kept_values"] / counts["pruned_values"])  # == kept_fraction()
            ```
        """
        return SubnetworkFileFacts.of(self.entries(), 0).counts

    def entries(self) -> dict[str, dict]:
        """``{name: entry}`` of every tensor as a subnetwork file's header describes it
        (``kind``, ``shape``, ``dtype``; for a pruned tensor ``count``, ``delta`` and, when it
        grew, the base's ``rows``): read from the header for a subnetwork read from a file
        (nothing decoded), made from the tensors for one in memory."""
        entries = {}
        for table in (self.pruned, self.whole):
            for name in table:  # names only: nothing decoded
                on_file = isinstance(table, DecodedOnAccess)
                entries[name] = table.entry(name) if on_file else _entry_of(table[name])
        return entries

    def stored_bytes(self) -> int | None:
        """Size of the subnetwork file it was read from.

        Returns:
            The bytes of ``ken_subnetwork.safetensors`` for a subnetwork read with
            ``from_pretrained``; None for one made in memory and not read back (its size is
            known once ``save_pretrained`` has compressed it).
        """
        for table in (self.pruned, self.whole):
            if isinstance(table, DecodedOnAccess):
                return table.path.stat().st_size
        return None

    def kept_summary(self) -> str:
        """One line of what it keeps, in the style of PEFT's ``print_trainable_parameters``.

        Returns:
            ``"kept values: K || pruned values: N || kept%: P || stored whole: W || file: S"``:
            the kept positions ``K`` of the ``N`` values of the pruned tensors, their share
            ``P`` (``kept_fraction()`` in percent), the values ``W`` of the tensors stored
            whole, and the size ``S`` of the file it was read from (``not saved`` for one
            made in memory). See ``counts()``.

        Example:
            ```python
            subnetwork.kept_summary()
            # 'kept values: 5,678,208 || pruned values: 22,713,216 || kept%: 25.0000 || ...'
            ```
        """
        counts, size = self.counts(), self.stored_bytes()
        pruned = counts["pruned_values"]
        share = 100 * counts["kept_values"] / pruned if pruned else 100.0
        shown_size = "not saved" if size is None else f"{size / 2**20:.2f} MiB"
        return (
            f"kept values: {counts['kept_values']:,} || pruned values: {pruned:,} || "
            f"kept%: {share:.4f} || stored whole: {counts['whole_values']:,} || "
            f"file: {shown_size}"
        )

    def print_kept_values(self) -> None:
        """Print ``kept_summary()``: one line, as PEFT's ``print_trainable_parameters``.

        Example:
            ```python
            KENSubnetwork.from_pretrained("ken/").print_kept_values()
            ```
        """
        print(self.kept_summary())

    def __repr__(self) -> str:
        # One line: the dataclass's own repr prints every tensor (hundreds of thousands of
        # characters); nothing is decoded for this.
        config, counts = self.config, self.counts()
        budget = f"k={config.k}" if config.k is not None else f"keep_ratio={config.keep_ratio:g}"
        rule = "" if config.rule == "ken" else f", rule={config.rule!r}"
        pruned = counts["pruned_values"]
        share = counts["kept_values"] / pruned if pruned else 1.0
        return (
            f"KENSubnetwork(base={shown(config.base_model_name_or_path)}, {budget}{rule}, "
            f"tensors: {counts['pruned_tensors']} pruned + {counts['whole_tensors']} whole, "
            f"kept {share:.1%} of {_short_count(pruned)} values)"
        )

    def mask(self, name: str) -> torch.Tensor:
        """Bool tensor of the kept positions of pruned tensor ``name``.

        Args:
            name: a key of ``pruned``, e.g. ``"bert.encoder.layer.0.attention.self.query.weight"``.

        Returns:
            Bool CPU tensor of the tensor's shape: True where the fine-tuned value is kept.

        Raises:
            KeyError: ``name`` is not a pruned tensor.
            KENFormatError: the tensor, read from a file, does not decode.
        """
        return self.pruned[name].mask()

    # -- applying to a model ------------------------------------------------------------
    def check_base(self, fingerprints: Mapping[str, str]) -> None:
        """Check that a model holds the base this subnetwork was made from.

        Args:
            fingerprints: ``{name: hex}`` fingerprints of the model's tensors, in the model's
                order (``ken_hf.subnetwork.fingerprints_of(model)``).

        Raises:
            BaseMismatchError: naming a base tensor the model lacks, or the first tensor (in
                the model's order) whose fingerprint differs.
        """
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

    def check_fits(self, parameters: Mapping[str, torch.Tensor]) -> None:
        """Check that a model has every tensor the subnetwork writes, in shape and dtype.

        Made before anything is decoded, so a file's declared sizes are bounded by the
        model's.

        Args:
            parameters: ``{name: tensor}``: the model's tensors
                (``ken_hf.storage.checkpoints.tensors_of(model)``).

        Raises:
            BaseMismatchError: naming the first tensor that ``parameters`` lacks or holds
                with another shape or dtype (a grown tensor is compared on its base's rows).
        """
        for name, entry in self.entries().items():
            if name not in parameters:
                raise BaseMismatchError(f"tensor {name!r} is not a parameter of the model")
            parameter, shape, dtype = parameters[name], entry["shape"], VALUE_DTYPES[entry["dtype"]]
            if "rows" in entry:  # a grown tensor (at most twofold) lands on the base's rows
                shape = [entry["rows"], *shape[1:]]
            shape = torch.Size(shape)
            if parameter.shape != shape or parameter.dtype != dtype:
                raise BaseMismatchError(
                    f"tensor {name!r}: model has {parameter.dtype} {tuple(parameter.shape)}, "
                    f"subnetwork {dtype} {tuple(shape)}"
                )

    def apply_to(
        self, model: torch.nn.Module, *, base_fingerprints: Mapping[str, str] | None = None
    ) -> dict[str, torch.Tensor]:
        """Write the subnetwork into ``model`` in place; ``model`` must hold the base weights.

        Everything is checked (base fingerprints, shapes, dtypes, and every tensor read from
        a file decoded) before any weight changes. Costs time in proportion to the kept
        values that differ from the base (flat gathers and scatters): the others equal the
        base already. A grown tensor (a vocabulary that gained tokens) is resized, as
        ``resize_token_embeddings`` would.

        Args:
            model: the base model (the same architecture, revision and dtype the subnetwork
                was made from), on any device.
            base_fingerprints: ``{name: hex}`` of ``model``'s tensors, when already known;
                None: computed now.

        Returns:
            The base values it overwrote, for ``restore``: ``{name: values}``, a 1-D tensor
            of the overwritten positions' values for a pruned tensor, a full copy for a
            whole one.

        Raises:
            BaseMismatchError: ``model`` does not hold the base, or lacks a tensor the
                subnetwork writes, or holds it with another shape or dtype.
            KENFormatError: a tensor read from a file does not decode.

        Example:
            ```python
            saved = subnetwork.apply_to(base_model)
            outputs = base_model(**inputs)  # the pruned fine-tuned model
            subnetwork.restore(base_model, saved)
            ```
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
        """Put back the base values ``apply_to`` returned: the model is the base again.

        Grown tensors go back to the base's rows, bit for bit. Nothing is checked: pass the
        model and the values of the matching ``apply_to``.

        Args:
            model: the model ``apply_to`` wrote into.
            saved: what that ``apply_to`` returned.
        """
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
        """Save the subnetwork folder into ``save_directory``.

        Writes ``ken_subnetwork.safetensors`` (kept values as a compressed lossless delta
        against the base), the model's ``config.json``, a model card (``README.md``), and
        ``ken_config.json`` last (see ``FolderWriter``: other files there are never touched,
        and an interrupted save leaves the previous subnetwork loadable).

        Args:
            save_directory: the folder, created if needed.
            report: written as ``ken_report.json`` when given.
            tokenizer: a tokenizer or processor (anything with ``save_pretrained``) whose
                files are saved alongside, so that the folder loads as one.
            dataset: the Hub id of the evaluation data set, named in the model card's
                metadata with the metrics.
            picture: a PNG (the KENviz summary, ``ken_hf.viz.summary_png``) saved as
                ``ken_summary.png`` and shown in the card.
            compression_level: zstd's level (1-22).
            compression_threads: zstd's worker threads (0: one, the same bytes on every
                machine).

        Raises:
            TypeError: ``tokenizer`` has no ``save_pretrained``.
            KENConfigError: ``tokenizer`` saves a file named like one of the subnetwork's.
            KENError: a pruned tensor read from a version 1 file holds no delta against the
                base (apply it with ``KENModel`` and save that instead).
            NotADirectoryError: ``save_directory`` exists and is not a folder.

        Example:
            ```python
            subnetwork.save_pretrained("ken/", tokenizer=tokenizer, dataset="rotten_tomatoes")
            ```
        """
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
        """Read a subnetwork folder, local or on the Hub.

        Every header is validated now; each tensor is decoded (and its arrays checked) when
        first used, after its declared shape has been checked against a model
        (``check_fits``). From the Hub, the subnetwork's files and the tokenizer saved with
        it are downloaded into the Hub cache, so that they load offline afterwards.

        Args:
            name_or_path: a local folder, or a Hub repository id.
            subfolder: the folder inside it that holds the subnetwork (e.g. ``"ken"``).
            revision: a branch, tag or commit of the Hub repository.
            **hub_kwargs (Any): passed to ``huggingface_hub.snapshot_download`` (e.g.
                ``token``).

        Returns:
            The subnetwork, its tensors decoded on access.

        Raises:
            FileNotFoundError: neither the folder nor the Hub provides the subnetwork.
            UnsafePathError: ``subfolder`` leads out of the folder, or a file is a symbolic
                link to a place outside it.
            KENConfigError: ``ken_config.json`` is missing a key or holds an invalid field.
            KENFormatError: the subnetwork file is invalid, or not the one
                ``ken_config.json`` was saved with.
            CheckpointError: the saved ``config.json`` is malformed.

        Example:
            ```python
            subnetwork = KENSubnetwork.from_pretrained("me/minilm-sentiment", subfolder="ken")
            ```
        """
        folder = resolve_folder(
            name_or_path,
            allow_patterns=SUBNETWORK_FILES,
            subfolder=subfolder,
            revision=revision,
            **hub_kwargs,
        )
        config = KENConfig.from_pretrained(folder)
        reader, model_config_file = open_saved(folder, config)
        stored = open_subnetwork(reader)
        model_config = None
        if model_config_file is not None:
            model_config = read_model_config(model_config_file)
        return cls(config, stored.pruned, stored.whole, stored.fingerprints, model_config)

    def push_to_hub(
        self,
        repo_id: str,
        *,
        base_model_name_or_path: str | os.PathLike | None = None,
        **push_kwargs,
    ) -> str:
        """Publish the subnetwork folder (not the model) to a Hub repository.

        The folder is saved to a temporary place and uploaded; the repository is created if
        needed. A subnetwork from the Hub may name only a Hub id as its base, so one whose
        base is a local path is refused before anything is uploaded, unless
        ``base_model_name_or_path`` names the base's Hub id.

        Args:
            repo_id: the Hub repository, ``"owner/name"``.
            base_model_name_or_path: the Hub id of the base (the model the local base folder
                holds), recorded in the pushed ``ken_config.json`` and model card; this
                subnetwork's own ``config`` is left as it is.
            **push_kwargs (Any): ``private`` (applies only when the repository is created),
                ``token``, ``commit_message``, ``revision`` (a branch, created from the main
                branch when missing) and ``path_in_repo`` (default: the root).

        Returns:
            The URL of the commit.

        Raises:
            KENConfigError: the base is a local path and ``base_model_name_or_path`` is not
                given, or is not a Hub id (nothing is uploaded).
            OSError: the upload failed (network, permissions).
            UnsafePathError: ``path_in_repo`` leads out of the repository.

        Example:
            ```python
            url = subnetwork.push_to_hub("me/minilm-sentiment-ken", private=True)
            # made against a local copy of a Hub model: name the Hub model
            subnetwork.push_to_hub(
                "me/minilm-sentiment-ken",
                base_model_name_or_path="sentence-transformers/all-MiniLM-L6-v2",
            )
            ```
        """
        recorded = self.config.base_model_name_or_path
        base = travelling_base(
            recorded,
            base_model_name_or_path,
            repo_id=repo_id,
            remedy="push_to_hub(repo_id, base_model_name_or_path='owner/name') or ken push "
            "FOLDER REPO_ID --base-model OWNER/NAME",
        )
        pushed = self
        if base != recorded:  # the pushed copy names the Hub id; self is left as it is
            pushed = dataclasses.replace(
                self, config=dataclasses.replace(self.config, base_model_name_or_path=base)
            )
        with tempfile.TemporaryDirectory() as scratch:
            folder = Path(scratch) / "ken"
            pushed.save_pretrained(folder)
            return push_folder(folder, repo_id, **push_kwargs)


def with_provenance(
    config: KENConfig,
    model: Weights | None,
    source: BaseSource | None,
    base_dtype: str | None,
) -> tuple[KENConfig, dict | None]:
    """``config`` with what a subnetwork records of where it came from, where ``config``
    does not name it: the fine-tuned model's class, the base ``source`` (checkpoint and
    revision) and the base's dtype name (``base_dtype``); and the model's ``config.json``
    values (None unless ``model`` is a transformers model)."""
    model_config = None
    if isinstance(model, torch.nn.Module) and hasattr(model, "config"):
        # FSDP2 subclasses the model's class on the fly: record the class it came from.
        model_class = next(
            c for c in type(model).__mro__ if not c.__module__.startswith("torch.distributed")
        )
        config = dataclasses.replace(config, model_class=config.model_class or model_class.__name__)
        # What save_pretrained writes (the values that differ from the defaults, as
        # ``ken prune`` copies them from a saved fine-tune), with the class of this
        # model, whatever class the config was loaded with (servers pick it from here).
        model_config = json.loads(model.config.to_json_string(use_diff=True)) | {
            "architectures": [model_class.__name__]
        }
    if source is not None and not config.base_model_name_or_path:
        config = dataclasses.replace(
            config,
            base_model_name_or_path=source.name_or_path,
            base_model_revision=config.base_model_revision or source.revision,
        )
    config = dataclasses.replace(config, base_model_dtype=config.base_model_dtype or base_dtype)
    return config, model_config


def _short_count(count: int) -> str:
    """``22713216`` -> ``"22.7M"``: a count for a one-line summary."""
    for limit, suffix in ((10**9, "B"), (10**6, "M"), (10**3, "k")):
        if count >= limit:
            return f"{count / limit:.1f}{suffix}"
    return str(count)


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


def _select(base, finetuned, config, new_tensors, progress):
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
    masks = select_masks(plans, tuned, base_tensors, config, progress=progress)
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
) -> KENSubnetwork:
    """Prune ``finetuned`` in place with KEN and return its subnetwork.

    The functional path: select KEN's subnetwork of ``finetuned`` against ``base``, then
    reset ``finetuned`` to what the subnetwork rebuilds: kept values fine-tuned, all else
    pre-trained (tensors stored whole keep their fine-tuned values).

    Args:
        finetuned: the fully fine-tuned model; its weights are overwritten.
        base: the pre-trained model, or its state dict ``{name: tensor}``.
        config: what to keep and where.
        new_tensors: names of ``finetuned``'s newly initialised tensors (an empty set if
            none is); None: found from the base's checkpoint (see
            ``KENSubnetwork.from_weights``).
        progress: show a progress bar over the rows.

    Returns:
        The subnetwork, as ``KENSubnetwork.from_weights`` returns it.

    Raises:
        KENConfigError: as in ``KENSubnetwork.from_weights`` (base checkpoint unknown and no
            ``new_tensors``, PEFT adapters).
        KENError: a pair of tensors differs in shape or dtype, or a tensor holds NaN or Inf.

    Example:
        ```python
        from ken_hf import KENConfig, prune_model

        subnetwork = prune_model(finetuned_model, base_model, KENConfig(k=300))
        subnetwork.save_pretrained("ken/")  # finetuned_model is now the pruned model
        ```
    """
    subnetwork, records, base_tensors = _select(base, finetuned, config, new_tensors, progress)
    tuned = tensors_of(finetuned)
    for record in records:
        if record.plan.base_name:
            rebuild_into(tuned[record.plan.name], base_tensors[record.plan.base_name], record)
    return subnetwork
