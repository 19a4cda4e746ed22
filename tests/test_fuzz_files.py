"""Property-based fuzzing (hypothesis) of the files of a saved subnetwork folder.

Starting from a valid folder (a small KEN subnetwork of the real all-MiniLM-L6-v2), each
example makes structured mutations of one part: the safetensors header, the KEN document in
its metadata, the entries of that document, the zstd frames and arrays, ``ken_config.json``
(and the other files of the folder); a last test stacks mutations of every part. After a
mutation the file is made consistent again wherever an attacker could: the array
checksums, the document digest and the ``subnetwork_digest`` of ``ken_config.json`` are
recomputed, unless the mutation is about corrupting them.

The property: ``KENConfig.from_pretrained``, ``inspect_subnetwork`` and
``KENSubnetwork.from_pretrained`` on the folder, then applying what loaded to the real base
model (``KENModel.add_subnetwork`` + ``set_subnetwork``, then ``delete_subnetwork``), either
succeed or raise an error of ken-hf's family (``KENError``; ``OSError`` for the file
system). Any other exception fails the example. What loads must apply to the base or be
refused with a ``KENError``, keep distinct positions inside its tensors, and taking it off
must give the base back bit for bit.

``make test`` runs 600 derandomized examples per test (3,000 in all, about a minute);
``make fuzz`` sets ``KEN_HF_FUZZ_EXAMPLES`` for that many per test, randomized (a failure
prints the ``@reproduce_failure`` blob that replays it). Frames declare at most 512 MiB of
content; documents may declare any size, which the library must refuse before allocating
it (it decodes tensors only once their declared shapes matched the model's).
"""

from __future__ import annotations

import copy
import json
import math
import os
import struct
import tempfile
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pytest
import torch
import xxhash
import zstandard
from hypothesis import HealthCheck, currently_in_test_context, event, given, note, settings
from hypothesis import strategies as st
from transformers import AutoModelForSequenceClassification

from ken_hf import KENConfig, KENModel, KENSubnetwork
from ken_hf.errors import KENError
from ken_hf.experiments.assets import minilm_path
from ken_hf.making.from_checkpoints import inspect_subnetwork

# -- settings ------------------------------------------------------------------------------
# `make test`: EXAMPLES per test, derandomized (the same examples on every run, no database).
# `make fuzz` (KEN_HF_FUZZ_EXAMPLES=N): N per test, random; a failure prints its blob.
EXAMPLES = 600
FUZZ_EXAMPLES = int(os.environ.get("KEN_HF_FUZZ_EXAMPLES", "0") or 0)
FUZZ = settings(
    max_examples=FUZZ_EXAMPLES or EXAMPLES,
    derandomize=not FUZZ_EXAMPLES,
    database=None,
    print_blob=True,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
FAMILY = (KENError, OSError)

# -- the valid folder everything starts from --------------------------------------------------
SUBNETWORK = "ken_subnetwork.safetensors"
CONFIG = "ken_config.json"
MODEL_CONFIG = "config.json"
PREVIOUS = f".{SUBNETWORK}.previous"  # an interrupted save's previous version (atomic_files)
TARGETS = [
    "embeddings.token_type_embeddings",  # [2, 384]: mask encoding
    "layer.0.attention.output.LayerNorm",  # [384] weight and bias: mask encoding
    "layer.0.intermediate.dense.bias",  # [1536]: index list (uint16)
]
NEW = ["classifier.weight", "classifier.bias"]  # whole: zstd planes, and raw (codec none)
PRUNED = [
    "bert.embeddings.token_type_embeddings.weight",
    "bert.encoder.layer.0.attention.output.LayerNorm.bias",
    "bert.encoder.layer.0.attention.output.LayerNorm.weight",
    "bert.encoder.layer.0.intermediate.dense.bias",
]
WHOLE = sorted(NEW)
TENSORS = sorted(PRUNED + WHOLE)
PARTS = ("kept", "changed", "difference")
ARRAYS = [f"pruned.{n}.{p}" for n in PRUNED for p in PARTS] + [f"whole.{n}" for n in WHOLE]
ITEMSIZE = {"float32": 4, "float16": 2, "bfloat16": 2, "float64": 8}
FLOAT_NAMES = list(ITEMSIZE)
UNSIGNED = {1: np.uint8, 2: np.uint16, 4: np.uint32, 8: np.uint64}
ENTRY_KEYS = ["kind", "shape", "dtype", "count", "changed", "encoding", "sizes", "delta"]
ENTRY_KEYS += ["checksums", "codec"]
CONFIG_FIELDS = [
    "k",
    "keep_ratio",
    "target_modules",
    "exclude_modules",
    "modules_to_save",
    "compat",
    "rule",
    "seed",
    "base_model_name_or_path",
    "base_model_revision",
    "base_model_dtype",
    "model_class",
    "subnetwork_digest",
    "library_version",
]


@dataclass
class Array:
    """One array of the safetensors file: dtype name, shape, bytes."""

    dtype: str
    shape: list
    data: bytes


@dataclass(repr=False)
class Template:
    """The valid folder, taken apart; and the base model it applies to."""

    saved: dict[str, bytes]  # every file of the folder as saved
    files: dict[str, bytes]  # those besides the subnetwork file and ken_config.json
    arrays: dict[str, Array]
    metadata: dict[str, str]  # format and version (ken and digest are computed)
    document: dict
    digest: str
    config: dict
    decoded: dict[str, tuple[np.ndarray, np.ndarray, np.ndarray]]
    model: KENModel
    pristine: dict[str, torch.Tensor]

    def __repr__(self) -> str:  # shown with every failing example: keep it short
        return f"<template folder: {len(self.arrays)} arrays>"

    def _repr_pretty_(self, printer, cycle) -> None:  # what hypothesis prints
        printer.text(repr(self))


@dataclass
class Draft:
    """A folder being mutated; ``write`` makes it consistent where asked and writes it."""

    template: Template
    arrays: dict[str, Array]
    metadata: dict
    document: object
    config: object
    files: dict[str, bytes]
    fix_sums: bool = True  # recompute the entries' checksums from the arrays
    fix_digest: bool = True  # set the metadata digest to the document's
    fix_config_digest: bool = True  # set ken_config.json's subnetwork_digest to the file's
    document_text: str | None = None  # the document, verbatim
    header_edits: list = field(default_factory=list)  # (header dict, data length) -> None
    header_text_edits: list = field(default_factory=list)  # header JSON text -> text
    file_edits: list = field(default_factory=list)  # safetensors bytes -> bytes
    config_bytes: bytes | None = None  # ken_config.json, verbatim
    raw: dict = field(default_factory=dict)  # marker string -> JSON text put in its place
    extra: dict = field(default_factory=dict)  # name -> bytes | "dir" | ("link", bytes)


@dataclass(frozen=True)
class Mutation:
    kind: str
    detail: str
    edit: Callable[[Draft], None] = field(repr=False, compare=False)

    def __repr__(self) -> str:
        return f"<{self.kind}: {self.detail}>"

    def _repr_pretty_(self, printer, cycle) -> None:
        printer.text(repr(self))


def mutation(kind: str, detail: object, edit: Callable[[Draft], None]) -> Mutation:
    text = detail if isinstance(detail, str) else repr(detail)
    return Mutation(
        kind, text if len(text) <= 160 else f"{text[:150]}... ({len(text)} chars)", edit
    )


# -- building files -----------------------------------------------------------------------------
def checksum(data: bytes, shape: list) -> str:
    """The format's checksum of a stored array: xxh3 of the entry's shape, then the bytes."""
    hasher = xxhash.xxh3_64(repr(list(shape)).encode())
    hasher.update(data)
    return hasher.hexdigest()


def stored_keys(name: str, entry: dict) -> list[str]:
    if entry.get("kind") == "whole":
        return [f"whole.{name}"]
    return [f"pruned.{name}.{part}" for part in PARTS]


def raw_json(draft: Draft, text: str) -> str:
    """A marker to put in a JSON value of the draft; ``write`` puts ``text`` in its place
    (deep nesting, a long integer literal, NaN...)."""
    marker = f"\u0001raw{len(draft.raw)}\u0001"
    draft.raw[marker] = text
    return marker


def dumps(draft: Draft, value, **options) -> str:
    text = json.dumps(value, **options)
    for marker, raw in draft.raw.items():
        text = text.replace(json.dumps(marker), raw)
    return text


def fix_checksums(draft: Draft) -> None:
    document = draft.document
    if not isinstance(document, dict) or not isinstance(document.get("tensors"), dict):
        return
    for name, entry in document["tensors"].items():
        if not isinstance(entry, dict) or not isinstance(entry.get("shape"), list):
            continue
        keys = stored_keys(name, entry)
        if all(key in draft.arrays for key in keys):
            entry["checksums"] = [checksum(draft.arrays[k].data, entry["shape"]) for k in keys]


def write(draft: Draft, folder: Path) -> None:
    """The folder of ``draft``: safetensors file, ken_config.json, other files."""
    if draft.fix_sums:
        fix_checksums(draft)
    text = draft.document_text
    if text is None:
        text = dumps(draft, draft.document, sort_keys=True)
    digest = xxhash.xxh3_64_hexdigest(text.encode("utf-8", "surrogatepass"))
    metadata = dict(draft.metadata)
    metadata["ken"] = text
    if draft.fix_digest:
        metadata["digest"] = digest
    header, data, offset = {}, bytearray(), 0
    for key, array in draft.arrays.items():
        header[key] = {
            "dtype": array.dtype,
            "shape": array.shape,
            "data_offsets": [offset, offset + len(array.data)],
        }
        data += array.data
        offset += len(array.data)
    header["__metadata__"] = metadata
    for edit in draft.header_edits:
        edit(header, len(data))
    header_text = dumps(draft, header, separators=(",", ":"))
    for edit in draft.header_text_edits:
        header_text = edit(header_text)
    raw = header_text.encode("utf-8", "surrogatepass")
    raw += b" " * (-len(raw) % 8)
    content = struct.pack("<Q", len(raw)) + raw + bytes(data)
    for edit in draft.file_edits:
        content = edit(content)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / SUBNETWORK).write_bytes(content)
    config = draft.config
    if draft.fix_config_digest and isinstance(config, dict):
        stored = metadata.get("digest") if isinstance(metadata, dict) else None
        usable = isinstance(stored, str) and stored not in draft.raw
        config["subnetwork_digest"] = stored if usable else digest
    config_bytes = draft.config_bytes
    if config_bytes is None:
        text = dumps(draft, config, indent=2, sort_keys=True) + "\n"
        config_bytes = text.encode("utf-8", "surrogatepass")
    (folder / CONFIG).write_bytes(config_bytes)
    for name, content in {**draft.files, **draft.extra}.items():
        path = folder / name
        if path.is_dir():
            continue
        path.unlink(missing_ok=True)
        if content == "dir":
            path.mkdir()
        elif isinstance(content, tuple):  # a symbolic link to a file outside the folder
            outside = folder.parent / f"outside-{name}"
            outside.write_bytes(content[1])
            path.symlink_to(outside)
        elif content is not None:
            path.write_bytes(content)


