"""KENCallback inside real transformers Trainer runs."""

from __future__ import annotations

import inspect
import json
import logging
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    AutoModelForSequenceClassification,
    AutoTokenizer,
    DataCollatorForLanguageModeling,
    DataCollatorWithPadding,
    Trainer,
    TrainerCallback,
    TrainingArguments,
)

from ken_hf import (
    AutoKENModelForCausalLM,
    AutoKENModelForSequenceClassification,
    KENCallback,
    KENConfigError,
)
from ken_hf.callback import AutoK
from ken_hf.experiments.assets import minilm_path, movie_reviews, smollm2_path
from ken_hf.experiments.metrics import classification_metrics
from ken_hf.experiments.tasks import movie_review_splits
from ken_hf.making.sharded import check_sharded_training

# The argument's name since transformers 5.x; older releases call it gradient_checkpointing.
CHECKPOINTING = (
    "activation_checkpointing"
    if "activation_checkpointing" in inspect.signature(TrainingArguments).parameters
    else "gradient_checkpointing"
)
# Two layers only, to keep selection quick; everything else goes back to pre-trained.
LAYERS_0_1 = r"bert\.encoder\.layer\.[01]\..*"


@pytest.fixture(scope="module")
def splits():
    tokenizer = AutoTokenizer.from_pretrained(minilm_path())
    train, held_out = movie_review_splits(tokenizer, train_size=64, eval_size=32, max_length=32)
    return tokenizer, train, held_out


def _train(
    tmp_path, splits, callback, *, model=None, resume=None, with_tokenizer=False, **arguments
):
    tokenizer, train, held_out = splits
    torch.manual_seed(0)
    model = model or AutoModelForSequenceClassification.from_pretrained(minilm_path(), num_labels=2)
    settings = {
        "output_dir": str(tmp_path / "run"),
        "per_device_train_batch_size": 16,
        "per_device_eval_batch_size": 32,
        "num_train_epochs": 1,
        "report_to": [],
        "save_strategy": "no",
        "use_cpu": True,
        "disable_tqdm": True,
        "seed": 0,
    }
    args = TrainingArguments(**(settings | arguments))
    trainer = Trainer(
        model=model,
        args=args,
        train_dataset=train,
        eval_dataset=held_out,
        data_collator=DataCollatorWithPadding(tokenizer),
        processing_class=tokenizer if with_tokenizer else None,
        compute_metrics=classification_metrics("accuracy"),
        callbacks=callback if isinstance(callback, list) else [callback],
    )
    trainer.train(resume_from_checkpoint=resume)
    return trainer


def _pretrained() -> dict[str, torch.Tensor]:
    model = AutoModelForSequenceClassification.from_pretrained(minilm_path(), num_labels=2)
    return dict(model.named_parameters())


