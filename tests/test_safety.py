"""A user's ordinary moves are safe: saving never deletes what ken-hf did not write, every
documented way of making a subnetwork gives one that reloads to identical logits, a loaded
KEN model saves through a Trainer, the base dtype travels with the subnetwork, and the three
drivers of the pipeline write the same file for the same pair."""

from __future__ import annotations

import copy

import pytest
import torch
from transformers import (
    AutoModelForSequenceClassification,
    BertForSequenceClassification,
    PreTrainedModel,
    Trainer,
    TrainingArguments,
)

from ken_hf import (
    AutoKENModelForSequenceClassification,
    KENConfig,
    KENModel,
    KENSubnetwork,
    prune_model,
)
from ken_hf.cli import main
from ken_hf.storage.subnetwork_file import SUBNETWORK_NAME

TARGETS = ["layer.0.attention.self.query", "layer.1.output.dense"]


def _base(path: str, **kwargs) -> torch.nn.Module:
    torch.manual_seed(1)  # a classifier unlike the fine-tune's initial one
    return AutoModelForSequenceClassification.from_pretrained(path, num_labels=2, **kwargs).eval()


def _logits(model: torch.nn.Module, batch: dict) -> torch.Tensor:
    with torch.no_grad():
        return model(**batch).logits


@pytest.fixture(scope="module")
def batch(minilm_finetune):
    texts = ["a gripping, funny film", "dull and far too long", "not bad at all"]
    return dict(minilm_finetune["tokenizer"](texts, return_tensors="pt", padding=True))


@pytest.fixture(scope="module")
def finetuned_folder(minilm_finetune, tmp_path_factory):
    folder = tmp_path_factory.mktemp("finetuned") / "model"
    minilm_finetune["model"].save_pretrained(folder)
    minilm_finetune["tokenizer"].save_pretrained(folder)
    return folder


def _with_foreign_files(folder):
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "my_notes.txt").write_text("mine")
    (folder / "checkpoint-500").mkdir(exist_ok=True)
    (folder / "checkpoint-500" / "model.safetensors").write_bytes(b"user's")
    return folder


def _foreign_files_survive(folder) -> bool:
    return (folder / "my_notes.txt").read_text() == "mine" and (
        folder / "checkpoint-500" / "model.safetensors"
    ).read_bytes() == b"user's"


def test_readme_paths_with_a_new_head_reload_identically(
    minilm_finetune, finetuned_folder, batch, tmp_path
):
    """``prune_model`` with a base model, with a state dict, with a fine-tune loaded from its
    own folder; ``KENSubnetwork.from_weights``; ``ken prune``: each folder, saved among a
    user's files, reloads through ``AutoKENModelFor*`` to the in-memory pruned model's
    logits, and the user's files survive."""
    base_path, config = minilm_finetune["base"], KENConfig(k=96, target_modules=TARGETS)
    expected = {}

    tuned = copy.deepcopy(minilm_finetune["model"])
    subnetwork = prune_model(tuned, _base(base_path), config, progress=False)
    expected["model"] = (subnetwork, _logits(tuned, batch))

    tuned = copy.deepcopy(minilm_finetune["model"])
    subnetwork = prune_model(tuned, _base(base_path).state_dict(), config, progress=False)
    expected["state-dict"] = (subnetwork, _logits(tuned, batch))

    own_folder = _base(str(finetuned_folder))  # name_or_path: the fine-tune's folder
    subnetwork = prune_model(own_folder, _base(base_path), config, progress=False)
    assert subnetwork.config.base_model_name_or_path == base_path  # the base's, not the tune's
    expected["own-folder"] = (subnetwork, _logits(own_folder, batch))

    subnetwork = KENSubnetwork.from_weights(_base(base_path), minilm_finetune["model"], config)
    rebuilt = _base(base_path)
    subnetwork.apply_to(rebuilt)
    expected["from-weights"] = (subnetwork, _logits(rebuilt, batch))

    for label, (subnetwork, logits) in expected.items():
        assert set(subnetwork.whole) == {"classifier.weight", "classifier.bias"}, label
        folder = _with_foreign_files(tmp_path / label)
        subnetwork.save_pretrained(folder)
        loaded = AutoKENModelForSequenceClassification.from_pretrained(folder)
        assert torch.equal(_logits(loaded, batch), logits), label
        assert _foreign_files_survive(folder), label

    out = _with_foreign_files(tmp_path / "cli")
    args = ["prune", "--base", base_path, "--finetuned", str(finetuned_folder)]
    assert main([*args, "--k", "96", "--target-modules", *TARGETS, "--out", str(out)]) == 0
    loaded = AutoKENModelForSequenceClassification.from_pretrained(out)
    assert torch.equal(_logits(loaded, batch), expected["own-folder"][1])
    assert _foreign_files_survive(out)
    # Same pair, same subnetwork: the in-memory and the streaming driver write the same bytes.
    assert (out / SUBNETWORK_NAME).read_bytes() == (
        tmp_path / "own-folder" / SUBNETWORK_NAME
    ).read_bytes()


