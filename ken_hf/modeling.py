"""``KENModel`` and ``AutoKENModelFor*``: a base model plus KEN subnetworks, loaded
transparently from a folder or the Hub, in the shape of PEFT's ``PeftModel``."""

from __future__ import annotations

import functools
import inspect
import os

import torch
import transformers

from .hub import resolve_folder
from .subnetwork import KENSubnetwork, fingerprints_of


class KENModel(torch.nn.Module):
    """A transformers model with KEN subnetworks applied in place.

    The wrapped ``base_model`` is the real model: ``forward``, ``generate`` and every other
    attribute are its own, so the result works wherever the plain model does. Several
    subnetworks can be loaded under names; switching writes only their kept values.
    """

    def __init__(self, base_model: torch.nn.Module) -> None:
        super().__init__()
        self.base_model = base_model
        self.subnetworks: dict[str, KENSubnetwork] = {}
        self.active_subnetwork: str | None = None
        self._overwritten: dict[str, torch.Tensor] = {}
        _own_weights(base_model)
        self._base_fingerprints = fingerprints_of(base_model)
        self.__class__ = _ken_model_class(type(base_model))

    def forward(self, *args, **kwargs):
        return self.base_model(*args, **kwargs)

    def _get_name(self) -> str:  # shown by repr()
        return f"KENModel[{type(self.base_model).__name__}]"

    def __getattr__(self, name: str):
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(super().__getattr__("base_model"), name)

    # -- loading ------------------------------------------------------------------------
    @classmethod
    def from_pretrained(
        cls,
        base_model: torch.nn.Module,
        name_or_path: str | os.PathLike,
        *,
        subnetwork_name: str = "default",
        revision: str | None = None,
        **hub_kwargs,
    ) -> KENModel:
        """Wrap ``base_model`` (holding the base weights) and apply the subnetwork saved in
        ``name_or_path`` (a folder or a Hub id)."""
        model = cls(base_model)
        model.load_subnetwork(name_or_path, subnetwork_name, revision=revision, **hub_kwargs)
        model.set_subnetwork(subnetwork_name)
        return model

    def load_subnetwork(
        self,
        name_or_path: str | os.PathLike,
        name: str,
        *,
        revision: str | None = None,
        **hub_kwargs,
    ) -> None:
        """Read a subnetwork and keep it under ``name`` (not applied yet)."""
        self.add_subnetwork(
            name, KENSubnetwork.from_pretrained(name_or_path, revision=revision, **hub_kwargs)
        )

    def add_subnetwork(self, name: str, subnetwork: KENSubnetwork) -> None:
        """Keep ``subnetwork`` under ``name``; it must have been made from this base."""
        subnetwork.check_base(self._base_fingerprints)
        self.subnetworks[name] = subnetwork

    # -- switching ----------------------------------------------------------------------
    def set_subnetwork(self, name: str) -> None:
        """Make ``name`` the active subnetwork: the previous one's values are taken off and
        this one's written, in time proportional to their kept values."""
        if name not in self.subnetworks:
            raise KeyError(f"no subnetwork named {name!r}; loaded: {sorted(self.subnetworks)}")
        self._take_off()
        self._overwritten = self.subnetworks[name].apply_to(
            self.base_model, base_fingerprints=self._base_fingerprints
        )
        self.active_subnetwork = name

    def _take_off(self) -> None:
        if self.active_subnetwork is not None:
            self.subnetworks[self.active_subnetwork].restore(self.base_model, self._overwritten)
            self._overwritten, self.active_subnetwork = {}, None

    def unload(self) -> torch.nn.Module:
        """Take the active subnetwork off and return the base model, bit for bit as loaded."""
        self._take_off()
        return self.base_model

    def merge_and_unload(self) -> torch.nn.Module:
        """Return the plain transformers model with the active subnetwork in its weights."""
        self._overwritten, self.active_subnetwork = {}, None
        return self.base_model

    @property
    def subnetwork(self) -> KENSubnetwork:
        if self.active_subnetwork is None:
            raise ValueError("no active subnetwork; call set_subnetwork(name)")
        return self.subnetworks[self.active_subnetwork]

    # -- saving -------------------------------------------------------------------------
    def save_pretrained(self, save_directory: str | os.PathLike) -> None:
        """Save the active subnetwork (not the model) to ``save_directory``."""
        self.subnetwork.save_pretrained(save_directory)

    def push_to_hub(self, repo_id: str, **push_kwargs) -> str:
        """Publish only the active subnetwork to the Hub; returns the commit URL."""
        return self.subnetwork.push_to_hub(repo_id, **push_kwargs)


def _own_weights(model: torch.nn.Module) -> None:
    """Give every parameter memory of its own. transformers maps checkpoint files into
    memory; writing kept values into such a mapping copies it page by page on write, which
    is slower than one copy up front. Tied parameters stay tied (same Parameter object)."""
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.data = parameter.data.clone()


@functools.cache
def _ken_model_class(base_class: type) -> type:
    """A ``KENModel`` subclass that looks like ``base_class`` to transformers: Trainer reads
    ``forward``'s signature from the class (label columns, unused columns to drop) and
    pipelines check the class name against the models they support."""

    def forward(self, *args, **kwargs):
        return self.base_model(*args, **kwargs)

    forward.__signature__ = inspect.signature(base_class.forward)
    forward.__doc__ = base_class.forward.__doc__
    return type(
        base_class.__name__,
        (KENModel,),
        {
            "forward": forward,
            "__module__": __name__,
            "__qualname__": f"KENModel[{base_class.__name__}]",
        },
    )


class AutoKENModel:
    """Loads the base model named in a subnetwork's config, through the transformers class
    recorded there (or the Auto class of the subclass), and applies the subnetwork."""

    auto_class: str | None = None

    @classmethod
    def from_pretrained(
        cls,
        name_or_path: str | os.PathLike,
        *,
        revision: str | None = None,
        subnetwork_name: str = "default",
        hub_kwargs: dict | None = None,
        **model_kwargs,
    ) -> KENModel:
        """``name_or_path``: a subnetwork folder or Hub id. ``model_kwargs`` go to the base
        model's ``from_pretrained`` (e.g. ``device_map``); the base revision is the one the
        subnetwork recorded."""
        from .config import KENConfig

        folder = resolve_folder(name_or_path, revision=revision, **(hub_kwargs or {}))
        config = KENConfig.from_pretrained(folder)
        if config.base_model_name_or_path is None:
            raise ValueError(f"{folder}: ken_config.json names no base model")
        model_class = _model_class(cls.auto_class or config.model_class, folder)
        if (folder / "config.json").is_file():
            model_kwargs.setdefault("config", transformers.AutoConfig.from_pretrained(folder))
        base = model_class.from_pretrained(
            config.base_model_name_or_path, revision=config.base_model_revision, **model_kwargs
        )
        return KENModel.from_pretrained(base, folder, subnetwork_name=subnetwork_name)


def _model_class(name: str | None, folder) -> type:
    model_class = getattr(transformers, name or "", None)
    if model_class is None:
        raise ValueError(f"{folder}: unknown transformers model class {name!r}")
    return model_class


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