def test_fp32_run_prunes_evaluates_logs_and_saves(tmp_path, splits):
    callback = KENCallback(keep_ratio=0.5, target_modules=LAYERS_0_1)
    trainer = _train(tmp_path, splits, callback)
    logged = {key for entry in trainer.state.log_history for key in entry}
    assert {"ken_before_accuracy", "ken_after_accuracy", "ken_reset_fraction"} <= logged
    folder = tmp_path / "run" / "ken"
    report = json.loads((folder / "ken_report.json").read_text())
    assert (
        report["metrics_before"]["ken_before_accuracy"]
        == callback.report["metrics_before"]["ken_before_accuracy"]
    )
    name = "bert.encoder.layer.1.attention.self.key.weight"
    assert report["tensors"][name] == {"kept": 384 * 192, "values": 384 * 384}
    assert report["stored_whole"] == ["classifier.bias", "classifier.weight"]

    pretrained, final = _pretrained(), dict(trainer.model.named_parameters())
    mask = callback.subnetwork.mask(name)
    assert torch.equal(final[name][~mask], pretrained[name][~mask])
    assert not torch.equal(final[name][mask], pretrained[name][mask])  # trained values kept
    untargeted = "bert.encoder.layer.4.output.dense.weight"
    assert torch.equal(final[untargeted], pretrained[untargeted])
    reloaded = AutoKENModelForSequenceClassification.from_pretrained(folder).base_model
    for key, value in trainer.model.state_dict().items():
        assert torch.equal(reloaded.state_dict()[key], value), key


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_a_resumed_run_gives_the_subnetwork_of_an_uninterrupted_one(tmp_path, splits, dtype):
    """Resumed from a checkpoint, the callback reads the pre-trained values from the base
    checkpoint (in the model's dtype): the same subnetwork as a run that was never stopped."""

    def model():
        torch.manual_seed(0)
        return AutoModelForSequenceClassification.from_pretrained(
            minilm_path(), num_labels=2, dtype=dtype
        )

    steps = {"save_strategy": "steps", "save_steps": 2, "max_steps": 4}
    whole = KENCallback(keep_ratio=0.5, target_modules=LAYERS_0_1, evaluate=False)
    _train(tmp_path / "whole", splits, whole, model=model(), **steps)
    resumed = KENCallback(keep_ratio=0.5, target_modules=LAYERS_0_1, evaluate=False)
    checkpoint = tmp_path / "whole" / "run" / "checkpoint-2"  # saved on the way
    _train(tmp_path / "cut", splits, resumed, model=model(), resume=str(checkpoint), **steps)
    assert set(resumed.subnetwork.pruned) == set(whole.subnetwork.pruned)
    for name, pruned in whole.subnetwork.pruned.items():
        assert torch.equal(resumed.subnetwork.pruned[name].positions, pruned.positions), name
        # the kept values, as the file stores them: their bit changes from the same base
        assert torch.equal(resumed.subnetwork.pruned[name].changed, pruned.changed), name
        assert torch.equal(resumed.subnetwork.pruned[name].difference, pruned.difference), name
    assert resumed.subnetwork.fingerprints == whole.subnetwork.fingerprints
    assert resumed.subnetwork.config.base_model_dtype == str(dtype).removeprefix("torch.")


def test_callback_prune_model_and_ken_prune_write_the_same_folder(tmp_path, splits):
    """One pair, one folder, whichever driver wrote it (one writer: ``write_folder``). What
    may differ is named: the callback alone has the report, the KENviz picture, and in the
    model card the metrics table, the picture and the share of the model reset (which only
    the run knows: untargeted tensors are not in the file). The callback saving into the
    Trainer's output folder keeps the Trainer's checkpoints there."""
    from transformers import TrainerCallback

    from ken_hf import KENConfig, prune_model
    from ken_hf.cli import main

    tokenizer = splits[0]

    class SaveFineTuned(TrainerCallback):  # runs before KENCallback: the fine-tuned weights
        def on_train_end(self, args, state, control, model=None, **kwargs):
            model.save_pretrained(tmp_path / "finetuned")
            tokenizer.save_pretrained(tmp_path / "finetuned")

    run, targets = tmp_path / "run", ["layer.0.attention.self.query", "layer.1.output.dense"]
    callback = KENCallback(keep_ratio=0.5, target_modules=targets, save_dir=str(run))
    _train(tmp_path, splits, [SaveFineTuned(), callback], save_strategy="steps", save_steps=2,
           max_steps=4, with_tokenizer=True)  # fmt: skip
    assert (run / "checkpoint-2" / "model.safetensors").is_file()
    assert (run / "checkpoint-4" / "model.safetensors").is_file()
    config = KENConfig(keep_ratio=0.5, target_modules=targets)
    tuned = AutoModelForSequenceClassification.from_pretrained(tmp_path / "finetuned")
    base = AutoModelForSequenceClassification.from_pretrained(minilm_path(), num_labels=2)
    prune_model(tuned, base, config, progress=False).save_pretrained(
        tmp_path / "functional", tokenizer=tokenizer
    )
    args = ["prune", "--base", str(minilm_path()), "--finetuned", str(tmp_path / "finetuned")]
    assert main([*args, "--keep-ratio", "0.5", "--target-modules", *targets,
                 "--out", str(tmp_path / "cli")]) == 0  # fmt: skip

    def files(folder: Path) -> dict[str, bytes]:
        return {p.name: p.read_bytes() for p in folder.iterdir() if p.is_file()}

    callback_files = files(run)
    functional, cli = files(tmp_path / "functional"), files(tmp_path / "cli")
    assert functional == cli
    only_callback = {"ken_report.json", "ken_summary.png"}
    assert set(callback_files) - set(functional) == only_callback
    for name in set(functional) - {"README.md"}:
        assert callback_files[name] == functional[name], name

    def card_without_metrics(card: bytes) -> list[str]:
        lines = card.decode().splitlines()
        if "## Metrics" in lines:  # the table, up to the next section
            start = lines.index("## Metrics")
            end = next(i for i in range(start + 1, len(lines)) if lines[i].startswith("## "))
            lines = lines[:start] + lines[end:]
        lines = [line for line in lines if "ken_summary.png" not in line]
        lines = [line for line in lines if not line.startswith("- Share of the model's")]
        return [line for i, line in enumerate(lines) if line or (i and lines[i - 1])]

    assert "## Metrics" in callback_files["README.md"].decode()
    assert card_without_metrics(callback_files["README.md"]) == card_without_metrics(
        functional["README.md"]
    )


