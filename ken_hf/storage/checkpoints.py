"""Transformers checkpoints read tensor by tensor: a folder or Hub id with ``model.safetensors``
or sharded ``model-*.safetensors`` plus ``model.safetensors.index.json``. Headers are read
first (names, dtypes, shapes at no cost); a tensor is read only when asked for, from a
memory-mapped file. Pickle checkpoints (``*.bin``) are never loaded.

Tensor names are matched across two checkpoints as ``from_pretrained`` matches them: a
base saved without the model's ``base_model_prefix`` (``bert-base-uncased`` as ``BertModel``,
a Llama as ``LlamaModel``) against a fine-tune that has it, and the other way round.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Mapping
from pathlib import Path

import torch

from ..errors import KENError
from ..utils.confined import confined_file, confined_path
from ..utils.hub import resolve_folder
from ..utils.json_input import read_json_object
from ..utils.lazy_tensors import LazyTensors
from .safetensors_io import SafetensorsError, SafetensorsFile

INDEX_NAME = "model.safetensors.index.json"
WEIGHTS_NAME = "model.safetensors"
# Files of a checkpoint besides its weights, copied where a checkpoint is written.
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "vocab.txt",
    "vocab.json",
    "merges.txt",
    "tokenizer.model",
    "spiece.model",
    "added_tokens.json",
    "chat_template.jinja",
)
_DOWNLOAD_PATTERNS = ["*.safetensors", "*.json", "*.txt", "*.model", "*.jinja"]


class CheckpointError(KENError):
    """A checkpoint that cannot be read, or two that do not belong together.

    Raised for a transformers checkpoint (a folder or Hub id with ``model.safetensors`` or
    sharded safetensors files) whose index or headers are invalid, whose ``config.json``
    is malformed, or that no longer holds the values recorded from it (the file changed
    since), and for a model whose tensors differ from the checkpoint it should hold.

    Example:
        ```python
        from ken_hf import CheckpointError

        try:
            trainer.train()  # with a KENCallback(pretrained_source="checkpoint")
        except CheckpointError as error:
            print(error)  # e.g. the base checkpoint was replaced during training
        ```
    """


class Checkpoint:
    """The safetensors weights of a transformers checkpoint, one tensor at a time.

    Attributes:
        folder: the local folder (a Hub id is downloaded, weights and JSON files only).
        names: tensor names in file order.
        config: the checkpoint's ``config.json`` as a dict (empty if it has none).
    """

    def __init__(self, name_or_path: str | os.PathLike, *, revision: str | None = None) -> None:
        self.source = str(name_or_path)
        self.folder = _resolve(name_or_path, revision)
        config_file = confined_file(self.folder, "config.json")
        self.config = read_model_config(config_file) if config_file is not None else {}
        index_file = confined_file(self.folder, INDEX_NAME)
        if index_file is not None:
            weight_map = read_json(index_file).get("weight_map")
            if not isinstance(weight_map, dict) or not all(
                isinstance(file, str) for file in weight_map.values()
            ):
                raise CheckpointError(f"{index_file}: no weight_map of tensor names to files")
            files = sorted(set(weight_map.values()))
        elif confined_file(self.folder, WEIGHTS_NAME) is not None:
            files = [WEIGHTS_NAME]
        else:
            raise CheckpointError(
                f"{self.source}: no {WEIGHTS_NAME} or {INDEX_NAME} (pickle *.bin checkpoints "
                "are never loaded: convert them to safetensors first)"
            )
        self._files: dict[str, SafetensorsFile] = {}
        self._file_of: dict[str, SafetensorsFile] = {}
        try:
            for file in files:
                self._files[file] = SafetensorsFile(confined_path(self.folder, file))
        except SafetensorsError as error:
            self.close()
            raise CheckpointError(str(error)) from None
        for file in self._files.values():
            for name in file.names:
                self._file_of[name] = file
        self.names = list(self._file_of)

    @property
    def architecture(self) -> str | None:
        return architecture_of(self.config)

    @property
    def base_model_prefix(self) -> str | None:
        return base_model_prefix_of(self.config)

    def shape(self, name: str) -> tuple[int, ...]:
        return self._file_of[name].shape(name)

    def dtype(self, name: str) -> torch.dtype | None:
        """The tensor's torch dtype (None for a dtype torch cannot hold here)."""
        return self._file_of[name].dtype(name)

    def nbytes(self, name: str) -> int:
        return self._file_of[name].nbytes(name)

    def read(self, name: str) -> torch.Tensor:
        """Tensor ``name`` on the CPU, a fresh copy (see ``SafetensorsFile.read``)."""
        try:
            return self._file_of[name].read(name)
        except SafetensorsError as error:
            raise CheckpointError(str(error)) from None

    def close(self) -> None:
        for file in self._files.values():
            file.close()

    def __enter__(self) -> Checkpoint:
        return self

    def __exit__(self, *exception) -> None:
        self.close()


def architecture_of(model_config: dict) -> str | None:
    """The transformers class a ``config.json`` names (its first architecture)."""
    return (model_config.get("architectures") or [None])[0]


def base_model_prefix_of(model_config: dict) -> str | None:
    """The ``base_model_prefix`` of that class (``bert``, ``model``, ...), if known."""
    import transformers

    model_class = getattr(transformers, architecture_of(model_config) or "", None)
    return getattr(model_class, "base_model_prefix", None) or None


