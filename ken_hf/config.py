"""``KENConfig``: what KEN keeps and where it applies, saved as ``ken_config.json``.

In the style of ``peft.LoraConfig``: a documented dataclass that round-trips to JSON and is
read from a folder or a Hub id.
"""

from __future__ import annotations

import json
import os
import re
import warnings
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

from .errors import KENConfigError, shown
from .selection.rules import check_rule
from .utils.atomic_files import write_text_atomic
from .utils.hub import resolve_file
from .utils.json_input import is_integer, read_json_object

CONFIG_NAME = "ken_config.json"
REQUIRED_KEYS = ("k", "keep_ratio", "base_model_name_or_path")


@dataclass
class KENConfig:
    """Configuration of a KEN subnetwork: what KEN keeps and where it applies.

    In the style of ``peft.LoraConfig``; saved as ``ken_config.json``. Exactly one of ``k``
    and ``keep_ratio`` is set. Each parameter of the fine-tuned model ends up in one of
    three places:

    - pruned by KEN (targeted and not excluded): ``k`` fine-tuned values per row are kept;
    - stored whole (``modules_to_save``, or absent from the base): all fine-tuned values;
    - neither (not targeted, or excluded): reset to its pre-trained values, as parameters
      outside an adapter are in PEFT.

    Module patterns follow PEFT: a list of names matches a parameter whose module name (or
    the parameter name itself) equals an entry or ends with ``"." + entry``; a string is a
    regular expression that must match the whole module or parameter name. Every field is
    checked on construction, whether given in code or read from a file.

    Args:
        k: fine-tuned values kept per row (the paper's ``k``), a positive integer.
        keep_ratio: fraction of each row kept, in (0, 1]: a row of ``n`` values keeps
            ``max(1, round(keep_ratio * n))``.
        target_modules: where KEN applies (names or a regex, see above); None: every
            parameter, as in the paper. A tuple is taken as a list.
        exclude_modules: modules not pruned: they go back to their pre-trained values.
        modules_to_save: modules stored whole (fine-tuned values, not pruned). Tensors absent
            from the base checkpoint, such as a new classification head, are stored whole
            anyway.
        compat: reproduce the published KEN code bit for bit, quirks included (rule
            ``"ken"`` only).
        rule: the selection rule: ``"ken"`` (the paper's), or for comparisons
            ``"ken_delta"`` (KEN on fine-tuned minus pre-trained), ``"largest_delta"``,
            ``"random"``.
        seed: seed of the ``"random"`` rule, an integer >= 0.
        base_model_name_or_path: Hub id or folder of the pre-trained base model; filled in
            when the subnetwork is made, if ken-hf can tell which checkpoint the base is.
        base_model_revision: the base's branch, tag or commit on the Hub.
        base_model_dtype: the dtype the base is loaded in (``"float32"``, ``"float16"``,
            ``"bfloat16"`` or ``"float64"``); the fingerprints hold for it.
        model_class: the transformers class of the fine-tuned model, e.g.
            ``"BertForSequenceClassification"``; ``AutoKENModel`` loads the base with it.
        subnetwork_digest: 16 hex digits identifying the ``ken_subnetwork.safetensors``
            saved with this config (written by ``save_pretrained``; a subnetwork file of
            another save is refused).
        library_version: the ken-hf version that made the subnetwork (default: this one).

    Raises:
        KENConfigError: a field is invalid: both or neither of ``k`` and ``keep_ratio``,
            a value of the wrong type or range, an invalid regex, ``compat`` with a rule
            other than ``"ken"``.

    Example:
        ```python
        from ken_hf import KENConfig

        config = KENConfig(keep_ratio=0.25, target_modules=["query", "key", "value"])
        config.k_for(768)  # 192 values kept per row of 768
        config.save_pretrained("ken/")  # writes ken/ken_config.json
        ```
    """

    k: int | None = field(
        default=None, metadata={"help": "Fine-tuned values kept per row (the paper's k)."}
    )
    keep_ratio: float | None = field(
        default=None,
        metadata={"help": "Fraction of each row kept, in (0, 1]: k = max(1, round(ratio * n))."},
    )
    target_modules: list[str] | str | None = field(
        default=None,
        metadata={"help": "Where KEN applies; None = every parameter, as in the paper."},
    )
    exclude_modules: list[str] | str | None = field(
        default=None,
        metadata={"help": "Modules not pruned: they go back to their pre-trained values."},
    )
    modules_to_save: list[str] | str | None = field(
        default=None,
        metadata={
            "help": "Modules stored whole (fine-tuned values, not pruned). Tensors absent from "
            "the base checkpoint, such as a new classification head, are stored whole anyway."
        },
    )
    compat: bool = field(
        default=False,
        metadata={"help": "Reproduce the published KEN code bit for bit, quirks included."},
    )
    rule: str = field(
        default="ken",
        metadata={
            "help": "Selection rule: 'ken' (the paper's), or for comparisons 'ken_delta' (KEN "
            "on fine-tuned minus pre-trained), 'largest_delta', 'random'."
        },
    )
    seed: int = field(default=0, metadata={"help": "Seed of the 'random' rule."})
    base_model_name_or_path: str | None = field(
        default=None, metadata={"help": "Hub id or folder of the pre-trained base model."}
    )
    base_model_revision: str | None = field(
        default=None, metadata={"help": "Revision (commit) of the base model on the Hub."}
    )
    base_model_dtype: str | None = field(
        default=None,
        metadata={
            "help": "dtype the base is loaded in (the fingerprints hold for it), e.g. float32."
        },
    )
    model_class: str | None = field(
        default=None,
        metadata={"help": "transformers class of the model, e.g. BertForSequenceClassification."},
    )
    subnetwork_digest: str | None = field(
        default=None,
        metadata={
            "help": "Digest of the ken_subnetwork.safetensors saved with this config (written "
            "by save_pretrained; a file of another save is refused)."
        },
    )
    library_version: str | None = field(
        default=None, metadata={"help": "ken-hf version that made the subnetwork."}
    )

    def __post_init__(self) -> None:
        # Every field is checked, as given or as read from a ken_config.json someone else wrote.
        if isinstance(self.base_model_name_or_path, os.PathLike):
            self.base_model_name_or_path = os.fspath(self.base_model_name_or_path)
        for name in ("target_modules", "exclude_modules", "modules_to_save"):
            if isinstance(getattr(self, name), tuple):  # as PEFT takes them
                setattr(self, name, list(getattr(self, name)))
        if (self.k is None) == (self.keep_ratio is None):
            raise KENConfigError(
                f"KENConfig needs exactly one of k and keep_ratio (got k={shown(self.k)}, "
                f"keep_ratio={shown(self.keep_ratio)})"
            )
        if self.k is not None and not (is_integer(self.k) and 1 <= self.k <= 2**31):
            raise KENConfigError(f"KENConfig.k must be a positive integer, got {shown(self.k)}")
        if self.keep_ratio is not None and not (
            isinstance(self.keep_ratio, int | float)
            and not isinstance(self.keep_ratio, bool)
            and 0 < self.keep_ratio <= 1
        ):
            raise KENConfigError(
                f"KENConfig.keep_ratio must be in (0, 1], got {shown(self.keep_ratio)}"
            )
        for name in ("target_modules", "exclude_modules", "modules_to_save"):
            _check_patterns(name, getattr(self, name))
        if not isinstance(self.compat, bool):
            raise KENConfigError(
                f"KENConfig.compat must be true or false, got {shown(self.compat)}"
            )
        if not isinstance(self.rule, str):
            raise KENConfigError(f"KENConfig.rule must be a string, got {shown(self.rule)}")
        check_rule(self.rule)
        if not (is_integer(self.seed) and 0 <= self.seed < 2**63):
            raise KENConfigError(f"KENConfig.seed must be an integer >= 0, got {shown(self.seed)}")
        for name, limit in _TEXT_FIELDS.items():
            _check_text(name, getattr(self, name), limit)
        if self.base_model_dtype not in (None, "float32", "float16", "bfloat16", "float64"):
            raise KENConfigError(
                f"KENConfig.base_model_dtype must be a floating-point dtype name such as "
                f"'float32', got {shown(self.base_model_dtype)}"
            )
        if self.base_model_revision is not None and not _REVISION.fullmatch(
            self.base_model_revision
        ):
            raise KENConfigError(
                "KENConfig.base_model_revision must be a branch, tag or commit name, got "
                f"{shown(self.base_model_revision)}"
            )
        if self.model_class is not None and not self.model_class.isidentifier():
            raise KENConfigError(
                f"KENConfig.model_class must be a class name, got {shown(self.model_class)}"
            )
        if self.subnetwork_digest is not None and not (
            isinstance(self.subnetwork_digest, str) and _HEX16.fullmatch(self.subnetwork_digest)
        ):
            raise KENConfigError(
                "KENConfig.subnetwork_digest must be 16 hex digits, got "
                f"{shown(self.subnetwork_digest)}"
            )
        if self.compat and self.rule != "ken":
            raise KENConfigError(f"KENConfig.compat applies to rule 'ken' only, not {self.rule!r}")
        if self.library_version is None:
            from . import __version__

            self.library_version = __version__

    def __repr__(self) -> str:
        # The fields that differ from their defaults, each cut short: a config read from a
        # file can hold 100,000 module patterns or a 4,096-character path.
        from . import __version__

        shown_fields = [
            f"{f.name}={shown(getattr(self, f.name), 60)}"
            for f in fields(self)
            if getattr(self, f.name) != f.default
            and not (f.name == "library_version" and self.library_version == __version__)
        ]
        return f"KENConfig({', '.join(shown_fields)})"

    def k_for(self, row_width: int) -> int:
        """Values kept per row for rows of ``row_width`` values.

        Args:
            row_width: values per row of the tensor (for a tensor of rank >= 2, the product
                of its dimensions after the first).

        Returns:
            ``k`` when set, else ``max(1, round(keep_ratio * row_width))``.
        """
        if self.k is not None:
            return self.k
        return max(1, round(self.keep_ratio * row_width))

    def targets(self, parameter_name: str) -> bool:
        """Whether KEN prunes this parameter: targeted, not excluded, not stored whole.

        Args:
            parameter_name: the parameter's full name, e.g. ``"bert.pooler.dense.weight"``.

        Returns:
            True when KEN selects in this parameter; False when it is stored whole or reset
            to its pre-trained values.
        """
        if self.target_modules is not None and not _matches(self.target_modules, parameter_name):
            return False
        if self.exclude_modules is not None and _matches(self.exclude_modules, parameter_name):
            return False
        return not self.saves_whole(parameter_name)

    def saves_whole(self, parameter_name: str) -> bool:
        """Whether this parameter is stored whole: it matches ``modules_to_save``.

        Args:
            parameter_name: the parameter's full name, e.g. ``"classifier.weight"``.

        Returns:
            True when ``modules_to_save`` matches the parameter or its module.
        """
        return self.modules_to_save is not None and _matches(self.modules_to_save, parameter_name)

    def to_dict(self) -> dict:
        """The fields as a dict, as ``ken_config.json`` holds them.

        Returns:
            ``{field name: value}`` for every field (a deep copy).
        """
        return asdict(self)

    def to_json_string(self) -> str:
        """The text of ``ken_config.json``.

        Returns:
            The fields as indented JSON with sorted keys, ending in a newline.
        """
        return json.dumps(self.to_dict(), indent=2, sort_keys=True) + "\n"

    def save_pretrained(self, save_directory: str | os.PathLike) -> None:
        """Write ``ken_config.json`` into ``save_directory``, creating the folder if needed.

        The file is replaced atomically: a reader sees the old file or the new one.

        Args:
            save_directory: the folder to write into.

        Example:
            ```python
            KENConfig(k=64).save_pretrained("ken/")
            ```
        """
        Path(save_directory).mkdir(parents=True, exist_ok=True)
        write_text_atomic(Path(save_directory) / CONFIG_NAME, self.to_json_string())

    @classmethod
    def from_dict(cls, values: dict, source: str = "config") -> KENConfig:
        """Build a config from a dict, such as a parsed ``ken_config.json``.

        Unknown keys are ignored with a warning, so files of newer versions still load.

        Args:
            values: ``{field name: value}``; must hold ``k``, ``keep_ratio`` and
                ``base_model_name_or_path`` (each may be None).
            source: what messages call the dict (a file name).

        Returns:
            The checked config.

        Raises:
            KENConfigError: a required key is missing, or a field is invalid.

        Example:
            ```python
            config = KENConfig.from_dict(
                {"k": 64, "keep_ratio": None, "base_model_name_or_path": "bert-base-uncased"}
            )
            ```
        """
        missing = [key for key in REQUIRED_KEYS if key not in values]
        if missing:
            raise KENConfigError(f"{source} lacks required key(s) {missing}")
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            warnings.warn(f"{source}: ignoring unknown key(s) {unknown}", stacklevel=3)
        return cls(**{key: value for key, value in values.items() if key in known})

    @classmethod
    def from_pretrained(
        cls,
        name_or_path: str | os.PathLike,
        *,
        subfolder: str | None = None,
        revision: str | None = None,
        **hub_kwargs,
    ) -> KENConfig:
        """Read ``ken_config.json`` from a folder or a Hub repository.

        A Hub file is downloaded into the Hub cache (and read from it offline afterwards).

        Args:
            name_or_path: a local folder, or a Hub repository id.
            subfolder: the folder inside it that holds ``ken_config.json``.
            revision: a branch, tag or commit of the Hub repository.
            **hub_kwargs (Any): passed to ``huggingface_hub.hf_hub_download`` (e.g.
                ``token``).

        Returns:
            The checked config.

        Raises:
            FileNotFoundError: neither the folder nor the Hub provides the file.
            UnsafePathError: ``subfolder`` leads out of the folder, or the file is a
                symbolic link to a place outside it.
            KENConfigError: the file is not a JSON object, lacks a required key, or holds
                an invalid field.

        Example:
            ```python
            config = KENConfig.from_pretrained("me/minilm-sentiment", subfolder="ken")
            ```
        """
        path = resolve_file(
            name_or_path, CONFIG_NAME, subfolder=subfolder, revision=revision, **hub_kwargs
        )
        values = read_json_object(path, error=KENConfigError)
        try:
            return cls.from_dict(values, source=str(path))
        except KENConfigError as error:
            if str(path) in str(error):
                raise
            raise KENConfigError(f"{path}: {error}") from None