@pytest.mark.parametrize("source", ["auto", "snapshot"])
def test_resumed_run_resets_to_the_base_checkpoint_not_the_resumed_weights(
    tmp_path, splits, source
):
    """Read from the base checkpoint when training ends, or (``snapshot``) held from the
    start of the resumed run: the same pre-trained values either way."""
    first = _train(
        tmp_path,
        splits,
        KENCallback(keep_ratio=0.5, target_modules=LAYERS_0_1, evaluate=False),
        save_strategy="steps",
        save_steps=2,
        max_steps=2,
    )
    assert first.state.global_step == 2
    checkpoint = tmp_path / "run" / "checkpoint-2"
    callback = KENCallback(
        keep_ratio=0.5, target_modules=LAYERS_0_1, evaluate=False, pretrained_source=source
    )
    holdings = _Holdings(callback)
    _train(tmp_path, splits, [callback, holdings], resume=str(checkpoint), max_steps=4)
    held = [(count > 0, to_read) for count, _, to_read in holdings.steps]
    assert held == ([(False, True)] * 2 if source == "auto" else [(True, False)] * 2)
    pretrained = _pretrained()
    resumed = AutoModelForSequenceClassification.from_pretrained(checkpoint)
    name = "bert.encoder.layer.0.intermediate.dense.weight"
    reset = ~callback.subnetwork.mask(name)
    final = dict(callback._trainer.model.named_parameters())[name]
    assert torch.equal(final[reset], pretrained[name][reset])
    assert not torch.equal(final[reset], dict(resumed.named_parameters())[name][reset])


class _Holdings(TrainerCallback):
    """Records at every step what a ``KENCallback`` holds for the pre-trained values:
    (snapshot tensors, values of them, whether a checkpoint is to be read instead)."""

    def __init__(self, ken: KENCallback) -> None:
        self.ken, self.steps = ken, []

    def on_step_end(self, args, state, control, **kwargs):
        held = self.ken.pretrained_values
        values = sum(t.numel() for t in held.snapshot.values())
        self.steps.append((len(held.snapshot), values, held.checkpoint is not None))


def test_a_model_loaded_from_a_checkpoint_is_read_from_it_when_training_ends(
    tmp_path, splits, caplog
):
    """No copy held during training, and the same bytes as the snapshot gives."""
    caplog.set_level(logging.INFO, logger="ken_hf")
    results = {}
    for source in ("auto", "snapshot"):
        ken = KENCallback(
            keep_ratio=0.5, target_modules=LAYERS_0_1, evaluate=False, pretrained_source=source
        )
        holdings = _Holdings(ken)
        trainer = _train(tmp_path / source, splits, [ken, holdings], max_steps=3)
        folder = tmp_path / source / "run" / "ken"
        results[source] = (ken, holdings.steps, folder, trainer.model.state_dict())
    ken, steps, folder, weights = results["auto"]
    assert steps == [(0, 0, True)] * 3  # nothing held, the checkpoint to be read
    assert f"read from the checkpoint {str(minilm_path())!r} when training ends" in caplog.text
    assert ken.pretrained_values is None  # let go at the end
    _, snapshot_steps, snapshot_folder, snapshot_weights = results["snapshot"]
    parameters = sum(p.numel() for p in _pretrained().values())
    assert all(held[1] >= parameters and not held[2] for held in snapshot_steps)
    assert "snapshot held on cpu during training (pretrained_source='snapshot')" in caplog.text
    for file in ("ken_subnetwork.safetensors", "ken_config.json"):
        assert (folder / file).read_bytes() == (snapshot_folder / file).read_bytes(), file
    for key, value in weights.items():
        assert torch.equal(snapshot_weights[key], value), key
    with pytest.raises(ValueError, match="pretrained_source='copy'"):
        KENCallback(keep_ratio=0.5, pretrained_source="copy")


