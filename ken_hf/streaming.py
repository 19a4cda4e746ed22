"""KEN checkpoint to checkpoint, a tensor at a time, for models larger than memory.

``prune_checkpoints`` reads a base and a fine-tuned checkpoint tensor by tensor and writes
the subnetwork folder (the format of ``KENSubnetwork.save_pretrained``); ``apply_checkpoint``
writes base + subnetwork as a plain sharded checkpoint for servers that do not know KEN;
``inspect_subnetwork`` reports what a subnetwork holds from its headers alone.

Memory: at most the two versions of one tensor, its mask (one byte per value), its kept
values and the selection's working memory (``max_memory``) at a time. Under a distributed
launcher (``ken_hf.distributed``) each rank holds that for its own tensors, and the main
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
import struct
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch
import xxhash
from tqdm.auto import tqdm

from .atomic_files import FolderWriter
from .checkpoints import (
    INDEX_NAME,
    TOKENIZER_FILES,
    WEIGHTS_NAME,
    Checkpoint,
    base_model_prefix_of,
    match_names,
    read_json,
    read_model_config,
)
from .config import KENConfig
from .confined import confined_file
from .delta_codec import BITS_DTYPES, DEFAULT_LEVEL, DEFAULT_THREADS, pack_bits, unpack_bits
from .distributed import Inbox, Outbox, Team, share_by_size
from .fingerprint import tensor_fingerprint
from .hub import resolve_folder
from .pipeline import (
    PRUNED,
    RESET,
    WHOLE,
    TensorPlan,
    TensorRecord,
    dominant_dtype,
    plan_tensors,
    process_tensor,
)
from .safetensors_io import ShardedWriter
from .serialization import (
    PrunedTensor,
    SubnetworkReader,
)
from .subnetwork import BaseMismatchError
from .subnetwork_folder import MODEL_CONFIG_NAME, SUBNETWORK_FILES, open_saved, write_folder
from .subnetwork_format import VALUE_DTYPES

# Working memory of the selection, per tensor: half the library default, so that the whole
# run stays within two copies of the largest tensor plus 1 GiB, start-up included.
SELECTION_MEMORY = 128 * 2**20


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

    The pipeline's plan (``ken_hf.pipeline``) is made from the headers, so every check
    (names in common, shapes, dtypes) runs before any selection; tensors only in the
    fine-tune are stored whole. ``compression_level`` / ``compression_threads``: as in
    ``KENSubnetwork.save_pretrained``. Returns counts and sizes of what was written.

    In a joined torch.distributed group (``ken prune`` under torchrun or ``accelerate
    launch``: ``ken_hf.distributed``), every rank reads the headers and plans, the tensors
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
        owners = _owners(plans, sizes, team.world)
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

        if not team.main:
            _send_share([p for p in plans if owners[p.name] == team.rank], processed, team)
            return team.broadcast(None)
        counted = {"kept": 0, "pruned": 0}

        def records() -> Iterator[TensorRecord]:
            """Each tensor's record in name order (the file's order): this rank's selected
            here, the others' received; each is freed before the next tensor is read."""
            with tqdm(
                total=sum(tuned.nbytes(p.name) for p in plans),
                desc="KEN prune",
                unit="B",
                unit_scale=True,
                disable=not progress,
            ) as bar:
                # Records of the other ranks wait here while this rank selects its own; no
                # more than the largest tensor's bytes of them.
                inbox = Inbox(
                    team,
                    [owners[p.name] for p in plans if owners[p.name] != team.rank],
                    max((tuned.nbytes(p.name) for p in plans), default=0),
                )
                for plan in plans:
                    if owners[plan.name] == team.rank:
                        inbox.check()
                        record = processed(plan)
                    else:
                        record = _received(plan, tuned_specs[plan.name], inbox.get())
                    if plan.fate == PRUNED:
                        counted["kept"] += int(torch.count_nonzero(record.mask))
                        counted["pruned"] += record.mask.numel()
                    yield record
                    del record
                    bar.update(tuned.nbytes(plan.name))

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


def _owners(plans: list[TensorPlan], sizes: dict[str, int], world: int) -> dict[str, int]:
    """The rank that processes each tensor. Tensors stored whole go to the main process,
    which compresses and writes them anyway (sending them would move whole tensors); the
    others, in name order (the order the main process writes in), each to the rank with
    the fewest values so far, so that no rank runs far ahead of the writer."""
    # Grown tensors too: the records other ranks send carry no added rows.
    on_main = [p.fate == WHOLE or p.base_rows is not None for p in plans]
    whole = [p for p, main in zip(plans, on_main, strict=True) if main]
    shared = [p for p, main in zip(plans, on_main, strict=True) if not main]
    load = [sum(sizes[p.name] for p in whole)] + [0] * (world - 1)
    owners = share_by_size([sizes[p.name] for p in shared], world, load)
    return {p.name: 0 for p in whole} | {p.name: r for p, r in zip(shared, owners, strict=True)}


def _send_share(mine: list[TensorPlan], processed, team: Team) -> None:
    """A rank other than the main one: process the tensors ``mine`` in name order and send
    each record to the main process while the next is processed; an error is sent instead
    of the record, then raised."""
    outbox = Outbox(team)
    for plan in mine:
        try:
            payload = _payload(processed(plan))
        except Exception as error:
            outbox.send_error(f"on tensor {plan.name!r}: {type(error).__name__}: {error}")
            raise
        outbox.send(payload)
    outbox.flush()


def _payload(record: TensorRecord) -> bytes:
    """What the main process needs to write a ``PRUNED`` or ``RESET`` record: an 8-byte
    length and a JSON header (fingerprint; for a pruned tensor its delta statistics, kept
    count and array sizes), then the mask ``[numel]`` and the changed flags ``[K]`` as
    packed bits and the differences ``[C]``' bytes: about one bit per value plus the kept
    values' changes, never a whole tensor."""
    header: dict = {"fingerprint": record.fingerprint}
    arrays: list[bytes] = []
    if record.mask is not None:
        arrays = [
            pack_bits(record.mask),
            pack_bits(record.changed),
            record.difference.numpy().tobytes(),
        ]
        header |= {
            "delta": record.delta,
            "kept": int(record.changed.numel()),
            "sizes": [len(a) for a in arrays],
        }
    text = json.dumps(header).encode()
    return b"".join([struct.pack("<Q", len(text)), text, *arrays])


def _received(plan: TensorPlan, spec, payload: bytes) -> TensorRecord:
    """The record ``_payload`` sent, for the writer; ``spec``: the fine-tuned tensor's
    (shape, dtype)."""
    shape, dtype = spec
    (length,) = struct.unpack_from("<Q", payload)
    header = json.loads(payload[8 : 8 + length])
    # The writer reads only the fine-tuned tensor's shape and dtype: a stand-in, no values.
    finetuned = torch.empty((), dtype=dtype).expand(shape)
    if plan.fate == RESET:
        return TensorRecord(plan, finetuned, fingerprint=header["fingerprint"])
    start, parts = 8 + length, []
    for size in header["sizes"]:
        parts.append(payload[start : start + size])
        start += size
    mask, changed, difference = parts
    return TensorRecord(
        plan,
        finetuned,
        mask=unpack_bits(mask, math.prod(shape)).reshape(shape),
        fingerprint=header["fingerprint"],
        delta=header["delta"],
        changed=unpack_bits(changed, header["kept"]),
        difference=torch.from_numpy(np.frombuffer(difference, dtype=np.uint8).copy()).view(
            BITS_DTYPES[dtype]
        ),
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
