"""Shared fixtures: real pre-trained weights from packaged assets (see ken_hf.assets)."""

from __future__ import annotations

import os

import pytest
import torch
from safetensors.torch import load_file

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # nothing in the tests may reach the Hub


@pytest.fixture(scope="session")
def minilm_weights() -> dict[str, torch.Tensor]:
    """Every tensor of the real all-MiniLM-L6-v2 checkpoint (float32)."""
    from ken_hf.assets import minilm_path

    return load_file(str(minilm_path() / "model.safetensors"))


@pytest.fixture(scope="session")
def smollm2_weights() -> dict[str, torch.Tensor]:
    """A few real SmolLM2-135M tensors, dequantized from their Q4_1/Q8_0 GGUF blocks: rows
    with many repeated values. Layout as in the GGUF file (rows = its first numpy axis)."""
    import gguf

    from ken_hf.assets import smollm2_gguf_path

    reader = gguf.GGUFReader(str(smollm2_gguf_path()))
    wanted = {
        "blk.0.attn_q.weight",
        "blk.0.attn_k.weight",
        "blk.3.ffn_down.weight",
        "blk.5.ffn_up.weight",
        "blk.0.attn_norm.weight",
    }
    weights = {}
    for tensor in reader.tensors:
        if tensor.name in wanted:
            values = gguf.quants.dequantize(tensor.data, tensor.tensor_type)
            weights[tensor.name] = torch.from_numpy(values.copy()).float()
    return weights
