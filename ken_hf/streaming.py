"""KEN checkpoint to checkpoint, a tensor at a time, for models larger than memory.

``prune_checkpoints`` reads a base and a fine-tuned checkpoint tensor by tensor and writes
the subnetwork folder (the format of ``KENSubnetwork.save_pretrained``); ``apply_checkpoint``
writes base + subnetwork as a plain sharded checkpoint for servers that do not know KEN;
``inspect_subnetwork`` reports what a subnetwork holds from its headers alone.

Memory: at most the two versions of one tensor, its mask (one byte per value), its kept
values and the selection's working memory (``max_memory``) at a time.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from tqdm.auto import tqdm

from .card import model_card
from .checkpoints import (
    TOKENIZER_FILES,
    Checkpoint,
    CheckpointError,
    base_model_prefix_of,
    copy_side_files,
    match_names,
    read_json,
)
from .config import KENConfig
from .fingerprint import tensor_fingerprint
from .io import atomic_folder, write_text_atomic
from .selection import select_by_rule
from .selection.rows import as_rows
from .serialization import (
    FORMAT_VERSION,
    SUBNETWORK_NAME,
    PrunedTensor,
    SubnetworkReader,
    SubnetworkWriter,
)
from .subnetwork import BaseMismatchError, delta_statistics, placement

FLOATING = (torch.float64, torch.float32, torch.float16, torch.bfloat16)
# Working memory of the selection, per tensor: half the library default, so that the whole
# run stays within two copies of the largest tensor plus 1 GiB, start-up included.
SELECTION_MEMORY = 128 * 2**20


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
) -> dict:
    """Select the KEN subnetwork of checkpoint ``finetuned`` against checkpoint ``base`` and
    write it to the folder ``out`` (atomically: a killed run leaves no folder there).

    Every floating-point tensor of the fine-tune is pruned, stored whole (``modules_to_save``,
    or absent from the base) or left to the base, as in ``KENSubnetwork.from_weights``.
    All checks (names in common, shapes, dtypes) run before any selection.
    Returns counts and sizes of what was written.
    """
    with (
        Checkpoint(base, revision=base_revision) as base_ckpt,
        Checkpoint(finetuned, revision=finetuned_revision) as tuned,
    ):
        names = [n for n in tuned.names if tuned.dtype(n) in FLOATING]
        if not names:
            raise CheckpointError(f"{tuned.source}: no floating-point tensors")
        pairs = match_names(
            names, base_ckpt.names, tuned.base_model_prefix or base_ckpt.base_model_prefix
        )
        _check_pairs(pairs, base_ckpt, tuned)
        config = _recorded(config, base, base_revision, tuned.architecture)
        kept = total_pruned = 0
        with atomic_folder(out) as staging:
            with (
                SubnetworkWriter(staging / SUBNETWORK_NAME) as writer,
                tqdm(
                    total=sum(tuned.nbytes(n) for n in names),
                    desc="KEN prune",
                    unit="B",
                    unit_scale=True,
                    disable=not progress,
                ) as bar,
            ):
                for name in names:
                    weight = tuned.read(name).to(device)
                    fate = placement(name, config, in_base=name in pairs)
                    if fate == "whole":
                        writer.add_whole(name, weight)
                    else:
                        pretrained = base_ckpt.read(pairs[name])
                        writer.fingerprints[name] = tensor_fingerprint(pretrained)
                        if fate == "pruned":
                            pretrained = pretrained.to(device)
                            mask = _select(name, weight, pretrained, config)
                            delta = delta_statistics(weight, pretrained, mask)
                            del pretrained  # free it before the kept values are gathered
                            kept += writer.add_pruned_mask(name, mask, weight, delta)
                            total_pruned += weight.numel()
                    bar.update(tuned.nbytes(name))
            config.save_pretrained(staging)
            if tuned.config:
                write_text_atomic(staging / "config.json", json.dumps(tuned.config, indent=2))
            copy_side_files(tuned.folder, staging, TOKENIZER_FILES)
            write_text_atomic(staging / "README.md", model_card(config, staging))
        return {
            "tensors": len(names),
            "matched": len(pairs),
            "kept_fraction": kept / total_pruned if total_pruned else 1.0,
            "bytes": (Path(out) / SUBNETWORK_NAME).stat().st_size,
        }


def apply_checkpoint(
    base: str | os.PathLike,
    ken: str | os.PathLike,
    out: str | os.PathLike,
    *,
    max_shard_size: int = 5 * 10**9,
    progress: bool = True,
    revision: str | None = None,
) -> dict:
    """Write base + subnetwork to ``out`` as a plain transformers checkpoint (sharded
    safetensors, the fine-tuned model's ``config.json``, tokenizer files), atomically.
    Every base tensor is checked against the subnetwork's fingerprints as it is read; a
    mismatch raises ``BaseMismatchError`` and leaves nothing at ``out``."""
    from .hub import resolve_folder
    from .safetensors_stream import ShardedWriter

    folder = resolve_folder(ken, revision=revision)
    config = KENConfig.from_pretrained(folder)
    with (
        SubnetworkReader(folder / SUBNETWORK_NAME) as reader,
        Checkpoint(base, revision=config.base_model_revision) as base_ckpt,
    ):
        has_config = (folder / "config.json").is_file()
        model_config = read_json(folder / "config.json") if has_config else {}
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
        with atomic_folder(out) as staging:
            writer = ShardedWriter(staging, max_shard_size)
            try:
                for name in tqdm(names, desc="KEN apply", unit="tensor", disable=not progress):
                    writer.add(name, _merged(name, reader, base_ckpt, pairs))
                writer.close()
            except BaseException:
                writer.abort()
                raise
            if model_config:
                write_text_atomic(staging / "config.json", json.dumps(model_config, indent=2))
            tokenizer_source = folder if (folder / "tokenizer_config.json").is_file() else None
            copy_side_files(tokenizer_source or base_ckpt.folder, staging, TOKENIZER_FILES)
            copy_side_files(base_ckpt.folder, staging, ("generation_config.json",))
        return {"tensors": len(names), "bytes": writer.total_bytes}


def inspect_subnetwork(path: str | os.PathLike, *, revision: str | None = None) -> dict:
    """What a subnetwork folder (or Hub id) holds, from its config and file header."""
    from .hub import resolve_folder

    folder = resolve_folder(path, revision=revision)
    config = KENConfig.from_pretrained(folder)
    with SubnetworkReader(folder / SUBNETWORK_NAME) as reader:
        counts = reader.summary()
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
        "format_version": FORMAT_VERSION,
        "library_version": config.library_version,
        **counts,
        "kept_fraction": counts["kept_values"] / pruned if pruned else 1.0,
        "bytes": (folder / SUBNETWORK_NAME).stat().st_size,
        "tensors": tensors,
    }


def _select(name: str, weight: torch.Tensor, pretrained: torch.Tensor, config: KENConfig):
    k = config.k_for(as_rows(weight).shape[1])
    return select_by_rule(
        {name: weight},
        k,
        rule=config.rule,
        pretrained={name: pretrained},
        compat=config.compat,
        seed=config.seed,
        max_memory=SELECTION_MEMORY,
    )[name]


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
            tensor.view(-1).index_copy_(0, stored.positions, stored.values.to(tensor.dtype))
        else:
            tensor = stored
    return tensor


def _check_pairs(pairs: dict[str, str], base: Checkpoint, tuned: Checkpoint) -> None:
    if not pairs:
        raise CheckpointError(
            f"{base.source} and {tuned.source} have no tensor in common: not a base and "
            "its fine-tune"
        )
    for name, base_name in pairs.items():
        if base.shape(base_name) != tuned.shape(name):
            raise CheckpointError(
                f"tensor {name!r}: base shape {base.shape(base_name)} differs from fine-tuned "
                f"shape {tuned.shape(name)}"
            )
        if base.dtype(base_name) != tuned.dtype(name):
            raise CheckpointError(
                f"tensor {name!r}: base dtype {base.dtype(base_name)} differs from fine-tuned "
                f"dtype {tuned.dtype(name)} (convert one checkpoint first)"
            )


def _recorded(config: KENConfig, base, revision: str | None, architecture: str | None):
    """``config`` with the base and model class filled in where the user left them out."""
    import dataclasses

    return dataclasses.replace(
        config,
        base_model_name_or_path=config.base_model_name_or_path or str(base),
        base_model_revision=config.base_model_revision or revision,
        model_class=config.model_class or architecture,
    )
