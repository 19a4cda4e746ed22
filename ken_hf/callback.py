"""``KENCallback``: KEN at the end of any transformers ``Trainer`` run.

Memory: where the pre-trained values come from is ``pretrained_source``.

- ``"checkpoint"``: no copy is held during training. When training begins, every tensor of
  the checkpoint the model was loaded from (found by ``locate_base``) is read once, a
  tensor at a time, compared bit for bit with the model's and fingerprinted; when training
  ends, the values are read again from the memory-mapped checkpoint a tensor at a time,
  each checked against its fingerprint (a file changed meanwhile raises an error naming the
  tensor) and moved to the model tensor's device. The ranks of one machine share the page
  cache. Each tensor is read and checked four times at the end (locating, plan, step,
  rebuild; once more for ``ken_delta`` and ``largest_delta``), from the page cache, and
  pre-trained tensors are held one at a time.
- ``"snapshot"``: a copy of every parameter is taken when training begins, on the CPU by
  default (``snapshot_device``): as much host memory as the weights take (90 MB for
  MiniLM, 540 MB for SmolLM2-135M in fp32, 28 GB for a 7B model in fp32), on every rank.
- ``"auto"`` (the default): the checkpoint when the model still holds exactly its weights,
  else the snapshot (a model built from a config, or changed after loading, or a checkpoint
  lacking a tensor that ``new_tensors`` does not name); the log says which, and why
  (``logger.info``, or a warning when it falls back to the snapshot).

A run resumed from a checkpoint always takes the pre-trained values from the base
checkpoint (the model holds trained values), so that KEN resets to them, not to the
resumed ones: read when training ends, or held from its start with ``"snapshot"``.
``auto_k`` holds one more copy of the weights (the fine-tuned values, put back after each
probe) while it searches.

Distributed runs (DDP, e.g. ``accelerate launch --num_processes 2``): the tensors are
shared out among the ranks, each selects its share, and the masks are broadcast, so every
rank ends with identical weights; only the main process writes files.

Sharded runs (FSDP2, DeepSpeed ZeRO-3; see ``ken_hf.sharding``): full tensors are gathered
one at a time; the main process alone keeps the snapshot (one full copy of the weights on
its host: ``pretrained_source="checkpoint"`` is refused there, and a resumed run reads the
base checkpoint as above), selects, and scatters each rebuilt tensor back into every
rank's shard. FSDP version 1 is refused (use ``fsdp_version: 2``), and so is ``auto_k``
with sharding.

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
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path

import torch
from transformers import Trainer, TrainerCallback
from transformers.utils import logging

from .auto_k import AutoK
from .base_source import (
    BaseSource,
    CheckpointValues,
    base_rows_of,
    cannot_tell,
    locate_base,
    record_checkpoint,
)
from .checkpoints import CheckpointError, new_parameters, tensors_of
from .config import KENConfig
from .errors import KENConfigError, shown
from .hub import is_remote_id
from .in_place import InPlacePrune
from .pipeline import specs_of
from .serialization import StoredSubnetwork, SubnetworkFileFacts
from .sharding import full_numel, prune_sharded, sharding_of, snapshot_sharded
from .subnetwork import KENSubnetwork, check_full_model
from .subnetwork_folder import SubnetworkFolderWriter, push_subnetwork_folder, travelling_base
from .viz import summary_png_if_available

logger = logging.get_logger(__name__)

PRETRAINED_SOURCES = ("auto", "checkpoint", "snapshot")
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
        subnetwork: the ``KENSubnetwork`` once training ended (None before, and on ranks
            other than the main one in sharded runs).
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
        if pretrained_source not in PRETRAINED_SOURCES:
            raise KENConfigError(
                f"pretrained_source={pretrained_source!r}: choose one of "
                + ", ".join(PRETRAINED_SOURCES)
            )
        if hub_base_model is not None and not is_remote_id(hub_base_model):
            raise KENConfigError(
                f"hub_base_model={shown(hub_base_model)} is not a Hub id ('owner/name', and no "
                "local path of that name): give the Hub id of the base"
            )
        self.config = config
        self.save_dir = save_dir
        self.dataset = dataset
        self.hub_base_model = hub_base_model
        self.evaluate = evaluate
        self.auto_k = auto_k
        self.pretrained_source = pretrained_source
        self.snapshot_device = torch.device(snapshot_device)
        # The pre-trained values during training: a snapshot, or where to read them.
        self.pretrained: dict[str, torch.Tensor] = {}
        self.checkpoint_values: CheckpointValues | None = None
        self._reasons: list[str] = []  # why each candidate checkpoint was not the base
        self.new_tensors = None if new_tensors is None else set(new_tensors)
        self.source: BaseSource | None = None
        self.subnetwork: KENSubnetwork | None = None
        self.report: dict = {}
        self.auto_k_curve: list[dict] = []
        self._trainer: Trainer | None = None
        self._sharding: str | None = None

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
        self._sharding = _check_sharding(trainer, model, self.auto_k, self.pretrained_source)
        main = trainer.is_world_process_zero()
        self.pretrained, self.checkpoint_values = {}, None
        resumed = state.global_step > 0  # the model holds trained values already
        if resumed:
            self._find_resumed_base(model)
        elif self._sharding:
            self.pretrained = snapshot_sharded(model, self.snapshot_device, main=main)
            if main:
                self._find_base(model, self.pretrained)
                logger.info(
                    f"KENCallback: the pre-trained values are a snapshot held on "
                    f"{self.snapshot_device} by the main process ({self._sharding} sharding)"
                )
        else:
            self._find_base(model, tensors_of(model))
        if self.source is not None:
            if self.new_tensors is None:
                self.new_tensors = set(self.source.missing)
            self.config = dataclasses.replace(
                self.config,
                base_model_name_or_path=self.source.name_or_path,
                base_model_revision=self.source.revision,
            )
        if args.push_to_hub:  # the push would refuse at the end: say so now, on every rank
            self._check_hub_base(trainer)
        if resumed or not self._sharding:
            self._hold_pretrained(model, resumed=resumed)

    def _find_base(self, model: torch.nn.Module, tensors: Mapping[str, torch.Tensor]) -> None:
        """``self.source``: the checkpoint holding ``tensors`` (the model's pre-trained
        values), or an error when it is unknown and no ``new_tensors`` were named."""
        if self.source is None:
            self.source, self._reasons = locate_base(model, model, self.config, tensors)
            if self.source is None and self.new_tensors is None:
                floating = [n for n, t in tensors.items() if t.is_floating_point()]
                raise cannot_tell(model, floating, self._reasons)

    def _find_resumed_base(self, model: torch.nn.Module) -> None:
        """``self.source`` of a resumed run: the base checkpoint named by the config or the
        model (its tensors cannot be compared with the model's, which are trained); the
        tensors it lacks are the newly initialised ones."""
        candidates = [self.config.base_model_name_or_path, getattr(model, "name_or_path", "")]
        name = next((c for c in candidates if c), None)
        if name is None:
            raise KENConfigError(
                "KENCallback: a resumed run reads the pre-trained values from the base "
                "checkpoint; the model names none: set KENConfig.base_model_name_or_path"
            )
        revision = self.config.base_model_revision or getattr(model.config, "_commit_hash", None)
        missing = new_parameters(model, name, revision=revision)
        self.source = BaseSource(name, revision, frozenset(missing))

    def _hold_pretrained(self, model: torch.nn.Module, *, resumed: bool) -> None:
        """Decide where the pre-trained values will come from (``pretrained_source``) and
        log it: ``self.checkpoint_values`` (read when training ends) or ``self.pretrained``
        (a snapshot, taken now)."""
        tensors = tensors_of(model)
        if self.pretrained_source == "snapshot" and not resumed:
            recorded, why_not = None, "pretrained_source='snapshot'"
        else:
            recorded, why_not = self._checked_checkpoint(model, tensors, resumed=resumed)
        if recorded is None:
            if resumed or self.pretrained_source == "checkpoint":
                raise KENConfigError(
                    f"KENCallback: the pre-trained values cannot be read from a checkpoint: "
                    f"{why_not}"
                    + ("" if resumed else "; pretrained_source='auto' or 'snapshot' holds a copy")
                )
            if self.source is not None:  # grown tensors: the rows the base has
                prefix = getattr(model, "base_model_prefix", None) or None
                tensors = base_rows_of(self.source, tensors, prefix)
            self.pretrained = {
                name: t.detach().to(self.snapshot_device, copy=True) for name, t in tensors.items()
            }
            log = logger.info if self.pretrained_source == "snapshot" else logger.warning
            log(
                f"KENCallback: the pre-trained values are a snapshot held on "
                f"{self.snapshot_device} during training ({why_not})"
            )
        elif self.pretrained_source == "snapshot":  # resumed: held from the start, as asked
            with recorded.open() as values:
                self.pretrained = {
                    name: value.to(self.snapshot_device) for name, value in values.items()
                }
            logger.info(
                f"KENCallback: the pre-trained values are read from the base checkpoint "
                f"{self.source.name_or_path!r} and held on {self.snapshot_device}"
            )
        else:
            self.checkpoint_values = recorded
            logger.info(
                f"KENCallback: the pre-trained values will be read from the checkpoint "
                f"{self.source.name_or_path!r} when training ends, a tensor at a time (no copy "
                "held during training"
                + ("" if resumed else "; every tensor equals the model's")
                + ")"
            )

    def _checked_checkpoint(
        self, model: torch.nn.Module, tensors: Mapping[str, torch.Tensor], *, resumed: bool
    ) -> tuple[CheckpointValues | None, str | None]:
        """The located checkpoint recorded as the pre-trained values of ``tensors`` (each
        compared with the model's unless ``resumed``), or None and why it cannot be."""
        if self.source is None:
            return None, "no checkpoint holds the model's weights (" + (
                "; ".join(self._reasons) or "none is named"
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
                if name not in (self.new_tensors or ()):
                    return None, (
                        f"checkpoint {self.source.name_or_path!r} lacks tensor {name!r}, which "
                        "is not among new_tensors"
                    )
        return recorded, None

    @contextmanager
    def _pretrained_values(
        self, model: torch.nn.Module
    ) -> Iterator[tuple[Mapping[str, torch.Tensor], dict]]:
        """The pre-trained values for the end of training and their ``{name: (shape,
        dtype)}``: the snapshot, or the checkpoint read a tensor at a time (each on its
        model tensor's device; shapes and dtypes as recorded, nothing read for them)."""
        if self.checkpoint_values is None:
            yield self.pretrained, specs_of(self.pretrained)
            return
        devices = {name: tensor.device for name, tensor in tensors_of(model).items()}
        with self.checkpoint_values.open(devices) as values:
            yield values, self.checkpoint_values.specs

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
            config, model_config = self._prune(trainer, model, before, save, args, state)
            seconds = time.perf_counter() - start
            self.pretrained, self.checkpoint_values = {}, None
            after = trainer.evaluate(metric_key_prefix="ken_after") if evaluate else {}
            if save is None:  # not the main process: nothing to report
                return
            self.report = self._report(model, config, save.facts, seconds, before, after)
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
        self, trainer: Trainer, model: torch.nn.Module, before: dict, save, args, state
    ) -> tuple[KENConfig, dict | None]:
        """Prune ``model`` in place (after the ``AutoK`` search, when given), its tensors
        written by ``save`` (the main process's folder writer, else None) as they come.
        Returns the subnetwork's config and the model's ``config.json`` values."""
        progress = state.is_world_process_zero and not args.disable_tqdm
        with self._pretrained_values(model) as (pretrained, specs):
            if self.auto_k is not None:
                ratio = self._search_keep_ratio(trainer, model, before, pretrained, specs)
                self.config = dataclasses.replace(self.config, k=None, keep_ratio=ratio)
            if self._sharding:  # the main process alone holds the subnetwork: written whole
                subnetwork = prune_sharded(
                    model,
                    pretrained,
                    self.config,
                    new_tensors=self.new_tensors or (),
                    main=save is not None,
                    source=self.source,
                    progress=progress,
                )
                if save is None:
                    return self.config, None
                save.write_tensors(
                    StoredSubnetwork(subnetwork.pruned, subnetwork.whole, subnetwork.fingerprints)
                )
                return subnetwork.config, subnetwork.model_config
            pruning = self._in_place(model, pretrained, specs, self.config, progress)
            records = pruning.records()
            if save is not None:
                save.write_tensors(records)
            else:
                for _ in records:  # rebuilt on this rank, written by the main process
                    pass
            return pruning.config, pruning.model_config

    def _in_place(self, model, pretrained, specs, config: KENConfig, progress: bool):
        return InPlacePrune(
            model,
            pretrained,
            specs,
            config,
            source=self.source,
            new_tensors=self.new_tensors or (),
            progress=progress,
        )

    def _report(
        self,
        model: torch.nn.Module,
        config: KENConfig,
        facts: SubnetworkFileFacts,
        seconds: float,
        before: dict,
        after: dict,
    ) -> dict:
        """What ``ken_report.json`` holds, from the written file's ``facts``."""
        counts = facts.counts
        kept_anywhere = counts["kept_values"] + counts["whole_values"] + facts.added_values
        pruned = counts["pruned_values"]
        total = sum(full_numel(p) for p in model.parameters())
        return {
            "ken_reset_fraction": 1.0 - kept_anywhere / total,
            "ken_kept_fraction": counts["kept_values"] / pruned if pruned else 1.0,
            "ken_selection_seconds": seconds,
            "config": config.to_dict(),
            "metrics_before": before,
            "metrics_after": after,
            "tensors": facts.per_tensor,
            "stored_whole": list(facts.whole_names),
            "auto_k_curve": self.auto_k_curve,
        }

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
        args = trainer.args
        repo_id = _hub_repo_id(trainer)
        self._check_hub_base(trainer, KENConfig.from_pretrained(folder))
        try:
            path_in_repo = folder.resolve().relative_to(Path(args.output_dir).resolve()).as_posix()
        except ValueError:  # save_dir outside output_dir
            path_in_repo = "ken"
        revision = args.hub_revision  # a TrainingArguments field since transformers 4.51
        in_flight = getattr(trainer, "push_in_progress", None)
        if in_flight is not None:
            in_flight.wait_until_done()
        try:
            url = push_subnetwork_folder(
                folder,
                repo_id,
                base_model_name_or_path=self.hub_base_model,
                private=args.hub_private_repo,
                token=args.hub_token,
                revision=revision,
                path_in_repo=path_in_repo,
                commit_message="KEN subnetwork, end of training",
            )
        except Exception as error:  # network, permissions, unknown branch: all reported alike
            again = (
                f"ken push {folder} {repo_id} --subfolder {path_in_repo}"
                + (f" --revision {revision}" if revision else "")
                + (f" --base-model {self.hub_base_model}" if self.hub_base_model else "")
            )
            raise OSError(
                f"KENCallback: pushing the subnetwork to {repo_id} (subfolder {path_in_repo}) "
                f"failed: {error}. The subnetwork is saved and safe in {folder}; push it "
                f"again with: {again}"
            ) from error
        logger.info(f"KEN subnetwork pushed to {repo_id}/{path_in_repo}: {url}")
        return url

    # -- helpers --------------------------------------------------------------------------
    def _check_hub_base(self, trainer: Trainer, config: KENConfig | None = None) -> None:
        """Refuse a push whose base (``config``'s, by default the one in use) is a local path
        when no ``hub_base_model`` names its Hub id (``travelling_base``)."""
        travelling_base(
            (config or self.config).base_model_name_or_path,
            self.hub_base_model,
            repo_id=_hub_repo_id(trainer),
            remedy="KENCallback(..., hub_base_model='owner/name'), the base's Hub id",
            argument="hub_base_model",
        )

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

    def _search_keep_ratio(
        self,
        trainer: Trainer,
        model: torch.nn.Module,
        before: dict,
        pretrained: Mapping[str, torch.Tensor],
        specs: dict,
    ) -> float:
        """``auto_k``'s search: each probe prunes the model against ``pretrained`` and
        evaluates, then the fine-tuned values (a copy held meanwhile) are put back."""
        search = self.auto_k
        key = f"ken_before_{search.metric}"
        if key not in before:
            raise KENConfigError(f"auto_k: metric {search.metric!r} not in {sorted(before)}")
        finetuned = {n: t.detach().clone() for n, t in tensors_of(model).items()}

        def probe(ratio: float) -> float:
            config = dataclasses.replace(self.config, k=None, keep_ratio=ratio)
            for _ in self._in_place(model, pretrained, specs, config, progress=False).records():
                pass
            value = trainer.evaluate(metric_key_prefix="ken_probe")[f"ken_probe_{search.metric}"]
            with torch.no_grad():
                for name, tensor in tensors_of(model).items():
                    tensor.copy_(finetuned[name])
            trainer.log({"ken_auto_k_ratio": ratio, f"ken_auto_k_{search.metric}": value})
            return value

        ratio, self.auto_k_curve = search.search(before[key], probe)
        return ratio


def _hub_repo_id(trainer: Trainer) -> str:
    """The repository the Trainer pushes to, as its own ``push_to_hub`` names it."""
    args = trainer.args
    return (
        getattr(trainer, "hub_model_id", None)
        or args.hub_model_id
        or Path(args.output_dir).absolute().name
    )


def _unwrap(trainer: Trainer) -> torch.nn.Module:
    return trainer.accelerator.unwrap_model(trainer.model, keep_torch_compile=False)


def _check_sharding(
    trainer: Trainer, model: torch.nn.Module, auto_k, pretrained_source: str = "auto"
) -> str | None:
    """The model's sharding (``sharding_of``); FSDP version 1, and ``auto_k`` or
    ``pretrained_source="checkpoint"`` with any sharding, are refused with the reason."""
    sharding = sharding_of(model)
    if getattr(trainer, "is_fsdp_enabled", False) and sharding is None:
        raise NotImplementedError(
            "KENCallback needs FSDP2 (fsdp_version: 2 in the FSDP config): FSDP version 1 "
            "shards flattened groups of parameters, and KEN selects per parameter row"
        )
    if sharding and auto_k is not None:
        raise NotImplementedError(
            f"KENCallback: auto_k is not available with sharded training ({sharding}); give "
            "k or keep_ratio"
        )
    if sharding and pretrained_source == "checkpoint":
        raise NotImplementedError(
            f"KENCallback: pretrained_source='checkpoint' is not available with sharded "
            f"training ({sharding}) yet: the main process holds a snapshot of the pre-trained "
            "values; use pretrained_source='auto' or 'snapshot'"
        )
    return sharding
