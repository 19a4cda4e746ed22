"""``KENModel`` and ``AutoKENModelFor*``: a base model plus KEN subnetworks, loaded
transparently from a folder or the Hub, in the shape of PEFT's ``PeftModel``."""

from __future__ import annotations

import bisect
import dataclasses
import functools
import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch
import transformers
from transformers import PretrainedConfig, PreTrainedModel

from .checkpoints import tensors_of
from .delta_codec import host_copies
from .errors import KENConfigError, KENError, UnsafePathError
from .fingerprint import tensor_fingerprint
from .hub import is_remote_id, resolve_file
from .json_input import is_integer, read_json_object
from .subnetwork import KENSubnetwork, fingerprints_of


class KENModel(PreTrainedModel):
    """A transformers model with KEN subnetworks applied in place.

    The wrapped model (``base_model``, ``get_base_model()``) is the real model, its weights
    holding the active subnetwork: ``forward``, ``generate`` and every attribute it has are
    its own, so a ``KENModel`` works wherever the plain model does, and
    ``pipeline(task, model=ken_model.base_model)`` takes the plain model itself. A
    ``KENModel`` is a ``PreTrainedModel``, so that ``Trainer`` saves it through
    ``save_pretrained``: the active subnetwork by default, the merged model with
    ``save_merged=True``. Several subnetworks can be loaded under names; switching writes
    only their kept values.

    ``KENModel(model)`` gives a ``KENModelForQuestionAnswering`` for a question-answering
    model (Trainer finds its label arguments by the class).
    """

    # PreTrainedModel.base_model returns the attribute of this name: the wrapped model.
    base_model_prefix = "model"

    def __new__(cls, model: torch.nn.Module, **kwargs):
        if cls is KENModel and type(model).__name__.endswith("ForQuestionAnswering"):
            cls = KENModelForQuestionAnswering
        return super().__new__(cls)

    def __init__(self, model: torch.nn.Module, *, save_merged: bool = False) -> None:
        # Not PreTrainedModel.__init__: the wrapped model was built, and checked, already.
        torch.nn.Module.__init__(self)
        self.config = model.config
        self.name_or_path = getattr(model, "name_or_path", "")
        self.main_input_name = getattr(model, "main_input_name", "input_ids")
        self.model = model
        self.subnetworks: dict[str, KENSubnetwork] = {}
        self.active_subnetwork: str | None = None
        self.save_merged = save_merged
        self._overwritten: dict[str, torch.Tensor] = {}
        _own_weights(model)
        self._base_fingerprints: dict[str, str] | None = fingerprints_of(model)
        # Trainer keeps the dataset columns that forward's signature names: the model's own.
        self.forward = functools.update_wrapper(_calling(model), model.forward)

    def forward(self, *args, labels=None, **kwargs):
        """The wrapped model's forward (each instance carries it with the model's signature;
        this one names the label argument, which ``Trainer`` looks up on the class)."""
        if labels is not None:
            kwargs["labels"] = labels
        return self.model(*args, **kwargs)

    def _get_name(self) -> str:  # shown by repr()
        return f"{type(self).__name__}[{type(self.model).__name__}]"

    def __getattr__(self, name: str):
        try:
            return super().__getattr__(name)
        except AttributeError:
            if name == "model" or "model" not in self.__dict__.get("_modules", {}):
                raise
            return getattr(self._modules["model"], name)

    def get_base_model(self) -> torch.nn.Module:
        return self.model

    def can_generate(self) -> bool:
        return self.model.can_generate()

    def gradient_checkpointing_enable(self, *args, **kwargs) -> None:
        self.model.gradient_checkpointing_enable(*args, **kwargs)

    def gradient_checkpointing_disable(self) -> None:
        self.model.gradient_checkpointing_disable()

    # -- loading ------------------------------------------------------------------------
    @classmethod
    def from_pretrained(
        cls,
        base_model: torch.nn.Module,
        name_or_path: str | os.PathLike,
        *,
        subnetwork_name: str = "default",
        subfolder: str | None = None,
        revision: str | None = None,
        **hub_kwargs,
    ) -> KENModel:
        """Wrap ``base_model`` (holding the base weights) and apply the subnetwork saved in
        ``name_or_path`` (a folder or a Hub id; in its ``subfolder``, at ``revision``)."""
        model = cls(base_model)
        model.load_subnetwork(
            name_or_path, subnetwork_name, subfolder=subfolder, revision=revision, **hub_kwargs
        )
        model.set_subnetwork(subnetwork_name)
        return model

    def load_subnetwork(
        self,
        name_or_path: str | os.PathLike,
        name: str,
        *,
        subfolder: str | None = None,
        revision: str | None = None,
        **hub_kwargs,
    ) -> None:
        """Read a subnetwork (a folder or a Hub id; in its ``subfolder``, at ``revision``)
        and keep it under ``name`` (not applied yet)."""
        subnetwork = KENSubnetwork.from_pretrained(
            name_or_path, subfolder=subfolder, revision=revision, **hub_kwargs
        )
        self.add_subnetwork(name, subnetwork)

    def add_subnetwork(self, name: str, subnetwork: KENSubnetwork) -> None:
        """Keep ``subnetwork`` under ``name``; it must have been made from this base, and
        every tensor it writes must be one of the model's, of the same shape and dtype."""
        subnetwork.check_base(self._live_base())
        subnetwork.check_fits(tensors_of(self.model))
        self.subnetworks[name] = subnetwork

    def delete_subnetwork(self, name: str) -> None:
        """Forget subnetwork ``name``, taking it off the weights first if it is active."""
        self._named(name)
        if name == self.active_subnetwork:
            self._take_off()
        del self.subnetworks[name]

    # -- switching ----------------------------------------------------------------------
    def set_subnetwork(self, name: str) -> None:
        """Make ``name`` the active subnetwork: the previous one's values are taken off and
        this one's written, in time proportional to their kept values."""
        subnetwork = self._named(name)
        self._take_off()
        self._overwritten = subnetwork.apply_to(self.model, base_fingerprints=self._live_base())
        self.active_subnetwork = name

    @contextmanager
    def disable_subnetwork(self) -> Iterator[None]:
        """Within the block the model is the base, bit for bit; the active subnetwork is
        written back on leaving it."""
        active = self.active_subnetwork
        self._take_off()
        try:
            yield
        finally:
            if active is not None:
                self.set_subnetwork(active)

    def _named(self, name: str) -> KENSubnetwork:
        self._live_base()
        if name not in self.subnetworks:
            raise KeyError(f"no subnetwork named {name!r}; loaded: {sorted(self.subnetworks)}")
        return self.subnetworks[name]

    def _live_base(self) -> dict[str, str]:
        if self._base_fingerprints is None:
            raise KENError(
                "this KENModel was unloaded: use the model that unload() or "
                "merge_and_unload() returned"
            )
        return self._base_fingerprints

    def _take_off(self) -> None:
        if self.active_subnetwork is not None:
            self.subnetworks[self.active_subnetwork].restore(self.model, self._overwritten)
            self._overwritten, self.active_subnetwork = {}, None

    def unload(self) -> torch.nn.Module:
        """Take the active subnetwork off and return the base model, bit for bit as loaded.
        This ``KENModel`` is done with: it refuses further subnetworks."""
        self._take_off()
        return self._release()

    def merge_and_unload(self) -> torch.nn.Module:
        """Return the plain transformers model with the active subnetwork in its weights.
        This ``KENModel`` is done with: it refuses further subnetworks, so nothing is
        written over the merged weights."""
        self._live_base()
        self._overwritten, self.active_subnetwork = {}, None
        return self._release()

    def _release(self) -> torch.nn.Module:
        self.subnetworks.clear()
        self._base_fingerprints = None
        return self.model

    @property
    def subnetwork(self) -> KENSubnetwork:
        if self.active_subnetwork is None:
            raise KENError("no active subnetwork; call set_subnetwork(name)")
        return self.subnetworks[self.active_subnetwork]

    # -- saving -------------------------------------------------------------------------
    def save_pretrained(
        self,
        save_directory: str | os.PathLike,
        *,
        merged: bool | None = None,
        is_main_process: bool = True,
        state_dict: dict | None = None,
        **kwargs,
    ) -> None:
        """Save the active subnetwork (not the model) to ``save_directory``; with
        ``merged`` (default: ``self.save_merged``) the merged model instead, as
        ``save_pretrained`` of transformers writes it (``kwargs`` go there).

        The subnetwork is saved only while the weights are what it rebuilds: weights changed
        since (trained further) raise ``KENError`` naming the first changed tensor.
        ``state_dict`` (what Trainer passes) is the wrapper's view of the same weights."""
        if not is_main_process:
            return
        if self.save_merged if merged is None else merged:
            if state_dict is not None:
                prefix = f"{self.base_model_prefix}."
                kwargs["state_dict"] = {k.removeprefix(prefix): v for k, v in state_dict.items()}
            self.model.save_pretrained(save_directory, **kwargs)
            return
        self._check_unchanged()
        subnetwork = self.subnetwork
        # A subnetwork read from a version 1 file gets its delta from the base it is on.
        pruned = {n: p.with_delta(self._overwritten[n]) for n, p in subnetwork.pruned.items()}
        dataclasses.replace(subnetwork, pruned=pruned).save_pretrained(save_directory)

    def _check_unchanged(self) -> None:
        """Raise when a weight differs from base + active subnetwork."""
        subnetwork, base = self.subnetwork, self._live_base()
        for name, tensor in tensors_of(self.model).items():
            if not tensor.is_floating_point():
                continue
            current, same = tensor.detach(), True
            pruned = subnetwork.pruned.get(name)
            if pruned is not None and pruned.added is not None:  # a grown tensor
                same = torch.equal(current[pruned.base_rows :].cpu(), pruned.added)
                current = current[: pruned.base_rows]
            if name in subnetwork.whole:
                same = torch.equal(current.cpu(), subnetwork.whole[name])
            else:
                # What was written must be the subnetwork's values; with the base's values
                # put back there, the tensor must be the base, bit for bit.
                rebuilt_base = current.clone()
                if pruned is not None:
                    where, overwritten = pruned.written_positions(), self._overwritten[name]
                    written = current.reshape(-1).index_select(0, where.to(current.device))
                    same = same and torch.equal(written, pruned.written_values(overwritten))
                    rebuilt_base.view(-1).index_copy_(0, where.to(current.device), overwritten)
                same = same and tensor_fingerprint(rebuilt_base) == base.get(name)
            if not same:
                raise KENError(
                    f"tensor {name!r} changed since the subnetwork was applied (trained "
                    "further?), and the subnetwork would not rebuild it: save the merged "
                    "model with save_pretrained(folder, merged=True), or set "
                    "model.save_merged = True before a Trainer saves"
                )

    def push_to_hub(self, repo_id: str, **push_kwargs) -> str:
        """Publish only the active subnetwork to the Hub; returns the commit URL."""
        return self.subnetwork.push_to_hub(repo_id, **push_kwargs)


