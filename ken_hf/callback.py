"""``KENCallback``: KEN at the end of any transformers ``Trainer`` run.

The callback reacts to two events and leaves the work to the modules that own it:

- training begins: the base checkpoint is found and the pre-trained values are held or
  recorded (``ken_hf.making.pretrained_values``: ``pretrained_source`` and what each costs);
- training ends: the ``AutoK`` search when given (``ken_hf.auto_k``), then KEN in place, a
  tensor at a time (``ken_hf.making.in_place``), each record written to the subnetwork file as it
  comes (``SubnetworkFolderWriter``); the pruned model is evaluated, and the card, report
  and ``ken_config.json`` complete the folder. Host memory at the end: one tensor's work at
  a time (``benchmarks/bench_callback_memory.py``). ``auto_k`` holds one more copy of the
  weights (the fine-tuned values, put back after each probe) while it searches.

Distributed runs (DDP, e.g. ``accelerate launch --num_processes 2``): the ranks share the
selection (``ken_hf.making.shared_records``), every rank ends with identical weights, and only the
main process writes files.

Sharded runs (FSDP2, DeepSpeed ZeRO-3; see ``ken_hf.making.sharded``): full tensors are gathered
one at a time; the main process alone keeps the snapshot (one full copy of the weights on
its host: ``pretrained_source="checkpoint"`` is refused there, and a resumed run reads the
base checkpoint), selects, and scatters each rebuilt tensor back into every rank's shard.
FSDP version 1 is refused (use ``fsdp_version: 2``), and so is ``auto_k`` with sharding.

The Hub: with ``TrainingArguments(push_to_hub=True)`` the saved subnetwork folder (report,
model card and the Trainer's tokenizer or processor included) is pushed when training ends
into the subfolder ``ken/`` of the Trainer's own repository (``hub_model_id``), the place
that the Trainer's own ``push_to_hub`` of ``output_dir`` gives it, with the Trainer's
``hub_token``, ``hub_private_repo`` and ``hub_revision``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import inspect
import time
from collections.abc import Mapping
from pathlib import Path

import torch
from transformers import Trainer, TrainerCallback
from transformers.utils import logging

from .auto_k import AutoK
from .config import KENConfig
from .errors import KENConfigError
from .making.distributed import Team
from .making.in_place import InPlacePrune
from .making.pretrained_values import PretrainedValues, check_policy
from .making.sharded import (
    check_sharded_training,
    full_numel,
    prune_sharded,
    snapshot_sharded,
)
from .storage.folder import SubnetworkFolderWriter, training_report
from .storage.subnetwork_file import StoredSubnetwork
from .subnetwork import KENSubnetwork, check_full_model
from .trainer_push import check_hub_base_model, check_pushed_base, push_to_trainer_repo
from .viz import summary_png_if_available

logger = logging.get_logger(__name__)

# What the callback logs through the Trainer when training ends.
SUMMARY = ("ken_reset_fraction", "ken_kept_fraction", "ken_selection_seconds")


class KENCallback(TrainerCallback):
    """A ``TrainerCallback`` that prunes the model with KEN when training ends.

    When training ends it selects per row, resets the rest to the pre-trained values in
    place (``trainer.model`` is then the pruned model), evaluates before and after on the
    Trainer's eval set (metrics logged as ``ken_before_*`` and ``ken_after_*``), and saves
    the subnetwork with ``ken_report.json``. When training begins it finds the checkpoint
    the model was loaded from (its base, recorded in the subnetwork) and how to get the
    pre-trained values back (``pretrained_source``). Distributed (DDP) runs share the
    selection among ranks; sharded runs (FSDP2, DeepSpeed ZeRO-3) gather one tensor at a
    time. With ``TrainingArguments(push_to_hub=True)``, the main process pushes the saved
    folder to the subfolder ``ken/`` of the Trainer's repository (``push_subnetwork``).

    Args:
        config: a ``KENConfig``; or give ``k`` / ``keep_ratio`` and other fields instead.
        k: ``KENConfig.k``, when no ``config`` is given.
        keep_ratio: ``KENConfig.keep_ratio``, when no ``config`` is given.
        save_dir: where the subnetwork goes; default ``<output_dir>/ken``.
        evaluate: evaluate before and after KEN when the Trainer has an eval set.
        auto_k: an ``AutoK`` search for the keep ratio (replaces ``k`` / ``keep_ratio``).
        pretrained_source: where the pre-trained values come from when training ends:
            ``"checkpoint"`` (read then from the checkpoint the model was loaded from, a
            tensor at a time, checked against fingerprints taken when training began: no
            copy held, and an error when the model does not hold exactly that checkpoint's
            weights), ``"snapshot"`` (a copy of every parameter taken when training begins,
            as much memory as the weights) or ``"auto"`` (the checkpoint when possible,
            else the snapshot; the log says which, and why).
        snapshot_device: where the pre-trained snapshot is kept.
        new_tensors: names of the newly initialised tensors (stored whole). By default they
            are found from the checkpoint the model was loaded from; a model that was not
            loaded from a readable checkpoint needs them (an empty set if none is).
        dataset: Hub id of the evaluation data set; the model card's metadata then lists
            the metrics after KEN for it (``model-index``).
        hub_base_model: with ``push_to_hub=True``, the Hub id of the base (the Hub model
            that the local folder the model was loaded from holds), recorded in the pushed
            ``ken_config.json`` and model card; the local folder keeps the local path. A
            subnetwork from the Hub may name only a Hub id as its base, so a run whose base
            is a local folder and that pushes is refused when training begins without it.
        **config_fields (Any): other ``KENConfig`` fields (``target_modules``, ``rule``, ...),
            when no ``config`` is given.

    Attributes:
        config: the ``KENConfig`` in use (its base recorded when training begins).
        subnetwork: the ``KENSubnetwork`` once training ended, as read back from the saved
            folder (None before, and on ranks other than the main one).
        pretrained_values: the ``PretrainedValues`` held between the two events (None
            before training begins and once training ended).
        report: what ``ken_report.json`` holds: kept and reset shares, selection time,
            metrics before and after, per-tensor counts.
        auto_k_curve: the ``AutoK`` probes: keep ratio, metric, whether within tolerance.

    Raises:
        KENConfigError: both a ``config`` and fields are given, ``pretrained_source`` is
            not one of ``"auto"``, ``"checkpoint"``, ``"snapshot"``, a field is invalid, or
            ``hub_base_model`` is not a Hub id.

    Example:
        ```python
        from transformers import Trainer
        from ken_hf import KENCallback

        trainer = Trainer(
            model=model, args=args, train_dataset=train, eval_dataset=dev,
            callbacks=[KENCallback(keep_ratio=0.75)],
        )
        trainer.train()  # then trainer.model is pruned; <output_dir>/ken/ holds the subnetwork
        ```
    """

    def __init__(
        self,
        config: KENConfig | None = None,
        *,
        k: int | None = None,
        keep_ratio: float | None = None,
        save_dir: str | None = None,
        evaluate: bool = True,
        auto_k: AutoK | None = None,
        pretrained_source: str = "auto",
        snapshot_device: str | torch.device = "cpu",
        new_tensors: set[str] | None = None,
        dataset: str | None = None,
        hub_base_model: str | None = None,
        **config_fields,
    ) -> None:
        if config is None:
            if auto_k is not None and k is None and keep_ratio is None:
                keep_ratio = 1.0  # replaced by the search
            config = KENConfig(k=k, keep_ratio=keep_ratio, **config_fields)
        elif k is not None or keep_ratio is not None or config_fields:
            raise KENConfigError("give either a KENConfig or its fields, not both")
        check_policy(pretrained_source)
        check_hub_base_model(hub_base_model)
        self.config = config
        self.save_dir = save_dir
        self.dataset = dataset
        self.hub_base_model = hub_base_model
        self.evaluate = evaluate
        self.auto_k = auto_k
        self.pretrained_source = pretrained_source
        self.snapshot_device = torch.device(snapshot_device)
        self.new_tensors = None if new_tensors is None else set(new_tensors)
        # The pre-trained values during training: a snapshot, or where to read them.
        self.pretrained_values: PretrainedValues | None = None
        self.subnetwork: KENSubnetwork | None = None
        self.report: dict = {}
        self.auto_k_curve: list[dict] = []
        self._trainer: Trainer | None = None
        self._sharding: str | None = None
        self._team: Team | None = None

    def bind(self, trainer: Trainer) -> KENCallback:
        """Name the Trainer this callback runs in.

        Callbacks are not handed their Trainer; without ``bind``, the callback looks for the
        Trainer whose callbacks hold it among the calling frames, and raises
        ``RuntimeError`` saying so if none does (e.g. when a wrapper calls the events).

        Args:
            trainer: the Trainer whose callbacks hold this one.

        Returns:
            This callback, so that it can be added in one expression.

        Example:
            ```python
            trainer.add_callback(KENCallback(k=64).bind(trainer))
            ```
        """
        self._trainer = trainer
        return self

    # -- events ---------------------------------------------------------------------------
    def on_train_begin(self, args, state, control, **kwargs):
        """Trainer event: find the base checkpoint and where the pre-trained values come from.

        Called by the Trainer, not by user code. A snapshot, when one is needed, is taken
        here; a resumed run (``state.global_step > 0``) takes its pre-trained values from
        the base checkpoint, not from the resumed weights.

        Args:
            args (transformers.TrainingArguments): the Trainer's arguments.
            state (transformers.TrainerState): the Trainer's state.
            control (transformers.TrainerControl): the Trainer's control flags.
            **kwargs (Any): the other objects the Trainer passes to callbacks.

        Raises:
            RuntimeError: the Trainer cannot be found (see ``bind``).
            KENConfigError: the model carries PEFT adapters; ``push_to_hub`` is set and the
                base is a local folder with no ``hub_base_model`` given (so that no training
                run is spent before the push refuses); its base checkpoint is unknown
                and no ``new_tensors`` were given; ``pretrained_source="checkpoint"`` (or a
                resumed run) and the checkpoint cannot provide the pre-trained values; or a
                resumed run whose model names no base checkpoint.
            NotImplementedError: FSDP version 1, or ``auto_k`` or
                ``pretrained_source="checkpoint"`` with sharded training.
            CheckpointError: a resumed run's base checkpoint cannot be read.
        """
        trainer = self._find_trainer()
        model = _unwrap(trainer)
        check_full_model(model, "KENCallback: the Trainer's model")
        self._sharding = check_sharded_training(
            trainer, model, auto_k=self.auto_k is not None, pretrained_source=self.pretrained_source
        )
        main = trainer.is_world_process_zero()
        resumed = state.global_step > 0  # the model holds trained values already
        self._team = None  # this run's processes, joined when training ends
        snapshot = None
        if self._sharding and not resumed:
            snapshot = snapshot_sharded(model, self.snapshot_device, main=main)
            logger.info(
                f"KENCallback: the pre-trained values are a snapshot held on "
                f"{self.snapshot_device} by the main process ({self._sharding} sharding)"
            )
        if snapshot is not None and not main:  # the main process alone selects
            self.pretrained_values = PretrainedValues(None, frozenset(self.new_tensors or ()))
            return
        self.pretrained_values = PretrainedValues.find(
            model,
            self.config,
            policy=self.pretrained_source,
            snapshot_device=self.snapshot_device,
            new_tensors=self.new_tensors,
            resumed=resumed,
            snapshot=snapshot,
        )
        source = self.pretrained_values.source
        if source is not None:
            self.config = dataclasses.replace(
                self.config,
                base_model_name_or_path=source.name_or_path,
                base_model_revision=source.revision,
            )
        if args.push_to_hub:  # the push would refuse at the end: say so now, on every rank
            check_pushed_base(trainer, self.config.base_model_name_or_path, self.hub_base_model)

    def on_train_end(self, args, state, control, **kwargs):
        """Trainer event: run KEN on the trained model, evaluate, report and save.

        Called by the Trainer, not by user code. Prunes the model in place (after the
        ``AutoK`` search, when given), logs ``ken_reset_fraction``, ``ken_kept_fraction``
        and ``ken_selection_seconds``, and on the main process saves the subnetwork (with
        the Trainer's tokenizer or processor, and the KENviz summary when the ``viz`` extra
        is installed) and pushes it when ``args.push_to_hub`` is set.

        Args:
            args (transformers.TrainingArguments): the Trainer's arguments.
            state (transformers.TrainerState): the Trainer's state.
            control (transformers.TrainerControl): the Trainer's control flags.
            **kwargs (Any): the other objects the Trainer passes to callbacks.

        Raises:
            CheckpointError: a checkpoint tensor no longer matches what was recorded when
                training began (the file was changed or replaced since).
            KENConfigError: the ``AutoK`` metric is not among the evaluation's metrics.
            KENError: a tensor holds NaN or Inf after training.
            OSError: pushing to the Hub failed (the subnetwork is saved; the message says
                how to push it again).
        """
        trainer = self._find_trainer()
        model = _unwrap(trainer)
        evaluate = self.evaluate and trainer.eval_dataset is not None
        main = trainer.is_world_process_zero()
        folder = Path(self.save_dir or Path(args.output_dir) / "ken")
        before = trainer.evaluate(metric_key_prefix="ken_before") if evaluate else {}
        with contextlib.ExitStack() as stack:
            # The subnetwork file is written as the tensors are pruned; the other files
            # once the pruned model is evaluated. The folder changes only at the end.
            save = stack.enter_context(SubnetworkFolderWriter(folder)) if main else None
            start = time.perf_counter()
            progress = main and not args.disable_tqdm
            config, model_config = self._prune(trainer, model, before, save, progress)
            seconds = time.perf_counter() - start
            self.pretrained_values = None  # let go: the model is pruned
            after = trainer.evaluate(metric_key_prefix="ken_after") if evaluate else {}
            if save is None:  # not the main process: nothing to report
                return
            self.report = training_report(
                save.facts,
                config,
                total_values=sum(full_numel(p) for p in model.parameters()),
                seconds=seconds,
                before=before,
                after=after,
                auto_k_curve=self.auto_k_curve,
            )
            trainer.log({key: self.report[key] for key in SUMMARY})
            metrics = {k: v for k, v in {**before, **after}.items() if isinstance(v, float)}
            save.write_rest(
                config,
                model_config=model_config,
                metrics=metrics,
                report=self.report,
                tokenizer=trainer.processing_class,
                dataset=self.dataset,
                picture=summary_png_if_available(save.entries),  # needs [viz]
            )
        logger.info(f"KEN subnetwork saved to {folder}")
        self.subnetwork = KENSubnetwork.from_pretrained(folder)
        self.subnetwork.metrics = metrics
        if args.push_to_hub:
            self.push_subnetwork(trainer, folder)

    def _prune(
        self,
        trainer: Trainer,
        model: torch.nn.Module,
        before: dict,
        save: SubnetworkFolderWriter | None,
        progress: bool,
    ) -> tuple[KENConfig, dict | None]:
        """Prune ``model`` in place (after the ``AutoK`` search, when given), its tensors
        written by ``save`` (the main process's folder writer, else None) as they come.
        Returns the subnetwork's config and the model's ``config.json`` values."""
        values = self.pretrained_values
        with values.open(model) as (pretrained, specs):
            if self.auto_k is not None:

                def prune(ratio: float) -> None:
                    config = dataclasses.replace(self.config, k=None, keep_ratio=ratio)
                    self._in_place(model, pretrained, specs, config, progress=False).run()

                ratio, self.auto_k_curve = self.auto_k.run(trainer, model, before, prune)
                self.config = dataclasses.replace(self.config, k=None, keep_ratio=ratio)
            if self._sharding:  # the main process alone holds the subnetwork: written whole
                subnetwork = prune_sharded(
                    model,
                    pretrained,
                    self.config,
                    new_tensors=values.new_tensors,
                    main=save is not None,
                    source=values.source,
                    progress=progress,
                )
                if save is None:
                    return self.config, None
                save.write_tensors(
                    StoredSubnetwork(subnetwork.pruned, subnetwork.whole, subnetwork.fingerprints)
                )
                return subnetwork.config, subnetwork.model_config
            pruning = self._in_place(model, pretrained, specs, self.config, progress)
            if save is not None:
                save.write_tensors(pruning.records())
            else:
                pruning.run()  # rebuilt on this rank, written by the main process
            return pruning.config, pruning.model_config

    def _in_place(
        self,
        model: torch.nn.Module,
        pretrained: Mapping[str, torch.Tensor],
        specs: dict,
        config: KENConfig,
        progress: bool,
    ) -> InPlacePrune:
        """KEN in place on ``model`` with ``config``, against the values held for it (the
        team of processes made once per run: with NCCL it is a gloo group of its own)."""
        if self._team is None:
            self._team = Team.current()
        return InPlacePrune(
            model,
            pretrained,
            specs,
            config,
            source=self.pretrained_values.source,
            new_tensors=self.pretrained_values.new_tensors,
            progress=progress,
            team=self._team,
        )

    def push_subnetwork(self, trainer: Trainer, folder: Path) -> str:
        """Push the saved subnetwork folder to the Trainer's Hub repository.

        Into the subfolder ``ken/`` (or the folder's path inside ``output_dir`` when
        ``save_dir`` lies there), with the Trainer's ``hub_token``, ``hub_private_repo`` and
        ``hub_revision``. The subnetwork exists only once training ends, so it is pushed
        then whatever ``hub_strategy`` says; uploads the Trainer still has in flight
        (``every_save``, ``checkpoint``) are waited for first, so that the subnetwork's
        commit comes last. ``on_train_end`` calls it when ``push_to_hub`` is set.

        Args:
            trainer: the Trainer (its ``args`` name the repository, token and revision).
            folder: the saved subnetwork folder.

        Returns:
            The URL of the commit.

        Raises:
            KENConfigError: the subnetwork's base is a local folder and no
                ``hub_base_model`` was given (nothing is uploaded).
            OSError: the push failed; the message says that the subnetwork is saved in
                ``folder`` and gives the ``ken push`` command that pushes it again.

        Example:
            ```python
            from pathlib import Path

            url = callback.push_subnetwork(trainer, Path(trainer.args.output_dir) / "ken")
            ```
        """
        return push_to_trainer_repo(trainer, folder, self.hub_base_model)

    # -- helpers --------------------------------------------------------------------------
    def _find_trainer(self) -> Trainer:
        """The Trainer whose event we are handling: callbacks are not handed it, so ``bind``
        names it, or the calling frames are searched for the Trainer holding this callback."""
        if self._trainer is not None:
            return self._trainer
        frame = inspect.currentframe()
        while frame is not None:
            candidate = frame.f_locals.get("self")
            if isinstance(candidate, Trainer) and self in candidate.callback_handler.callbacks:
                self._trainer = candidate
                return candidate
            frame = frame.f_back
        raise RuntimeError(
            "KENCallback could not find the Trainer running it among the calling frames; "
            "name it explicitly: trainer.add_callback(KENCallback(...).bind(trainer)), or "
            "callback.bind(trainer) after building the Trainer"
        )


def _unwrap(trainer: Trainer) -> torch.nn.Module:
    return trainer.accelerator.unwrap_model(trainer.model, keep_torch_compile=False)
