"""What KEN is given is a full fine-tune, and what it writes says which model it is: a model
wrapped by PEFT is refused (by the callback before the first step, and by ``prune_model``),
and every ``config.json`` ken-hf writes names the fine-tuned model's class, as
``save_pretrained`` of transformers does, so that ``ken apply``'s merged checkpoint loads as
that class."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import torch
from peft import LoraConfig, get_peft_model
from transformers import (
    AutoModelForSequenceClassification,
    Trainer,
    TrainerCallback,
    TrainingArguments,
)

from ken_hf import KENCallback, KENConfig, KENSubnetwork, prune_model
from ken_hf.cli import main
from ken_hf.errors import KENConfigError

LORA = LoraConfig(r=4, target_modules=["query", "value"], task_type="SEQ_CLS")


class CountSteps(TrainerCallback):
    def __init__(self) -> None:
        self.steps = 0

    def on_step_end(self, args, state, control, **kwargs):
        self.steps += 1


def test_a_peft_model_stops_the_callback_at_training_begin(minilm_finetune, tmp_path):
    model = get_peft_model(
        AutoModelForSequenceClassification.from_pretrained(minilm_finetune["base"], num_labels=2),
        LORA,
    )
    steps = CountSteps()
    args = TrainingArguments(
        output_dir=str(tmp_path), max_steps=2, report_to=[], use_cpu=True, save_strategy="no"
    )
    trainer = Trainer(
        model=model,
        args=args,
        train_dataset=minilm_finetune["held_out"],
        callbacks=[KENCallback(keep_ratio=0.5), steps],
    )
    with pytest.raises(KENConfigError, match="wrapped by PEFT") as refused:
        trainer.train()
    assert "merge_and_unload()" in str(refused.value)
    assert steps.steps == 0  # stopped before the first step
    assert not (tmp_path / "ken").exists()


def test_prune_model_refuses_a_peft_model(minilm_finetune):
    base = AutoModelForSequenceClassification.from_pretrained(minilm_finetune["base"], num_labels=2)
    wrapped = get_peft_model(copy.deepcopy(minilm_finetune["model"]), LORA)
    before = {n: t.clone() for n, t in wrapped.state_dict().items()}
    with pytest.raises(KENConfigError, match="LoRA|Linear|wrapped by PEFT"):
        prune_model(wrapped, base, KENConfig(keep_ratio=0.5), new_tensors=minilm_finetune["new"])
    after = wrapped.state_dict()
    assert all(torch.equal(before[n], after[n]) for n in before)  # nothing was reset
    # merged, as the message says, it prunes
    merged = wrapped.merge_and_unload()
    subnetwork = prune_model(
        merged, base, KENConfig(keep_ratio=0.5), new_tensors=minilm_finetune["new"], progress=False
    )
    assert 0.45 < subnetwork.kept_fraction() < 0.55


def test_config_json_names_the_fine_tuned_class_and_ken_apply_loads_as_it(
    minilm_finetune, tmp_path
):
    """The packaged MiniLM's config.json says BertModel; the fine-tune is a
    BertForSequenceClassification, and that is what the subnetwork's config.json, and so the
    merged checkpoint's, must say."""
    base_path = minilm_finetune["base"]
    packaged = json.loads((Path(base_path) / "config.json").read_text())
    assert packaged["architectures"] == ["BertModel"]
    base = AutoModelForSequenceClassification.from_pretrained(base_path, num_labels=2)
    subnetwork = KENSubnetwork.from_weights(
        base,
        minilm_finetune["model"],
        KENConfig(keep_ratio=0.5),
        new_tensors=minilm_finetune["new"],
        progress=False,
    )
    subnetwork.save_pretrained(tmp_path / "ken")
    saved = json.loads((tmp_path / "ken" / "config.json").read_text())
    assert saved["architectures"] == ["BertForSequenceClassification"]
    args = ["apply", "--base", base_path, "--ken", str(tmp_path / "ken"), "--out"]
    assert main([*args, str(tmp_path / "merged")]) == 0
    merged_config = json.loads((tmp_path / "merged" / "config.json").read_text())
    assert merged_config["architectures"] == ["BertForSequenceClassification"]
    merged = AutoModelForSequenceClassification.from_pretrained(tmp_path / "merged")
    assert type(merged).__name__ == merged_config["architectures"][0]
    expected = copy.deepcopy(base)
    subnetwork.apply_to(expected)
    expected_state = expected.state_dict()
    for name, tensor in merged.state_dict().items():
        assert torch.equal(tensor, expected_state[name]), name