class KENModelForQuestionAnswering(KENModel):
    """A ``KENModel`` of a question-answering model: its forward names the answer span
    arguments, which ``Trainer`` looks up on the class as this task's labels."""

    def forward(self, *args, start_positions=None, end_positions=None, **kwargs):
        if start_positions is not None:
            kwargs["start_positions"] = start_positions
        if end_positions is not None:
            kwargs["end_positions"] = end_positions
        return self.model(*args, **kwargs)


def _calling(model: torch.nn.Module):
    """A function that calls ``model`` (its hooks included) with what it is given."""

    def call(*args, **kwargs):
        return model(*args, **kwargs)

    return call


def _own_weights(model: torch.nn.Module) -> None:
    """Give every CPU parameter that lies in a memory-mapped file memory of its own.
    transformers maps checkpoint files into memory when the dtype needs no conversion;
    writing kept values into such a mapping copies it page by page on write, which is
    slower than one copy up front. Parameters already in memory of their own (converted
    to another dtype, or on an accelerator) are left as they are. Tied parameters stay
    tied (same Parameter object)."""
    mapped = _file_mappings()
    parameters = [
        p for p in model.parameters() if p.device.type == "cpu" and _in_mapping(p, mapped)
    ]
    copies = host_copies([p.data for p in parameters])
    for parameter, copy in zip(parameters, copies, strict=True):
        parameter.data = copy


