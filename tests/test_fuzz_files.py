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

``make test`` runs a few hundred derandomized examples per test; ``make fuzz`` sets
``KEN_HF_FUZZ_EXAMPLES`` for many more, randomized (a failure prints the
``@reproduce_failure`` blob that replays it).
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
from hypothesis import HealthCheck, event, given, note, settings
from hypothesis import strategies as st
from transformers import AutoModelForSequenceClassification

from ken_hf import KENConfig, KENModel, KENSubnetwork
from ken_hf.errors import KENError
from ken_hf.experiments.assets import minilm_path
from ken_hf.streaming import inspect_subnetwork

# -- settings ------------------------------------------------------------------------------
# `make test`: EXAMPLES per test, derandomized (the same examples on every run, no database).
# `make fuzz` (KEN_HF_FUZZ_EXAMPLES=N): N per test, random; a failure prints its blob.
EXAMPLES = 400
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


@dataclass
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


def mutation(kind: str, detail: object, edit: Callable[[Draft], None]) -> Mutation:
    text = detail if isinstance(detail, str) else repr(detail)
    return Mutation(kind, text if len(text) <= 160 else f"{text[:150]}... ({len(text)} chars)", edit)


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
        config["subnetwork_digest"] = metadata.get("digest", digest)
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
    start = 8 + length
    arrays = {
        key: Array(r["dtype"], r["shape"], content[start + r["data_offsets"][0] : start + r["data_offsets"][1]])
        for key, r in header.items()
    }  # fmt: skip
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
    if not ints or not all(type(v) is int for v in ints) or dtype not in ITEMSIZE:
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
    """What loaded is consistent: positions distinct and inside; it applies to the base or
    is refused with a KENError; taking it off gives the base back bit for bit."""
    for name, pruned in subnetwork.pruned.items():
        positions = pruned.positions
        assert positions.dim() == 1, name
        if 0 < pruned.shape.numel() <= 2**22 and positions.numel():
            assert 0 <= int(positions.min()) and int(positions.max()) < pruned.shape.numel(), name
            assert int(pruned.mask().sum()) == positions.numel(), f"{name}: repeated positions"
    model = template.model
    parameters = dict(model.model.named_parameters())
    touched = [n for n in [*subnetwork.pruned, *subnetwork.whole] if n in parameters]
    try:
        try:
            model.add_subnetwork("fuzz", subnetwork)
            model.set_subnetwork("fuzz")
        except FAMILY:
            pass
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
            event("loaded")
            check_applies(subnetwork, template)


def run(template: Template, mutations: list[Mutation]) -> None:
    draft = new_draft(template)
    for one in mutations:
        note(repr(one))
        event(one.kind)
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
        record = header.get(key)
        begin, end = record["data_offsets"]
        count, rest = divmod(end - begin, DTYPE_SIZES[dtype])
        if rest or (layout == "scalar" and count != 1):
            return
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
        begin, end = header[key]["data_offsets"]
        other_begin = header[other]["data_offsets"][0] if other in header else 0
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
                metadata["digest"] = metadata.get("digest", "").upper()
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
        (real,) = struct.unpack("<Q", content[:8])
        length = {"fixed": value, "real plus": real + value}.get(variant, len(content) + value)
        return struct.pack("<Q", min(max(length, 0), 2**64 - 1)) + content[8:]

    return file_edit("header length", (variant, value), edit)


@st.composite
def file_bytes(draw) -> Mutation:
    variant = draw(
        st.sampled_from(["truncate", "append", "header byte", "header text", "replace"])
    )
    number = draw(st.integers(0, 2**20))
    data = draw(st.binary(max_size=64))
    text = draw(st.sampled_from(["[]", "null", '"x"', "0", "{}", "", "{", '{"a":1}', "[{}]"]))

    def edit(content: bytes) -> bytes:
        (length,) = struct.unpack("<Q", content[:8])
        if variant == "truncate":
            return content[: number % len(content)]
        if variant == "append":
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
        elif variant == "upper" and name in fingerprints:
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
            draft.document = list(document.get("tensors", {}).values())
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