def test_weights_changed_after_loading_fall_back_to_a_snapshot_and_say_so(tmp_path, splits, caplog):
    """One tensor changed outside the few that locating the checkpoint compares: the full
    check at train begin finds it; ``auto`` takes a snapshot (the values training began
    from) and warns, ``checkpoint`` refuses. A model built from its config (random weights,
    new tensors named) takes a snapshot as well."""
    from ken_hf.config import KENConfig
    from ken_hf.making.base_source import locate_base
    from ken_hf.storage.checkpoints import tensors_of

    changed = "bert.encoder.layer.0.attention.self.query.bias"

    def model():
        torch.manual_seed(0)
        loaded = AutoModelForSequenceClassification.from_pretrained(minilm_path(), num_labels=2)
        with torch.no_grad():
            dict(loaded.named_parameters())[changed].add_(0.5)
        return loaded

    sampled = model()
    source, _ = locate_base(sampled, sampled, KENConfig(k=1), tensors_of(sampled))
    assert source is not None  # not one of the tensors locate_base compares
    with pytest.raises(ValueError, match=f"tensor {changed!r} of the model differs"):
        strict = KENCallback(keep_ratio=0.5, evaluate=False, pretrained_source="checkpoint")
        _train(tmp_path / "strict", splits, strict, model=model(), max_steps=1)

    ken = KENCallback(keep_ratio=0.5, target_modules=LAYERS_0_1, evaluate=False)
    holdings = _Holdings(ken)
    trainer = _train(tmp_path / "auto", splits, [ken, holdings], model=model(), max_steps=2)
    assert all(held[0] > 0 and not held[2] for held in holdings.steps)
    warned = [
        r
        for r in caplog.records
        if r.name == "ken_hf.making.pretrained_values" and r.levelname == "WARNING"
    ]
    assert len(warned) == 1 and "snapshot held on cpu" in warned[0].getMessage()
    assert f"tensor {changed!r} of the model differs" in warned[0].getMessage()
    reset = ~ken.subnetwork.mask(changed)
    final = dict(trainer.model.named_parameters())[changed]
    start = dict(model().named_parameters())[changed]
    assert torch.equal(final[reset], start[reset])  # the values training began from

    caplog.clear()
    config = AutoConfig.from_pretrained(minilm_path(), num_labels=2)
    built = AutoModelForSequenceClassification.from_config(config)
    ken = KENCallback(keep_ratio=0.5, target_modules=LAYERS_0_1, evaluate=False, new_tensors=set())
    holdings = _Holdings(ken)
    _train(tmp_path / "built", splits, [ken, holdings], model=built, max_steps=1)
    assert holdings.steps[0][0] > 0 and not holdings.steps[0][2]
    assert "no checkpoint holds the model's weights" in caplog.text


