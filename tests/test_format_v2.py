"""Format version 2: kept values as a lossless, compressed delta against the base; version 1
files still load; the full fine-tune (keep ratio 1) stored as a delta."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from transformers import AutoModelForSequenceClassification

from ken_hf import AutoKENModelForSequenceClassification, KENConfig, KENModel, prune_model
from ken_hf.cli import main
from ken_hf.storage.delta_codec import (
    bit_difference,
    compress,
    decompress,
    from_planes,
    host_copies,
    to_planes,
)
from ken_hf.storage.subnetwork_file import SUBNETWORK_NAME, PrunedTensor, SubnetworkReader

V1 = Path(__file__).parent / "data" / "v1"  # a base, its fine-tune and a version 1 subnetwork
NEW = {"classifier.weight", "classifier.bias"}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64])
def test_the_delta_is_bit_exact_in_every_dtype(dtype):
    """Any bit patterns, NaN payloads, -0.0 and subnormals included, come back exactly."""
    torch.manual_seed(0)
    width = torch.empty((), dtype=dtype).element_size()
    integer = {2: torch.int16, 4: torch.int32, 8: torch.int64}[width]
    limits = torch.iinfo(integer)
    base = torch.randint(limits.min, limits.max, (4096,), dtype=integer).view(dtype)
    tuned = base.clone()
    tuned[::3] = torch.randint(limits.min, limits.max, (1366,), dtype=integer).view(dtype)
    tuned[1], tuned[2], tuned[4] = float("nan"), -0.0, torch.finfo(dtype).tiny / 2
    changed, difference = bit_difference(tuned, base)
    assert int(changed.sum()) == difference.numel() < tuned.numel()
    stored = from_planes(to_planes(difference), difference.dtype, difference.numel())
    positions = torch.arange(base.numel())
    pruned = PrunedTensor(base.shape, dtype, positions, None, changed, stored)
    where = pruned.written_positions()
    rebuilt = base.clone()
    rebuilt[where] = pruned.written_values(base[where])
    assert torch.equal(rebuilt.view(integer), tuned.view(integer))


def _tensors(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {name: t.detach().clone() for name, t in model.state_dict().items()}


def test_version_1_folders_load_apply_and_save_again_as_version_2(tmp_path):
    base = AutoModelForSequenceClassification.from_pretrained(V1 / "base")
    with SubnetworkReader(V1 / "ken" / SUBNETWORK_NAME) as reader:
        assert reader.version == "1"
    loaded = KENModel.from_pretrained(base, V1 / "ken")
    # The same pair pruned today gives the same weights, through a version 2 file.
    tuned = AutoModelForSequenceClassification.from_pretrained(V1 / "finetuned")
    config = KENConfig(keep_ratio=0.5)
    subnetwork = prune_model(tuned, AutoModelForSequenceClassification.from_pretrained(V1 / "base"),
                             config, new_tensors=NEW, progress=False)  # fmt: skip
    expected = _tensors(tuned)
    assert all(torch.equal(t, expected[n]) for n, t in _tensors(loaded.base_model).items())
    subnetwork.save_pretrained(tmp_path / "today")
    loaded.save_pretrained(tmp_path / "again")  # its delta taken against the base it is on
    with SubnetworkReader(tmp_path / "again" / SUBNETWORK_NAME) as reader:
        assert reader.version == "2"
    assert (tmp_path / "again" / SUBNETWORK_NAME).read_bytes() == (
        tmp_path / "today" / SUBNETWORK_NAME
    ).read_bytes()
    merged = tmp_path / "merged"
    assert main(["apply", "--base", str(V1 / "base"), "--ken", str(V1 / "ken"),
                 "--out", str(merged)]) == 0  # fmt: skip
    merged_model = AutoModelForSequenceClassification.from_pretrained(merged)
    assert all(torch.equal(t, expected[n]) for n, t in _tensors(merged_model).items())


def test_keep_ratio_1_stores_the_full_fine_tune_as_a_delta(minilm_finetune, tmp_path, capsys):
    """``ken prune --keep-ratio 1``: the whole fine-tune, rebuilt bit for bit, in fewer bytes
    than its checkpoint."""
    finetuned = tmp_path / "finetuned"
    minilm_finetune["model"].save_pretrained(finetuned)
    out = tmp_path / "ken"
    args = ["prune", "--base", minilm_finetune["base"], "--finetuned", str(finetuned)]
    assert main([*args, "--keep-ratio", "1", "--out", str(out)]) == 0
    loaded = AutoKENModelForSequenceClassification.from_pretrained(out)
    expected = _tensors(minilm_finetune["model"])
    for name, tensor in _tensors(loaded.base_model).items():
        assert torch.equal(tensor, expected[name]), name
    stored = (out / SUBNETWORK_NAME).stat().st_size
    assert stored < 0.9 * (finetuned / "model.safetensors").stat().st_size
    capsys.readouterr()
    assert main(["inspect", str(out), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["format_version"] == "2" and info["kept_fraction"] == 1.0


def test_compression_level_changes_size_not_content(minilm_finetune, tmp_path):
    tuned = AutoModelForSequenceClassification.from_pretrained(
        minilm_finetune["base"], num_labels=2
    )
    tuned.load_state_dict(minilm_finetune["model"].state_dict())
    base = AutoModelForSequenceClassification.from_pretrained(minilm_finetune["base"], num_labels=2)
    subnetwork = prune_model(tuned, base, KENConfig(keep_ratio=0.75), progress=False)
    sizes = {}
    for level in (1, 19):
        folder = tmp_path / f"level{level}"
        subnetwork.save_pretrained(folder, compression_level=level)
        sizes[level] = (folder / SUBNETWORK_NAME).stat().st_size
        loaded = AutoKENModelForSequenceClassification.from_pretrained(folder)
        assert all(
            torch.equal(t, _tensors(tuned)[n]) for n, t in _tensors(loaded.base_model).items()
        )
    assert sizes[19] < sizes[1]


def test_decompress_takes_exactly_the_frame_it_is_told_of():
    """Decompressed into numpy memory: a frame holding fewer or more bytes than the header
    says, a truncated frame or no frame at all are errors, never a silent partial array."""
    data = bytes(range(256)) * 40
    frame = compress(data)
    assert decompress(frame, len(data)).tobytes() == data
    assert decompress(np.frombuffer(frame, dtype=np.uint8), len(data)).tobytes() == data
    assert decompress(compress(b""), 0).size == 0
    for bad_frame, size in [
        (frame, len(data) + 1),  # holds less than told
        (frame, len(data) - 1),  # holds more
        (frame[:-5], len(data)),  # truncated
        (b"not a zstd frame at all", 10),
    ]:
        with pytest.raises(ValueError, match="zstd frame"):
            decompress(bad_frame, size)


def test_host_copies_are_equal_separate_tensors():
    """One allocation carved into tensors, each with a storage of its own (safetensors and
    save_pretrained would take shared storages for tied weights)."""
    tensors = [torch.randn(3, 5), torch.randn(0), torch.randn(7).to(torch.bfloat16),
               torch.randn(2, 2).t(), torch.randn(()).to(torch.float64)]  # fmt: skip
    copies = host_copies(tensors)
    for tensor, copy in zip(tensors, copies, strict=True):
        assert copy.dtype == tensor.dtype and copy.shape == tensor.shape
        assert copy.is_contiguous() and torch.equal(copy, tensor)
    filled = [c for c in copies if c.numel()]
    assert len({c.untyped_storage().data_ptr() for c in filled}) == len(filled)
    assert all(c.untyped_storage().nbytes() == c.numel() * c.element_size() for c in filled)
    copies[0].add_(1)
    assert torch.equal(copies[2], tensors[2])  # writing one leaves its neighbours alone
