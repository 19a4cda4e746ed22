"""The files of a saved subnetwork folder: their names, writing them together
(``write_folder``), and opening the ones saved together (``open_saved``).

A folder holds ``ken_config.json`` (written last: the commit point), the subnetwork file,
the model's ``config.json``, a model card, and when given the report, the KENviz summary
picture and the tokenizer or processor. Saving goes through ``FolderWriter``: other files
in the folder are never touched, and an interrupted save leaves the previous subnetwork
loadable.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import tempfile
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING

from ..config import CONFIG_NAME, KENConfig
from ..errors import KENConfigError, KENError, shown
from ..utils.atomic_files import FolderWriter, previous_version
from ..utils.confined import confined_file, confined_path
from ..utils.hub import is_remote_id, push_folder
from ..utils.json_input import read_json_object
from .card import card_metadata, model_card
from .checkpoints import TOKENIZER_FILES
from .delta_codec import DEFAULT_LEVEL, DEFAULT_THREADS
from .subnetwork_file import (
    SUBNETWORK_NAME,
    KENFormatError,
    StoredSubnetwork,
    SubnetworkFileFacts,
    SubnetworkReader,
    SubnetworkWriter,
)

if TYPE_CHECKING:
    from ..making.plan import TensorRecord

MODEL_CONFIG_NAME = "config.json"
REPORT_NAME = "ken_report.json"
PICTURE_NAME = "ken_summary.png"
CARD_NAME = "README.md"
# Files a processor (tokenizer, image or audio processor) saves beside the subnetwork.
PROCESSOR_FILES = [*TOKENIZER_FILES, "preprocessor_config.json", "processor_config.json"]
# What from_pretrained downloads from a Hub repository: the subnetwork and its processor.
SUBNETWORK_FILES = [
    CONFIG_NAME,
    SUBNETWORK_NAME,
    MODEL_CONFIG_NAME,
    CARD_NAME,
    REPORT_NAME,
    *PROCESSOR_FILES,
]


def write_folder(
    save_directory: str | os.PathLike,
    config: KENConfig,
    tensors: StoredSubnetwork | Iterable[TensorRecord],
    *,
    model_config: Mapping | None = None,
    metrics: Mapping[str, float] | None = None,
    report: dict | None = None,
    tokenizer: object | None = None,
    processor_folder: Path | None = None,
    dataset: str | None = None,
    picture: bytes | None = None,
    compression_level: int = DEFAULT_LEVEL,
    compression_threads: int = DEFAULT_THREADS,
) -> SubnetworkFileFacts:
    """Write a subnetwork folder: the one writer of every driver (``save_pretrained`` and
    the callback, ``ken prune``, the sharded path), which owns every file name and the
    order they are written in.

    The subnetwork file first, its tensors as they come; then the model's ``config.json``,
    the tokenizer or processor, the model card (given the written file's counts), the
    KENviz picture and the report (an earlier save's are removed when not given), and
    ``ken_config.json`` last, the commit point (``FolderWriter``: other files are never
    touched; an error anywhere, in ``tensors`` too, leaves the folder as it was).

    Args:
        save_directory: the folder, created if needed.
        config: the subnetwork's configuration, written as ``ken_config.json`` with the
            subnetwork file's digest.
        tensors: a subnetwork held in memory, or the pipeline's records in name order
            (consumed one at a time: each can be freed once written).
        model_config: the fine-tuned model's ``config.json`` values.
        metrics: metrics for the card when there is no ``report``.
        report: written as ``ken_report.json``.
        tokenizer: a tokenizer or processor (with ``save_pretrained``) saved alongside.
        processor_folder: a folder whose tokenizer or processor files are copied alongside
            instead (``ken prune``: the fine-tuned checkpoint's).
        dataset: the evaluation data set's Hub id, for the card's metadata.
        picture: the KENviz summary PNG, saved as ``ken_summary.png``.
        compression_level: zstd's level (1-22).
        compression_threads: zstd's worker threads (0: one, the same bytes everywhere).

    Returns:
        Counts and sizes of the written subnetwork file.

    Raises:
        TypeError: ``tokenizer`` has no ``save_pretrained``.
        KENConfigError: ``tokenizer`` saves a file named like one of the subnetwork's.
        KENError: a pruned tensor read from a version 1 file holds no delta against the base.
    """
    with SubnetworkFolderWriter(
        save_directory, compression_level=compression_level, compression_threads=compression_threads
    ) as folder:
        folder.write_tensors(tensors)
        folder.write_rest(
            config,
            model_config=model_config,
            metrics=metrics,
            report=report,
            tokenizer=tokenizer,
            processor_folder=processor_folder,
            dataset=dataset,
            picture=picture,
        )
    return folder.facts


class SubnetworkFolderWriter:
    """``write_folder`` in two steps, for a driver that has work to do between them (the
    callback evaluates the pruned model after its tensors are written, and only then has
    the metrics for the card): ``write_tensors``, then ``write_rest``, inside the block.
    The folder changes when the block ends without an error, never before.

    Args:
        save_directory: the folder, created if needed.
        compression_level: zstd's level (1-22).
        compression_threads: zstd's worker threads (0: one, the same bytes everywhere).

    Attributes:
        facts: counts and sizes of the written subnetwork file (once ``write_tensors`` ran).
        entries: ``{name: the header's record}`` of every tensor written, as
            ``SubnetworkReader.entry`` gives it (kind, shape, dtype, kept count, delta).
    """

    def __init__(
        self,
        save_directory: str | os.PathLike,
        *,
        compression_level: int = DEFAULT_LEVEL,
        compression_threads: int = DEFAULT_THREADS,
    ) -> None:
        self._out = FolderWriter(save_directory, commit=CONFIG_NAME)
        self._level, self._threads = compression_level, compression_threads
        self._digest: str | None = None
        self._finished = False
        self.facts: SubnetworkFileFacts | None = None
        self.entries: dict[str, dict] = {}

    def __enter__(self) -> SubnetworkFolderWriter:
        self._out.__enter__()
        return self

    def __exit__(self, kind, error, traceback) -> bool | None:
        if kind is None and not self._finished:
            error = KENError("SubnetworkFolderWriter: the block ended before write_rest")
            self._out.__exit__(type(error), error, None)
            raise error
        return self._out.__exit__(kind, error, traceback)

    def write_tensors(self, tensors: StoredSubnetwork | Iterable[TensorRecord]) -> None:
        """Write the subnetwork file: a subnetwork held in memory, or the pipeline's records
        in name order (consumed one at a time: each can be freed once written)."""
        with SubnetworkWriter(
            self._out.staged(SUBNETWORK_NAME), level=self._level, threads=self._threads
        ) as writer:
            if isinstance(tensors, StoredSubnetwork):
                writer.add_stored(tensors)
            else:
                for record in tensors:
                    writer.add_record(record)
                    del record  # freed before ``tensors`` makes the next one
        self.facts, self.entries, self._digest = writer.facts(), writer.entries, writer.digest

    def write_rest(
        self,
        config: KENConfig,
        *,
        model_config: Mapping | None = None,
        metrics: Mapping[str, float] | None = None,
        report: dict | None = None,
        tokenizer: object | None = None,
        processor_folder: Path | None = None,
        dataset: str | None = None,
        picture: bytes | None = None,
    ) -> None:
        """Write the files beside the subnetwork file (``write_folder`` says which), and
        ``ken_config.json`` last, with the subnetwork file's digest."""
        if self.facts is None:
            raise KENError("SubnetworkFolderWriter.write_rest: write_tensors has not run")
        out = self._out
        if model_config is not None:
            out.write_text(MODEL_CONFIG_NAME, json.dumps(model_config, indent=2, sort_keys=True))
        processor_saved = False
        if tokenizer is not None:
            _save_processor(tokenizer, out)
            processor_saved = True
        elif processor_folder is not None:
            for name in PROCESSOR_FILES:
                path = confined_file(processor_folder, name)
                if path is not None:
                    out.copy(path, name)
                    processor_saved = True
        card = model_card(
            config,
            self.facts,
            metrics,
            report=report,
            dataset=dataset,
            tokenizer=processor_saved,
            picture=PICTURE_NAME if picture is not None else None,
        )
        out.write_text(CARD_NAME, card)
        if picture is not None:
            with open(out.staged(PICTURE_NAME), "wb") as stream:
                stream.write(picture)
        else:
            out.remove_stale([PICTURE_NAME])  # it pictured an earlier subnetwork
        if report is not None:
            out.write_text(REPORT_NAME, json.dumps(report, indent=2) + "\n")
        else:
            out.remove_stale([REPORT_NAME])  # it described an earlier subnetwork
        saved = dataclasses.replace(config, subnetwork_digest=self._digest)
        out.write_text(CONFIG_NAME, saved.to_json_string())
        self._finished = True


def training_report(
    facts: SubnetworkFileFacts,
    config: KENConfig,
    *,
    total_values: int,
    seconds: float,
    before: Mapping[str, float],
    after: Mapping[str, float],
    auto_k_curve: list[dict],
) -> dict:
    """What ``ken_report.json`` holds at the end of a training run, from the written file's
    ``facts``: the reset and kept shares (of ``total_values``, the model's parameter
    values, and of the pruned tensors' values), the selection's ``seconds``, the config, the
    metrics ``before`` and ``after`` KEN, per-tensor counts and the ``AutoK`` probes."""
    counts = facts.counts
    kept_anywhere = counts["kept_values"] + counts["whole_values"] + facts.added_values
    pruned = counts["pruned_values"]
    return {
        "ken_reset_fraction": 1.0 - kept_anywhere / total_values,
        "ken_kept_fraction": counts["kept_values"] / pruned if pruned else 1.0,
        "ken_selection_seconds": seconds,
        "config": config.to_dict(),
        "metrics_before": dict(before),
        "metrics_after": dict(after),
        "tensors": facts.per_tensor,
        "stored_whole": list(facts.whole_names),
        "auto_k_curve": auto_k_curve,
    }


def _save_processor(processor: object, out: FolderWriter) -> None:
    """Save ``processor`` (a tokenizer or processor) through its ``save_pretrained`` and
    stage its files in ``out``; a file named like one of ken-hf's own is an error."""
    if not hasattr(processor, "save_pretrained"):
        raise TypeError(
            f"tokenizer={type(processor).__name__}: expected a tokenizer or processor with "
            "save_pretrained (e.g. AutoTokenizer.from_pretrained(...))"
        )
    own = {CONFIG_NAME, SUBNETWORK_NAME, MODEL_CONFIG_NAME, CARD_NAME, REPORT_NAME}
    with tempfile.TemporaryDirectory() as scratch:
        processor.save_pretrained(scratch)
        for path in sorted(Path(scratch).iterdir()):
            if not path.is_file():
                continue
            if path.name in own:
                raise KENConfigError(
                    f"tokenizer={type(processor).__name__} saves {path.name}, a file of the "
                    "subnetwork itself: save it to another folder"
                )
            out.copy(path, path.name)


def open_saved(folder: Path, config: KENConfig) -> tuple[SubnetworkReader, Path | None]:
    """The subnetwork file saved with ``config`` (read from ``folder``'s
    ``ken_config.json``), opened (its header parsed and checked once, here), and the
    model's ``config.json`` saved with it (None if it has none): the current files, or the
    previous versions that an interrupted save left beside them. The caller closes the
    reader. Raises ``KENFormatError`` for files of another save, ``UnsafePathError`` for a
    file that links out of the folder."""
    subnetwork_file = confined_path(folder, SUBNETWORK_NAME)
    model_config_file = confined_file(folder, MODEL_CONFIG_NAME)
    reader = SubnetworkReader(subnetwork_file)
    if config.subnetwork_digest is None or reader.digest == config.subnetwork_digest:
        return reader, model_config_file
    reader.close()
    previous = confined_file(folder, previous_version(subnetwork_file).name)
    if previous is not None:
        reader = SubnetworkReader(previous)
        if reader.digest == config.subnetwork_digest:
            previous_config = confined_file(folder, previous_version(MODEL_CONFIG_NAME).name)
            return reader, previous_config or model_config_file
        reader.close()
    raise KENFormatError(
        f"{subnetwork_file} is not the subnetwork that {folder / CONFIG_NAME} was saved with "
        "(another save changed one of them); save the subnetwork again"
    )


def travelling_base(
    recorded: str | None,
    base_model_name_or_path: str | os.PathLike | None,
    *,
    repo_id: str,
    remedy: str,
    argument: str = "base_model_name_or_path",
) -> str | None:
    """The base a subnetwork pushed to the Hub names: a Hub id, never a local path.

    A subnetwork from the Hub may name only a Hub id as its base (see ``AutoKENModel``), so
    a push of one that records a local folder would publish a repository no one
    can load as it is. The push is refused before anything is uploaded.

    Args:
        recorded: the ``base_model_name_or_path`` the subnetwork's ``ken_config.json``
            records (None: no base recorded; the loader then names it, which is allowed).
        base_model_name_or_path: the Hub id to record instead (the base's id on the Hub,
            whose weights the recorded local folder holds), or None.
        repo_id: the repository pushed to, named in the error.
        remedy: how the caller names the Hub id (e.g. ``"ken push ... --base-model ID"``),
            said in the error.
        argument: what the caller calls ``base_model_name_or_path`` (``--base-model`` on
            the command line), named when its value is not a Hub id.

    Returns:
        The base to record in the pushed ``ken_config.json``: ``base_model_name_or_path``
        when given, else ``recorded``.

    Raises:
        KENConfigError: ``base_model_name_or_path`` is not a Hub id, or it is None and
            ``recorded`` is a local path.

    Example:
        ```python
        base = travelling_base(
            "sentence-transformers/all-MiniLM-L6-v2", None, repo_id="me/ken", remedy="..."
        )
        ```
    """
    if base_model_name_or_path is not None:
        named = os.fspath(base_model_name_or_path)
        if not is_remote_id(named):
            raise KENConfigError(
                f"not pushing to {repo_id}: {argument}={shown(named)} is not a Hub id "
                "('owner/name', and no local path of that name); give the Hub id of the base"
            )
        return named
    if recorded is None or is_remote_id(recorded):
        return recorded
    # Said first, so that the way out survives the command line's cut of long messages.
    raise KENConfigError(
        f"not pushing to {repo_id}: the subnetwork's base is a local path, which no one "
        f"loading it from the Hub has: name the base's Hub id with {remedy} (nothing was "
        f"uploaded; base_model_name_or_path is {shown(recorded)})"
    )


def push_subnetwork_folder(
    folder: str | os.PathLike,
    repo_id: str,
    *,
    base_model_name_or_path: str | os.PathLike | None = None,
    remedy: str = "base_model_name_or_path='owner/name'",
    argument: str = "base_model_name_or_path",
    **push_kwargs,
) -> str:
    """Push a saved subnetwork folder to the Hub, naming its base by Hub id.

    The folder is checked first (a complete subnetwork, and a base the Hub can provide:
    ``travelling_base``). With ``base_model_name_or_path``, a copy of the folder is pushed
    whose ``ken_config.json`` and model card name that Hub id instead; the folder itself is
    left as it is, so that it keeps loading with the local base.

    Args:
        folder: the subnetwork folder (``save_pretrained``, ``ken prune``, ``KENCallback``).
        repo_id: the Hub repository, ``"owner/name"``.
        base_model_name_or_path: the Hub id of the base, recorded in the pushed copy; needed
            when the folder records a local path as its base.
        remedy: how the caller passes ``base_model_name_or_path``, said in the refusal.
        argument: the caller's name for ``base_model_name_or_path``, said in the refusal.
        **push_kwargs: what ``ken_hf.utils.hub.push_folder`` takes (``private``, ``token``,
            ``revision``, ``path_in_repo``, ``commit_message``).

    Returns:
        The URL of the commit.

    Raises:
        KENConfigError: the base is a local path and no Hub id is given, or the Hub id
            given is not one; nothing is uploaded.
        KENFormatError: the folder is not a complete subnetwork.
        OSError: the folder is missing, or the upload failed.

    Example:
        ```python
        push_subnetwork_folder(
            "run/ken",
            "me/minilm-ken",
            base_model_name_or_path="sentence-transformers/all-MiniLM-L6-v2",
        )
        ```
    """
    folder = Path(folder)
    config = KENConfig.from_pretrained(folder)
    reader, _ = open_saved(folder, config)  # a complete subnetwork, or refused
    with reader:
        facts = reader.facts()
    recorded = config.base_model_name_or_path
    base = travelling_base(
        recorded, base_model_name_or_path, repo_id=repo_id, remedy=remedy, argument=argument
    )
    if base == recorded:
        return push_folder(folder, repo_id, **push_kwargs)
    with tempfile.TemporaryDirectory() as scratch:
        copy = Path(scratch) / folder.name
        shutil.copytree(folder, copy, copy_function=_linked_or_copied)
        rebased = dataclasses.replace(config, base_model_name_or_path=base)
        # Written over the links, never through them: the folder keeps its own files.
        for name in (CONFIG_NAME, CARD_NAME):
            (copy / name).unlink(missing_ok=True)
        rebased.save_pretrained(copy)
        (copy / CARD_NAME).write_text(_card_of(folder, rebased, facts))
        return push_folder(copy, repo_id, **push_kwargs)


def _linked_or_copied(source: str, destination: str) -> None:
    """A hard link (no second copy of a large subnetwork file), else a copy."""
    try:
        os.link(source, destination)
    except OSError:  # another file system, or links not allowed
        shutil.copy2(source, destination)


def _card_of(folder: Path, config: KENConfig, facts: SubnetworkFileFacts) -> str:
    """The model card of ``folder``'s subnetwork under ``config``: its report, picture and
    tokenizer as saved, and the data set and license the saved card names (the base's
    license was read from the local base, which a Hub id may not show offline)."""
    report = None
    report_file = confined_file(folder, REPORT_NAME)
    if report_file is not None:
        report = read_json_object(report_file, error=KENConfigError)
    card = confined_file(folder, CARD_NAME)
    saved = card_metadata(card) if card is not None else {}
    return model_card(
        config,
        facts,
        report=report,
        dataset=saved.get("dataset"),
        tokenizer=any((folder / name).is_file() for name in PROCESSOR_FILES),
        picture=PICTURE_NAME if (folder / PICTURE_NAME).is_file() else None,
        base_license=saved.get("license"),
    )
