"""The checks of a subnetwork file's header, made in full before a byte of its arrays is
decoded: every field of the KEN document (types, ranges, lengths), every array it calls for
(present, of the type and length the document implies), nothing the document does not
describe. A file that passes describes tensors of bounded size whose arrays can be decoded
with the memory the document states; the arrays' contents are checked as they are decoded
(checksums, compressed sizes, bit counts), and the declared shapes against the base before
that (``KENSubnetwork.check_fits``).
"""

from __future__ import annotations

import math
import re

import torch

from ..errors import shown
from ..utils.json_input import is_integer
from .format import VALUE_DTYPES, KENFormatError, index_dtype
from .safetensors_io import MAX_RANK, SafetensorsFile

# Far beyond any real tensor (the largest embeddings hold about 2**32 values); it keeps
# every size computed from a declared shape inside int64.
MAX_NUMEL = 2**36
MAX_NAME = 1024
# A subnetwork header holds about 1 KB per tensor: 32 MiB is about 30,000 tensors.
MAX_SUBNETWORK_HEADER = 32 * 2**20

_HEX16 = re.compile(r"[0-9a-f]{16}")
_HEX32 = re.compile(r"[0-9a-f]{32}")
_PARTS = ("kept", "changed", "difference")
_PRUNED_V1 = {"kind", "shape", "dtype", "count", "encoding", "delta", "checksums"}
_KEYS = {
    ("1", "pruned"): _PRUNED_V1,
    ("1", "whole"): {"kind", "shape", "dtype", "checksums"},
    ("2", "pruned"): _PRUNED_V1 | {"changed", "sizes"},
    ("2", "whole"): {"kind", "shape", "dtype", "codec", "checksums"},
}
# Version 3: version 2, and a pruned tensor may have grown along its first dimension
# ("rows": the base's rows; array "added": the rows after them).
_KEYS["3", "whole"] = _KEYS["2", "whole"]
_KEYS["3", "pruned"] = _KEYS["2", "pruned"]
_GROWN = _KEYS["2", "pruned"] | {"rows"}


def _is_mean(value: object) -> bool:
    """A mean of absolute differences: a finite number of at least 0."""
    return (
        isinstance(value, int | float)
        and not isinstance(value, bool)
        and math.isfinite(value)
        and value >= 0
    )


def check_name(path, name: object) -> str:
    """A tensor name: a printable string of 1 to ``MAX_NAME`` characters."""
    if not (isinstance(name, str) and 0 < len(name) <= MAX_NAME and name.isprintable()):
        raise KENFormatError(f"{path}: tensor name {shown(name)} is not a printable name")
    return name


class _Entry:
    """Checks of one entry of the document; ``fail`` names the file, tensor and field."""

    def __init__(self, path, name: str, entry: dict, file: SafetensorsFile) -> None:
        self.path, self.name, self.entry, self.file = path, name, entry, file

    def fail(self, field: str, problem: str) -> KENFormatError:
        return KENFormatError(f"{self.path}: tensor {self.name!r}: field {field!r}: {problem}")

    def integer(self, field: str, limit: int) -> int:
        value = self.entry[field]
        if not is_integer(value) or not 0 <= value <= limit:
            raise self.fail(field, f"{shown(value)} is not an integer from 0 to {limit}")
        return value

    def one_of(self, field: str, choices) -> str:
        value = self.entry[field]
        if not isinstance(value, str) or value not in choices:
            raise self.fail(field, f"{shown(value)} is not one of {sorted(choices)}")
        return value

    def checksums(self, count: int) -> None:
        value = self.entry["checksums"]
        if not (
            isinstance(value, list)
            and len(value) == count
            and all(isinstance(c, str) and _HEX16.fullmatch(c) for c in value)
        ):
            raise self.fail("checksums", f"expected {count} 16-digit hex strings")

    def delta(self) -> None:
        value = self.entry["delta"]
        if not (
            isinstance(value, list)
            and len(value) == 2
            and all(d is None or _is_mean(d) for d in value)
        ):
            raise self.fail("delta", f"{shown(value)} is not two finite means (or null)")

    def array(self, key: str, dtype: torch.dtype, shape: tuple[int, ...] | None) -> None:
        """Array ``key`` is stored, with ``dtype`` and ``shape`` (None: any vector)."""
        if key not in self.file.names:
            raise KENFormatError(f"{self.path}: tensor {self.name!r}: array {key!r} is missing")
        stored_shape = self.file.shape(key)
        if self.file.dtype(key) != dtype or (
            len(stored_shape) != 1 if shape is None else stored_shape != shape
        ):
            expected = "a vector" if shape is None else f"shape {list(shape)}"
            raise KENFormatError(
                f"{self.path}: tensor {self.name!r}: array {key!r} is "
                f"{self.file.dtype(key)} {list(stored_shape)}, expected {dtype} {expected}"
            )


