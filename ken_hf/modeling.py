"""``KENModel`` and ``AutoKENModelFor*``: a base model plus KEN subnetworks, loaded
transparently from a folder or the Hub, in the shape of PEFT's ``PeftModel``."""

from __future__ import annotations

import dataclasses
import inspect
import os
from collections.abc import Iterator
from contextlib import AbstractContextManager, contextmanager
from pathlib import Path
from typing import NoReturn

import torch
import transformers
from transformers import PretrainedConfig, PreTrainedModel
from transformers.utils import find_labels

from .errors import KENConfigError, KENError, UnsafePathError, shown
from .storage.checkpoints import tensors_of
from .storage.delta_codec import host_copies
from .subnetwork import KENSubnetwork, fingerprints_of
from .utils.fingerprint import tensor_fingerprint
from .utils.hub import is_remote_id, resolve_file
from .utils.json_input import is_integer, read_json_object


class _signature_of_wrapped_model:  # noqa: N801 (a decorator, named as one)
    """The ``forward`` of the ``KENModel`` classes, as ``Trainer`` reads it.

    transformers' ``Trainer`` reads the signature of ``forward`` twice: from the class
    (``transformers.utils.find_labels`` and ``can_return_loss``: the label arguments) and
    from the instance (``_remove_unused_columns``: the data set columns to keep). The first
    is the task's, the second the wrapped model's. A descriptor (Python's data model) gives
    both from the class: read from the class, the function itself; read from an instance,
    the function bound to it, with the wrapped model's ``forward`` signature as its
    ``__signature__``, which ``inspect.signature`` returns. Nothing is stored per instance, so
    ``copy.deepcopy`` and pickle keep a ``KENModel`` whole, and the signature follows the
    wrapped model's ``forward`` if that is replaced (by accelerate, say).
    """

    def __init__(self, function) -> None:
        self.function = function
        self.__doc__ = function.__doc__

    def __get__(self, instance, owner=None):
        if instance is None:
            return self.function
        return _BoundForward(self.function, instance)


class _BoundForward:
    """``forward`` bound to a ``KENModel``, with its wrapped model's signature."""

    __slots__ = ("_function", "_owner")

    def __init__(self, function, owner) -> None:
        self._function, self._owner = function, owner

    def __call__(self, *args, **kwargs):
        return self._function(self._owner, *args, **kwargs)

    @property
    def __signature__(self) -> inspect.Signature:
        return inspect.signature(self._owner.model.forward)

    @property
    def __name__(self) -> str:
        return self._function.__name__

    def __repr__(self) -> str:
        return f"<bound forward of {self._owner._get_name()}>"