def test_unknown_new_tensors_stop_at_prune_time_naming_them(minilm_finetune):
    untouched = AutoModelForSequenceClassification.from_config(minilm_finetune["model"].config)
    tuned = copy.deepcopy(minilm_finetune["model"])
    tuned.name_or_path = ""  # nothing says where either came from
    with pytest.raises(ValueError, match=r"new_tensors=.*classifier\.bias"):
        prune_model(tuned, untouched.state_dict(), KENConfig(k=8), progress=False)
    with pytest.raises(ValueError, match="does not hold the base given"):
        config = KENConfig(k=8, base_model_name_or_path=minilm_finetune["base"])
        prune_model(tuned, untouched, config, progress=False)


def test_a_loaded_ken_model_saves_through_a_trainer(
    minilm_finetune, finetuned_folder, batch, tmp_path
):
    """Trainer.save_model of a loaded KEN model writes the subnetwork (or, asked to, the
    merged model), among the user's files; both reload to the same logits. Weights trained
    further are not saved as a subnetwork that would not rebuild them."""
    first = tmp_path / "ken"
    args = ["prune", "--base", minilm_finetune["base"], "--finetuned", str(finetuned_folder)]
    assert main([*args, "--keep-ratio", "0.5", "--out", str(first)]) == 0
    model = AutoKENModelForSequenceClassification.from_pretrained(first)
    assert isinstance(model, KENModel) and isinstance(model, PreTrainedModel)
    assert isinstance(model.base_model, BertForSequenceClassification)
    logits = _logits(model, batch)
    args = TrainingArguments(output_dir=str(tmp_path / "run"), report_to=[], use_cpu=True)
    trainer = Trainer(model=model, args=args, processing_class=minilm_finetune["tokenizer"])
    out = _with_foreign_files(tmp_path / "saved")
    trainer.save_model(str(out))
    assert _foreign_files_survive(out)
    assert torch.equal(
        _logits(AutoKENModelForSequenceClassification.from_pretrained(out), batch), logits
    )

    model.save_merged = True
    trainer.save_model(str(tmp_path / "merged"))
    merged = AutoModelForSequenceClassification.from_pretrained(tmp_path / "merged").eval()
    assert torch.equal(_logits(merged, batch), logits)

    model.save_merged = False
    with torch.no_grad():
        model.base_model.bert.pooler.dense.bias.add_(1e-3)
    with pytest.raises(ValueError, match=r"pooler\.dense\.bias.*merged=True"):
        trainer.save_model(str(tmp_path / "changed"))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def test_the_base_dtype_travels_with_the_subnetwork(minilm_finetune, batch, tmp_path, dtype):
    base_path = minilm_finetune["base"]
    tuned = copy.deepcopy(minilm_finetune["model"]).to(dtype)
    subnetwork = prune_model(
        tuned, _base(base_path, dtype=dtype), KENConfig(k=32, target_modules=TARGETS)
    )
    assert subnetwork.config.base_model_dtype == str(dtype).removeprefix("torch.")
    subnetwork.save_pretrained(tmp_path / "ken")
    loaded = AutoKENModelForSequenceClassification.from_pretrained(tmp_path / "ken")
    assert loaded.dtype == dtype
    assert torch.equal(_logits(loaded, batch), _logits(tuned, batch))