def test_a_checkpoint_changed_during_training_stops_with_the_tensor_named(tmp_path, splits):
    """The checkpoint is read again when training ends and checked against fingerprints
    taken when it began: a file overwritten meanwhile is refused, naming the tensor."""
    base = tmp_path / "base"
    shutil.copytree(minilm_path(), base)
    overwritten = "encoder.layer.2.output.dense.weight"  # as the base checkpoint names it

    class Overwrite(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            tensors = load_file(base / "model.safetensors")
            tensors[overwritten] = tensors[overwritten] + 1e-3
            save_file(tensors, base / "model.safetensors", metadata={"format": "pt"})

    torch.manual_seed(0)
    model = AutoModelForSequenceClassification.from_pretrained(base, num_labels=2)
    ken = KENCallback(keep_ratio=0.5, target_modules=LAYERS_0_1, evaluate=False)
    with pytest.raises(ValueError, match=rf"tensor 'bert\.{overwritten}'.*no longer what it was"):
        _train(tmp_path, splits, [ken, Overwrite()], model=model, max_steps=1)
    assert ken.pretrained_values.checkpoint is not None  # it was to be read from it


@pytest.mark.parametrize(
    "arguments",
    [
        {"bf16": True},
        {"fp16": True},
        {CHECKPOINTING: True},
        {"torch_compile": True, "torch_compile_backend": "eager"},
    ],
    ids=["bf16", "fp16", "gradient-checkpointing", "torch-compile"],
)
def test_training_modes(tmp_path, splits, arguments):
    callback = KENCallback(k=96, target_modules=LAYERS_0_1)
    trainer = _train(tmp_path, splits, callback, **arguments)
    assert "ken_after_accuracy" in callback.report["metrics_after"]
    query = callback.subnetwork.mask("bert.encoder.layer.0.attention.self.query.weight")
    assert (query.sum(dim=1) == 96).all()
    folder = tmp_path / "run" / "ken"
    reloaded = AutoKENModelForSequenceClassification.from_pretrained(folder).base_model
    plain = trainer.accelerator.unwrap_model(trainer.model, keep_torch_compile=False)
    for key, value in plain.state_dict().items():
        assert torch.equal(reloaded.state_dict()[key], value), key


def test_tied_lm_head_is_stored_once_and_tied_after_reload(tmp_path):
    path = smollm2_path(2)
    tokenizer = AutoTokenizer.from_pretrained(path)
    texts = movie_reviews()[0][:32]
    from datasets import Dataset

    data = Dataset.from_dict({"text": texts}).map(
        lambda b: tokenizer(b["text"], truncation=True, max_length=32),
        batched=True,
        remove_columns=["text"],
    )
    callback = KENCallback(keep_ratio=0.25)
    trainer = Trainer(
        model=AutoModelForCausalLM.from_pretrained(path),
        args=TrainingArguments(
            output_dir=str(tmp_path),
            max_steps=2,
            per_device_train_batch_size=8,
            report_to=[],
            save_strategy="no",
            use_cpu=True,
            disable_tqdm=True,
        ),
        train_dataset=data,
        data_collator=DataCollatorForLanguageModeling(tokenizer, mlm=False),
        callbacks=[callback],
    )
    trainer.train()
    stored = set(callback.subnetwork.pruned) | set(callback.subnetwork.whole)
    assert "model.embed_tokens.weight" in stored and "lm_head.weight" not in stored
    model = trainer.model
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
    reloaded = AutoKENModelForCausalLM.from_pretrained(tmp_path / "ken").base_model
    assert reloaded.lm_head.weight.data_ptr() == reloaded.model.embed_tokens.weight.data_ptr()
    assert torch.equal(reloaded.lm_head.weight, model.lm_head.weight)


def test_auto_k_searches_a_bounded_number_of_ratios(tmp_path, splits):
    callback = KENCallback(
        target_modules=LAYERS_0_1, auto_k=AutoK(metric="loss", tolerance=0.02, max_evaluations=3)
    )
    trainer = _train(tmp_path, splits, callback)
    curve = callback.auto_k_curve
    assert len(curve) == 3 and all("loss" in point for point in curve)
    chosen = callback.subnetwork.config.keep_ratio
    assert 0.05 < chosen <= 1.0
    within = [p["keep_ratio"] for p in curve if p["within_tolerance"]]
    assert chosen == (min(within) if within else 1.0)
    assert sum("ken_auto_k_ratio" in entry for entry in trainer.state.log_history) == 3


@pytest.mark.parametrize(
    ("field", "value", "allowed"),
    [
        ("low", 0.0, r"in \(0, 1\)"),
        ("low", 1.0, r"in \(0, 1\)"),
        ("low", -0.5, r"in \(0, 1\)"),
        ("low", float("nan"), r"in \(0, 1\)"),
        ("low", "0.1", r"in \(0, 1\)"),
        ("tolerance", -0.01, "a finite number >= 0"),
        ("tolerance", float("nan"), "a finite number >= 0"),
        ("tolerance", float("inf"), "a finite number >= 0"),
        ("max_evaluations", 0, "an integer >= 1"),
        ("max_evaluations", -2, "an integer >= 1"),
        ("max_evaluations", 2.5, "an integer >= 1"),
        ("max_evaluations", True, "an integer >= 1"),
        ("metric", "", "a non-empty string"),
        ("metric", None, "a non-empty string"),
        ("greater_is_better", "yes", "True or False"),
    ],
)
def test_auto_k_refuses_settings_out_of_range_naming_the_field(field, value, allowed):
    with pytest.raises(KENConfigError, match=f"AutoK.{field} must be {allowed}, got"):
        AutoK(**{field: value})


def test_auto_k_accepts_the_edges_of_its_ranges():
    AutoK(tolerance=0, low=1e-6, max_evaluations=1)
    AutoK(metric="accuracy", tolerance=0.5, low=0.999, max_evaluations=20, greater_is_better=True)


def test_fsdp_version_1_and_auto_k_or_checkpoint_with_sharding_are_refused_clearly(tmp_path):
    def check(trainer, model, auto_k=False, pretrained_source="auto"):
        return check_sharded_training(
            trainer, model, auto_k=auto_k, pretrained_source=pretrained_source
        )

    class FSDP1Trainer:
        is_fsdp_enabled = True  # but no DTensor parameter: flattened FSDP1 shards

    with pytest.raises(NotImplementedError, match="FSDP2"):
        check(FSDP1Trainer(), torch.nn.Linear(2, 2))
    assert check(object(), torch.nn.Linear(2, 2), auto_k=True) is None  # not sharded

    # Really sharded: fully_shard on a one-process gloo group makes every parameter a DTensor.
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    store = f"file://{tmp_path / 'store'}"
    dist.init_process_group("gloo", init_method=store, rank=0, world_size=1)
    try:
        model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.Linear(4, 2))
        fully_shard(model, mesh=init_device_mesh("cpu", (1,)))
        assert check(object(), model) == "fsdp2"
        with pytest.raises(NotImplementedError, match=r"auto_k .*sharded training \(fsdp2\)"):
            check(object(), model, auto_k=True)
        with pytest.raises(NotImplementedError, match=r"'checkpoint' .*sharded training"):
            check(object(), model, pretrained_source="checkpoint")
        assert check(object(), model, pretrained_source="auto") == "fsdp2"  # a snapshot
    finally:
        dist.destroy_process_group()


