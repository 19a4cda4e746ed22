"""Where a model in training keeps its pre-trained values until KEN needs them.

KEN resets what it does not keep to the pre-trained values, which the weights no longer
hold once training has begun. ``PretrainedValues.find`` decides when training begins, as
``pretrained_source`` says:

- ``"checkpoint"``: no copy is held. Every tensor of the checkpoint the model was loaded
  from (found by ``locate_base``) is read once, a tensor at a time, compared bit for bit
  with the model's and fingerprinted; when training ends each is read once more, checked
  against its fingerprint (a file changed meanwhile raises an error naming the tensor)
  and moved to the model tensor's device. The ranks of one machine share the page cache.
- ``"snapshot"``: a copy of every parameter, on the CPU by default (``snapshot_device``):
  as much host memory as the weights take (90 MB for MiniLM, 540 MB for SmolLM2-135M in
  fp32, 28 GB for a 7B model in fp32), on every rank.
- ``"auto"`` (the default): the checkpoint when the model still holds exactly its weights,
  else the snapshot (a model built from a config, or changed after loading, or a checkpoint
  lacking a tensor that ``new_tensors`` does not name); the log says which, and why.

A run resumed from a checkpoint always takes the pre-trained values from the base
checkpoint (the model holds trained values): read when training ends, or held from its
start with ``"snapshot"``. Sharded runs hold a snapshot on the main process
(``ken_hf.making.sharded.snapshot_sharded``).
"""

from __future__ import annotations

import logging
from collections.abc import Collection, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch

from ..config import KENConfig
from ..errors import KENConfigError
from ..storage.checkpoints import CheckpointError, new_parameters, tensors_of
from .base_source import (
    BaseSource,
    CheckpointValues,
    base_rows_of,
    cannot_tell,
    locate_base,
    record_checkpoint,
)
from .plan import TensorSpec, specs_of

logger = logging.getLogger(__name__)

PRETRAINED_SOURCES = ("auto", "checkpoint", "snapshot")


def check_policy(policy: str) -> None:
    """Refuse a ``pretrained_source`` other than one of ``PRETRAINED_SOURCES``
    (``KENConfigError``)."""
    if policy not in PRETRAINED_SOURCES:
        raise KENConfigError(
            f"pretrained_source={policy!r}: choose one of " + ", ".join(PRETRAINED_SOURCES)
        )


