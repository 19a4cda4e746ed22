"""KEN on a model in memory, in place, a tensor at a time: how ``KENCallback`` ends a run.

``InPlacePrune`` plans every tensor from shapes and dtypes alone (the model's, and the
base's as its checkpoint's headers or a snapshot give them), before any value is read.
``records()`` then takes one tensor at a time through the pipeline's step, writes what the
subnetwork rebuilds into the model (kept values fine-tuned, the rest pre-trained) and
hands the record on, to the folder writer on the main process; nothing is held from one
tensor to the next. Each pre-trained tensor is read once.

Under torch.distributed (DDP), the ranks share the selection (``ken_hf.making.shared_records``):
each selects its share and every rank receives every record, so that all end with the
same weights.
"""

from __future__ import annotations

from collections.abc import Collection, Iterator, Mapping

import torch
from tqdm.auto import tqdm

from ..config import KENConfig
from ..storage.checkpoints import tensors_of
from ..subnetwork import with_provenance
from .base_source import BaseSource
from .distributed import Team
from .plan import (
    WHOLE,
    TensorPlan,
    TensorRecord,
    TensorSpec,
    dominant_dtype,
    plan_tensors,
    process_tensor,
    rebuild_into,
    specs_of,
)
from .shared_records import SELECTION_MEMORY, shared_records


class InPlacePrune:
    """KEN on ``model``'s weights, in place, one tensor at a time.

    Args:
        model: the fine-tuned model; its weights are overwritten as ``records()`` runs.
        pretrained: ``{model tensor name: pre-trained tensor}`` (a snapshot, or
            ``ken_hf.storage.checkpoints.LazyTensors`` reading a checkpoint on access), cut to the
            base's rows for a tensor that grew since.
        base_specs: ``{name: (shape, dtype)}`` of ``pretrained``, known without reading it.
        config: what to keep and where.
        source: the checkpoint the base was loaded from, recorded as the base.
        new_tensors: names of the newly initialised tensors (stored whole).
        progress: show a progress bar over the tensors' bytes.
        team: the processes that share the selection (default: ``Team.current()``, the
            joined torch.distributed group or this process alone); every one of them must
            run ``records()``.

    Attributes:
        plans: every floating-point tensor's plan, in name order.
        config: ``config`` with the provenance a subnetwork records (``with_provenance``).
        model_config: the model's ``config.json`` values, for the folder.

    Raises:
        KENError: a pair of tensors differs in shape or dtype, or the two share no tensor.
    """

    def __init__(
        self,
        model: torch.nn.Module,
        pretrained: Mapping[str, torch.Tensor],
        base_specs: Mapping[str, TensorSpec],
        config: KENConfig,
        *,
        source: BaseSource | None = None,
        new_tensors: Collection[str] = (),
        progress: bool = False,
        team: Team | None = None,
    ) -> None:
        self._team = team if team is not None else Team.current()
        self._tensors = tensors_of(model)
        self._specs = specs_of(self._tensors)
        self._pretrained = pretrained
        self._progress = progress
        self.plans = plan_tensors(
            self._specs,
            base_specs,
            config,
            new_tensors=new_tensors,
            prefix=getattr(model, "base_model_prefix", None) or None,
        )
        base_dtype = dominant_dtype(base_specs[p.base_name] for p in self.plans if p.fate != WHOLE)
        self.config, self.model_config = with_provenance(config, model, source, base_dtype)

    def records(self) -> Iterator[TensorRecord]:
        """Prune each tensor in name order and yield its record once the model holds the
        result (consume them all: the model is pruned when the iterator ends).

        Yields:
            ``TensorRecord``: on the main process, what the folder writer stores; a record
            selected by another rank carries no fine-tuned values (see ``shared_records``).

        Raises:
            KENError: a tensor holds NaN or Inf.
            CheckpointError: a pre-trained tensor read from its checkpoint no longer
                matches what was recorded.
            RankFailedError: another rank failed.
        """
        team = self._team
        held: dict[str, torch.Tensor | None] = {}  # the base tensor just read, for rebuilding

        def process(plan: TensorPlan) -> TensorRecord:
            base = None
            if plan.fate != WHOLE:
                base = held[plan.name] = self._pretrained[plan.base_name]
            return process_tensor(
                plan, self._tensors[plan.name], base, self.config, max_memory=SELECTION_MEMORY
            )

        sizes = {p.name: self._tensors[p.name].nbytes for p in self.plans}
        with tqdm(
            total=sum(sizes.values()),
            desc="KEN",
            unit="B",
            unit_scale=True,
            disable=not (self._progress and team.main),
        ) as bar:
            for record in shared_records(
                self.plans,
                process,
                self._specs,
                team=team,
                every_rank_receives=True,
                budget=max(sizes.values(), default=0),
            ):
                plan = record.plan
                if plan.fate != WHOLE:
                    base = held.pop(plan.name, None)
                    if base is None:  # selected by another rank
                        base = self._pretrained[plan.base_name]
                    rebuild_into(self._tensors[plan.name], base, record)
                    del base
                bar.update(sizes[plan.name])
                yield record
                del record

    def run(self) -> None:
        """Prune every tensor in place, the records dropped (another process writes them,
        or no subnetwork is kept: an ``AutoK`` probe)."""
        for _ in self.records():
            pass