def test_the_three_drivers_write_the_same_file(minilm_finetune, finetuned_folder, tmp_path):
    """In memory (``prune_model``), checkpoint to checkpoint (``ken prune``) and sharded
    (``prune_sharded`` over FSDP2 DTensors, one gloo process): one pair, one file."""
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    from ken_hf.making.base_source import locate_base
    from ken_hf.making.sharded import prune_sharded
    from ken_hf.storage.checkpoints import tensors_of

    base_path, config = minilm_finetune["base"], KENConfig(keep_ratio=0.5, target_modules=TARGETS)
    tuned = _base(str(finetuned_folder))
    prune_model(tuned, _base(base_path), config, progress=False).save_pretrained(tmp_path / "a")
    args = ["prune", "--base", base_path, "--finetuned", str(finetuned_folder)]
    assert main([*args, "--keep-ratio", "0.5", "--target-modules", *TARGETS,
                 "--out", str(tmp_path / "b")]) == 0  # fmt: skip

    base = _base(base_path)
    snapshot = {name: t.detach().clone() for name, t in tensors_of(base).items()}
    source, _ = locate_base(base, base, config, snapshot)
    sharded = _base(str(finetuned_folder))
    dist.init_process_group(
        "gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1
    )
    try:
        fully_shard(sharded, mesh=init_device_mesh("cpu", (1,)))
        subnetwork = prune_sharded(
            sharded, snapshot, config, new_tensors=source.missing, main=True, source=source
        )
    finally:
        dist.destroy_process_group()
    subnetwork.save_pretrained(tmp_path / "c")
    files = [(tmp_path / label / SUBNETWORK_NAME).read_bytes() for label in "abc"]
    assert files[0] == files[1] == files[2]
    assert KENSubnetwork.from_pretrained(tmp_path / "a").pruned  # and not an empty one


def test_ken_apply_into_a_folder_keeps_the_users_files(minilm_finetune, finetuned_folder, tmp_path):
    base_path = minilm_finetune["base"]
    args = ["prune", "--base", base_path, "--finetuned", str(finetuned_folder), "--k", "64"]
    assert main([*args, "--out", str(tmp_path / "ken")]) == 0
    out = _with_foreign_files(tmp_path / "merged")
    for shard_size in ("20MB", "1GB"):  # sharded, then one file: the old shards go
        apply = ["apply", "--base", base_path, "--ken", str(tmp_path / "ken"), "--out", str(out)]
        assert main([*apply, "--max-shard-size", shard_size]) == 0
        assert _foreign_files_survive(out)
    assert sorted(p.name for p in out.glob("*.safetensors")) == ["model.safetensors"]
    assert not (out / "model.safetensors.index.json").exists()
    merged = AutoModelForSequenceClassification.from_pretrained(out)
    expected = AutoKENModelForSequenceClassification.from_pretrained(tmp_path / "ken")
    for name, tensor in merged.state_dict().items():
        assert torch.equal(tensor, expected.base_model.state_dict()[name]), name


def test_float_buffers_follow_the_same_rule_in_memory_and_from_checkpoints(tmp_path):
    """BatchNorm statistics (persistent float buffers) change in fine-tuning: both drivers
    treat them as the checkpoint holds them, so the two files are the same bytes."""
    from transformers import ResNetConfig, ResNetForImageClassification

    config = ResNetConfig(embedding_size=8, hidden_sizes=[8, 16], depths=[1, 1], num_labels=2)
    torch.manual_seed(0)
    base = ResNetForImageClassification(config).eval()
    base.save_pretrained(tmp_path / "base")
    base = ResNetForImageClassification.from_pretrained(tmp_path / "base").eval()
    tuned = ResNetForImageClassification.from_pretrained(tmp_path / "base").train()
    with torch.no_grad():
        for parameter in tuned.parameters():
            parameter.add_(0.01 * torch.randn_like(parameter))
        tuned(torch.randn(4, 3, 32, 32))  # a training-mode pass moves the running statistics
    tuned.save_pretrained(tmp_path / "finetuned")
    statistics = "resnet.embedder.embedder.normalization.running_mean"
    subnetwork = prune_model(tuned, base, KENConfig(keep_ratio=0.5), progress=False)
    assert statistics in subnetwork.pruned
    assert not any(name.endswith("num_batches_tracked") for name in subnetwork.fingerprints)
    subnetwork.save_pretrained(tmp_path / "memory")
    args = ["prune", "--base", str(tmp_path / "base"), "--finetuned", str(tmp_path / "finetuned")]
    assert main([*args, "--keep-ratio", "0.5", "--out", str(tmp_path / "stream")]) == 0
    assert (tmp_path / "memory" / SUBNETWORK_NAME).read_bytes() == (
        tmp_path / "stream" / SUBNETWORK_NAME
    ).read_bytes()