def _file_mappings() -> list[tuple[int, int]] | None:
    """Sorted ``(start, end)`` addresses of this process's mappings of files (Linux's
    ``/proc/self/maps``: an inode other than 0); None where that cannot be read."""
    try:
        lines = Path("/proc/self/maps").read_text().splitlines()
    except OSError:
        return None
    ranges = []
    for line in lines:
        fields = line.split()
        if len(fields) >= 5 and fields[4] != "0":
            start, end = fields[0].split("-")
            ranges.append((int(start, 16), int(end, 16)))
    return sorted(ranges)


def _in_mapping(tensor: torch.Tensor, mapped: list[tuple[int, int]] | None) -> bool:
    """Whether ``tensor``'s memory lies in one of the ``mapped`` ranges (True when they are
    unknown: copying is always safe)."""
    if mapped is None:
        return True
    address = tensor.data_ptr()
    index = bisect.bisect_right(mapped, (address, float("inf"))) - 1
    return index >= 0 and mapped[index][0] <= address < mapped[index][1]


# transformers 5 names the loading dtype ``dtype``; 4.x ``torch_dtype``.
_DTYPE_ARGUMENT = "dtype" if int(transformers.__version__.split(".")[0]) >= 5 else "torch_dtype"


class AutoKENModel:
    """Loads the base model named in a subnetwork's config, through the transformers class
    recorded there (or the Auto class of the subclass), in the dtype recorded there, and
    applies the subnetwork.

    What a subnetwork's files may choose is bounded (see SECURITY.md): a subnetwork from the
    Hub names its base by Hub id only (a local base needs ``base_model_name_or_path=``), its
    ``config.json`` must describe a model of the base's sizes, no code from the base or the
    subnetwork runs (``trust_remote_code=False`` unless you pass it), and each tensor's
    declared shape is checked against the loaded base before it is decoded."""

    auto_class: str | None = None

    @classmethod
    def from_pretrained(
        cls,
        name_or_path: str | os.PathLike,
        *,
        subfolder: str | None = None,
        revision: str | None = None,
        subnetwork_name: str = "default",
        base_model_name_or_path: str | os.PathLike | None = None,
        base_model_revision: str | None = None,
        hub_kwargs: dict | None = None,
        **model_kwargs,
    ) -> KENModel:
        """``name_or_path``: a subnetwork folder or Hub id; ``subfolder``: the folder inside
        it that holds the subnetwork; ``revision``: the subnetwork's branch, tag or commit
        on the Hub. ``base_model_name_or_path`` / ``base_model_revision``: the base to load
        instead of the one the subnetwork recorded (a local folder, or a Hub id at a
        revision); its fingerprints must still match. ``model_kwargs`` go to the base
        model's ``from_pretrained`` (e.g. ``device_map``); the base dtype is the one the
        subnetwork recorded unless given."""
        subnetwork = KENSubnetwork.from_pretrained(
            name_or_path, subfolder=subfolder, revision=revision, **(hub_kwargs or {})
        )
        base, base_revision = _base_location(
            name_or_path, subnetwork.config, base_model_name_or_path, base_model_revision
        )
        model_class = _model_class(cls.auto_class or subnetwork.config.model_class, name_or_path)
        model_kwargs.setdefault("trust_remote_code", False)  # nothing prompts, nothing runs
        if subnetwork.model_config is not None and "config" not in model_kwargs:
            base_config = _base_model_config(base, base_revision, hub_kwargs or {})
            model_kwargs["config"] = model_config_of(
                subnetwork.model_config, base_config, f"{name_or_path}: config.json"
            )
        dtype_name = subnetwork.config.base_model_dtype
        if dtype_name and not {"dtype", "torch_dtype"} & set(model_kwargs):
            model_kwargs[_DTYPE_ARGUMENT] = getattr(torch, dtype_name)
        model = KENModel(model_class.from_pretrained(base, revision=base_revision, **model_kwargs))
        model.add_subnetwork(subnetwork_name, subnetwork)
        model.set_subnetwork(subnetwork_name)
        return model