FSDP2_SCRIPT = """
import json, os, sys, torch, torch.distributed as dist
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard
from transformers import AutoModelForSequenceClassification
from ken_hf import KENConfig, prune_model
from ken_hf.experiments.assets import minilm_path
from ken_hf.utils.fingerprint import tensor_fingerprint
from ken_hf.storage.checkpoints import new_parameters
from ken_hf.making.sharded import gathered, prune_sharded, sharding_of, snapshot_sharded
dist.init_process_group("gloo")
rank, out = dist.get_rank(), sys.argv[1]
mesh = init_device_mesh("cpu", (dist.get_world_size(),))
torch.manual_seed(0)
model = AutoModelForSequenceClassification.from_pretrained(minilm_path(), num_labels=2)
new = new_parameters(model, minilm_path())
reference = AutoModelForSequenceClassification.from_pretrained(minilm_path(), num_labels=2)
reference.load_state_dict(model.state_dict())
reference_base = {n: p.detach().clone() for n, p in reference.named_parameters()}
for layer in model.bert.encoder.layer:
    fully_shard(layer, mesh=mesh)
fully_shard(model, mesh=mesh)
assert sharding_of(model) == "fsdp2"
pretrained = snapshot_sharded(model, torch.device("cpu"), main=rank == 0)
assert (len(pretrained) > 0) == (rank == 0)
# The same "fine-tune" on both: seeded changes, written through rank 0 into the shards.
for (name, parameter), (_, twin) in zip(model.named_parameters(), reference.named_parameters()):
    change = 0.01 * torch.randn(twin.shape, generator=torch.Generator().manual_seed(len(name)))
    with gathered(parameter, write_back=True) as full:
        if rank == 0:
            full.add_(change)
    with torch.no_grad():
        twin.add_(change)
config = KENConfig(keep_ratio=0.25, exclude_modules=["bert.embeddings.word_embeddings"])
subnetwork = prune_sharded(model, pretrained, config, new_tensors=new, main=rank == 0,
                           progress=False)
expected = prune_model(reference, reference_base, config, new_tensors=new, progress=False)
same = True
for (name, parameter), (_, twin) in zip(model.named_parameters(), reference.named_parameters()):
    with gathered(parameter) as full:
        same = same and torch.equal(full, twin)
local_rows = model.classifier.weight.to_local().shape[0]
result = {"rank": rank, "same_weights": same, "local_rows": local_rows}
if rank == 0:
    result["model_class"] = subnetwork.config.model_class
    result["same_subnetwork"] = (
        subnetwork.fingerprints == expected.fingerprints
        and set(subnetwork.whole) == set(expected.whole)
        and all(torch.equal(subnetwork.pruned[n].positions, p.positions)
                and torch.equal(subnetwork.pruned[n].values, p.values)
                for n, p in expected.pruned.items())
        and set(subnetwork.pruned) == set(expected.pruned))
    result["pruned"] = len(subnetwork.pruned)
else:
    result["subnetwork_is_none"] = subnetwork is None
with open(os.path.join(out, f"rank{rank}.json"), "w") as f:
    json.dump(result, f)
dist.barrier()  # rank 0 checks more: tearing gloo down on one rank alone can abort it
dist.destroy_process_group()
"""


