"""The subnetwork file: compact encodings, full validation on read, and atomic saves."""

from __future__ import annotations

import json
import random
import shutil
import struct
from pathlib import Path

import pytest
import torch
import xxhash
from transformers import AutoModelForSequenceClassification

from ken_hf import KENConfig, KENFormatError, KENModel, KENSubnetwork
from ken_hf.experiments.assets import minilm_path
from ken_hf.storage.delta_codec import pack_bits, unpack_bits
from ken_hf.storage.subnetwork_file import SUBNETWORK_NAME, read_subnetwork

V1 = Path(__file__).parent / "data" / "v1"  # a base, its fine-tune and a version 1 subnetwork


@pytest.fixture(scope="module")
def small_subnetworks(minilm_finetune, tmp_path_factory):
    """Two real subnetworks of the fine-tuned MiniLM, one stored as index lists (k=8), one
    as packed masks (keep ratio 0.5), each with the classifier stored whole."""
    base = AutoModelForSequenceClassification.from_pretrained(minilm_finetune["base"], num_labels=2)
    folders = {}
    for label, config in {
        "indices": KENConfig(k=8, target_modules=["layer.0.attention.self.query"]),
        "mask": KENConfig(keep_ratio=0.5, target_modules=["layer.1.attention.self.value"]),
    }.items():
        config.base_model_name_or_path = minilm_finetune["base"]
        subnetwork = KENSubnetwork.from_weights(
            base,
            minilm_finetune["model"],
            config,
            new_tensors=minilm_finetune["new"],
            progress=False,
        )
        folder = tmp_path_factory.mktemp("small") / label
        subnetwork.save_pretrained(folder)
        folders[label] = folder
    return folders


def _header(data: bytes) -> tuple[int, dict]:
    (length,) = struct.unpack("<Q", data[:8])
    return length, json.loads(data[8 : 8 + length])


def test_encodings_chosen_by_size(small_subnetworks):
    for label, folder in small_subnetworks.items():
        _, header = _header((folder / SUBNETWORK_NAME).read_bytes())
        keys = [k for k in header if k != "__metadata__"]
        document = json.loads(header["__metadata__"]["ken"])
        pruned = [e for e in document["tensors"].values() if e["kind"] == "pruned"]
        assert pruned and all(e["encoding"] == label for e in pruned)
        assert "whole.classifier.weight" in keys


