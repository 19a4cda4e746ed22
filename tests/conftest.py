"""Shared fixtures: real pre-trained weights from packaged assets (ken_hf.experiments.assets)."""

from __future__ import annotations

import os

import pytest
import torch
from safetensors.torch import load_file

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # nothing in the tests may reach the Hub

NEEDS_CUDA = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
# Devices for tests of whole paths (prune, callback, loading); the CUDA ones run under
# `make gpu-check` on a machine with a GPU.
DEVICES = ["cpu", pytest.param("cuda", marks=NEEDS_CUDA)]


@pytest.fixture(params=["compiled", "torch", pytest.param("cuda", marks=NEEDS_CUDA)])
def selection_device(request, monkeypatch) -> str:
    """Each way KEN selects rows: CPU rows through the compiled kernels (the default), CPU
    rows through the torch path (``KEN_HF_SELECT_BACKEND=torch``), and CUDA rows (always the
    torch path). Returns the device to put the rows on."""
    if request.param == "torch":
        monkeypatch.setenv("KEN_HF_SELECT_BACKEND", "torch")
    return "cuda" if request.param == "cuda" else "cpu"


@pytest.fixture(scope="session")
def minilm_weights() -> dict[str, torch.Tensor]:
    """Every tensor of the real all-MiniLM-L6-v2 checkpoint (float32)."""
    from ken_hf.experiments.assets import minilm_path

    return load_file(str(minilm_path() / "model.safetensors"))


@pytest.fixture(scope="session")
def smollm2_weights() -> dict[str, torch.Tensor]:
    """A few real SmolLM2-135M tensors, dequantized from their Q4_1/Q8_0 GGUF blocks: rows
    with many repeated values. Layout as in the GGUF file (rows = its first numpy axis)."""
    import gguf

    from ken_hf.experiments.assets import smollm2_gguf_path

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


@pytest.fixture(scope="session")
def minilm_finetune(tmp_path_factory):
    """A real (small) fine-tune of all-MiniLM-L6-v2 on movie snippets with a transformers
    Trainer. Returns the base folder, the fine-tuned model, its tokenizer, the held-out
    split and the names of its newly initialised parameters."""
    from transformers import (
        AutoModelForSequenceClassification,
        AutoTokenizer,
        DataCollatorWithPadding,
        Trainer,
        TrainingArguments,
    )

    from ken_hf.experiments.assets import minilm_path
    from ken_hf.experiments.tasks import movie_review_splits
    from ken_hf.storage.checkpoints import new_parameters

    base = str(minilm_path())
    tokenizer = AutoTokenizer.from_pretrained(base)
    train, held_out = movie_review_splits(tokenizer, train_size=192, eval_size=64, max_length=32)
    torch.manual_seed(0)
    model = AutoModelForSequenceClassification.from_pretrained(base, num_labels=2)
    args = TrainingArguments(
        output_dir=str(tmp_path_factory.mktemp("minilm-ft")),
        per_device_train_batch_size=16,
        num_train_epochs=1,
        learning_rate=5e-5,
        report_to=[],
        save_strategy="no",
        disable_tqdm=True,
        use_cpu=True,
        seed=0,
    )
    Trainer(
        model=model,
        args=args,
        train_dataset=train,
        data_collator=DataCollatorWithPadding(tokenizer),
    ).train()
    model.eval()
    return {
        "base": base,
        "model": model,
        "tokenizer": tokenizer,
        "held_out": held_out,
        "new": new_parameters(model, base),
    }


@pytest.fixture(scope="session")
def minilm_subnetwork(minilm_finetune, tmp_path_factory):
    """The keep 25 % subnetwork of ``minilm_finetune``, saved: ``(subnetwork, folder)``."""
    from transformers import AutoModelForSequenceClassification

    from ken_hf import KENConfig, KENSubnetwork

    base = AutoModelForSequenceClassification.from_pretrained(minilm_finetune["base"], num_labels=2)
    config = KENConfig(keep_ratio=0.25, base_model_name_or_path=minilm_finetune["base"])
    subnetwork = KENSubnetwork.from_weights(
        base, minilm_finetune["model"], config, new_tensors=minilm_finetune["new"], progress=False
    )
    folder = tmp_path_factory.mktemp("minilm-subnetwork") / "ken"
    subnetwork.save_pretrained(folder)
    return subnetwork, folder