def new_draft(template: Template) -> Draft:
    return Draft(
        template=template,
        arrays=dict(template.arrays),
        metadata=dict(template.metadata),
        document=copy.deepcopy(template.document),
        config=copy.deepcopy(template.config),
        files=dict(template.files),
    )


def parse_safetensors(content: bytes) -> tuple[dict[str, Array], dict[str, str]]:
    (length,) = struct.unpack("<Q", content[:8])
    header = json.loads(content[8 : 8 + length])
    metadata = header.pop("__metadata__")
    arrays = {}
    for key, record in header.items():
        begin, end = (8 + length + offset for offset in record["data_offsets"])
        arrays[key] = Array(record["dtype"], record["shape"], content[begin:end])
    return arrays, metadata


def index_size(numel: int) -> int:
    """Bytes of the narrowest index type of the format for ``numel`` positions."""
    for size, limit in ((1, 2**8), (2, 2**16), (4, 2**32)):
        if numel <= limit:
            return size
    return 8


def expected_sizes(entry: dict) -> list[int] | None:
    """The raw sizes a pruned entry's counts call for (None if they are not numbers)."""
    shape, dtype = entry.get("shape"), entry.get("dtype")
    count, changed = entry.get("count"), entry.get("changed")
    ints = [*shape, count, changed] if isinstance(shape, list) else []
    if not ints or not all(type(v) is int for v in ints) or ITEMSIZE.get(str(dtype)) is None:
        return None
    numel = math.prod(shape)
    kept = -(-numel // 8) if entry.get("encoding") == "mask" else count * index_size(numel)
    return [kept, -(-count // 8), changed * ITEMSIZE[dtype]]


def compress(data: bytes, **options) -> bytes:
    return zstandard.ZstdCompressor(level=1, **options).compress(data)


def decompress(frame: bytes) -> bytes:
    return zstandard.ZstdDecompressor().decompressobj().decompress(frame)


def decode(entry: dict, arrays: dict[str, Array], name: str) -> tuple:
    """A valid pruned entry's positions, changed flags and (unsigned) bit differences."""
    numel, count = math.prod(entry["shape"]), entry["count"]
    kept, changed, difference = (decompress(arrays[f"pruned.{name}.{p}"].data) for p in PARTS)
    if entry["encoding"] == "mask":
        bits = np.unpackbits(np.frombuffer(kept, np.uint8), count=numel, bitorder="little")
        positions = np.flatnonzero(bits)
    else:
        positions = np.frombuffer(kept, UNSIGNED[index_size(numel)]).astype(np.int64)
    flags = np.unpackbits(np.frombuffer(changed, np.uint8), count=count, bitorder="little")
    itemsize = ITEMSIZE[entry["dtype"]]
    planes = np.frombuffer(difference, np.uint8).reshape(itemsize, -1)
    values = np.ascontiguousarray(planes.T).reshape(-1).view(UNSIGNED[itemsize])
    return positions, flags.astype(bool), values


def encode(draft: Draft, name: str, shape: list, dtype: str, positions, flags, values, encoding):
    """Store a pruned tensor consistently: arrays, counts, sizes (checksums: by ``write``)."""
    numel, itemsize = math.prod(shape), ITEMSIZE[dtype]
    count, size = len(positions), index_size(numel)
    if encoding is None:
        encoding = "indices" if count * size < -(-numel // 8) else "mask"
    if encoding == "mask":
        bits = np.zeros(numel, dtype=bool)
        bits[positions] = True
        kept = np.packbits(bits, bitorder="little").tobytes()
    else:
        kept = positions.astype(UNSIGNED[size] if size < 8 else np.int64).tobytes()
    changed = np.packbits(flags, bitorder="little").tobytes()
    raw = values.astype(UNSIGNED[itemsize]).view(np.uint8).reshape(-1, itemsize)
    planes = np.ascontiguousarray(raw.T).tobytes()
    for part, data in zip(PARTS, (kept, changed, planes), strict=True):
        frame = compress(data)
        draft.arrays[f"pruned.{name}.{part}"] = Array("U8", [len(frame)], frame)
    entry = draft.document["tensors"].setdefault(name, {})
    entry.update(kind="pruned", shape=list(shape), dtype=dtype, count=count, encoding=encoding)
    entry.update(changed=int(flags.sum()), sizes=[len(kept), len(changed), len(planes)])
    entry.setdefault("delta", [None, None])


# -- the property ---------------------------------------------------------------------------
def tally(label: str) -> None:
    """Count ``label`` in hypothesis's statistics (``--hypothesis-show-statistics``)."""
    if currently_in_test_context():
        event(label)


def family(call, *args):
    """``call(*args)``, or None when it refuses with an error of ken-hf's family."""
    try:
        return call(*args)
    except FAMILY:
        return None


def bits(tensor: torch.Tensor) -> torch.Tensor:
    view = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}
    return tensor.detach().contiguous().view(view[tensor.element_size()])


def check_applies(subnetwork: KENSubnetwork, template: Template) -> None:
    """What loaded applies to the base or is refused with an error of the family; applied,
    its positions are distinct and inside their tensors; taken off, the base is back bit
    for bit. (Tensors of a file may be decoded only when applied: after the library has
    checked the declared shapes against the model's.)"""
    model = template.model
    parameters = dict(model.model.named_parameters())
    touched = [n for n in parameters if n in subnetwork.pruned or n in subnetwork.whole]
    try:
        try:
            model.add_subnetwork("fuzz", subnetwork)
            model.set_subnetwork("fuzz")
        except FAMILY:
            pass
        else:
            tally("applied")
            for name, pruned in subnetwork.pruned.items():
                positions, numel = pruned.positions, pruned.shape.numel()
                assert positions.dim() == 1 and positions.numel() <= numel, name
                if positions.numel():
                    assert 0 <= int(positions.min()) and int(positions.max()) < numel, name
                    assert int(pruned.mask().sum()) == positions.numel(), f"{name}: repeats"
        finally:
            if "fuzz" in model.subnetworks:
                model.delete_subnetwork("fuzz")
        for name in touched:
            restored = torch.equal(bits(parameters[name]), bits(template.pristine[name]))
            assert restored, f"{name} is not the base again after delete_subnetwork"
    finally:
        with torch.no_grad():
            for name in touched:  # whatever happened, the next example starts from the base
                parameters[name].copy_(template.pristine[name])


def check_folder(folder: Path, template: Template) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # a warning is no error, whatever -W says
        family(KENConfig.from_pretrained, folder)
        family(inspect_subnetwork, folder)
        subnetwork = family(KENSubnetwork.from_pretrained, folder)
        if subnetwork is not None:
            tally("loaded")
            check_applies(subnetwork, template)


def run(template: Template, mutations: list[Mutation]) -> None:
    draft = new_draft(template)
    for one in mutations:
        note(repr(one))
        tally(one.kind)
        one.edit(draft)
    with tempfile.TemporaryDirectory(prefix="ken-fuzz-") as scratch:
        folder = Path(scratch) / "ken"
        write(draft, folder)
        check_folder(folder, template)


@pytest.fixture(scope="module")
def template(tmp_path_factory) -> Template:
    """A small subnetwork of all-MiniLM-L6-v2 (four pruned tensors: mask and index
    encodings, one of two dimensions; a new head stored whole, zstd and raw), saved."""
    torch.manual_seed(0)
    base = AutoModelForSequenceClassification.from_pretrained(minilm_path(), num_labels=2).eval()
    tuned = copy.deepcopy(base)
    generator = torch.Generator().manual_seed(1)
    parameters = dict(tuned.named_parameters())
    with torch.no_grad():
        for name in PRUNED + NEW:  # about half the values of each changed a little
            parameter = parameters[name]
            noise = torch.randn(parameter.shape, generator=generator) * 1e-2
            parameter.add_(noise * (torch.rand(parameter.shape, generator=generator) < 0.5))
    config = KENConfig(k=30, target_modules=TARGETS)
    subnetwork = KENSubnetwork.from_weights(base, tuned, config, new_tensors=NEW, progress=False)
    folder = tmp_path_factory.mktemp("fuzz-template") / "ken"
    subnetwork.save_pretrained(folder)
    saved = {p.name: p.read_bytes() for p in folder.iterdir()}
    files = dict(saved)
    arrays, metadata = parse_safetensors(files.pop(SUBNETWORK))
    document = json.loads(metadata.pop("ken"))
    digest = metadata.pop("digest")
    config_values = json.loads(files.pop(CONFIG))
    assert sorted(document["tensors"]) == TENSORS and list(arrays) == ARRAYS
    encodings = [document["tensors"][n]["encoding"] for n in PRUNED]
    assert encodings == ["mask", "mask", "mask", "indices"]
    assert [document["tensors"][n]["codec"] for n in WHOLE] == ["none", "zstd"]
    decoded = {n: decode(document["tensors"][n], arrays, n) for n in PRUNED}
    model = KENModel(base)
    pristine = {n: p.detach().clone() for n, p in base.named_parameters()}
    return Template(
        saved, files, arrays, metadata, document, digest, config_values, decoded, model, pristine
    )


# -- values ---------------------------------------------------------------------------------
HUGE = [2**31 - 1, 2**31, 2**32, 2**32 + 1, 2**53 + 1, 2**62, 2**63 - 1, 2**63, 2**64, 10**30]
NEGATIVE = [-1, -8, -(2**31), -(2**63), -(2**64)]
numbers = st.one_of(
    st.integers(-10, 70_000), st.sampled_from(HUGE + NEGATIVE), st.floats(), st.booleans()
)
junk = st.one_of(
    st.none(),
    numbers,
    st.text(max_size=12),
    st.lists(st.integers(-2, 5), max_size=3),
    st.lists(st.lists(st.integers(0, 3), max_size=2), min_size=1, max_size=2),
    st.dictionaries(st.text(max_size=4), st.integers(0, 3), max_size=2),
)
dims = st.one_of(
    st.integers(0, 5000),
    st.sampled_from(HUGE + NEGATIVE + [2**40, 2**20]),
    st.floats(),
    st.booleans(),
    st.text(max_size=3),
    st.none(),
    st.lists(st.integers(0, 3), max_size=2),
)
shapes = st.one_of(st.lists(dims, max_size=5), junk)
depths = st.one_of(st.integers(1, 3000), st.sampled_from([10_000, 100_000]))
# JSON text that a value could be replaced with: deep nesting, numbers Python reads badly.
raw_texts = st.one_of(
    st.builds(lambda n: "[" * n + "]" * n, depths),
    st.builds(lambda n: '{"a":' * n + "0" + "}" * n, depths),
    st.sampled_from(["NaN", "Infinity", "-Infinity", "1e400", "-0", "1E-400", "[1e999]"]),
    st.builds(lambda n: "1" * n, st.sampled_from([4300, 4301, 5000, 50_000])),
    st.builds(lambda n: "0." + "1" * n, st.sampled_from([5000, 50_000])),
)


def entry_of(draft: Draft, name: str) -> dict | None:
    document = draft.document
    if isinstance(document, dict) and isinstance(document.get("tensors"), dict):
        entry = document["tensors"].get(name)
        return entry if isinstance(entry, dict) else None
    return None


def fingerprints_of(draft: Draft) -> dict | None:
    document = draft.document
    if isinstance(document, dict) and isinstance(document.get("fingerprints"), dict):
        return document["fingerprints"]
    return None


def offsets_of(header: dict, key: str) -> tuple[int, int] | None:
    """The byte range of record ``key`` when an earlier mutation left it well-formed."""
    record = header.get(key)
    offsets = record.get("data_offsets") if isinstance(record, dict) else None
    if isinstance(offsets, list) and len(offsets) == 2 and all(type(o) is int for o in offsets):
        return offsets[0], offsets[1]
    return None


def header_length_of(content: bytes) -> int | None:
    """The header length field of a file, when it has one that fits in the file."""
    if len(content) < 8:
        return None
    (length,) = struct.unpack("<Q", content[:8])
    return length if 0 < length <= len(content) - 8 else None


def header_edit(kind: str, detail: object, function) -> Mutation:
    return mutation(kind, detail, lambda draft: draft.header_edits.append(function))


def file_edit(kind: str, detail: object, function) -> Mutation:
    return mutation(kind, detail, lambda draft: draft.file_edits.append(function))


# -- the safetensors header -------------------------------------------------------------------
VALID_DTYPES = ["U8", "I8", "BOOL", "U16", "I16", "F16", "BF16", "U32", "I32", "F32"]
VALID_DTYPES += ["U64", "I64", "F64"]
DTYPE_SIZES = {"U8": 1, "I8": 1, "BOOL": 1, "U16": 2, "I16": 2, "F16": 2, "BF16": 2}
DTYPE_SIZES.update({"U32": 4, "I32": 4, "F32": 4, "U64": 8, "I64": 8, "F64": 8})
dtype_names = st.one_of(
    st.sampled_from(VALID_DTYPES),
    st.sampled_from(["", "u8", "uint8", "F8_E4M3", "F8_E5M2", "C64", "U8 ", "U8\x00", "I128"]),
    st.text(max_size=6),
    junk,
)


@st.composite
def header_field(draw) -> Mutation:
    key = draw(st.sampled_from(ARRAYS))
    name = draw(st.sampled_from(["dtype", "shape", "data_offsets"]))
    value = draw({"dtype": dtype_names, "shape": shapes, "data_offsets": junk}[name])

    def edit(header, size):
        if isinstance(header.get(key), dict):
            header[key][name] = value

    return header_edit("header field", (key, name, value), edit)


@st.composite
def header_retyped(draw) -> Mutation:
    """Another valid dtype and shape covering the same bytes: the header is valid."""
    key = draw(st.sampled_from(ARRAYS))
    dtype = draw(st.sampled_from(VALID_DTYPES))
    layout = draw(st.sampled_from(["flat", "row", "column", "scalar"]))

    def edit(header, size):
        offsets = offsets_of(header, key)
        count, rest = divmod(offsets[1] - offsets[0], DTYPE_SIZES[dtype]) if offsets else (0, 1)
        if rest or count < 0 or (layout == "scalar" and count != 1):
            return
        record = header[key]
        record["dtype"] = dtype
        record["shape"] = {"flat": [count], "row": [1, count], "column": [count, 1]}.get(layout, [])

    return header_edit("header retyped", (key, dtype, layout), edit)


OFFSET_VARIANTS = ["swapped", "shifted", "end moved", "begin moved", "past the end", "other's"]
OFFSET_VARIANTS += ["negative", "one junk", "three", "one", "huge", "to the end"]


@st.composite
def header_offsets(draw) -> Mutation:
    key, other = draw(st.sampled_from(ARRAYS)), draw(st.sampled_from(ARRAYS))
    variant = draw(st.sampled_from(OFFSET_VARIANTS))
    delta = draw(st.one_of(st.integers(-64, 64), st.sampled_from(HUGE + NEGATIVE)))
    value = draw(junk)

    def edit(header, size):
        if offsets_of(header, key) is None:
            return
        begin, end = offsets_of(header, key)
        other_begin = (offsets_of(header, other) or (0, 0))[0]
        header[key]["data_offsets"] = {
            "swapped": [end, begin],
            "shifted": [begin + delta, end + delta],
            "end moved": [begin, end + delta],
            "begin moved": [begin + delta, end],
            "past the end": [size + abs(delta), size + abs(delta) + end - begin],
            "other's": [other_begin, other_begin + end - begin],
            "negative": [begin - end, 0],
            "one junk": [begin, value] if delta % 2 else [value, end],
            "three": [begin, end, end],
            "one": [begin],
            "huge": [2**63 + begin, 2**63 + end] if delta % 2 else [begin, 2**64 + end],
            "to the end": [begin, size],
        }[variant]

    return header_edit("header offsets", (key, variant, delta, value, other), edit)


@st.composite
def header_records(draw) -> Mutation:
    key = draw(st.sampled_from(ARRAYS))
    variant = draw(st.sampled_from(["delete field", "extra field", "junk record", "delete"]))
    name = draw(st.sampled_from(["dtype", "shape", "data_offsets", "x", ""]))
    value = draw(junk)

    def edit(header, size):
        record = header.get(key)
        if variant == "delete":
            header.pop(key, None)
        elif variant == "junk record":
            header[key] = value
        elif isinstance(record, dict):
            if variant == "delete field":
                record.pop(name, None)
            else:
                record[name or "extra"] = value

    return header_edit("header record", (key, variant, name, value), edit)


@st.composite
def header_extra_record(draw) -> Mutation:
    name = draw(
        st.one_of(
            st.sampled_from(["pruned.x.kept", "whole.nope", "", "__metadata__ ", "whole."]),
            st.sampled_from([f"{key} " for key in ARRAYS] + [key.upper() for key in ARRAYS]),
            st.text(max_size=10),
        )
    )
    place = draw(st.sampled_from(["first", "last", "duplicate first", "duplicate last"]))
    dtype, length = draw(st.sampled_from(["U8", "F32", "BOOL"])), draw(st.integers(0, 8))

    def edit(text: str) -> str:
        key = name if not place.startswith("duplicate") else ARRAYS[len(name) % len(ARRAYS)]
        record = json.dumps({key: {"dtype": dtype, "shape": [length], "data_offsets": [0, length]}})
        if place.endswith("first"):
            return "{" + record[1:-1] + "," + text[1:]
        return text[:-1] + "," + record[1:-1] + "}"

    detail = (name, place, dtype, length)
    return mutation("header extra record", detail, lambda d: d.header_text_edits.append(edit))


METADATA_VALUES = {
    "format": st.sampled_from(["ken-hf-subnetwork ", "pt", "", "KEN-HF-SUBNETWORK"]),
    "format_version": st.sampled_from(["1", "3", "", "02", "2 ", "2.0", "0", "-1"]),
    "ken": st.sampled_from(["", "{}", "[]", "null", '{"tensors": {}, "fingerprints": {}}']),
    "digest": st.one_of(st.sampled_from(["", "0" * 16, "f" * 16, "0" * 64]), st.text(max_size=17)),
}


@st.composite
def header_metadata(draw) -> Mutation:
    key = draw(st.sampled_from([*METADATA_VALUES, "extra"]))
    variant = draw(st.sampled_from(["plausible", "junk", "delete", "replace all"]))
    value = draw(METADATA_VALUES.get(key, st.text(max_size=5))) if variant == "plausible" else None
    value = draw(junk) if variant in ("junk", "replace all") else value

    def edit(header, size):
        metadata = header.get("__metadata__")
        if variant == "replace all":
            header["__metadata__"] = value
        elif isinstance(metadata, dict):
            if variant == "delete":
                metadata.pop(key, None)
            elif key == "digest" and variant == "plausible" and value == "":
                metadata["digest"] = str(metadata.get("digest", "")).upper()
            else:
                metadata[key] = value

    return header_edit("header metadata", (key, variant, value), edit)


@st.composite
def header_raw_value(draw) -> Mutation:
    """A value of the header replaced with deep nesting, a long number literal, NaN..."""
    text = draw(raw_texts)
    where = draw(st.sampled_from(["record", "shape", "offsets", "metadata", "metadata value"]))
    key = draw(st.sampled_from(ARRAYS))

    def edit(draft: Draft) -> None:
        marker = raw_json(draft, text)

        def put(header, size):
            record, metadata = header.get(key), header.get("__metadata__")
            if where == "record":
                header[key] = marker
            elif where == "metadata":
                header["__metadata__"] = marker
            elif where == "metadata value" and isinstance(metadata, dict):
                metadata["digest"] = marker
            elif isinstance(record, dict):
                record["shape" if where == "shape" else "data_offsets"] = [marker]

        draft.header_edits.append(put)

    return mutation("header raw value", (where, key, text), edit)


LENGTHS = [0, 1, 7, 8, 9, 2**31, 2**32, 2**63, 2**64 - 1, 100 * 2**20, 100 * 2**20 + 1]


@st.composite
def header_length(draw) -> Mutation:
    variant = draw(st.sampled_from(["fixed", "real plus", "file size minus"]))
    value = draw(st.sampled_from(LENGTHS)) if variant == "fixed" else draw(st.integers(-16, 16))

    def edit(content: bytes) -> bytes:
        real = struct.unpack("<Q", content[:8])[0] if len(content) >= 8 else 0
        length = {"fixed": value, "real plus": real + value}.get(variant, len(content) + value)
        return struct.pack("<Q", min(max(length, 0), 2**64 - 1)) + content[8:]

    return file_edit("header length", (variant, value), edit)


@st.composite
def file_bytes(draw) -> Mutation:
    variant = draw(st.sampled_from(["truncate", "append", "header byte", "header text", "replace"]))
    number = draw(st.integers(0, 2**20))
    data = draw(st.binary(max_size=64))
    text = draw(st.sampled_from(["[]", "null", '"x"', "0", "{}", "", "{", '{"a":1}', "[{}]"]))

    def edit(content: bytes) -> bytes:
        length = header_length_of(content)
        if variant == "truncate":
            return content[: number % max(len(content), 1)]
        if variant == "append" or length is None:
            return content + data
        if variant == "header byte":
            at = 8 + number % length
            return content[:at] + (data[:1] or b"\xff") + content[at + 1 :]
        if variant == "header text":
            raw = text.encode() + b" " * (-len(text) % 8)
            return struct.pack("<Q", len(raw)) + raw + content[8 + length :]
        return data

    return file_edit("file bytes", (variant, number, data, text), edit)


HEADER = st.one_of(
    header_field(),
    header_retyped(),
    header_offsets(),
    header_records(),
    header_extra_record(),
    header_metadata(),
    header_raw_value(),
    header_length(),
    file_bytes(),
)


# -- the KEN document and its entries ---------------------------------------------------------
ENTRY_VALUES = {
    "kind": st.one_of(st.sampled_from(["pruned", "whole", "", "Pruned", "pruned ", "mask"]), junk),
    "shape": shapes,
    "dtype": st.one_of(
        st.sampled_from(FLOAT_NAMES),
        st.sampled_from(["int8", "uint8", "bool", "int64", "complex64", "float8_e4m3fn"]),
        st.sampled_from(["torch.float32", "F32", "", "Float32"]),
        junk,
    ),
    "count": st.one_of(numbers, junk),
    "changed": st.one_of(numbers, junk),
    "encoding": st.one_of(st.sampled_from(["mask", "indices", "", "MASK", "index"]), junk),
    "sizes": st.one_of(st.lists(numbers, max_size=4), junk),
    "delta": st.one_of(
        st.lists(st.one_of(st.none(), numbers, st.text(max_size=2)), max_size=3), junk
    ),
    "checksums": st.one_of(
        st.lists(st.one_of(st.text(max_size=16), numbers, st.none()), max_size=4), junk
    ),
    "codec": st.one_of(st.sampled_from(["none", "zstd", "", "ZSTD", "gzip"]), junk),
}


@st.composite
def entry_field(draw) -> Mutation:
    name = draw(st.sampled_from(TENSORS))
    key = draw(st.sampled_from(ENTRY_KEYS))
    value = draw(ENTRY_VALUES[key])

    def edit(draft: Draft) -> None:
        entry = entry_of(draft, name)
        if entry is not None:
            entry[key] = value
            draft.fix_sums = draft.fix_sums and key != "checksums"

    return mutation("entry field", (name, key, value), edit)


@st.composite
def entry_keys(draw) -> Mutation:
    name = draw(st.sampled_from(TENSORS))
    variant = draw(st.sampled_from(["delete", "extra", "junk entry", "copy of another"]))
    key = draw(st.sampled_from([*ENTRY_KEYS, "", "x"]))
    value, other = draw(junk), draw(st.sampled_from(TENSORS))

    def edit(draft: Draft) -> None:
        entry = entry_of(draft, name)
        if entry is None:
            return
        if variant == "delete":
            entry.pop(key, None)
            draft.fix_sums = draft.fix_sums and key != "checksums"
        elif variant == "extra":
            entry[key + "_extra"] = value
        else:
            source = entry_of(draft, other) if variant == "copy of another" else value
            draft.document["tensors"][name] = copy.deepcopy(source)

    return mutation("entry keys", (name, variant, key, value, other), edit)


shape_dims = st.sampled_from([0, 1, 2, 3, 384, 768, 1536, 2**16, 2**20, 2**31, 2**32, 2**40])
big_dims = st.sampled_from([2**62, 2**63 - 1, 2**63, 2**64])


@st.composite
def entry_resized(draw) -> Mutation:
    """Shape, counts, dtype or encoding changed and the sizes made to agree with them."""
    name = draw(st.sampled_from(TENSORS))
    shape = draw(
        st.one_of(
            st.none(),
            st.lists(st.integers(0, 4000), max_size=4),
            st.lists(shape_dims, min_size=1, max_size=3),
            st.lists(st.one_of(shape_dims, big_dims), min_size=1, max_size=3),
        )
    )
    count = draw(st.one_of(st.none(), st.integers(0, 5000), st.sampled_from(HUGE)))
    changed = draw(st.one_of(st.none(), st.integers(0, 5000), st.sampled_from(HUGE)))
    dtype = draw(st.one_of(st.none(), st.sampled_from(FLOAT_NAMES)))
    encoding = draw(st.one_of(st.none(), st.sampled_from(["mask", "indices"])))
    codec = draw(st.one_of(st.none(), st.sampled_from(["none", "zstd"])))

    def edit(draft: Draft) -> None:
        entry = entry_of(draft, name)
        if entry is None:
            return
        changes = {"shape": shape, "count": count, "changed": changed, "dtype": dtype}
        changes.update(encoding=encoding, codec=codec if name in WHOLE else None)
        entry.update({key: value for key, value in changes.items() if value is not None})
        sizes = expected_sizes(entry)
        if sizes is not None and name in PRUNED:
            entry["sizes"] = sizes

    detail = (name, shape, count, changed, dtype, encoding, codec)
    return mutation("entry resized", detail, edit)


def rename_in(draft: Draft, old: str, new: str, fingerprint: bool) -> None:
    tensors = draft.document["tensors"]
    tensors[new] = tensors.pop(old)
    renamed = {}
    for key, array in draft.arrays.items():
        for prefix in (f"pruned.{old}.", f"whole.{old}"):
            tail = key[len(prefix) :]
            if key.startswith(prefix) and (tail in PARTS or (not tail and prefix[0] == "w")):
                key = prefix.replace(old, new, 1) + tail
        renamed[key] = array
    draft.arrays = renamed
    fingerprints = fingerprints_of(draft)
    if fingerprint and fingerprints is not None and old in fingerprints:
        fingerprints[new] = fingerprints.pop(old)


OTHER_NAMES = [
    "bert.pooler.dense.weight",
    "bert.encoder.layer.1.attention.output.LayerNorm.weight",
    "bert.encoder.layer.0.attention.output.LayerNorm.weight ",
    "Bert.encoder.layer.0.attention.output.LayerNorm.weight",
    "bert.encoder.layer.0.attention.output.LayerNorm.weight\u200b",
    "bert.encoder.layer.0.attention.output.LayerNorm",
    "bert.embeddings.word_embeddings.weight",
]
tensor_names = st.one_of(
    st.sampled_from(["", " ", ".", "..", "pruned", "whole.x", "x.kept", "kept", "\x00"]),
    st.sampled_from(["a\nb", "\x1b[31mred", "\ud800", "\udfff", "λ", "🙂", "../../etc/x"]),
    st.sampled_from(TENSORS + OTHER_NAMES),
    st.text(max_size=20),
    st.builds(lambda n: "a" * n, st.sampled_from([255, 256, 4096, 70_000])),
)


@st.composite
def entry_renamed(draw) -> Mutation:
    old, new = draw(st.sampled_from(TENSORS)), draw(tensor_names)
    fingerprint = draw(st.booleans())

    def edit(draft: Draft) -> None:
        if entry_of(draft, old) is not None and new != old:
            rename_in(draft, old, new, fingerprint)

    return mutation("entry renamed", (old, new, fingerprint), edit)


hex_texts = st.text(alphabet="0123456789abcdefABCDEF", max_size=40)


@st.composite
def fingerprint_edit(draw) -> Mutation:
    variant = draw(
        st.sampled_from(
            ["junk value", "text value", "another's", "upper", "delete", "unknown", "none left"]
        )
    )
    name = draw(st.one_of(st.sampled_from(TENSORS), st.sampled_from(OTHER_NAMES)))
    other = draw(st.one_of(st.sampled_from(TENSORS), tensor_names))
    value = draw(junk if variant == "junk value" else st.one_of(hex_texts, st.text(max_size=8)))

    def edit(draft: Draft) -> None:
        fingerprints = fingerprints_of(draft)
        if fingerprints is None:
            return
        if variant in ("junk value", "text value"):
            fingerprints[name] = value
        elif variant == "another's" and other in fingerprints:
            fingerprints[name] = fingerprints[other]
        elif variant == "upper" and isinstance(fingerprints.get(name), str):
            fingerprints[name] = fingerprints[name].upper()
        elif variant == "delete":
            fingerprints.pop(name, None)
        elif variant == "unknown":
            fingerprints[other if other not in fingerprints else other + "?"] = "0" * 32
        elif variant == "none left":
            fingerprints.clear()

    return mutation("fingerprints", (variant, name, other, value), edit)


@st.composite
def document_structure(draw) -> Mutation:
    variant = draw(
        st.sampled_from(
            [
                "replace document",
                "list of entries",
                "replace tensors",
                "tensors as list",
                "replace fingerprints",
                "delete tensors",
                "delete fingerprints",
                "extra key",
                "no tensors",
            ]
        )
    )
    value = draw(junk)

    def edit(draft: Draft) -> None:
        document = draft.document
        if variant == "replace document":
            draft.document = value
        elif not isinstance(document, dict):
            return
        elif variant == "list of entries":
            tensors = document.get("tensors")
            draft.document = list(tensors.values()) if isinstance(tensors, dict) else [tensors]
        elif variant in ("replace tensors", "replace fingerprints"):
            document[variant.split()[1]] = value
        elif variant == "tensors as list" and isinstance(document.get("tensors"), dict):
            document["tensors"] = [{"name": n, **e} for n, e in document["tensors"].items()]
        elif variant.startswith("delete"):
            document.pop(variant.split()[1], None)
        elif variant == "extra key":
            document["extra"] = value
        elif variant == "no tensors":
            document["tensors"] = {}

    return mutation("document structure", (variant, value), edit)


@st.composite
def document_raw(draw) -> Mutation:
    """Text no ``json.dumps`` writes: deep nesting, long literals, NaN, broken JSON."""
    variant = draw(st.sampled_from(["value", "whole text", "truncated", "duplicate key", "BOM"]))
    text = draw(raw_texts)
    where = draw(st.sampled_from(["count", "shape", "delta", "sizes", "entry", "fingerprints"]))
    name, cut = draw(st.sampled_from(TENSORS)), draw(st.integers(0, 100_000))
    garbage = draw(st.text(max_size=30))

    def edit(draft: Draft) -> None:
        entry = entry_of(draft, name)
        if variant == "value" and entry is not None:
            marker = raw_json(draft, text)
            if where == "entry":
                draft.document["tensors"][name] = marker
            elif where == "fingerprints":
                draft.document["fingerprints"] = marker
            else:
                entry[where] = marker if where == "count" else [marker]
            return
        fix_checksums(draft)
        full = dumps(draft, draft.document, sort_keys=True)
        draft.document_text = {
            "whole text": text if cut % 2 else garbage,
            "truncated": full[: cut % max(len(full), 1)],
            "duplicate key": '{"tensors": {}, ' + full[1:],
            "BOM": "\ufeff" + full,
        }.get(variant, full)

    return mutation("document raw", (variant, where, name, cut, text, garbage), edit)


@st.composite
def document_digest(draw) -> Mutation:
    """The metadata digest is stale, or the entries' checksums are."""
    variant = draw(st.sampled_from(["stale digest", "stale checksums", "checksum of other"]))
    name, other = draw(st.sampled_from(TENSORS)), draw(st.sampled_from(TENSORS))

    def edit(draft: Draft) -> None:
        entry = entry_of(draft, name)
        if variant == "stale digest":
            draft.metadata["digest"] = draft.template.digest
            draft.fix_digest = False
            if isinstance(draft.document, dict):
                draft.document["touched"] = True
        elif entry is not None:
            draft.fix_sums = False
            source = entry_of(draft, other)
            if variant == "checksum of other" and source is not None:
                entry["checksums"] = copy.deepcopy(source.get("checksums"))
            elif isinstance(entry.get("shape"), list):
                entry["shape"] = [*entry["shape"], 1]  # checksums cover the shape

    return mutation("document digest", (variant, name, other), edit)


DOCUMENT = st.one_of(
    entry_field(),
    entry_keys(),
    entry_resized(),
    entry_renamed(),
    fingerprint_edit(),
    document_structure(),
    document_raw(),
    document_digest(),
)


# -- frames and arrays -------------------------------------------------------------------------
def set_array(draft: Draft, key: str, data: bytes) -> None:
    """Array ``key`` holds ``data`` now: a uint8 vector, or for a raw array (a whole tensor
    stored as it is) its dtype and shape when ``data`` has its size."""
    old = draft.arrays.get(key) or draft.template.arrays[key]
    if old.dtype != "U8" and len(data) == len(old.data):
        draft.arrays[key] = Array(old.dtype, old.shape, data)
    else:
        draft.arrays[key] = Array("U8", [len(data)], data)


def data_of(draft: Draft, key: str) -> bytes:
    array = draft.arrays.get(key)
    return array.data if array is not None else draft.template.arrays[key].data


def content_of(draft: Draft, key: str) -> bytes:
    """What array ``key`` holds decompressed (its template's when it is no frame now)."""
    for data in (data_of(draft, key), draft.template.arrays[key].data):
        try:
            return decompress(data)
        except zstandard.ZstdError:
            continue
    return draft.template.arrays[key].data  # the raw whole tensor


def frame_header_length(frame: bytes) -> int:
    """Bytes of a zstd frame's header (magic number included)."""
    descriptor = frame[4]
    single, dictionary = (descriptor >> 5) & 1, descriptor & 3
    size_field = ((1 if single else 0), 2, 4, 8)[descriptor >> 6]
    return 5 + (0 if single else 1) + (0, 1, 2, 4)[dictionary] + size_field


def declaring(frame: bytes, declared: int, blocks: bool = True) -> bytes:
    """``frame`` whose header declares ``declared`` bytes of content (its blocks kept, or
    one empty last block): a 1 MiB window, an 8-byte content size."""
    descriptor = 0b1100_0000 | (frame[4] & 0b100)  # keep the checksum flag
    body = frame[frame_header_length(frame) :] if blocks else b"\x01\x00\x00"
    if not blocks and descriptor & 0b100:
        body += b"\x00" * 4
    return frame[:4] + bytes([descriptor, 0x50]) + struct.pack("<Q", declared) + body


@st.composite
def frame_bytes(draw) -> Mutation:
    """A frame replaced, cut, extended or bit-flipped (checksums made to agree)."""
    key = draw(st.sampled_from(ARRAYS))
    variant = draw(st.sampled_from(["random", "truncated", "appended", "bit flips", "bytes set"]))
    data = draw(st.binary(max_size=128))
    spots = draw(st.lists(st.integers(0, 2**20), min_size=1, max_size=8))
    stale = draw(st.integers(0, 9)) == 0  # now and then the checksums are left stale

    def edit(draft: Draft) -> None:
        old = data_of(draft, key)
        if variant == "random":
            new = data
        elif variant == "truncated":
            new = old[: spots[0] % max(len(old), 1)]
        elif variant == "appended":
            new = old + (data or b"\x00")
        else:
            buffer = bytearray(old)
            for i, spot in enumerate(spots if buffer else []):
                at = spot % len(buffer)
                flip = 1 << (spot % 8) if variant == "bit flips" else 0
                buffer[at] = buffer[at] ^ flip if flip else (data[i % len(data)] if data else 0)
            new = bytes(buffer)
        set_array(draft, key, new)
        draft.fix_sums = draft.fix_sums and not stale

    return mutation("frame bytes", (key, variant, data, spots, stale), edit)


FRAME_VARIANTS = ["shorter", "longer", "empty", "random", "no content size", "checksum"]
FRAME_VARIANTS += ["bad checksum", "two frames", "skippable first", "level 19", "declared"]
FRAME_VARIANTS += ["declared, no blocks", "declared, document agrees"]


@st.composite
def frame_valid(draw) -> Mutation:
    """A valid zstd frame of other content, size or options, or one that declares a
    content size other than what it holds (up to 512 MiB, holding a few KiB)."""
    key = draw(st.sampled_from(ARRAYS))
    variant = draw(st.sampled_from(FRAME_VARIANTS))
    number = draw(st.integers(1, 64))
    data = draw(st.binary(max_size=64))
    declared = draw(
        st.one_of(
            st.integers(0, 2**16),
            st.integers(2**20, 2**29 - 1),
            st.sampled_from([2**24, 2**28, 2**29 - 8]),
        )
    )

    def edit(draft: Draft) -> None:
        content = content_of(draft, key)
        half = len(content) // 2
        new = {
            "shorter": lambda: compress(content[:-number]),
            "longer": lambda: compress(content + bytes(number)),
            "empty": lambda: compress(b""),
            "random": lambda: compress(data),
            "no content size": lambda: compress(content, write_content_size=False),
            "checksum": lambda: compress(content, write_checksum=True),
            "bad checksum": lambda: compress(content, write_checksum=True)[:-1] + b"\x00",
            "two frames": lambda: compress(content[:half]) + compress(content[half:]),
            "skippable first": lambda: (
                b"\x50\x2a\x4d\x18" + struct.pack("<I", 4) + bytes(4) + compress(content)
            ),
            "level 19": lambda: zstandard.ZstdCompressor(level=19).compress(content),
            "declared, no blocks": lambda: declaring(compress(content), declared, blocks=False),
        }.get(variant, lambda: declaring(compress(content), declared))()
        set_array(draft, key, new)
        entry = entry_of(draft, "classifier.weight")
        if variant == "declared, document agrees" and key == "whole.classifier.weight" and entry:
            entry.update(codec="zstd", dtype="float32", shape=[2, declared // 8])

    return mutation("frame valid", (key, variant, number, data, declared), edit)


@st.composite
def frame_content(draw) -> Mutation:
    """The bytes a frame holds changed, recompressed at the same size: the mask, index
    list, changed bits or differences decode to something else."""
    key = draw(st.sampled_from(ARRAYS))
    variant = draw(
        st.sampled_from(["bit flips", "bytes set", "all zero", "all ones", "last byte", "sorted"])
    )
    spots = draw(st.lists(st.integers(0, 2**20), min_size=1, max_size=8))
    values = draw(st.lists(st.integers(0, 255), min_size=1, max_size=8))

    def edit(draft: Draft) -> None:
        buffer = bytearray(content_of(draft, key))
        if not buffer:
            return
        if variant == "all zero":
            buffer[:] = bytes(len(buffer))
        elif variant == "all ones":
            buffer[:] = b"\xff" * len(buffer)
        elif variant == "last byte":
            buffer[-1] |= values[0] or 0x80
        elif variant == "sorted":  # an index list out of order, or repeated
            buffer[:] = bytes(sorted(buffer, reverse=bool(values[0] % 2)))
        else:
            for i, spot in enumerate(spots):
                at = spot % len(buffer)
                flip = buffer[at] ^ (1 << spot % 8)
                buffer[at] = flip if variant == "bit flips" else values[i % len(values)]
        raw = draft.template.arrays[key].dtype != "U8"
        set_array(draft, key, bytes(buffer) if raw else compress(bytes(buffer)))

    return mutation("frame content", (key, variant, spots, values), edit)


@st.composite
def pruned_reencoded(draw) -> Mutation:
    """A pruned tensor stored again, consistently, with other contents: nothing kept,
    everything kept, another subset, nothing changed, random differences, the other
    encoding, another dtype or shape."""
    name = draw(st.sampled_from(PRUNED))
    variant = draw(
        st.sampled_from(
            ["none kept", "all kept", "subset", "none changed", "random differences"]
            + ["other encoding", "other dtype", "other shape", "empty shape"]
        )
    )
    seed = draw(st.integers(0, 2**32 - 1))
    fraction = draw(st.floats(0, 1))
    dtype = draw(st.sampled_from(FLOAT_NAMES))
    shape = draw(st.lists(st.integers(1, 40), min_size=1, max_size=3))

    def edit(draft: Draft) -> None:
        entry = entry_of(draft, name)
        if entry is None:
            return
        rng = np.random.default_rng(seed)
        positions, flags, values = draft.template.decoded[name]
        item = ITEMSIZE[draft.template.document["tensors"][name]["dtype"]]
        new_shape, new_dtype, encoding = (
            draft.template.document["tensors"][name]["shape"],
            None,
            None,
        )
        numel = math.prod(new_shape)
        if variant == "other shape":
            new_shape, numel = shape, math.prod(shape)
        elif variant == "empty shape":
            new_shape, numel = [0], 0
        if variant in ("none kept", "empty shape"):
            positions = np.zeros(0, dtype=np.int64)
        elif variant == "all kept":
            positions = np.arange(numel)
        elif variant in ("subset", "other shape"):
            positions = np.flatnonzero(rng.random(numel) < fraction)
        if len(flags) != len(positions):
            flags = rng.random(len(positions)) < fraction
        if variant == "none changed":
            flags = np.zeros(len(positions), dtype=bool)
        if variant == "other dtype":
            new_dtype = dtype
            item = ITEMSIZE[dtype]
        count = int(flags.sum())
        if len(values) != count or variant in ("random differences", "other dtype"):
            values = rng.integers(0, 2 ** (8 * item), size=count, dtype=UNSIGNED[item])
        if variant == "other encoding":
            encoding = "indices" if entry.get("encoding") == "mask" else "mask"
        new_dtype = new_dtype or draft.template.document["tensors"][name]["dtype"]
        encode(draft, name, new_shape, new_dtype, positions, flags, values, encoding)

    return mutation("pruned re-encoded", (name, variant, seed, fraction, dtype, shape), edit)


@st.composite
def whole_reencoded(draw) -> Mutation:
    """A whole tensor stored again, consistently: other values, dtype, shape or codec."""
    name = draw(st.sampled_from(WHOLE))
    dtype = draw(st.sampled_from(FLOAT_NAMES))
    shape = draw(st.one_of(st.none(), st.lists(st.integers(0, 8), max_size=3)))
    codec = draw(st.sampled_from(["none", "zstd"]))
    data = draw(st.binary(min_size=64, max_size=64))

    def edit(draft: Draft) -> None:
        entry = entry_of(draft, name)
        if entry is None:
            return
        new_shape = shape if shape is not None else entry.get("shape")
        if not isinstance(new_shape, list) or not all(type(d) is int for d in new_shape):
            return
        numel, item = math.prod(new_shape), ITEMSIZE[dtype]
        if not 0 <= numel <= 2**16:  # an earlier mutation's shape: not stored for real
            return
        values = (data * (numel * item // 64 + 1))[: numel * item]
        planes = np.frombuffer(values, np.uint8).reshape(-1, item).T.tobytes() if numel else b""
        stored = compress(planes) if codec == "zstd" else values
        names = {"float32": "F32", "float16": "F16", "bfloat16": "BF16", "float64": "F64"}
        array = Array("U8", [len(stored)], stored)
        if codec == "none":
            array = Array(names[dtype], list(new_shape), stored)
        draft.arrays[f"whole.{name}"] = array
        entry.update(kind="whole", codec=codec, dtype=dtype, shape=list(new_shape))

    return mutation("whole re-encoded", (name, dtype, shape, codec, data), edit)


@st.composite
def arrays_moved(draw) -> Mutation:
    key, other = draw(st.sampled_from(ARRAYS)), draw(st.sampled_from(ARRAYS))
    variant = draw(st.sampled_from(["removed", "swapped", "duplicated", "copied over"]))

    def edit(draft: Draft) -> None:
        arrays = draft.arrays
        if key not in arrays or other not in arrays:
            return
        if variant == "removed":
            del arrays[key]
        elif variant == "swapped":
            arrays[key], arrays[other] = arrays[other], arrays[key]
        elif variant == "duplicated":
            arrays[key + ".copy"] = arrays[key]
        else:
            arrays[key] = arrays[other]

    return mutation("arrays moved", (key, variant, other), edit)


FRAMES = st.one_of(
    frame_bytes(),
    frame_valid(),
    frame_content(),
    pruned_reencoded(),
    whole_reencoded(),
    arrays_moved(),
)


# -- ken_config.json and the other files ------------------------------------------------------
regexes = st.sampled_from(
    ["(", "[a-", "*", "a{2,1}", "(?<=a+)b", "a{4294967296}", "(?P<x>a)(?P<x>b)", "\\", "[]"]
    + ["(" * 200 + ")" * 200, "(?i", "x{99999999999999999999}", "", ".*", "(a|b"]
)
CONFIG_VALUES = {
    "k": st.sampled_from(["20", 20.0, 20.5, True, False, 0, -1, 2**63, 10**30, [20], None]),
    "keep_ratio": st.sampled_from([0.5, 0, -0.1, 1.5, "0.5", True, 2**70, float("nan")]),
    "target_modules": regexes,
    "exclude_modules": regexes,
    "modules_to_save": st.sampled_from(["(", ["a", 1], [None], "classifier", [["x"]]]),
    "compat": st.sampled_from(["false", "true", 1, 0, None, [], "yes", True]),
    "rule": st.sampled_from(["KEN", "random", "ken_delta", "", None, 5, ["ken"], "ken\x00"]),
    "seed": st.sampled_from(["0", 0.5, -1, 2**70, None, True, float("inf")]),
    "base_model_name_or_path": st.sampled_from([None, 5, ["x"], "", "../..", "\x00", "a" * 5000]),
    "base_model_revision": st.sampled_from([5, ["main"], "", "\x00"]),
    "base_model_dtype": st.sampled_from(["float8", "int8", "torch.float32", 32, ["float32"]])
    | st.sampled_from([None, "FLOAT32", "float16", "bfloat16"]),
    "model_class": st.sampled_from([5, "os.system", "", ["Bert"], "BertModel", None]),
    "subnetwork_digest": st.sampled_from(["", "0" * 16, 5, None, ["x"], {"a": 1}, "upper"]),
    "library_version": st.sampled_from([5, None, [], "99.0", ""]),
}


@st.composite
def config_field(draw) -> Mutation:
    key = draw(st.sampled_from(CONFIG_FIELDS))
    value = draw(st.one_of(CONFIG_VALUES[key], junk))
    deleted = draw(st.integers(0, 7)) == 0

    def edit(draft: Draft) -> None:
        config = draft.config
        if not isinstance(config, dict):
            return
        draft.fix_config_digest = draft.fix_config_digest and key != "subnetwork_digest"
        if deleted:
            config.pop(key, None)
        elif key == "subnetwork_digest" and value == "upper":
            config[key] = draft.template.digest.upper()
        else:
            config[key] = value

    return mutation("config field", (key, value, deleted), edit)


@st.composite
def config_structure(draw) -> Mutation:
    variant = draw(
        st.sampled_from(["replace", "unknown key", "empty object", "only required", "both k"])
    )
    value, key = draw(junk), draw(st.text(max_size=8))

    def edit(draft: Draft) -> None:
        config = draft.config
        if variant == "replace":
            draft.config = value
        elif not isinstance(config, dict):
            return
        elif variant == "unknown key":
            config[key if key not in CONFIG_FIELDS else key + "_"] = value
        elif variant == "empty object":
            draft.config = {}
        elif variant == "only required":
            draft.config = {k: config.get(k) for k in ("k", "keep_ratio")}
            draft.config["base_model_name_or_path"] = config.get("base_model_name_or_path")
        else:
            config["keep_ratio"] = 0.5

    return mutation("config structure", (variant, value, key), edit)


@st.composite
def config_bytes(draw) -> Mutation:
    """ken_config.json not JSON, not UTF-8, deeply nested, or with literals Python reads
    badly; or the model's config.json so."""
    target = draw(st.sampled_from([CONFIG, MODEL_CONFIG]))
    variant = draw(
        st.sampled_from(["raw value", "raw file", "truncated", "invalid utf-8", "BOM", "bytes"])
    )
    text, key = draw(raw_texts), draw(st.sampled_from(["k", "seed", "target_modules", "x"]))
    data, cut = draw(st.binary(max_size=40)), draw(st.integers(0, 10_000))

    def edit(draft: Draft) -> None:
        if target == CONFIG and variant == "raw value" and isinstance(draft.config, dict):
            draft.config[key] = raw_json(draft, text)
            return
        if target == CONFIG:
            config = draft.config if isinstance(draft.config, dict) else {}
            config = {**config, "subnetwork_digest": draft.template.digest}
            original = json.dumps(config, indent=2, sort_keys=True).encode()
        else:
            original = draft.files[MODEL_CONFIG]
        new = {
            "raw value": original[:-1] + b', "x": ' + text.encode() + b"}",
            "raw file": text.encode(),
            "truncated": original[: cut % max(len(original), 1)],
            "invalid utf-8": original[:-1] + b', "x": "\xff\xfe\xc3"}',
            "BOM": b"\xef\xbb\xbf" + original,
        }.get(variant, data)
        if target == CONFIG:
            draft.config_bytes = new
        else:
            draft.files[MODEL_CONFIG] = new

    return mutation("config bytes", (target, variant, key, text, data, cut), edit)


@st.composite
def folder_files(draw) -> Mutation:
    """Files swapped for directories, links out of the folder, removed; an interrupted
    save's previous version beside a subnetwork of another save."""
    name = draw(st.sampled_from([CONFIG, SUBNETWORK, MODEL_CONFIG]))
    variant = draw(
        st.sampled_from(["directory", "link outside", "removed", "previous", "previous cut"])
    )
    cut = draw(st.integers(0, 2**16))

    def edit(draft: Draft) -> None:
        template = draft.template
        if variant == "directory":
            draft.extra[name] = "dir"
        elif variant == "link outside":
            draft.extra[name] = ("link", template.saved[name])
        elif variant == "removed":
            draft.extra[name] = None
            draft.files.pop(name, None)
        else:  # this file of another save; the one ken_config.json names is the previous
            if isinstance(draft.document, dict):
                draft.document["another save"] = True
            draft.fix_config_digest = False
            if isinstance(draft.config, dict):
                draft.config["subnetwork_digest"] = template.digest
            previous = template.saved[SUBNETWORK]
            if variant == "previous cut":
                previous = previous[: cut % len(previous)]
            draft.extra[PREVIOUS] = previous

    return mutation("folder files", (name, variant, cut), edit)


CONFIGS = st.one_of(config_field(), config_structure(), config_bytes(), folder_files())
EVERYTHING = st.one_of(HEADER, DOCUMENT, FRAMES, CONFIGS)


# -- the tests --------------------------------------------------------------------------------
def test_the_template_rebuilds_byte_for_byte_and_applies(template, tmp_path):
    """The fix-ups compute what the library writes: an unmutated draft is the saved folder
    again, byte for byte (checksums recomputed), and it loads and applies."""
    draft = new_draft(template)
    for entry in draft.document["tensors"].values():
        entry["checksums"] = []
    write(draft, tmp_path / "ken")
    for name, content in template.saved.items():
        assert (tmp_path / "ken" / name).read_bytes() == content, name
    for name in PRUNED:  # and the encoder stores the decoded contents as the library did
        draft = new_draft(template)
        entry = draft.document["tensors"][name]
        encode(draft, name, entry["shape"], entry["dtype"], *template.decoded[name], None)
        assert draft.arrays == template.arrays and draft.document == template.document
    subnetwork = KENSubnetwork.from_pretrained(tmp_path / "ken")
    assert sorted([*subnetwork.pruned, *subnetwork.whole]) == TENSORS
    model, parameters = template.model, dict(template.model.model.named_parameters())
    model.add_subnetwork("unmutated", subnetwork)
    model.set_subnetwork("unmutated")
    try:  # every tensor it stores differs from the base somewhere
        assert all(not torch.equal(parameters[n], template.pristine[n]) for n in TENSORS)
    finally:
        model.delete_subnetwork("unmutated")
    assert all(torch.equal(parameters[n], template.pristine[n]) for n in TENSORS)
    check_applies(subnetwork, template)


@FUZZ
@given(one=HEADER)
def test_safetensors_header_mutations(template, one):
    run(template, [one])


@FUZZ
@given(one=DOCUMENT)
def test_document_and_entry_mutations(template, one):
    run(template, [one])


@FUZZ
@given(one=FRAMES)
def test_frame_and_array_mutations(template, one):
    run(template, [one])


@FUZZ
@given(one=CONFIGS)
def test_config_and_folder_mutations(template, one):
    run(template, [one])


@FUZZ
@given(several=st.lists(EVERYTHING, min_size=2, max_size=4))
def test_stacked_mutations(template, several):
    run(template, several)