def _base_location(
    source: str | os.PathLike,
    config,
    base: str | os.PathLike | None,
    revision: str | None,
) -> tuple[str, str | None]:
    """The base to load: the caller's, else the one the subnetwork recorded. A subnetwork
    from the Hub may only name a Hub id that is not also a local path (transformers would
    read the local folder): a file from a stranger does not choose a folder on this
    machine."""
    if base is not None:
        return os.fspath(base), revision
    recorded = config.base_model_name_or_path
    if recorded is None:
        raise KENConfigError(
            f"{source}: ken_config.json names no base model; pass base_model_name_or_path=, "
            "or load the base yourself and call KENModel.from_pretrained(base_model, folder)"
        )
    from_hub = not Path(source).is_dir()  # as hub.resolve_folder decides
    if from_hub and not is_remote_id(recorded):
        raise UnsafePathError(
            f"{source}: ken_config.json field 'base_model_name_or_path' is {recorded!r}, "
            "which is not a Hub id: a subnetwork from the Hub may name only a Hub id as its "
            "base. To use a base you trust, pass base_model_name_or_path="
        )
    return recorded, config.base_model_revision


def _model_class(name: str | None, source: str | os.PathLike) -> type:
    """The transformers model class (or Auto class) called ``name``; a name that is not
    one (any other attribute of transformers) is refused."""
    found = getattr(transformers, name or "", None)
    if not (
        isinstance(found, type)
        and (issubclass(found, PreTrainedModel) or name.startswith("AutoModel"))
        and hasattr(found, "from_pretrained")
    ):
        raise KENConfigError(
            f"{source}: ken_config.json field 'model_class' is {name!r}, not a transformers "
            "model class"
        )
    return found


