"""KENCallback inside TRL's trainers: SFTTrainer, DPOTrainer and RewardTrainer, a couple of
steps each on a 2-layer cut of SmolLM2-135M-Instruct (real weights, real chat template),
in fp32 and with ``bf16=True`` (TRL's default, CPU autocast here).

Each run must save the subnetwork in ``<output_dir>/ken``, keep half of the targeted
values, and reload to exactly the trainer's pruned model: the same weights, and the same
outputs on a fixed batch when both are evaluated the same way, in fp32 outside autocast
and under the same ``torch.autocast("cpu", dtype=torch.bfloat16)``.

After a ``bf16=True`` run, ``trainer.model`` still runs its forward under the autocast
that accelerate wrapped around it, so calling it directly gives bf16-rounded logits,
which differ from the reloaded model's fp32 logits. The bf16 tests check that this
difference comes from autocast alone and not from KEN (see docs/trl.md).
"""

from __future__ import annotations

import inspect
from pathlib import Path

import pytest
import torch
from datasets import Dataset
from transformers import (
    AutoModelForCausalLM,
    AutoModelForSequenceClassification,
    AutoTokenizer,
    TrainingArguments,
)

from ken_hf import (
    AutoKENModelForCausalLM,
    AutoKENModelForSequenceClassification,
    KENCallback,
    KENSubnetwork,
)
from ken_hf.experiments.assets import movie_reviews, smollm2_path

# Installed by `make test` (the dev extra); absent only from `make test-min`, whose version
# floors no trl release accepts (see tests/test_version_floors.py).
trl = pytest.importorskip("trl")

# The attention projections of both layers: quick to select; everything else goes back
# to its pre-trained value (the reward head, new, is stored whole).
ATTENTION = r"model\.layers\.\d+\.self_attn\.[qkvo]_proj"
KEEP = 0.5
PRECISIONS = pytest.mark.parametrize("bf16", [False, True], ids=["fp32", "bf16"])
# The argument's name since transformers 5.x; older releases call it gradient_checkpointing.
CHECKPOINTING = (
    "activation_checkpointing"
    if "activation_checkpointing" in inspect.signature(TrainingArguments).parameters
    else "gradient_checkpointing"
)
# A short system turn: SmolLM2's template otherwise adds a long default one.
SYSTEM = {"role": "system", "content": "You review films."}


@pytest.fixture(scope="module")
def reviews() -> dict[str, list[str]]:
    """Short real movie-review snippets, by sentiment; the last two of each are held out."""
    texts, labels = movie_reviews()
    short = [(t, label) for t, label in zip(texts, labels, strict=True) if 40 < len(t) < 90]
    return {
        "positive": [t for t, label in short if label == 1][:6],
        "negative": [t for t, label in short if label == 0][:6],
    }


@pytest.fixture(scope="module")
def tokenizer():
    return AutoTokenizer.from_pretrained(smollm2_path(2))


def _prompt(sentiment: str) -> list[dict]:
    return [SYSTEM, {"role": "user", "content": f"Write a {sentiment} movie review."}]


def _answer(text: str) -> list[dict]:
    return [{"role": "assistant", "content": text}]


def _sft_data(reviews, rows: slice) -> Dataset:
    """Conversational prompt-completion rows: a request, and a real review as the answer."""
    return Dataset.from_list(
        [
            {"prompt": _prompt(sentiment), "completion": _answer(text)}
            for sentiment in ("positive", "negative")
            for text in reviews[sentiment][rows]
        ]
    )


def _preference_data(reviews, rows: slice) -> Dataset:
    """Conversational preference rows: the review of the asked sentiment is chosen, one of
    the other sentiment rejected."""
    other = {"positive": "negative", "negative": "positive"}
    return Dataset.from_list(
        [
            {
                "prompt": _prompt(sentiment),
                "chosen": _answer(text),
                "rejected": _answer(reviews[other[sentiment]][rows][i]),
            }
            for sentiment in ("positive", "negative")
            for i, text in enumerate(reviews[sentiment][rows])
        ]
    )


def _settings(tmp_path, bf16: bool) -> dict:
    return {
        "output_dir": str(tmp_path / "run"),
        "max_steps": 2,
        "per_device_train_batch_size": 2,
        "per_device_eval_batch_size": 4,
        "max_length": 64,
        "learning_rate": 1e-4,
        "bf16": bf16,  # TRL's configs default to bf16=True; both are asked for explicitly
        CHECKPOINTING: False,  # TRL's default is True; off for speed
        "report_to": [],
        "save_strategy": "no",
        "use_cpu": True,
        "disable_tqdm": True,
        "seed": 0,
    }