def test_fsdp2_two_cpu_processes_gather_one_tensor_at_a_time(tmp_path):
    """FSDP2 sharding (torch's fully_shard, on CPU with gloo; the Trainer itself runs FSDP
    only on accelerators): the sharded path ends with the weights and the subnetwork that
    prune_model gives on the unsharded model."""
    script = tmp_path / "fsdp2_run.py"
    script.write_text(FSDP2_SCRIPT)
    out = tmp_path / "out"
    out.mkdir()
    done = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", str(script),
         str(out)],
        capture_output=True,
        text=True,
        timeout=900,
        env=dict(os.environ, OMP_NUM_THREADS="1"),
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-4000:]
    ranks = [json.loads((out / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert all(r["same_weights"] for r in ranks)
    assert [r["local_rows"] for r in ranks] == [1, 1]  # really sharded: 2 classifier rows
    assert ranks[0]["same_subnetwork"] and ranks[0]["pruned"] > 50
    assert ranks[0]["model_class"] == "BertForSequenceClassification"
    assert ranks[1]["subnetwork_is_none"]


DDP_SCRIPT = """
import json, os, sys, torch
from safetensors.torch import save_file
from transformers import (AutoModelForSequenceClassification, AutoTokenizer,
    DataCollatorWithPadding, Trainer, TrainerCallback, TrainingArguments)
from ken_hf import KENCallback
from ken_hf.experiments.assets import minilm_path
from ken_hf.utils.fingerprint import tensor_fingerprint
from ken_hf.experiments.tasks import movie_review_splits
out = sys.argv[1]
tokenizer = AutoTokenizer.from_pretrained(minilm_path())
train, held_out = movie_review_splits(tokenizer, train_size=64, eval_size=32, max_length=32)
torch.manual_seed(0)
model = AutoModelForSequenceClassification.from_pretrained(minilm_path(), num_labels=2)
callback = KENCallback(keep_ratio=0.5, target_modules=r"bert\\.encoder\\.layer\\.[0-2]\\..*")
class SaveFineTuned(TrainerCallback):  # runs before KENCallback: the weights before KEN
    def on_train_end(self, args, state, control, model=None, **kwargs):
        if state.is_world_process_zero:
            save_file({n: p.detach().contiguous() for n, p in model.named_parameters()},
                      os.path.join(out, "finetuned.safetensors"))
trainer = Trainer(model=model, args=TrainingArguments(output_dir=out, per_device_train_batch_size=8,
    num_train_epochs=1, report_to=[], save_strategy="no", use_cpu=True, disable_tqdm=True, seed=0),
    train_dataset=train, eval_dataset=held_out, data_collator=DataCollatorWithPadding(tokenizer),
    callbacks=[SaveFineTuned(), callback])
trainer.train()
rank = trainer.args.process_index
result = {"rank": rank, "world": trainer.args.world_size,
          "fingerprints": {n: tensor_fingerprint(p) for n, p in trainer.model.named_parameters()},
          "saved": trainer.is_world_process_zero()}
with open(os.path.join(out, f"rank{rank}.json"), "w") as f:
    json.dump(result, f)
"""


def test_ddp_two_cpu_processes_share_selection_and_end_identical(tmp_path):
    script = tmp_path / "ddp_run.py"
    script.write_text(DDP_SCRIPT)
    out = tmp_path / "out"
    launcher = Path(sys.executable).parent / "accelerate"
    env = dict(os.environ, OMP_NUM_THREADS="1")
    done = subprocess.run(
        [
            str(launcher),
            "launch",
            "--multi_gpu",  # the torchrun launcher; with no GPU and use_cpu=True: gloo DDP
            "--num_processes",
            "2",
            "--num_machines",
            "1",
            "--mixed_precision",
            "no",
            "--dynamo_backend",
            "no",
            str(script),
            str(out),
        ],
        capture_output=True,
        text=True,
        timeout=900,
        env=env,
    )
    assert done.returncode == 0, done.stderr[-4000:]
    ranks = [json.loads((out / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert [r["world"] for r in ranks] == [2, 2]
    assert ranks[0]["fingerprints"] == ranks[1]["fingerprints"]
    assert [r["saved"] for r in ranks] == [True, False]
    # The shared selection equals one process selecting alone on the same fine-tuned weights:
    # the same subnetwork, and the same pruned weights on every rank.
    shared, alone, alone_fingerprints = _single_process_selection(out)
    assert set(shared.whole) == set(alone.whole) and set(shared.pruned) == set(alone.pruned)
    for name, pruned in alone.pruned.items():
        assert torch.equal(shared.pruned[name].positions, pruned.positions), name
        assert torch.equal(shared.pruned[name].changed, pruned.changed), name
        assert torch.equal(shared.pruned[name].difference, pruned.difference), name
    assert ranks[0]["fingerprints"] == alone_fingerprints


def _single_process_selection(out: Path):
    """The subnetwork the DDP run saved; the one ``prune_model`` selects in this one process
    from the fine-tuned weights the run saved before KEN (same base, same config); and the
    fingerprints of the weights ``prune_model`` leaves."""
    from safetensors.torch import load_file

    from ken_hf import KENConfig, prune_model
    from ken_hf.storage.checkpoints import new_parameters
    from ken_hf.storage.subnetwork_file import SUBNETWORK_NAME, read_subnetwork
    from ken_hf.utils.fingerprint import tensor_fingerprint

    finetuned = AutoModelForSequenceClassification.from_pretrained(minilm_path(), num_labels=2)
    missing, unexpected = finetuned.load_state_dict(
        load_file(out / "finetuned.safetensors"), strict=False
    )
    assert unexpected == [] and all("position_ids" in name for name in missing)
    base = AutoModelForSequenceClassification.from_pretrained(minilm_path(), num_labels=2)
    config = KENConfig(keep_ratio=0.5, target_modules=r"bert\.encoder\.layer\.[0-2]\..*")
    new = new_parameters(finetuned, minilm_path())
    alone = prune_model(finetuned, base, config, new_tensors=new, progress=False)
    fingerprints = {n: tensor_fingerprint(p) for n, p in finetuned.named_parameters()}
    return read_subnetwork(out / "ken" / SUBNETWORK_NAME), alone, fingerprints
