"""Whole paths on every device: pruning, loading and the callback on a model in bf16, on the
CPU and on CUDA (the CUDA cases are skipped without a GPU; `make gpu-check` runs them).

Selection on a device must give the masks that the CPU gives (the oracle tests pin the CPU
masks to the specification), also with TF32 matrix products switched on process-wide.
"""

from __future__ import annotations

import copy

import pytest
import torch
from conftest import DEVICES, NEEDS_CUDA
from device_checks import KeepFineTuned, masks_differing_from_cpu
from transformers import (
    AutoModelForSequenceClassification,
    DataCollatorWithPadding,
    Trainer,
    TrainingArguments,
)

from ken_hf import (
    AutoKENModelForSequenceClassification,
    KENCallback,
    KENConfig,
    prune_model,
)
from ken_hf.cli import main
from ken_hf.storage.checkpoints import tensors_of
from ken_hf.storage.subnetwork_file import SUBNETWORK_NAME

TARGETS = ["layer.0.attention.self.query", "layer.1.output.dense", "layer.2.intermediate.dense"]


def _load(path: str, device: str, dtype: torch.dtype = torch.float32) -> torch.nn.Module:
    torch.manual_seed(1)
    model = AutoModelForSequenceClassification.from_pretrained(path, num_labels=2, dtype=dtype)
    return model.to(device).eval()


@pytest.fixture
def tf32_everywhere():
    """TF32 matrix products switched on process-wide, as many training scripts do."""
    before = torch.get_float32_matmul_precision(), torch.backends.cuda.matmul.allow_tf32
    torch.set_float32_matmul_precision("high")
    torch.backends.cuda.matmul.allow_tf32 = True
    yield
    torch.set_float32_matmul_precision(before[0])
    torch.backends.cuda.matmul.allow_tf32 = before[1]


@pytest.fixture(scope="module")
def finetuned_folder(minilm_finetune, tmp_path_factory):
    folder = tmp_path_factory.mktemp("finetuned") / "model"
    minilm_finetune["model"].save_pretrained(folder)
    return folder


@pytest.mark.parametrize("device", DEVICES)
def test_prune_and_reload_in_bf16_on_device(minilm_finetune, device, tf32_everywhere, tmp_path):
    """A bf16 fine-tune and base on ``device``: the masks are the CPU's, the pruned weights
    are kept values over the base, and the saved subnetwork reloads onto ``device`` with the
    pruned weights bit for bit."""
    tuned = copy.deepcopy(minilm_finetune["model"]).to(device, torch.bfloat16)
    finetuned = {name: t.detach().clone() for name, t in tensors_of(tuned).items()}
    base = _load(minilm_finetune["base"], device, torch.bfloat16)
    subnetwork = prune_model(tuned, base, KENConfig(keep_ratio=0.5, target_modules=TARGETS))
    assert len(subnetwork.pruned) == 2 * len(TARGETS)  # a weight and a bias each
    assert masks_differing_from_cpu(subnetwork, finetuned) == []
    for name in subnetwork.pruned:
        mask = subnetwork.mask(name).to(device)
        pruned = torch.where(mask, finetuned[name], base.state_dict()[name])
        assert torch.equal(tuned.state_dict()[name], pruned), name

    subnetwork.save_pretrained(tmp_path / "ken")
    loaded = AutoKENModelForSequenceClassification.from_pretrained(
        tmp_path / "ken", device_map=device
    )
    assert loaded.dtype == torch.bfloat16 and loaded.device.type == device
    for name, tensor in tuned.state_dict().items():
        assert torch.equal(loaded.base_model.state_dict()[name], tensor), name


@pytest.mark.parametrize("device", DEVICES)
def test_callback_in_bf16_on_device(minilm_finetune, device, tf32_everywhere, tmp_path):
    """A short Trainer run of a bf16 model on ``device`` with KENCallback: the callback's
    masks are the ones the CPU selects from the fine-tuned values, the saved subnetwork
    reloads onto ``device`` to the pruned model's logits, and before/after metrics exist."""
    tokenizer = minilm_finetune["tokenizer"]
    model = _load(minilm_finetune["base"], device, torch.bfloat16).train()
    keep = KeepFineTuned()
    callback = KENCallback(keep_ratio=0.5, target_modules=TARGETS, save_dir=str(tmp_path / "ken"))
    args = TrainingArguments(
        output_dir=str(tmp_path / "run"),
        per_device_train_batch_size=16,
        max_steps=3,
        learning_rate=1e-3,
        bf16=True,
        report_to=[],
        save_strategy="no",
        disable_tqdm=True,
        use_cpu=device == "cpu",
        seed=0,
    )
    held_out = minilm_finetune["held_out"]
    trainer = Trainer(
        model=model,
        args=args,
        train_dataset=held_out,
        eval_dataset=held_out.select(range(16)),
        data_collator=DataCollatorWithPadding(tokenizer),
        callbacks=[keep, callback],
    )
    trainer.train()
    assert {"ken_before_loss", "ken_after_loss"} <= set(callback.report["metrics_before"]) | set(
        callback.report["metrics_after"]
    )
    assert masks_differing_from_cpu(callback.subnetwork, keep.weights) == []

    batch = tokenizer(["a gripping, funny film", "dull"], return_tensors="pt", padding=True)
    batch = {key: value.to(device) for key, value in batch.items()}
    loaded = AutoKENModelForSequenceClassification.from_pretrained(
        tmp_path / "ken", device_map=device
    )
    with torch.no_grad():
        assert torch.equal(loaded(**batch).logits, model.eval()(**batch).logits)


@pytest.mark.parametrize("device", [pytest.param("cuda", marks=NEEDS_CUDA)])
def test_ken_prune_on_cuda_writes_the_cpu_bytes(
    minilm_finetune, finetuned_folder, device, tmp_path
):
    """``ken prune --device cuda`` writes the file that ``ken prune`` on the CPU writes."""
    args = ["prune", "--base", minilm_finetune["base"], "--finetuned", str(finetuned_folder)]
    args += ["--keep-ratio", "0.5", "--target-modules", *TARGETS]
    assert main([*args, "--out", str(tmp_path / "cpu")]) == 0
    assert main([*args, "--device", device, "--out", str(tmp_path / device)]) == 0
    on_device = (tmp_path / device / SUBNETWORK_NAME).read_bytes()
    assert on_device == (tmp_path / "cpu" / SUBNETWORK_NAME).read_bytes()