def _check(trainer, callback: KENCallback, auto_class, tokenizer, reviews, *, bf16: bool, scores):
    """The subnetwork saved by ``callback`` reloads to the trainer's pruned model: same
    weights; same outputs (``scores`` picks them from a forward's output) on a fixed batch
    of held-out reviews evaluated the same way, exactly."""
    folder = Path(trainer.args.output_dir) / "ken"
    for name in ("ken_config.json", "ken_subnetwork.safetensors"):
        assert (folder / name).is_file(), name
    subnetwork = KENSubnetwork.from_pretrained(folder)
    # Every pruned row has 576 values (the hidden size): exactly half of each is kept.
    assert subnetwork.kept_fraction() == KEEP
    assert callback.report["ken_kept_fraction"] == KEEP
    assert "ken_before_loss" in callback.report["metrics_before"]  # evaluated by the trainer
    assert "ken_after_loss" in callback.report["metrics_after"]

    ken = auto_class.from_pretrained(folder)
    with ken.disable_subnetwork():  # the pre-trained weights
        base = {name: value.clone() for name, value in ken.base_model.state_dict().items()}
    reloaded = ken.base_model.eval()
    # The trainer's model was pruned: the kept values are the trained ones, the others and
    # every untargeted tensor the pre-trained ones.
    final = trainer.accelerator.unwrap_model(trainer.model).state_dict()
    q_proj, up_proj = "model.layers.0.self_attn.q_proj.weight", "model.layers.1.mlp.up_proj.weight"
    kept = subnetwork.mask(q_proj)
    assert torch.equal(final[q_proj][~kept], base[q_proj][~kept])
    assert not torch.equal(final[q_proj][kept], base[q_proj][kept])
    assert torch.equal(final[up_proj], base[up_proj])
    texts = reviews["positive"][-2:] + reviews["negative"][-2:]
    batch = tokenizer(texts, return_tensors="pt", padding=True)
    autocast = torch.autocast("cpu", dtype=torch.bfloat16)
    trainer.model.eval()
    with torch.no_grad():
        # trainer.model as the Trainer left it: under bf16, its forward runs in autocast.
        as_left = scores(trainer.model(**batch))
        plain = trainer.accelerator.unwrap_model(trainer.model, keep_fp32_wrapper=False)
        assert plain.training is False
        pruned_fp32, reloaded_fp32 = scores(plain(**batch)), scores(reloaded(**batch))
        with autocast:
            pruned_bf16, reloaded_bf16 = scores(plain(**batch)), scores(reloaded(**batch))

    weights = reloaded.state_dict()
    for key, value in plain.state_dict().items():
        assert torch.equal(weights[key], value), key
    assert pruned_fp32.dtype == torch.float32 and pruned_bf16.dtype == torch.bfloat16
    assert torch.equal(pruned_fp32, reloaded_fp32)  # both in fp32, outside autocast
    assert torch.equal(pruned_bf16, reloaded_bf16)  # both under the same autocast
    if bf16:
        # accelerate's wrapper: the same autocast, outputs cast back to fp32 (exactly).
        assert as_left.dtype == torch.float32
        assert torch.equal(as_left, reloaded_bf16.float())
        # Comparing trainer.model with the reloaded model in fp32 mixes the two: a
        # difference that is autocast's rounding, not KEN's.
        assert not torch.equal(as_left, reloaded_fp32)
    else:
        assert torch.equal(as_left, reloaded_fp32)


def _logits(output) -> torch.Tensor:
    return output.logits


@PRECISIONS
def test_sft_trainer(tmp_path, reviews, tokenizer, bf16):
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(smollm2_path(2))
    callback = KENCallback(keep_ratio=KEEP, target_modules=ATTENTION)
    trainer = trl.SFTTrainer(
        model=model,
        args=trl.SFTConfig(**_settings(tmp_path, bf16)),
        train_dataset=_sft_data(reviews, slice(0, 2)),
        eval_dataset=_sft_data(reviews, slice(2, 3)),
        processing_class=tokenizer,
        callbacks=[callback],
    )
    trainer.train()
    _check(trainer, callback, AutoKENModelForCausalLM, tokenizer, reviews, bf16=bf16,
           scores=_logits)  # fmt: skip
    # The trainer's tokenizer is saved beside the subnetwork, chat template included.
    saved = AutoTokenizer.from_pretrained(Path(trainer.args.output_dir) / "ken")
    assert saved.chat_template == tokenizer.chat_template


@PRECISIONS
def test_dpo_trainer(tmp_path, reviews, tokenizer, bf16):
    """The reference model is the one DPOTrainer builds itself (``ref_model=None``)."""
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(smollm2_path(2))
    callback = KENCallback(keep_ratio=KEEP, target_modules=ATTENTION)
    trainer = trl.DPOTrainer(
        model=model,
        args=trl.DPOConfig(**_settings(tmp_path, bf16)),
        train_dataset=_preference_data(reviews, slice(0, 2)),
        eval_dataset=_preference_data(reviews, slice(2, 3)),
        processing_class=tokenizer,
        callbacks=[callback],
    )
    trainer.train()
    _check(trainer, callback, AutoKENModelForCausalLM, tokenizer, reviews, bf16=bf16,
           scores=_logits)  # fmt: skip
    # KEN pruned the policy only; the reference model still holds the pre-trained weights.
    reference = dict(trainer.ref_model.named_parameters())
    for name, value in AutoModelForCausalLM.from_pretrained(smollm2_path(2)).named_parameters():
        assert torch.equal(reference[name], value), name


@PRECISIONS
def test_reward_trainer(tmp_path, reviews, tokenizer, bf16):
    """A sequence-classification model with one label: its new ``score`` head is stored
    whole, the attention projections pruned."""
    torch.manual_seed(0)
    model = AutoModelForSequenceClassification.from_pretrained(smollm2_path(2), num_labels=1)
    model.config.pad_token_id = tokenizer.pad_token_id
    callback = KENCallback(keep_ratio=KEEP, target_modules=ATTENTION)
    trainer = trl.RewardTrainer(
        model=model,
        args=trl.RewardConfig(**_settings(tmp_path, bf16)),
        train_dataset=_preference_data(reviews, slice(0, 2)),
        eval_dataset=_preference_data(reviews, slice(2, 3)),
        processing_class=tokenizer,
        callbacks=[callback],
    )
    trainer.train()
    assert callback.report["stored_whole"] == ["score.weight"]
    _check(trainer, callback, AutoKENModelForSequenceClassification, tokenizer, reviews,
           bf16=bf16, scores=_logits)  # fmt: skip