_HEX16 = re.compile(r"[0-9a-f]{16}")
# A git branch, tag or commit as the Hub names them: no '..' step, no leading '/'.
_REVISION = re.compile(r"(?!.*\.\.)[\w.-]+(/[\w.-]+)*")
# Text fields and their longest accepted length.
_TEXT_FIELDS = {
    "base_model_name_or_path": 4096,
    "base_model_revision": 256,
    "model_class": 256,
    "library_version": 64,
}
_MAX_PATTERNS = 100_000
_MAX_PATTERN = 4096


def _check_text(name: str, value: object, limit: int) -> None:
    """None or a non-empty printable string of at most ``limit`` characters."""
    if value is not None and not (
        isinstance(value, str) and 0 < len(value) <= limit and value.isprintable()
    ):
        raise KENConfigError(
            f"KENConfig.{name} must be a printable string of at most {limit} characters, "
            f"got {shown(value)}"
        )


def _check_patterns(name: str, value: object) -> None:
    """None, a list of module names, or a regular expression (a string)."""
    if value is None:
        return
    if isinstance(value, str):
        if len(value) > _MAX_PATTERN:
            raise KENConfigError(f"KENConfig.{name}: a pattern longer than {_MAX_PATTERN}")
        try:
            re.compile(value)
        except (re.error, OverflowError, RecursionError) as error:  # what re.compile raises
            raise KENConfigError(f"KENConfig.{name} is not a valid regex: {error}") from None
        return
    if not (
        isinstance(value, list)
        and len(value) <= _MAX_PATTERNS
        and all(isinstance(v, str) and 0 < len(v) <= _MAX_PATTERN for v in value)
    ):
        raise KENConfigError(
            f"KENConfig.{name} must be a list of module names or a regex string, got {shown(value)}"
        )


def module_name(parameter_name: str) -> str:
    """The module a parameter belongs to: ``a.b.query.weight`` -> ``a.b.query``."""
    return parameter_name.rsplit(".", 1)[0] if "." in parameter_name else parameter_name


def _matches(patterns: list[str] | str, parameter_name: str) -> bool:
    names = (module_name(parameter_name), parameter_name)
    if isinstance(patterns, str):
        return any(re.fullmatch(patterns, name) for name in names)
    return any(name == p or name.endswith("." + p) for name in names for p in patterns)