def check_entry(path, version: str, name: str, entry: object, file: SafetensorsFile) -> set[str]:
    """Check one tensor's entry and the arrays it calls for; returns their names."""
    if not isinstance(entry, dict):
        raise KENFormatError(f"{path}: tensor {name!r}: entry is not a JSON object")
    kind = entry.get("kind")
    if kind not in ("pruned", "whole"):
        raise KENFormatError(f"{path}: tensor {name!r}: field 'kind': {shown(kind)} is unknown")
    keys = _KEYS[version, kind]
    if version == "3" and kind == "pruned" and "rows" in entry:
        keys = _GROWN
    if set(entry) != keys:
        missing, extra = sorted(keys - set(entry)), sorted(set(entry) - keys)
        raise KENFormatError(
            f"{path}: tensor {name!r}: fields missing {missing}, unknown {shown(extra)}"
        )
    check = _Entry(path, name, entry, file)
    shape = entry["shape"]
    if not (
        isinstance(shape, list)
        and len(shape) <= MAX_RANK
        and all(is_integer(d) and 0 <= d <= MAX_NUMEL for d in shape)
        and math.prod(shape) <= MAX_NUMEL
    ):
        raise check.fail("shape", f"{shown(shape)} is not a shape of at most {MAX_NUMEL} values")
    numel = full_numel = math.prod(shape)
    dtype = VALUE_DTYPES[check.one_of("dtype", VALUE_DTYPES)]
    itemsize = torch.empty((), dtype=dtype).element_size()
    if kind == "whole":
        check.checksums(1)
        key = f"whole.{name}"
        if version != "1" and check.one_of("codec", ("zstd", "none")) == "zstd":
            check.array(key, torch.uint8, None)
        else:
            check.array(key, dtype, tuple(shape))
        return {key}
    parts = list(_PARTS)
    if "rows" in entry:  # a grown tensor: what is pruned is the base's rows
        if not shape:
            raise check.fail("rows", "a tensor of no dimension cannot grow")
        rows = entry["rows"]
        # added tokens grow a vocabulary, at most twofold (as the plan allows)
        if not (is_integer(rows) and 0 < rows < shape[0] <= 2 * rows):
            raise check.fail(
                "rows", f"{shown(rows)} is not a row count below {shape[0]}, at least half"
            )
        numel = rows * math.prod(shape[1:])
        parts.append("added")
    count = check.integer("count", numel)
    encoding = check.one_of("encoding", ("mask", "indices"))
    check.delta()
    if version == "1":
        check.checksums(2)
        check.array(f"pruned.{name}.values", dtype, (count,))
        if encoding == "mask":
            check.array(f"pruned.{name}.mask", torch.uint8, (-(-numel // 8),))
        else:
            check.array(f"pruned.{name}.indices", index_dtype(max(numel, 1)), (count,))
        return {f"pruned.{name}.values", f"pruned.{name}.{encoding}"}
    check.checksums(len(parts))
    changed = check.integer("changed", count)
    index_size = torch.empty((), dtype=index_dtype(max(numel, 1))).element_size()
    kept_bytes = -(-numel // 8) if encoding == "mask" else count * index_size
    expected = [kept_bytes, -(-count // 8), changed * itemsize]
    if "rows" in entry:
        expected.append((full_numel - numel) * itemsize)
    if entry["sizes"] != expected:
        raise check.fail("sizes", f"{shown(entry['sizes'])} do not fit the counts: {expected}")
    keys = {f"pruned.{name}.{part}" for part in parts}
    for key in sorted(keys):
        check.array(key, torch.uint8, None)
    return keys


def check_document(path, version: str, document: object, file: SafetensorsFile) -> None:
    """Check the whole KEN document of a subnetwork file against its arrays (see the module
    docstring); ``KENFormatError`` naming the file, tensor and field at the first problem."""
    if not isinstance(document, dict) or set(document) != {"tensors", "fingerprints"}:
        raise KENFormatError(f"{path}: the KEN document must hold 'tensors' and 'fingerprints'")
    tensors, fingerprints = document["tensors"], document["fingerprints"]
    if not isinstance(tensors, dict) or not isinstance(fingerprints, dict):
        raise KENFormatError(f"{path}: the KEN document's tables must be JSON objects")
    for name, fingerprint in fingerprints.items():
        check_name(path, name)
        if not (isinstance(fingerprint, str) and _HEX32.fullmatch(fingerprint)):
            raise KENFormatError(
                f"{path}: tensor {name!r}: base fingerprint {shown(fingerprint)} is not "
                "32 hex digits"
            )
    described: set[str] = set()
    for name, entry in tensors.items():
        described |= check_entry(path, version, check_name(path, name), entry, file)
    extra = sorted(set(file.names) - described)
    if extra:
        raise KENFormatError(f"{path}: arrays not described by the header: {extra[:5]}")