class KENModel(PreTrainedModel):
    """A transformers model with KEN subnetworks applied in place, in the shape of ``PeftModel``.

    The wrapped model (``base_model``, ``get_base_model()``) is the real model, its weights
    holding the active subnetwork: ``forward``, ``generate`` and every attribute it has are
    its own, so a ``KENModel`` works wherever the plain model does, and
    ``pipeline(task, model=ken_model.base_model)`` takes the plain model itself. A
    ``KENModel`` is a ``PreTrainedModel``, so that ``Trainer`` saves it through
    ``save_pretrained``: the active subnetwork by default, the merged model with
    ``save_merged=True``. Several subnetworks can be loaded under names; switching writes
    only their kept values.

    ``KENModel(model)`` gives the ``KENModel`` class of the model's task, as PEFT's
    ``PeftModelFor*``: ``KENModelForSequenceClassification``, ``KENModelForTokenClassification``,
    ``KENModelForQuestionAnswering``, ``KENModelForCausalLM`` or ``KENModelForSeq2SeqLM``,
    the task whose transformers Auto class (``AutoModelForQuestionAnswering``, ...) builds
    the model's class for its config; a ``KENModel`` for any other model. ``Trainer`` finds
    the task's label arguments on the class, and keeps the data set columns the wrapped
    model's ``forward`` takes. CPU parameters in memory torch did not allocate (a
    memory-mapped checkpoint file) are copied into memory of their own first, so that
    writing kept values does not copy pages one by one.

    Args:
        model: the base model (a transformers model holding the pre-trained weights); it is
            wrapped, not copied, and its fingerprints are taken now.
        save_merged: make ``save_pretrained`` (and so ``Trainer``) save the merged model
            instead of the active subnetwork.

    Attributes:
        model: the wrapped model (also ``base_model``).
        subnetworks: ``{name: KENSubnetwork}`` of the loaded subnetworks.
        active_subnetwork: the name of the subnetwork in the weights, or None.
        save_merged: as the argument; may be set at any time.

    Example:
        ```python
        from transformers import AutoModelForSequenceClassification
        from ken_hf import KENModel

        base = AutoModelForSequenceClassification.from_pretrained("bert-base-uncased")
        model = KENModel(base)
        model.load_subnetwork("me/bert-sst2-ken", "sst2")
        model.load_subnetwork("me/bert-imdb-ken", "imdb")
        model.set_subnetwork("imdb")
        logits = model(**inputs).logits
        with model.disable_subnetwork():  # the base, bit for bit, inside the block
            ...
        ```
    """

    # PreTrainedModel.base_model returns the attribute of this name: the wrapped model.
    base_model_prefix = "model"

    def __new__(cls, model: torch.nn.Module | None = None, **kwargs):
        # KENModel(model) is the class of the model's task (_task_class). Without a model
        # (copy.deepcopy and pickle create the object first, then restore its state): cls.
        if cls is KENModel and model is not None:
            cls = _task_class(model)
        return super().__new__(cls)

    def __init__(self, model: torch.nn.Module, *, save_merged: bool = False) -> None:
        # Not PreTrainedModel.__init__: it checks the config against the class it runs for
        # (its attention and experts implementations: the _supports_* flags, this module's
        # source) and writes the result into the config, which is the wrapped model's. This
        # class holds no attention code: it would refuse "sdpa", the default, or change the
        # wrapped model's config. The wrapped model ran those checks when it was built.
        # What PreTrainedModel.__init__ sets (loss_type, generation_config, ...) is read from
        # the wrapped model by __getattr__; tests/test_kenmodel_classes.py pins both.
        torch.nn.Module.__init__(self)
        self.config = model.config
        self.name_or_path = getattr(model, "name_or_path", "")
        self.main_input_name = getattr(model, "main_input_name", "input_ids")
        # What the model's modules need, which PreTrainedModel declares on the class (so
        # __getattr__ never reaches the wrapped model's) and makes the instance's: accelerate
        # reads them for device maps and FSDP wrapping (_no_split_modules).
        for name in _MODULE_ATTRIBUTES:
            if hasattr(model, name):
                setattr(self, name, getattr(model, name))
        self.model = model
        self.subnetworks: dict[str, KENSubnetwork] = {}
        self.active_subnetwork: str | None = None
        self.save_merged = save_merged
        self._overwritten: dict[str, torch.Tensor] = {}
        _own_weights(model)
        self._base_fingerprints: dict[str, str] | None = fingerprints_of(model)

    @_signature_of_wrapped_model
    def forward(self, *args, labels=None, **kwargs):
        """Call the wrapped model (its hooks included) with what it is given.

        Read from the class, ``forward`` names the task's label arguments (``Trainer`` finds
        them there); read from an instance, its signature is the wrapped model's
        ``forward``'s (``Trainer`` keeps the data set columns it names).

        Args:
            *args (Any): positional arguments of the wrapped model.
            labels (torch.Tensor | None): passed on as ``labels=`` when given.
            **kwargs (Any): keyword arguments of the wrapped model (``input_ids``,
                ``attention_mask``, ...).

        Returns:
            (transformers.utils.ModelOutput): what the wrapped model returns (e.g. a
                ``SequenceClassifierOutput``, or a tuple with ``return_dict=False``).
        """
        if labels is not None:
            kwargs["labels"] = labels
        return self.model(*args, **kwargs)

    def _get_name(self) -> str:  # shown by repr(): the wrapped model's class names the task
        return f"KENModel[{type(self.model).__name__}]"

    def __getattr__(self, name: str):
        try:
            return super().__getattr__(name)
        except AttributeError:
            if name == "model" or "model" not in self.__dict__.get("_modules", {}):
                raise
            return getattr(self._modules["model"], name)

    def get_base_model(self) -> torch.nn.Module:
        """The wrapped transformers model, its weights holding the active subnetwork.

        Returns:
            ``self.model`` (also ``self.base_model``), not a copy.
        """
        return self.model

    def can_generate(self) -> bool:
        """Whether the wrapped model can ``generate``.

        Returns:
            The wrapped model's ``can_generate()``.
        """
        return self.model.can_generate()

    def gradient_checkpointing_enable(self, *args, **kwargs) -> None:
        """Enable gradient checkpointing on the wrapped model (what ``Trainer`` calls).

        Args:
            *args (Any): passed to the wrapped model's ``gradient_checkpointing_enable``.
            **kwargs (Any): passed to it too (e.g. ``gradient_checkpointing_kwargs``).
        """
        self.model.gradient_checkpointing_enable(*args, **kwargs)

    def gradient_checkpointing_disable(self) -> None:
        """Disable gradient checkpointing on the wrapped model."""
        self.model.gradient_checkpointing_disable()

    # -- loading ------------------------------------------------------------------------
    @classmethod
    def from_pretrained(
        cls,
        base_model: torch.nn.Module,
        name_or_path: str | os.PathLike,
        *,
        subnetwork_name: str | None = None,
        adapter_name: str | None = None,
        subfolder: str | None = None,
        revision: str | None = None,
        **hub_kwargs,
    ) -> KENModel:
        """Wrap a base model you loaded and apply a saved subnetwork to it.

        To have the base loaded for you, from what the subnetwork records, use
        ``AutoKENModel.from_pretrained``.

        Args:
            base_model: the base model, holding the weights the subnetwork was made from.
            name_or_path: the subnetwork: a local folder or a Hub repository id.
            subnetwork_name: the name it is kept under (and made active), what
                ``set_subnetwork`` and ``delete_subnetwork`` take; default ``"default"``, as
                PEFT's ``PeftModel.from_pretrained``.
            adapter_name: PEFT's name for ``subnetwork_name``; give one of the two.
            subfolder: the folder inside ``name_or_path`` that holds the subnetwork.
            revision: a branch, tag or commit of the Hub repository.
            **hub_kwargs (Any): passed to ``huggingface_hub.snapshot_download`` (e.g.
                ``token``).

        Returns:
            The ``KENModel`` (of the class of the model's task, e.g.
            ``KENModelForQuestionAnswering``) with the subnetwork active.

        Raises:
            FileNotFoundError: neither the folder nor the Hub provides the subnetwork.
            UnsafePathError: ``subfolder`` leads out of the folder, or a file links out.
            KENConfigError: ``ken_config.json`` is invalid, or ``subnetwork_name`` and
                ``adapter_name`` differ.
            KENFormatError: the subnetwork file is invalid.
            BaseMismatchError: ``base_model`` is not the base the subnetwork was made from,
                or lacks one of its tensors (or has it in another shape or dtype).

        Example:
            ```python
            from transformers import AutoModelForCausalLM
            from ken_hf import KENModel

            base = AutoModelForCausalLM.from_pretrained("HuggingFaceTB/SmolLM2-135M")
            model = KENModel.from_pretrained(base, "me/smollm2-ken")
            ```
        """
        name = _one_name(subnetwork_name, adapter_name, "subnetwork_name") or DEFAULT_NAME
        model = cls(base_model)
        model.load_subnetwork(
            name_or_path, name, subfolder=subfolder, revision=revision, **hub_kwargs
        )
        model.set_subnetwork(name)
        return model

    def load_subnetwork(
        self,
        name_or_path: str | os.PathLike,
        name: str | None = None,
        *,
        adapter_name: str | None = None,
        subfolder: str | None = None,
        revision: str | None = None,
        **hub_kwargs,
    ) -> None:
        """Read a subnetwork and keep it under ``name``, not applied yet.

        Args:
            name_or_path: a local folder or a Hub repository id.
            name: the name to keep it under.
            adapter_name: PEFT's name for ``name`` (as in ``load_adapter``); give one of the
                two.
            subfolder: the folder inside ``name_or_path`` that holds the subnetwork.
            revision: a branch, tag or commit of the Hub repository.
            **hub_kwargs (Any): passed to ``huggingface_hub.snapshot_download`` (e.g.
                ``token``).

        Raises:
            KENConfigError: no name is given, ``name`` and ``adapter_name`` differ, or the
                name is the active subnetwork's.
            FileNotFoundError: neither the folder nor the Hub provides the subnetwork.
            KENFormatError: the subnetwork file is invalid.
            BaseMismatchError: the model is not the subnetwork's base, or does not fit it.
            KENError: this ``KENModel`` was unloaded.

        Example:
            ```python
            model.load_subnetwork("me/bert-imdb-ken", "imdb")
            model.set_subnetwork("imdb")
            ```
        """
        name = _one_name(name, adapter_name, "name")
        if name is None:
            raise KENConfigError(
                f"load_subnetwork({os.fspath(name_or_path)!r}): name the subnetwork, "
                "load_subnetwork(folder, 'name') or adapter_name='name'"
            )
        subnetwork = KENSubnetwork.from_pretrained(
            name_or_path, subfolder=subfolder, revision=revision, **hub_kwargs
        )
        self.add_subnetwork(name, subnetwork)

    def add_subnetwork(self, name: str, subnetwork: KENSubnetwork) -> None:
        """Keep ``subnetwork`` under ``name``, not applied yet.

        It must have been made from this base, and every tensor it writes must be one of
        the model's, of the same shape and dtype: both are checked now, before anything is
        decoded.

        Args:
            name: the name to keep it under.
            subnetwork: a subnetwork made from this model's base.

        Raises:
            KENConfigError: ``name`` is the active subnetwork's (its values are in the
                weights; put in its place, another would take off values it never wrote).
            BaseMismatchError: the model is not the subnetwork's base, or does not fit it.
            KENError: this ``KENModel`` was unloaded.

        Example:
            ```python
            model.add_subnetwork("sst2", KENSubnetwork.from_pretrained("ken-sst2/"))
            ```
        """
        if name == self.active_subnetwork:
            raise KENConfigError(
                f"subnetwork {name!r} is active: delete_subnetwork({name!r}) (or set another "
                "one) before keeping another subnetwork under its name"
            )
        subnetwork.check_base(self._live_base())
        subnetwork.check_fits(tensors_of(self.model))
        self.subnetworks[name] = subnetwork

    def delete_subnetwork(self, name: str) -> None:
        """Forget subnetwork ``name``, taking it off the weights first if it is active.

        Args:
            name: a loaded subnetwork's name.

        Raises:
            UnknownSubnetworkError: no subnetwork has that name (a ``KeyError`` too).
            KENError: this ``KENModel`` was unloaded.
        """
        self._named(name)
        if name == self.active_subnetwork:
            self._take_off()
        del self.subnetworks[name]

    # -- switching ----------------------------------------------------------------------
    def set_subnetwork(self, name: str) -> None:
        """Make ``name`` the active subnetwork, writing its kept values into the weights.

        The previous subnetwork's values are taken off first, so the two never mix; the time
        taken is proportional to their kept values, not to the model's size.

        Args:
            name: a loaded subnetwork's name.

        Raises:
            UnknownSubnetworkError: no subnetwork has that name (a ``KeyError`` too).
            KENError: this ``KENModel`` was unloaded.
            KENFormatError: a tensor of the subnetwork's file does not decode (found before
                any of its values is written: the model is left as the base).

        Example:
            ```python
            model.set_subnetwork("sst2")
            ```
        """
        subnetwork = self._named(name)
        self._take_off()
        self._overwritten = subnetwork.apply_to(self.model, base_fingerprints=self._live_base())
        self.active_subnetwork = name

    @contextmanager
    def disable_subnetwork(self) -> Iterator[None]:
        """Context manager in which the model is the base, bit for bit.

        The active subnetwork is written back on leaving the block, also after an error.

        Yields:
            None.

        Example:
            ```python
            with model.disable_subnetwork():
                base_logits = model(**inputs).logits
            ```
        """
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
            raise UnknownSubnetworkError(
                f"no subnetwork named {shown(name)}; loaded: {sorted(self.subnetworks)}"
            )
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

        This ``KENModel`` is done with: it refuses further subnetworks, and a second
        ``unload()`` or ``merge_and_unload()``.

        Returns:
            The wrapped transformers model, holding the base weights.

        Raises:
            KENError: this ``KENModel`` was unloaded already.

        Example:
            ```python
            base = model.unload()
            ```
        """
        self._live_base()
        self._take_off()
        return self._release()

    def merge_and_unload(self) -> torch.nn.Module:
        """Return the plain transformers model with the active subnetwork in its weights.

        This ``KENModel`` is done with: it refuses further subnetworks, so nothing is
        written over the merged weights.

        Returns:
            The wrapped transformers model, holding the pruned fine-tuned weights (the base
            weights when no subnetwork is active).

        Raises:
            KENError: this ``KENModel`` was unloaded already.

        Example:
            ```python
            plain = model.merge_and_unload()
            plain.save_pretrained("pruned-model/")  # a full checkpoint
            ```
        """
        self._live_base()
        self._overwritten, self.active_subnetwork = {}, None
        return self._release()

    def _release(self) -> torch.nn.Module:
        self.subnetworks.clear()
        self._base_fingerprints = None
        return self.model

    @property
    def subnetwork(self) -> KENSubnetwork:
        """The active subnetwork.

        Returns:
            The ``KENSubnetwork`` in the weights.

        Raises:
            KENError: no subnetwork is active.
        """
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
        """Save the active subnetwork (not the model), or the merged model, to a folder.

        The subnetwork is saved only while the weights are what it rebuilds: weights changed
        since (trained further) raise ``KENError`` naming the first changed tensor. A
        subnetwork read from a version 1 file is saved in the current format.

        Args:
            save_directory: the folder, created if needed.
            merged: save the merged model, as transformers' ``save_pretrained`` writes it,
                instead of the subnetwork; None: ``self.save_merged``.
            is_main_process: False saves nothing (what ``Trainer`` passes on other ranks).
            state_dict: the wrapper's view of the same weights (what ``Trainer`` passes);
                used for the merged model, its names without the ``model.`` prefix.
            **kwargs (Any): passed to transformers' ``save_pretrained`` of the merged model
                (e.g. ``max_shard_size``); ignored for a subnetwork.

        Raises:
            KENError: no subnetwork is active, or a weight changed since it was applied
                (save with ``merged=True`` instead).

        Example:
            ```python
            model.save_pretrained("ken/")  # the subnetwork folder
            model.save_pretrained("merged/", merged=True)  # a full checkpoint
            ```
        """
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

    def push_to_hub(
        self,
        repo_id: str,
        *,
        base_model_name_or_path: str | os.PathLike | None = None,
        **push_kwargs,
    ) -> str:
        """Publish the active subnetwork (not the model) to a Hub repository.

        Args:
            repo_id: the Hub repository, ``"owner/name"``.
            base_model_name_or_path: the Hub id of the base, recorded in the pushed
                ``ken_config.json`` (the subnetwork in memory is left as it is); needed when
                the subnetwork records a local path as its base.
            **push_kwargs (Any): as in ``KENSubnetwork.push_to_hub`` (``private``, ``token``,
                ``commit_message``, ``revision``, ``path_in_repo``).

        Returns:
            The URL of the commit.

        Raises:
            KENConfigError: the base is a local path and no Hub id is given (nothing is
                uploaded).
            KENError: no subnetwork is active.
            OSError: the upload failed.

        Example:
            ```python
            url = model.push_to_hub("me/minilm-sentiment-ken")
            ```
        """
        return self.subnetwork.push_to_hub(
            repo_id, base_model_name_or_path=base_model_name_or_path, **push_kwargs
        )

    # -- PEFT's names -------------------------------------------------------------------
    # What PeftModel calls adapters, ken-hf calls subnetworks: the same methods, by the names
    # PEFT users (and TRL, which switches adapters this way) know.
    def load_adapter(
        self,
        model_id: str | os.PathLike,
        adapter_name: str,
        *,
        subfolder: str | None = None,
        revision: str | None = None,
        **hub_kwargs,
    ) -> None:
        """``load_subnetwork`` by PEFT's name: keep a subnetwork under ``adapter_name``.

        Not applied yet: ``set_adapter(adapter_name)`` applies it.

        Args:
            model_id: a subnetwork folder or Hub id.
            adapter_name: the name to keep it under.
            subfolder: the folder inside ``model_id`` that holds the subnetwork.
            revision: the subnetwork's branch, tag or commit on the Hub.
            **hub_kwargs (Any): passed to the Hub download (e.g. ``token``).

        Raises:
            KENConfigError: ``adapter_name`` is the active subnetwork's.
            BaseMismatchError: the subnetwork was not made from this model's base.

        Example:
            ```python
            model.load_adapter("ken-imdb", adapter_name="imdb")
            model.set_adapter("imdb")
            ```
        """
        self.load_subnetwork(
            model_id,
            adapter_name=adapter_name,
            subfolder=subfolder,
            revision=revision,
            **hub_kwargs,
        )

    def set_adapter(self, adapter_name: str) -> None:
        """``set_subnetwork`` by PEFT's name: make ``adapter_name`` the active subnetwork.

        Args:
            adapter_name: a name given to ``load_adapter`` or ``load_subnetwork``.

        Raises:
            KENConfigError: not one name (a KENModel has one active subnetwork at a time).
            UnknownSubnetworkError: no subnetwork has that name.

        Example:
            ```python
            model.set_adapter("imdb")
            ```
        """
        if not isinstance(adapter_name, str):
            raise KENConfigError(
                f"set_adapter(adapter_name={shown(adapter_name)}): give one name; a KENModel "
                "has one active subnetwork at a time"
            )
        self.set_subnetwork(adapter_name)

    @property
    def active_adapter(self) -> str | None:
        """PEFT's name for ``active_subnetwork``.

        Returns:
            The active subnetwork's name; None inside ``disable_adapter()`` or when none is
            set.
        """
        return self.active_subnetwork

    @property
    def active_adapters(self) -> list[str]:
        """The active subnetwork's name in a list, as PEFT's ``PeftModel.active_adapters``.

        A property, as in PEFT (transformers' models have a method of this name).

        Returns:
            ``[name]``, or ``[]`` when no subnetwork is active.
        """
        return [] if self.active_subnetwork is None else [self.active_subnetwork]

    def delete_adapter(self, adapter_name: str | list[str]) -> None:
        """``delete_subnetwork`` by PEFT's name, for one name or several.

        Args:
            adapter_name: a name, or a list of names, of loaded subnetworks.

        Raises:
            UnknownSubnetworkError: one of the names is not loaded (then none is deleted).

        Example:
            ```python
            model.delete_adapter("sst2")
            ```
        """
        names = [adapter_name] if isinstance(adapter_name, str) else list(adapter_name)
        for name in names:  # every name checked before any subnetwork goes
            self._named(name)
        for name in names:
            self.delete_subnetwork(name)

    def disable_adapter(self) -> AbstractContextManager[None]:
        """``disable_subnetwork`` by PEFT's name: the base, bit for bit, inside the block.

        Returns:
            The context manager; the active subnetwork is written back on leaving it.

        Example:
            ```python
            with model.disable_adapter():
                base_logits = model(**inputs).logits
            ```
        """
        return self.disable_subnetwork()

    # transformers' own PEFT integration (PeftAdapterMixin, on every PreTrainedModel) works
    # on injected PEFT layers: on a KENModel it fails with a message about PEFT versions, or
    # changes the weights behind the subnetworks' back. Each says what to use instead.
    def add_adapter(self, *args: object, **kwargs: object) -> NoReturn:
        """Refused: a ``KENModel`` holds KEN subnetworks, not PEFT adapters.

        Raises:
            KENError: always, naming ``load_adapter`` and ``add_subnetwork`` (and how to put
                a PEFT adapter on the pruned model).
        """
        raise _not_for_ken(
            "add_adapter",
            "load a subnetwork with load_adapter(folder, adapter_name) or "
            "add_subnetwork(name, subnetwork); for a PEFT adapter on the pruned model, take it "
            "out with merge_and_unload() and wrap that with peft.get_peft_model",
        )

    def enable_adapters(self, *args: object, **kwargs: object) -> NoReturn:
        """Refused: the active subnetwork is in the weights already.

        Raises:
            KENError: always, naming ``set_adapter`` and ``disable_adapter``.
        """
        raise _not_for_ken(
            "enable_adapters",
            "the active subnetwork is in the weights already; set_adapter(name) applies "
            "another, and disable_adapter() (a context manager) writes it back on leaving",
        )

    def disable_adapters(self, *args: object, **kwargs: object) -> NoReturn:
        """Refused: disabling is a block, ``with model.disable_adapter():``.

        Raises:
            KENError: always, naming ``disable_adapter``.
        """
        raise _not_for_ken(
            "disable_adapters",
            "use 'with model.disable_adapter():' (or disable_subnetwork()): the base inside "
            "the block, the subnetwork back after it",
        )

    def get_adapter_state_dict(self, *args: object, **kwargs: object) -> NoReturn:
        """Refused: a subnetwork is not a state dict of adapter weights.

        Raises:
            KENError: always, naming ``model.subnetwork`` and ``save_pretrained``.
        """
        raise _not_for_ken(
            "get_adapter_state_dict",
            "the active subnetwork is model.subnetwork (a KENSubnetwork); "
            "model.save_pretrained(folder) saves it",
        )

    def enable_peft_hotswap(self, *args: object, **kwargs: object) -> NoReturn:
        """Refused: switching subnetworks needs nothing enabled.

        Raises:
            KENError: always, naming ``set_adapter``.
        """
        raise _not_for_ken(
            "enable_peft_hotswap",
            "set_adapter(name) switches subnetworks in place, writing only their kept values",
        )

    # -- what it holds ------------------------------------------------------------------
    def print_kept_values(self) -> None:
        """Print one line of what the active subnetwork keeps (``KENSubnetwork.kept_summary``).

        Raises:
            KENError: no subnetwork is active.

        Example:
            ```python
            model.print_kept_values()
            # kept values: 5,678,208 || pruned values: 22,713,216 || kept%: 25.0000 || ...
            ```
        """
        self.subnetwork.print_kept_values()

    def print_trainable_parameters(self) -> None:
        """PEFT's name for ``print_kept_values``.

        An adapter's trainable parameters are what it adds to the base; a subnetwork's kept
        values are. The line says "kept values", not trainable ones: every weight of a
        ``KENModel`` trains.

        Raises:
            KENError: no subnetwork is active.
        """
        self.print_kept_values()

    def extra_repr(self) -> str:
        """The header of ``print(model)``, above the wrapped model's modules.

        Returns:
            The subnetworks loaded and the active one (a line of its own, never its
            tensors).
        """
        if self._base_fingerprints is None:
            return "unloaded: no subnetworks"
        loaded = shown(sorted(self.subnetworks), 200)
        if self.active_subnetwork is None:
            return f"subnetworks: {loaded}, none active"
        return (
            f"subnetworks: {loaded}, active: {self.active_subnetwork!r}\n"
            f"{self.active_subnetwork}: {self.subnetwork!r}"
        )


class KENModelForSequenceClassification(KENModel):
    """The ``KENModel`` of a text classification model (``AutoModelForSequenceClassification``),
    which ``KENModel(model)`` returns for one; arguments as ``KENModel``. ``forward`` names
    the task's label argument, ``labels``.
    """


class KENModelForTokenClassification(KENModel):
    """The ``KENModel`` of a token classification model (``AutoModelForTokenClassification``),
    which ``KENModel(model)`` returns for one; arguments as ``KENModel``. ``forward`` names
    the task's label argument, ``labels``.
    """


class KENModelForCausalLM(KENModel):
    """The ``KENModel`` of a causal language model (``AutoModelForCausalLM``), which
    ``KENModel(model)`` returns for one; arguments as ``KENModel``. ``forward`` names the
    task's label argument, ``labels``; ``generate`` is the wrapped model's.
    """


class KENModelForSeq2SeqLM(KENModel):
    """The ``KENModel`` of an encoder-decoder model (``AutoModelForSeq2SeqLM``), which
    ``KENModel(model)`` returns for one; arguments as ``KENModel``. ``forward`` names the
    task's label argument, ``labels``; ``generate`` is the wrapped model's.
    """


class KENModelForQuestionAnswering(KENModel):
    """The ``KENModel`` of a question-answering model (``AutoModelForQuestionAnswering``),
    which ``KENModel(model)`` returns for such a model, or for a model no Auto class knows
    whose labels ``Trainer`` finds to be the answer span; arguments as ``KENModel``.
    ``forward`` names the answer span arguments, ``Trainer``'s labels for this task.
    """

    @_signature_of_wrapped_model
    def forward(self, *args, start_positions=None, end_positions=None, **kwargs):
        """Call the wrapped model, naming the answer span labels for ``Trainer``.

        Args:
            *args (Any): positional arguments of the wrapped model.
            start_positions (torch.Tensor | None): passed on as ``start_positions=`` when
                given.
            end_positions (torch.Tensor | None): passed on as ``end_positions=`` when given.
            **kwargs (Any): keyword arguments of the wrapped model.

        Returns:
            (transformers.utils.ModelOutput): what the wrapped model returns (e.g. a
                ``QuestionAnsweringModelOutput``, or a tuple with ``return_dict=False``).
        """
        if start_positions is not None:
            kwargs["start_positions"] = start_positions
        if end_positions is not None:
            kwargs["end_positions"] = end_positions
        return self.model(*args, **kwargs)


# The class attributes of PreTrainedModel that describe its modules, which a KENModel takes
# from its wrapped model (module class names and patterns: no "model." prefix needed).
_MODULE_ATTRIBUTES = (
    "_no_split_modules",
    "_keep_in_fp32_modules",
    "_keep_in_fp32_modules_strict",
    "_skip_keys_device_placement",
)


# Each task's transformers Auto mapping (config class -> model class: what
# AutoModelFor*.from_pretrained builds, classes registered with AutoModelFor*.register
# included) and its KENModel class; question answering first, its labels being its own.
_TASK_CLASSES: tuple[tuple[str, type[KENModel]], ...] = (
    ("MODEL_FOR_QUESTION_ANSWERING_MAPPING", KENModelForQuestionAnswering),
    ("MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING", KENModelForSequenceClassification),
    ("MODEL_FOR_TOKEN_CLASSIFICATION_MAPPING", KENModelForTokenClassification),
    ("MODEL_FOR_CAUSAL_LM_MAPPING", KENModelForCausalLM),
    ("MODEL_FOR_SEQ_TO_SEQ_CAUSAL_LM_MAPPING", KENModelForSeq2SeqLM),
)


def _task_class(model: torch.nn.Module) -> type[KENModel]:
    """The ``KENModel`` class of ``model``'s task: that of the first Auto mapping whose
    model class for the model's config ``model`` is an instance of. A model no Auto class
    knows (remote code) whose labels ``Trainer`` finds to be an answer span (its own
    ``find_labels``) gets ``KENModelForQuestionAnswering``; any other, ``KENModel``."""
    config_class = type(getattr(model, "config", None))
    for mapping, task_class in _TASK_CLASSES:
        try:
            model_class = getattr(transformers, mapping)[config_class]
        except KeyError:  # no model of this task for this config
            continue
        if isinstance(model, model_class):  # a class, or a tuple of classes
            return task_class
    if {"start_positions", "end_positions"} <= set(find_labels(type(model))):
        return KENModelForQuestionAnswering
    return KENModel


# The name a subnetwork gets when none is given, as PEFT names its first adapter.
DEFAULT_NAME = "default"


class UnknownSubnetworkError(KENError, KeyError):
    """No subnetwork of that name is loaded in the ``KENModel``.

    A ``KeyError`` too, as the lookup it is, so that code catching either keeps working.

    Example:
        ```python
        from ken_hf.modeling import UnknownSubnetworkError

        try:
            model.set_adapter("imdb")
        except UnknownSubnetworkError as error:
            print(error)  # no subnetwork named 'imdb'; loaded: ['default']
        ```
    """

    # KeyError's own str() would put the message in quotes.
    __str__ = KENError.__str__


def _one_name(name: str | None, adapter_name: str | None, argument: str) -> str | None:
    """The subnetwork name given as ``argument`` or as PEFT's ``adapter_name`` (None when
    neither); both, different, or a name that is not a string is a ``KENConfigError``."""
    if name is not None and adapter_name is not None and name != adapter_name:
        raise KENConfigError(
            f"{argument}={shown(name)} and adapter_name={shown(adapter_name)} name the "
            "subnetwork twice, differently: give one of them (adapter_name is PEFT's name)"
        )
    chosen = adapter_name if name is None else name
    if chosen is not None and not (isinstance(chosen, str) and chosen):
        which = argument if name is not None else "adapter_name"
        raise KENConfigError(f"{which}={shown(chosen)}: a subnetwork's name is a non-empty string")
    return chosen


def _not_for_ken(method: str, instead: str) -> KENError:
    """The error of a transformers PEFT-adapter method called on a ``KENModel``."""
    return KENError(
        f"KENModel.{method}: this is transformers' method for PEFT adapters, which a KENModel "
        f"does not hold (it holds KEN subnetworks): {instead}"
    )


def _own_weights(model: torch.nn.Module) -> None:
    """Give every CPU parameter in memory torch did not allocate memory of its own.
    transformers maps checkpoint files into memory when the dtype needs no conversion (the
    tensors safetensors makes of such a mapping, as ``torch.frombuffer`` does, have a
    storage torch cannot resize: ``UntypedStorage.resizable()`` is False); writing kept
    values into such a mapping copies it page by page on write, which is slower than one
    copy up front. Parameters in torch's own memory (converted to another dtype, or on an
    accelerator) are left as they are; memory of another library (a numpy array, the
    copies made here) is copied too, once more, which is safe. Tied parameters stay tied
    (same Parameter object)."""
    parameters = [
        p
        for p in model.parameters()
        if p.device.type == "cpu" and not p.untyped_storage().resizable()
    ]
    copies = host_copies([p.data for p in parameters])
    for parameter, copy in zip(parameters, copies, strict=True):
        parameter.data = copy


# transformers 5 names the loading dtype ``dtype``; 4.x ``torch_dtype``.
_DTYPE_ARGUMENT = "dtype" if int(transformers.__version__.split(".")[0]) >= 5 else "torch_dtype"


class AutoKENModel:
    """Load a subnetwork together with the base model it names, in one call.

    ``from_pretrained`` loads the base named in a subnetwork's ``ken_config.json``, through
    the Auto class of the ``AutoKENModelFor*`` subclass it is called on (on ``AutoKENModel``
    itself, the transformers class recorded there), at the recorded revision and in the
    recorded dtype, and applies the subnetwork. Call ``from_pretrained`` on the class; it
    returns a ``KENModel`` (of the class of the model's task, e.g.
    ``KENModelForQuestionAnswering``).

    What a subnetwork's files may choose is bounded (see SECURITY.md): a subnetwork from the
    Hub names its base by Hub id only (a local base needs ``base_model_name_or_path=``), its
    ``config.json`` must describe a model of the base's sizes, no code from the base or the
    subnetwork runs (``trust_remote_code=False`` unless you pass it), and each tensor's
    declared shape is checked against the loaded base before it is decoded.

    Example:
        ```python
        from ken_hf import AutoKENModel

        model = AutoKENModel.from_pretrained("me/minilm-sentiment-ken")  # the recorded class
        plain = model.merge_and_unload()
        ```
    """

    auto_class: str | None = None

    @classmethod
    def from_pretrained(
        cls,
        name_or_path: str | os.PathLike,
        *,
        subfolder: str | None = None,
        revision: str | None = None,
        subnetwork_name: str | None = None,
        adapter_name: str | None = None,
        base_model_name_or_path: str | os.PathLike | None = None,
        base_model_revision: str | None = None,
        hub_kwargs: dict | None = None,
        **model_kwargs,
    ) -> KENModel:
        """Load the base a subnetwork names, apply the subnetwork, and wrap both.

        When the subnetwork holds the fine-tuned model's ``config.json`` (its labels, for
        instance) and no ``config`` is given, the base is built from it; it must describe a
        model of the base's sizes, checked against the base's ``config.json`` read as data.

        Args:
            name_or_path: the subnetwork: a local folder or a Hub repository id.
            subfolder: the folder inside ``name_or_path`` that holds the subnetwork.
            revision: the subnetwork's branch, tag or commit on the Hub.
            subnetwork_name: the name the subnetwork is kept under in the ``KENModel``
                (what ``set_subnetwork`` takes); default ``"default"``, as PEFT's.
            adapter_name: PEFT's name for ``subnetwork_name``; give one of the two.
            base_model_name_or_path: the base to load instead of the one the subnetwork
                recorded (a local folder, or a Hub id); its fingerprints must still match.
            base_model_revision: the revision of ``base_model_name_or_path`` on the Hub.
            hub_kwargs: passed to ``huggingface_hub`` when the subnetwork and the base's
                ``config.json`` are downloaded (e.g. ``{"token": ...}``); its Hub settings
                that transformers takes too (``token``, ``cache_dir``, ``force_download``,
                ``local_files_only``, ``proxies``) are also passed to the base model's
                ``from_pretrained``, so a private base needs its token once.
            **model_kwargs (Any): passed to the base model's ``from_pretrained`` (e.g.
                ``device_map``, ``dtype``); the dtype is the one the subnetwork recorded
                unless given, ``trust_remote_code`` is False unless given, and ``config`` is
                built from the subnetwork's ``config.json`` unless given. A Hub setting
                given here (``token=`` & co.) wins over the one in ``hub_kwargs`` for the
                base: its ``config.json`` and its weights are fetched with it.

        Returns:
            A ``KENModel`` (of the class of the model's task, e.g.
            ``KENModelForCausalLM``) with the subnetwork active.

        Raises:
            FileNotFoundError: the subnetwork, or the base's ``config.json`` (the message
                names the base), cannot be found locally or on the Hub.
            OSError: transformers cannot load the base.
            KENConfigError: ``ken_config.json`` is invalid, names no base (pass
                ``base_model_name_or_path``) or no transformers model class, or the
                subnetwork's ``config.json`` does not match the base's sizes; or
                ``subnetwork_name`` and ``adapter_name`` differ.
            UnsafePathError: a subnetwork from the Hub names a local path as its base.
            KENFormatError: the subnetwork file is invalid.
            BaseMismatchError: the loaded base is not the one the subnetwork was made from.

        Example:
            ```python
            from ken_hf import AutoKENModelForCausalLM

            model = AutoKENModelForCausalLM.from_pretrained(
                "me/smollm2-ken", device_map="auto", hub_kwargs={"token": token}
            )
            ```
        """
        name = _one_name(subnetwork_name, adapter_name, "subnetwork_name") or DEFAULT_NAME
        subnetwork = KENSubnetwork.from_pretrained(
            name_or_path, subfolder=subfolder, revision=revision, **(hub_kwargs or {})
        )
        base, base_revision = _base_location(
            name_or_path, subnetwork.config, base_model_name_or_path, base_model_revision
        )
        model_class = _model_class(cls.auto_class or subnetwork.config.model_class, name_or_path)
        model_kwargs.setdefault("trust_remote_code", False)  # nothing prompts, nothing runs
        base_hub = dict(hub_kwargs or {})  # the base's download: the model kwargs' win
        for key in _BASE_HUB_SETTINGS:
            if key in base_hub:
                model_kwargs.setdefault(key, base_hub[key])
            if key in model_kwargs:
                base_hub[key] = model_kwargs[key]
        if subnetwork.model_config is not None and "config" not in model_kwargs:
            base_config = _base_model_config(base, base_revision, base_hub)
            model_kwargs["config"] = model_config_of(
                subnetwork.model_config, base_config, f"{name_or_path}: config.json"
            )
        dtype_name = subnetwork.config.base_model_dtype
        if dtype_name and not {"dtype", "torch_dtype"} & set(model_kwargs):
            model_kwargs[_DTYPE_ARGUMENT] = getattr(torch, dtype_name)
        model = KENModel(model_class.from_pretrained(base, revision=base_revision, **model_kwargs))
        # Not add_subnetwork: set_subnetwork checks the base and the shapes (once) before it
        # writes anything, and a fresh KENModel has no subnetwork of that name yet.
        model.subnetworks[name] = subnetwork
        model.set_subnetwork(name)
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


# The Hub settings of ``hub_kwargs`` that a transformers model's ``from_pretrained`` takes
# too: they reach the base's download as well as the subnetwork's.
_BASE_HUB_SETTINGS = ("token", "cache_dir", "force_download", "local_files_only", "proxies")


def _base_model_config(base: str, revision: str | None, hub_kwargs: dict) -> dict:
    """The base's ``config.json`` as a dict, read as data (no code of the base runs)."""
    try:
        path = resolve_file(base, "config.json", revision=revision, **hub_kwargs)
    except FileNotFoundError as error:
        raise FileNotFoundError(
            f"the base model {base}: its config.json (against which the subnetwork's "
            f"config.json is checked) cannot be found: {error}"
        ) from error
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
    """``AutoKENModel`` for text classification (sentiment, topic, entailment): the base is loaded
    with ``transformers.AutoModelForSequenceClassification``, whatever class the subnetwork
    records.
    """

    auto_class = "AutoModelForSequenceClassification"


class AutoKENModelForCausalLM(AutoKENModel):
    """``AutoKENModel`` for text generation with a decoder-only model: the base is loaded with
    ``transformers.AutoModelForCausalLM``, whatever class the subnetwork records.
    """

    auto_class = "AutoModelForCausalLM"


class AutoKENModelForTokenClassification(AutoKENModel):
    """``AutoKENModel`` for a label per token (named entities, parts of speech): the base is loaded
    with ``transformers.AutoModelForTokenClassification``, whatever class the subnetwork
    records.
    """

    auto_class = "AutoModelForTokenClassification"


class AutoKENModelForQuestionAnswering(AutoKENModel):
    """``AutoKENModel`` for extractive question answering: the base is loaded with
    ``transformers.AutoModelForQuestionAnswering``, whatever class the subnetwork records.
    The result is a ``KENModelForQuestionAnswering``.
    """

    auto_class = "AutoModelForQuestionAnswering"


class AutoKENModelForSeq2SeqLM(AutoKENModel):
    """``AutoKENModel`` for encoder-decoder models (translation, summarisation): the base is loaded
    with ``transformers.AutoModelForSeq2SeqLM``, whatever class the subnetwork records.
    """

    auto_class = "AutoModelForSeq2SeqLM"