def match_names(names: Iterable[str], stored: Iterable[str], prefix: str | None) -> dict[str, str]:
    """``{name: stored name}`` for each of ``names`` (a model's tensors) that a checkpoint
    holding ``stored`` has, as ``from_pretrained`` matches them: the same name, or with
    ``prefix`` (the model class's ``base_model_prefix``) taken off or put on."""
    stored = set(stored)
    matched = {}
    for name in names:
        candidates = [name]
        if prefix:
            candidates += [name.removeprefix(f"{prefix}."), f"{prefix}.{name}"]
        found = next((c for c in candidates if c in stored), None)
        if found is not None:
            matched[name] = found
    return matched


def _resolve(name_or_path: str | os.PathLike, revision: str | None) -> Path:
    try:
        return resolve_folder(name_or_path, revision=revision, allow_patterns=_DOWNLOAD_PATTERNS)
    except FileNotFoundError as error:
        raise CheckpointError(str(error)) from error


def read_json(path: Path) -> dict:
    """A JSON object from ``path``, or ``CheckpointError`` naming the file."""
    return read_json_object(path, error=CheckpointError)


def read_model_config(path: Path) -> dict:
    """A model's ``config.json`` as a dict, its fields ken-hf reads checked: ``model_type``
    a string, ``architectures`` a list of class names (``CheckpointError`` naming them)."""
    values = read_json(path)
    model_type, architectures = values.get("model_type"), values.get("architectures")
    if model_type is not None and not isinstance(model_type, str):
        raise CheckpointError(f"{path}: field 'model_type' must be a string")
    if architectures is not None and not (
        isinstance(architectures, list)
        and all(isinstance(a, str) and a.isidentifier() for a in architectures)
    ):
        raise CheckpointError(f"{path}: field 'architectures' must be a list of class names")
    return values


def tensors_of(
    weights: torch.nn.Module | Mapping[str, torch.Tensor],
) -> Mapping[str, torch.Tensor]:
    """Named tensors of a model's state, as a checkpoint of it holds them: its parameters
    (tied ones once) and persistent buffers; or a state dict as it is (a ``LazyTensors``
    stays lazy: copying it into a dict would read every tensor at once)."""
    if isinstance(weights, LazyTensors):
        return weights
    if not isinstance(weights, torch.nn.Module):
        return dict(weights)
    tensors = dict(weights.named_parameters())
    for module_name, module in weights.named_modules():
        for name, buffer in module.named_buffers(recurse=False):
            if buffer is not None and name not in module._non_persistent_buffers_set:
                tensors.setdefault(f"{module_name}.{name}" if module_name else name, buffer)
    return tensors


def new_parameters(
    model: torch.nn.Module, base_name_or_path: str | os.PathLike, *, revision: str | None = None
) -> set[str]:
    """Floating-point tensors of ``model`` that its base checkpoint does not hold (newly
    initialised, such as a classification head); ``CheckpointError`` if it cannot be read."""
    names = [n for n, t in tensors_of(model).items() if t.is_floating_point()]
    with Checkpoint(base_name_or_path, revision=revision) as checkpoint:
        prefix = getattr(model, "base_model_prefix", None) or None
        return new_tensor_names(names, checkpoint, prefix)


def new_tensor_names(
    names: Iterable[str], checkpoint: Checkpoint, prefix: str | None = None
) -> set[str]:
    """Those of ``names`` (a model's tensors) that ``checkpoint`` does not hold: newly
    initialised when the model was loaded from it, such as a classification head. Names
    match as in ``match_names`` (``prefix``: the model's ``base_model_prefix``; default the
    checkpoint's)."""
    names = list(names)
    found = match_names(names, checkpoint.names, prefix or checkpoint.base_model_prefix)
    return {name for name in names if name not in found}


def first_difference(
    checkpoint: Checkpoint,
    tensors: Mapping[str, torch.Tensor],
    prefix: str | None = None,
    *,
    samples: int = 8,
) -> str | None:
    """Whether ``checkpoint`` holds ``tensors`` (a model's pre-trained values): up to
    ``samples`` of the tensors it has, spread evenly over them, are read, cast to the
    tensor's dtype and compared bit for bit. Returns the name of the first that differs
    (or has another shape), None when all agree; ``"<none in common>"`` if it holds none."""
    pairs = match_names(tensors, checkpoint.names, prefix or checkpoint.base_model_prefix)
    names = [n for n in pairs if tensors[n].is_floating_point() and checkpoint.dtype(pairs[n])]
    if not names:
        return "<none in common>"
    step = max(1, len(names) // samples)
    for name in names[::step][:samples] + names[-1:]:
        stored = checkpoint.read(pairs[name])
        tensor = rows_like(tensors[name].detach(), stored.shape)
        if tensor is None or not torch.equal(stored.to(tensor.dtype), tensor.to("cpu")):
            return name
    return None


def rows_like(tensor: torch.Tensor, stored_shape: tuple[int, ...]) -> torch.Tensor | None:
    """``tensor`` as a checkpoint of ``stored_shape`` holds it: itself when the shapes are
    equal, its first rows when it grew along its first dimension since (embeddings of a
    vocabulary that gained tokens), None when it has another shape."""
    shape, stored_shape = tuple(tensor.shape), tuple(stored_shape)
    if shape == stored_shape:
        return tensor
    if (
        len(shape) >= 1
        and len(stored_shape) == len(shape)
        and shape[1:] == stored_shape[1:]
        and stored_shape[0] < shape[0]
    ):
        return tensor[: stored_shape[0]]
    return None