@dataclass
class PretrainedValues:
    """The pre-trained values of a model in training, and the checkpoint they are from.

    Attributes:
        source: the base checkpoint (None when unknown: then ``new_tensors`` were named).
        new_tensors: names of the newly initialised tensors (stored whole).
        snapshot: ``{name: tensor}`` held copies (empty when read from the checkpoint).
        checkpoint: where to read them when training ends (None with a snapshot).
    """

    source: BaseSource | None
    new_tensors: frozenset[str]
    snapshot: dict[str, torch.Tensor] = field(default_factory=dict)
    checkpoint: CheckpointValues | None = None

    @classmethod
    def find(
        cls,
        model: torch.nn.Module,
        config: KENConfig,
        *,
        policy: str = "auto",
        snapshot_device: str | torch.device = "cpu",
        new_tensors: Collection[str] | None = None,
        resumed: bool = False,
        snapshot: Mapping[str, torch.Tensor] | None = None,
    ) -> PretrainedValues:
        """Find the base checkpoint of ``model`` and decide where its pre-trained values
        will come from (``policy``: one of ``PRETRAINED_SOURCES``), logging which and why.

        Args:
            model: the model as training begins.
            config: names the base checkpoint when ``base_model_name_or_path`` is set.
            policy: ``"auto"``, ``"checkpoint"`` or ``"snapshot"``.
            snapshot_device: where a snapshot is held.
            new_tensors: the newly initialised tensors; None: what the checkpoint lacks.
            resumed: the model holds trained values already (a resumed run).
            snapshot: a snapshot taken already (sharded runs: the main process's); it is
                used as it is, and only the base is found.

        Returns:
            The values' holder.

        Raises:
            KENConfigError: the base checkpoint is unknown and no ``new_tensors`` were
                given; ``policy="checkpoint"`` (or a resumed run) and the checkpoint cannot
                provide the values; a resumed run whose model names no base checkpoint.
            CheckpointError: a resumed run's base checkpoint cannot be read.
        """
        reasons: list[str] = []  # why each candidate checkpoint was not the base
        if resumed:
            source = _resumed_base(model, config)
        else:
            tensors = snapshot if snapshot is not None else tensors_of(model)
            source, reasons = locate_base(model, model, config, tensors)
            if source is None and new_tensors is None:
                floating = [n for n, t in tensors.items() if t.is_floating_point()]
                raise cannot_tell(model, floating, reasons)
        if new_tensors is None:
            new_tensors = source.missing
        values = cls(source, frozenset(new_tensors))
        if snapshot is not None and not resumed:
            values.snapshot = dict(snapshot)
        else:
            values._hold(model, policy, torch.device(snapshot_device), resumed, reasons)
        return values

    def _hold(
        self,
        model: torch.nn.Module,
        policy: str,
        device: torch.device,
        resumed: bool,
        reasons: list[str],
    ) -> None:
        """Take the snapshot now, or record the checkpoint to read when training ends."""
        tensors = tensors_of(model)
        if policy == "snapshot" and not resumed:
            recorded, why_not = None, "pretrained_source='snapshot'"
        else:
            recorded, why_not = self._checked_checkpoint(model, tensors, resumed, reasons)
        if recorded is None:
            if resumed or policy == "checkpoint":
                raise KENConfigError(
                    f"KENCallback: the pre-trained values cannot be read from a checkpoint: "
                    f"{why_not}"
                    + ("" if resumed else "; pretrained_source='auto' or 'snapshot' holds a copy")
                )
            if self.source is not None:  # grown tensors: the rows the base has
                prefix = getattr(model, "base_model_prefix", None) or None
                tensors = base_rows_of(self.source, tensors, prefix)
            self.snapshot = {n: t.detach().to(device, copy=True) for n, t in tensors.items()}
            log = logger.info if policy == "snapshot" else logger.warning
            log(
                f"KENCallback: the pre-trained values are a snapshot held on {device} during "
                f"training ({why_not})"
            )
        elif policy == "snapshot":  # resumed: held from the start, as asked
            with recorded.open() as values:
                self.snapshot = {name: value.to(device) for name, value in values.items()}
            logger.info(
                f"KENCallback: the pre-trained values are read from the base checkpoint "
                f"{self.source.name_or_path!r} and held on {device}"
            )
        else:
            self.checkpoint = recorded
            logger.info(
                f"KENCallback: the pre-trained values will be read from the checkpoint "
                f"{self.source.name_or_path!r} when training ends, a tensor at a time (no copy "
                "held during training"
                + ("" if resumed else "; every tensor equals the model's")
                + ")"
            )

    def _checked_checkpoint(
        self,
        model: torch.nn.Module,
        tensors: Mapping[str, torch.Tensor],
        resumed: bool,
        reasons: list[str],
    ) -> tuple[CheckpointValues | None, str | None]:
        """The located checkpoint recorded as the pre-trained values of ``tensors`` (each
        compared with the model's unless ``resumed``), or None and why it cannot be."""
        if self.source is None:
            return None, "no checkpoint holds the model's weights (" + (
                "; ".join(reasons) or "none is named"
            ) + ")"
        try:
            recorded = record_checkpoint(
                self.source,
                tensors,
                prefix=getattr(model, "base_model_prefix", None) or None,
                compare=not resumed,
            )
        except (CheckpointError, OSError) as error:
            return None, str(error)
        for name, tensor in tensors.items():
            # a tensor the checkpoint lacks would be stored whole, not pruned against its start
            if tensor.is_floating_point() and name not in recorded.stored:
                if name not in self.new_tensors:
                    return None, (
                        f"checkpoint {self.source.name_or_path!r} lacks tensor {name!r}, which "
                        "is not among new_tensors"
                    )
        return recorded, None

    @contextmanager
    def open(
        self, model: torch.nn.Module
    ) -> Iterator[tuple[Mapping[str, torch.Tensor], dict[str, TensorSpec]]]:
        """The values for the end of training, and their ``{name: (shape, dtype)}``: the
        snapshot, or the checkpoint read a tensor at a time on access (each moved to its
        model tensor's device; shapes and dtypes as recorded, nothing read for them)."""
        if self.checkpoint is None:
            yield self.snapshot, specs_of(self.snapshot)
            return
        devices = {name: tensor.device for name, tensor in tensors_of(model).items()}
        with self.checkpoint.open(devices) as values:
            yield values, self.checkpoint.specs


def _resumed_base(model: torch.nn.Module, config: KENConfig) -> BaseSource:
    """The base checkpoint of a resumed run, named by the config or the model (its tensors
    cannot be compared with the model's, which are trained); the tensors it lacks are the
    newly initialised ones."""
    candidates = [config.base_model_name_or_path, getattr(model, "name_or_path", "")]
    name = next((c for c in candidates if c), None)
    if name is None:
        raise KENConfigError(
            "KENCallback: a resumed run reads the pre-trained values from the base "
            "checkpoint; the model names none: set KENConfig.base_model_name_or_path"
        )
    revision = config.base_model_revision or getattr(model.config, "_commit_hash", None)
    return BaseSource(name, revision, frozenset(new_parameters(model, name, revision=revision)))