def _base_model_config(base: str, revision: str | None, hub_kwargs: dict) -> dict:
    """The base's ``config.json`` as a dict, read as data (no code of the base runs)."""
    try:
        path = resolve_file(base, "config.json", revision=revision, **hub_kwargs)
    except FileNotFoundError as error:
        raise OSError(f"the base {base}: {error}") from error
    return read_json_object(path, error=KENConfigError)


def model_config_of(values: dict, base_values: dict, source: str) -> PretrainedConfig:
    """The transformers config a subnetwork's ``config.json`` (``values``) describes,
    checked against the base's (``base_values``): the same ``model_type``, and the same
    value for every integer both hold (so the model built from it has the base's sizes),
    except token ids and a vocabulary that grew by at most its own size. The model is
    built with the base's vocabulary: a subnetwork that grew it grows the embeddings when
    it is applied."""
    model_type = values.get("model_type")
    if not isinstance(model_type, str) or model_type not in transformers.CONFIG_MAPPING:
        raise KENConfigError(f"{source}: field 'model_type' is {model_type!r}, not a known model")
    if base_values.get("model_type") != model_type:
        raise KENConfigError(
            f"{source}: field 'model_type' is {model_type!r}, the base's is "
            f"{base_values.get('model_type')!r}"
        )
    _check_sizes(values, base_values, source, "")
    fields = {key: value for key, value in values.items() if key != "model_type"}
    if "vocab_size" in base_values:  # built as the base; a grown vocabulary comes on apply
        fields["vocab_size"] = base_values["vocab_size"]
    try:
        return transformers.CONFIG_MAPPING[model_type].from_dict(fields)
    except Exception as error:  # transformers validates fields its own way: name the file
        raise KENConfigError(f"{source}: not a valid {model_type} config ({error})") from None


def _check_sizes(values: dict, base_values: dict, source: str, prefix: str) -> None:
    for key, value in values.items():
        base_value = base_values.get(key)
        if isinstance(value, dict) and isinstance(base_value, dict):
            _check_sizes(value, base_value, source, f"{prefix}{key}.")
            continue
        if not (is_integer(value) and is_integer(base_value)) or value == base_value:
            continue
        if key.endswith("_token_id"):
            continue
        if key == "vocab_size" and base_value <= value <= 2 * base_value:
            continue
        raise KENConfigError(
            f"{source}: field {prefix + key!r} is {value}, the base's is {base_value}: a "
            "subnetwork describes a model of its base's sizes"
        )


class AutoKENModelForSequenceClassification(AutoKENModel):
    auto_class = "AutoModelForSequenceClassification"


class AutoKENModelForCausalLM(AutoKENModel):
    auto_class = "AutoModelForCausalLM"


class AutoKENModelForTokenClassification(AutoKENModel):
    auto_class = "AutoModelForTokenClassification"


class AutoKENModelForQuestionAnswering(AutoKENModel):
    auto_class = "AutoModelForQuestionAnswering"


class AutoKENModelForSeq2SeqLM(AutoKENModel):
    auto_class = "AutoModelForSeq2SeqLM"
