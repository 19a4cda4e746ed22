"""KEN checkpoint to checkpoint, a tensor at a time, for models larger than memory.

``prune_checkpoints`` reads a base and a fine-tuned checkpoint tensor by tensor and writes
the subnetwork folder (the format of ``KENSubnetwork.save_pretrained``); ``apply_checkpoint``
writes base + subnetwork as a plain sharded checkpoint for servers that do not know KEN;
``inspect_subnetwork`` reports what a subnetwork holds from its headers alone.

Memory: at most the two versions of one tensor, its mask (one byte per value), its kept
values and the selection's working memory (``max_memory``) at a time. Under a distributed
launcher (``ken_hf.making.distributed``) each rank holds that for its own tensors, and the main
process also holds the other ranks' records waiting to be written: at most the bytes of the
largest tensor (a record is about one bit per value plus the kept values' changes).
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import re
from collections.abc import Iterator
from pathlib import Path

import torch
import xxhash
from tqdm.auto import tqdm

from ..config import KENConfig
from ..storage.checkpoints import (
    INDEX_NAME,
    TOKENIZER_FILES,
    WEIGHTS_NAME,
    Checkpoint,
    base_model_prefix_of,
    match_names,
    read_json,
    read_model_config,
)
from ..storage.delta_codec import DEFAULT_LEVEL, DEFAULT_THREADS
from ..storage.folder import MODEL_CONFIG_NAME, SUBNETWORK_FILES, open_saved, write_folder
from ..storage.format import VALUE_DTYPES
from ..storage.safetensors_io import ShardedWriter
from ..storage.subnetwork_file import (
    PrunedTensor,
    SubnetworkReader,
)
from ..subnetwork import BaseMismatchError
from ..utils.atomic_files import FolderWriter
from ..utils.confined import confined_file
from ..utils.fingerprint import tensor_fingerprint
from ..utils.hub import resolve_folder
from .distributed import Team
from .plan import (
    PRUNED,
    WHOLE,
    TensorPlan,
    TensorRecord,
    dominant_dtype,
    plan_tensors,
    process_tensor,
)
from .shared_records import SELECTION_MEMORY, shared_records


def _specs(checkpoint: Checkpoint) -> dict:
    return {name: (checkpoint.shape(name), checkpoint.dtype(name)) for name in checkpoint.names}


def prune_checkpoints(
    base: str | os.PathLike,
    finetuned: str | os.PathLike,
    config: KENConfig,
    out: str | os.PathLike,
    *,
    device: str = "cpu",
    progress: bool = True,
    base_revision: str | None = None,
    finetuned_revision: str | None = None,
    compression_level: int = DEFAULT_LEVEL,
    compression_threads: int = DEFAULT_THREADS,
) -> dict:
    """Select the KEN subnetwork of checkpoint ``finetuned`` against checkpoint ``base`` and
    write it into the folder ``out`` (as ``KENSubnetwork.save_pretrained`` does: other files
    there are never touched; a failed run leaves what was there as it was).

    The pipeline's plan (``ken_hf.making.plan``) is made from the headers, so every check
    (names in common, shapes, dtypes) runs before any selection; tensors only in the
    fine-tune are stored whole. ``compression_level`` / ``compression_threads``: as in
    ``KENSubnetwork.save_pretrained``. Returns counts and sizes of what was written.

    In a joined torch.distributed group (``ken prune`` under torchrun or ``accelerate
    launch``: ``ken_hf.making.distributed``), every rank reads the headers and plans, the tensors
    are shared out by size, each rank reads and selects its share, and the main process
    (rank 0) receives the other ranks' records in name order, as small arrays (mask and
    changed flags as bits, the kept values' differences, fingerprints: no whole tensor), and
    writes the folder, alone (on its machine): the same bytes as one process with as many
    torch threads as each rank. ``device`` is this rank's. Every rank returns the main
    process's result; an error on any rank stops every rank (``RankFailedError`` on the
    others).
    """
    team = Team.current()
    with contextlib.ExitStack() as stack:
        with team.together("reading the checkpoints' headers"):
            base_ckpt = stack.enter_context(Checkpoint(base, revision=base_revision))
            tuned = stack.enter_context(Checkpoint(finetuned, revision=finetuned_revision))
            base_specs, tuned_specs = _specs(base_ckpt), _specs(tuned)
            prefix = tuned.base_model_prefix or base_ckpt.base_model_prefix
            plans = plan_tensors(tuned_specs, base_specs, config, prefix=prefix)
        sizes = {p.name: math.prod(tuned_specs[p.name][0]) for p in plans}
        team.same(
            xxhash.xxh3_64_hexdigest(repr([plans, sizes, config]).encode()), "tensors or settings"
        )
        config = dataclasses.replace(
            config,
            base_model_name_or_path=config.base_model_name_or_path or str(base),
            base_model_revision=config.base_model_revision or base_revision,
            model_class=config.model_class or tuned.architecture,
            base_model_dtype=config.base_model_dtype
            or dominant_dtype(tuned_specs[p.name] for p in plans if p.fate != WHOLE),
        )

        def processed(plan: TensorPlan) -> TensorRecord:
            weight = tuned.read(plan.name).to(device)
            pretrained = None
            if plan.fate != WHOLE:
                pretrained = base_ckpt.read(plan.base_name).to(device)
            # the tensors are freed on return, before the record is compressed or sent
            return process_tensor(plan, weight, pretrained, config, max_memory=SELECTION_MEMORY)

        counted = {"kept": 0, "pruned": 0}

        def records() -> Iterator[TensorRecord]:
            """Each tensor's record in name order (the file's order), on the main process;
            each is freed before the next tensor is read."""
            with tqdm(
                total=sum(tuned.nbytes(p.name) for p in plans),
                desc="KEN prune",
                unit="B",
                unit_scale=True,
                disable=not (progress and team.main),
            ) as bar:
                for record in shared_records(
                    plans,
                    processed,
                    tuned_specs,
                    team=team,
                    every_rank_receives=False,
                    # other ranks' records wait here while this rank selects its own
                    budget=max((tuned.nbytes(p.name) for p in plans), default=0),
                ):
                    if record.plan.fate == PRUNED:
                        counted["kept"] += int(torch.count_nonzero(record.mask))
                        counted["pruned"] += record.mask.numel()
                    bar.update(tuned.nbytes(record.plan.name))
                    yield record
                    del record

        if not team.main:
            for _ in records():  # this rank's share, sent to the main process
                pass
            return team.broadcast(None)
        facts = write_folder(
            out,
            config,
            records(),
            model_config=tuned.config or None,
            processor_folder=tuned.folder,
            compression_level=compression_level,
            compression_threads=compression_threads,
        )
        return team.broadcast(
            {
                "tensors": len(plans),
                "matched": sum(p.base_name is not None for p in plans),
                "kept_fraction": counted["kept"] / counted["pruned"] if counted["pruned"] else 1.0,
                "bytes": facts.file_bytes,
            }
        )


def apply_checkpoint(
    base: str | os.PathLike,
    ken: str | os.PathLike,
    out: str | os.PathLike,
    *,
    max_shard_size: int = 5 * 10**9,
    progress: bool = True,
    subfolder: str | None = None,
    revision: str | None = None,
) -> dict:
    """Write base + subnetwork to ``out`` as a plain transformers checkpoint (sharded
    safetensors, the fine-tuned model's ``config.json``, tokenizer files), atomically.
    ``ken``: the subnetwork's folder or Hub id (in its ``subfolder``, at ``revision``).
    Every base tensor is checked against the subnetwork's fingerprints as it is read; a
    mismatch raises ``BaseMismatchError`` and leaves nothing at ``out``."""
    folder = resolve_folder(ken, subfolder=subfolder, revision=revision)
    config = KENConfig.from_pretrained(folder)
    reader, model_config_file = open_saved(folder, config)
    with (
        reader,
        Checkpoint(base, revision=config.base_model_revision) as base_ckpt,
    ):
        model_config = read_model_config(model_config_file) if model_config_file else {}
        names = list(reader.fingerprints) + [
            n for n in reader.names if n not in reader.fingerprints
        ]
        prefix = base_model_prefix_of(model_config) or base_ckpt.base_model_prefix
        pairs = match_names(reader.fingerprints, base_ckpt.names, prefix)
        missing = [n for n in reader.fingerprints if n not in pairs]
        if missing:
            raise BaseMismatchError(
                f"tensor {missing[0]!r} of the subnetwork's base is not in {base_ckpt.source} "
                f"({len(missing)} missing)"
            )
        _check_fits_checkpoint(reader, base_ckpt, pairs)
        stale = [WEIGHTS_NAME, INDEX_NAME, *_own_shards(Path(out))]
        with FolderWriter(out, commit=WEIGHTS_NAME) as target:
            with ShardedWriter(target, max_shard_size) as writer:
                for name in tqdm(names, desc="KEN apply", unit="tensor", disable=not progress):
                    writer.add(name, _merged(name, reader, base_ckpt, pairs))
            if model_config:
                target.write_text(MODEL_CONFIG_NAME, json.dumps(model_config, indent=2))
            has_tokenizer = confined_file(folder, "tokenizer_config.json") is not None
            side_files = [
                (folder if has_tokenizer else base_ckpt.folder, TOKENIZER_FILES),
                (base_ckpt.folder, ("generation_config.json",)),
            ]
            for source, side_names in side_files:
                for name in side_names:
                    path = confined_file(source, name)
                    if path is not None:
                        target.copy(path, name)
            target.remove_stale(stale)
        return {"tensors": len(names), "bytes": writer.total_bytes}


# Shards as transformers and ShardedWriter name them.
_SHARD = re.compile(r"model-\d{5}-of-\d{5}\.safetensors")


def _own_shards(out: Path) -> list[str]:
    """The shards of an earlier checkpoint in ``out`` that a new one replaces: the files its
    index names that carry a shard's name and are regular files of ``out`` itself. Anything
    else an index names (a path, a link, another file) is left alone."""
    index = out / INDEX_NAME
    if not index.is_file() or index.is_symlink():
        return []
    weight_map = read_json(index).get("weight_map")
    if not isinstance(weight_map, dict):
        return []
    return sorted(
        name
        for name in set(weight_map.values())
        if isinstance(name, str)
        and _SHARD.fullmatch(name)
        and (out / name).is_file()
        and not (out / name).is_symlink()
    )


def _check_fits_checkpoint(reader: SubnetworkReader, base: Checkpoint, pairs: dict) -> None:
    """Every tensor the subnetwork declares lands on a base tensor of the same shape and
    dtype, or, when the base lacks it, is no larger than the base's largest tensor: checked
    from the headers, before anything is decoded."""
    largest = max((math.prod(base.shape(n)) for n in base.names), default=0)
    for name in reader.names:
        entry = reader.entry(name)
        shape, dtype = tuple(entry["shape"]), VALUE_DTYPES[entry["dtype"]]
        if name in pairs:
            stored = pairs[name]
            rows = entry.get("rows")
            if rows is not None:  # grown (at most twofold): lands on the base's rows
                shape = (rows, *shape[1:])
            if base.shape(stored) != shape or base.dtype(stored) != dtype:
                raise BaseMismatchError(
                    f"tensor {name!r}: {base.source} holds {base.dtype(stored)} "
                    f"{list(base.shape(stored))}, the subnetwork declares {dtype} {list(shape)}"
                )
        elif math.prod(shape) > largest:
            raise BaseMismatchError(
                f"tensor {name!r}: the subnetwork declares {list(shape)}, larger than any "
                f"tensor of the base {base.source}"
            )


def inspect_subnetwork(
    path: str | os.PathLike, *, subfolder: str | None = None, revision: str | None = None
) -> dict:
    """What a subnetwork folder (or Hub id; in its ``subfolder``, at ``revision``) holds,
    from its config and file header."""
    folder = resolve_folder(
        path, allow_patterns=SUBNETWORK_FILES, subfolder=subfolder, revision=revision
    )
    config = KENConfig.from_pretrained(folder)
    reader, _ = open_saved(folder, config)
    with reader:
        facts, version = reader.facts(), reader.version
        counts = facts.counts
        tensors = {
            name: {key: reader.entry(name).get(key) for key in ("kind", "shape", "dtype", "count")}
            for name in reader.names
        }
    pruned = counts["pruned_values"]
    return {
        "folder": str(folder),
        "base": config.base_model_name_or_path,
        "base_revision": config.base_model_revision,
        "model_class": config.model_class,
        "k": config.k,
        "keep_ratio": config.keep_ratio,
        "rule": config.rule,
        "compat": config.compat,
        "format_version": version,
        "library_version": config.library_version,
        **counts,
        "kept_fraction": counts["kept_values"] / pruned if pruned else 1.0,
        "bytes": facts.file_bytes,
        "tensors": tensors,
    }


def _merged(name: str, reader: SubnetworkReader, base: Checkpoint, pairs: dict) -> torch.Tensor:
    """Tensor ``name`` of the fine-tuned model rebuilt: stored whole, or the base tensor
    (checked against its fingerprint) with the kept values written in."""
    if name not in pairs:
        return reader.read(name)
    tensor = base.read(pairs[name])
    if tensor_fingerprint(tensor) != reader.fingerprints[name]:
        raise BaseMismatchError(
            f"tensor {name!r} of {base.source} differs from the base this subnetwork was made "
            "from (another model, revision, dtype or a changed value)"
        )
    if name in reader.names:
        stored = reader.read(name)
        if isinstance(stored, PrunedTensor):
            flat, where = tensor.view(-1), stored.written_positions()
            flat.index_copy_(0, where, stored.written_values(flat.index_select(0, where)))
            if stored.added is not None:  # a vocabulary that gained tokens: the new rows
                tensor = torch.cat([tensor, stored.added])
        else:
            tensor = stored
    return tensor