def test_bit_packing_round_trips():
    torch.manual_seed(0)
    for count in (0, 1, 7, 8, 9, 1000):
        bits = torch.rand(count) < 0.3
        packed = pack_bits(bits)
        assert len(packed) == -(-count // 8)
        assert torch.equal(unpack_bits(packed, count), bits)


def _equal(x, y) -> bool:
    return (x is None and y is None) or (x is not None and y is not None and torch.equal(x, y))


def _same(a, b) -> bool:
    fields = ("positions", "values", "changed", "difference")
    return (
        a.pruned.keys() == b.pruned.keys()
        and all(a.pruned[n].shape == b.pruned[n].shape for n in a.pruned)
        and all(a.pruned[n].dtype == b.pruned[n].dtype for n in a.pruned)
        and all(
            _equal(getattr(a.pruned[n], f), getattr(b.pruned[n], f))
            for n in a.pruned
            for f in fields
        )
        and a.whole.keys() == b.whole.keys()
        and all(torch.equal(a.whole[n], b.whole[n]) for n in a.whole)
        and a.fingerprints == b.fingerprints
    )


def _byte_mutations(data: bytes, rng: random.Random, count: int) -> list[tuple[str, bytes]]:
    length, _ = _header(data)
    header_end = 8 + length
    mutations = []
    for i in range(count):
        kind = i % 6
        if kind == 0:
            cut = rng.randrange(0, len(data))
            mutations.append((f"truncate at {cut}", data[:cut]))
        elif kind in (1, 2):  # a flipped byte in the header, then anywhere
            where = rng.randrange(0, header_end if kind == 1 else len(data))
            flipped = bytearray(data)
            flipped[where] ^= rng.randrange(1, 256)
            mutations.append((f"flip byte {where}", bytes(flipped)))
        elif kind == 3:
            start = rng.randrange(header_end, len(data))
            zeroed = bytearray(data)
            zeroed[start : start + rng.randrange(1, 64)] = bytes(min(64, len(data) - start))[
                : len(zeroed[start : start + 64])
            ]
            mutations.append((f"zero from {start}", bytes(zeroed)[: len(data)]))
        elif kind == 4:
            where = rng.randrange(0, len(data))
            mutations.append((f"insert at {where}", data[:where] + b"\x00\x01" + data[where:]))
        else:
            start = rng.randrange(0, len(data) - 1)
            mutations.append((f"delete at {start}", data[:start] + data[start + 3 :]))
    return mutations


def _rewrite_metadata(data: bytes, edit) -> bytes:
    """Apply ``edit`` to the ken JSON document and re-sign it, so that only the semantic
    checks can catch the inconsistency."""
    length, header = _header(data)
    document = json.loads(header["__metadata__"]["ken"])
    edit(document)
    text = json.dumps(document)
    header["__metadata__"]["ken"] = text
    header["__metadata__"]["digest"] = xxhash.xxh3_64_hexdigest(text.encode())
    encoded = json.dumps(header).encode()
    encoded += b" " * (-len(encoded) % 8)
    return struct.pack("<Q", len(encoded)) + encoded + data[8 + length :]


def _semantic_mutations(data: bytes) -> list[tuple[str, bytes]]:
    _, header = _header(data)
    document = json.loads(header["__metadata__"]["ken"])
    mutations = []
    for name, entry in document["tensors"].items():

        def set_field(field, value, name=name):
            return lambda d: d["tensors"][name].__setitem__(field, value)

        edits = {
            "count+1": set_field("count", entry.get("count", 0) + 1),
            "shape": set_field("shape", [*entry["shape"][:-1], entry["shape"][-1] + 1]),
            "dtype": set_field("dtype", "float16"),
            "kind": set_field("kind", "sparse"),
            "checksum": set_field("checksums", ["0" * 16] * len(entry["checksums"])),
            "drop": lambda d, name=name: d["tensors"].pop(name),
        }
        if entry["kind"] == "pruned":
            other = "mask" if entry["encoding"] == "indices" else "indices"
            edits["encoding"] = set_field("encoding", other)
            if "changed" in entry:  # version 2
                edits["changed+1"] = set_field("changed", entry["changed"] + 1)
                edits["changed-1"] = set_field("changed", max(0, entry["changed"] - 1))
                edits["sizes"] = set_field("sizes", [s + 1 for s in entry["sizes"]])
        elif "codec" in entry:
            edits["codec"] = set_field("codec", "none" if entry["codec"] == "zstd" else "zstd")
        for label, edit in edits.items():
            mutations.append((f"{name}: {label}", _rewrite_metadata(data, edit)))
    mutations.append(("fingerprints", _rewrite_metadata(data, lambda d: d.pop("fingerprints"))))
    return mutations


def test_two_hundred_mutations_raise_a_clear_error_or_read_identically(small_subnetworks, tmp_path):
    rng = random.Random(0)
    checked = 0
    for folder in [*small_subnetworks.values(), V1 / "ken"]:  # version 2, and 1
        data = (folder / SUBNETWORK_NAME).read_bytes()
        original = read_subnetwork(folder / SUBNETWORK_NAME)
        for label, mutated in _byte_mutations(data, rng, 120) + _semantic_mutations(data):
            path = tmp_path / "mutated.safetensors"
            path.write_bytes(mutated)
            try:
                result = read_subnetwork(path)
            except KENFormatError as error:
                assert str(path) in str(error), label
            else:
                assert _same(result, original), f"{label}: read without error but differs"
            checked += 1
    assert checked >= 200


def test_foreign_and_missing_files_are_clear_errors(tmp_path):
    with pytest.raises(KENFormatError, match="not a ken-hf subnetwork"):
        read_subnetwork(minilm_path() / "model.safetensors")
    (tmp_path / "junk.safetensors").write_text("hello")
    with pytest.raises(KENFormatError, match="not a readable safetensors file"):
        read_subnetwork(tmp_path / "junk.safetensors")
    with pytest.raises(KENFormatError, match="no such subnetwork file"):
        read_subnetwork(tmp_path / "absent.safetensors")


def test_corrupted_folder_never_half_applies(small_subnetworks, minilm_finetune, tmp_path):
    folder = tmp_path / "ken"
    shutil.copytree(small_subnetworks["mask"], folder)
    data = bytearray((folder / SUBNETWORK_NAME).read_bytes())
    data[-5] ^= 0xFF  # inside the last stored array
    (folder / SUBNETWORK_NAME).write_bytes(bytes(data))
    base = AutoModelForSequenceClassification.from_pretrained(minilm_finetune["base"], num_labels=2)
    before = {n: t.clone() for n, t in base.state_dict().items()}
    with pytest.raises(KENFormatError, match="checksum mismatch"):
        KENModel.from_pretrained(base, folder)
    assert all(torch.equal(before[n], t) for n, t in base.state_dict().items())


def test_interrupted_save_leaves_the_previous_folder_intact(small_subnetworks, monkeypatch):
    folder = small_subnetworks["indices"]
    before = {p.name: p.read_bytes() for p in folder.iterdir()}
    subnetwork = KENSubnetwork.from_pretrained(small_subnetworks["mask"])

    def crash(writer, stored):
        writer.add_whole("partial", torch.zeros(3))
        raise KeyboardInterrupt

    monkeypatch.setattr("ken_hf.storage.subnetwork_file.SubnetworkWriter.add_stored", crash)
    with pytest.raises(KeyboardInterrupt):
        subnetwork.save_pretrained(folder)
    assert {p.name: p.read_bytes() for p in folder.iterdir()} == before
    assert [p.name for p in folder.parent.iterdir() if p.name.startswith(".")] == []


def test_saving_over_an_existing_folder_replaces_it(small_subnetworks, tmp_path):
    target = tmp_path / "ken"
    shutil.copytree(small_subnetworks["indices"], target)
    KENSubnetwork.from_pretrained(small_subnetworks["mask"]).save_pretrained(target)
    assert _same(
        read_subnetwork(target / SUBNETWORK_NAME),
        read_subnetwork(small_subnetworks["mask"] / SUBNETWORK_NAME),
    )
