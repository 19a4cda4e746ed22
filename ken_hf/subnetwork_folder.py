"""The files of a saved subnetwork folder: their names, writing them together
(``write_folder``), and finding the ones saved together (``saved_files``).

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
import tempfile
from collections.abc import Mapping
from pathlib import Path

from .atomic_files import FolderWriter, previous_version
from .card import model_card
from .checkpoints import TOKENIZER_FILES
from .config import CONFIG_NAME, KENConfig
from .confined import confined_file, confined_path
from .delta_codec import DEFAULT_LEVEL, DEFAULT_THREADS
from .errors import KENConfigError
from .serialization import (
    SUBNETWORK_NAME,
    KENFormatError,
    StoredSubnetwork,
    SubnetworkReader,
    write_subnetwork,
)

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
    stored: StoredSubnetwork,
    *,
    model_config: dict | None = None,
    metrics: Mapping[str, float] | None = None,
    report: dict | None = None,
    tokenizer: object | None = None,
    dataset: str | None = None,
    picture: bytes | None = None,
    compression_level: int = DEFAULT_LEVEL,
    compression_threads: int = DEFAULT_THREADS,
) -> None:
    """Write a subnetwork folder (see ``KENSubnetwork.save_pretrained``)."""
    with FolderWriter(save_directory, commit=CONFIG_NAME) as out:
        subnetwork_file = out.staged(SUBNETWORK_NAME)
        digest = write_subnetwork(
            stored,
            subnetwork_file,
            level=compression_level,
            threads=compression_threads,
        )
        if model_config is not None:
            out.write_text(MODEL_CONFIG_NAME, json.dumps(model_config, indent=2, sort_keys=True))
        if tokenizer is not None:
            _save_processor(tokenizer, out)
        card = model_card(
            config,
            subnetwork_file,
            metrics,
            report=report,
            dataset=dataset,
            tokenizer=tokenizer is not None,
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
        saved = dataclasses.replace(config, subnetwork_digest=digest)
        out.write_text(CONFIG_NAME, saved.to_json_string())


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


def saved_files(folder: Path, config: KENConfig) -> tuple[Path, Path | None]:
    """The subnetwork file and the model's ``config.json`` (None if it has none) saved with
    ``config`` (read from ``folder``'s ``ken_config.json``): the current files, or the
    previous versions that an interrupted save left beside them. Raises
    ``KENFormatError`` for files of another save, ``UnsafePathError`` for a file that links
    out of the folder."""
    subnetwork_file = confined_path(folder, SUBNETWORK_NAME)
    model_config_file = confined_file(folder, MODEL_CONFIG_NAME)
    if config.subnetwork_digest is None or _digest(subnetwork_file) == config.subnetwork_digest:
        return subnetwork_file, model_config_file
    previous = confined_file(folder, previous_version(subnetwork_file).name)
    if previous is not None and _digest(previous) == config.subnetwork_digest:
        previous_config = confined_file(folder, previous_version(MODEL_CONFIG_NAME).name)
        return previous, previous_config or model_config_file
    raise KENFormatError(
        f"{subnetwork_file} is not the subnetwork that {folder / CONFIG_NAME} was saved with "
        "(another save changed one of them); save the subnetwork again"
    )


def _digest(path: Path) -> str:
    with SubnetworkReader(path) as reader:
        return reader.digest
