"""KENConfig + subnetwork file + KENModel/AutoKENModel on real models: round trips, base
checks, several subnetworks on one base, and the model working where the plain one does."""

from __future__ import annotations

import copy
import shutil
from pathlib import Path

import pytest
import torch
import xxhash
from transformers import (
    AutoModelForCausalLM,
    AutoModelForSequenceClassification,
    AutoTokenizer,
    DataCollatorWithPadding,
    Trainer,
    TrainingArguments,
    pipeline,
)

from fake_hub import FakeHub, huggingface_hub_at
from ken_hf import (
    AutoKENModel,
    AutoKENModelForCausalLM,
    AutoKENModelForSequenceClassification,
    BaseMismatchError,
    KENConfig,
    KENError,
    KENModel,
    KENSubnetwork,
    prune_model,
)


def _minilm_base(path: str) -> torch.nn.Module:
    return AutoModelForSequenceClassification.from_pretrained(path, num_labels=2)


def _state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {name: t.detach().clone() for name, t in model.state_dict().items()}


def _assert_same_state(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for name in a:
        assert torch.equal(a[name], b[name]), name


@pytest.fixture(scope="module")
def minilm_pruned(minilm_finetune, tmp_path_factory):
    """The fine-tuned MiniLM pruned at keep ratio 0.25 and 0.5, each saved to a folder."""
    results = {}
    for ratio in (0.25, 0.5):
        model = copy.deepcopy(minilm_finetune["model"])
        config = KENConfig(keep_ratio=ratio, base_model_name_or_path=minilm_finetune["base"])
        subnetwork = prune_model(
            model, _minilm_base(minilm_finetune["base"]), config, new_tensors=minilm_finetune["new"]
        )
        folder = tmp_path_factory.mktemp("minilm-ken") / f"ken-{ratio}"
        subnetwork.save_pretrained(folder)
        results[ratio] = {"model": model, "subnetwork": subnetwork, "folder": folder}
    return results


def _batch(minilm_finetune, size=16):
    collate = DataCollatorWithPadding(minilm_finetune["tokenizer"])
    rows = [minilm_finetune["held_out"][i] for i in range(size)]
    batch = collate([{k: r[k] for k in ("input_ids", "attention_mask")} for r in rows])
    return {k: v for k, v in batch.items()}


def test_pruned_model_keeps_k_and_resets_the_rest(minilm_finetune, minilm_pruned):
    pruned = minilm_pruned[0.25]
    base = _minilm_base(minilm_finetune["base"])
    finetuned = dict(minilm_finetune["model"].named_parameters())
    name = "bert.encoder.layer.2.attention.self.query.weight"
    mask = pruned["subnetwork"].mask(name)
    assert (mask.sum(dim=1) == 96).all()  # 25 % of 384
    value = dict(pruned["model"].named_parameters())[name]
    assert torch.equal(value[mask], finetuned[name][mask])
    assert torch.equal(value[~mask], dict(base.named_parameters())[name][~mask])
    assert set(pruned["subnetwork"].whole) == {"classifier.weight", "classifier.bias"}


@pytest.mark.parametrize("ratio", [0.25, 0.5])
def test_minilm_round_trip_identical_state_and_logits(minilm_finetune, minilm_pruned, ratio):
    pruned = minilm_pruned[ratio]
    loaded = AutoKENModelForSequenceClassification.from_pretrained(pruned["folder"])
    assert isinstance(loaded, KENModel)
    _assert_same_state(_state(loaded.base_model), _state(pruned["model"]))
    batch = _batch(minilm_finetune)
    with torch.no_grad():
        assert torch.equal(loaded(**batch).logits, pruned["model"](**batch).logits)
    generic = AutoKENModel.from_pretrained(pruned["folder"])  # class from ken_config.json
    _assert_same_state(_state(generic.base_model), _state(pruned["model"]))


def test_saved_folder_holds_config_card_and_subnetwork_only(minilm_pruned):
    folder = minilm_pruned[0.25]["folder"]
    assert sorted(p.name for p in folder.iterdir()) == [
        "README.md",
        "config.json",
        "ken_config.json",
        "ken_subnetwork.safetensors",
    ]
    card = (folder / "README.md").read_text()
    assert "library_name: ken-hf" in card and "- ken" in card and "- pruning" in card
    # base_model names Hub ids only (the Hub refuses a folder there); the body names it
    assert "base_model:" not in card and "AutoKENModelForSequenceClassification" in card
    assert str(KENConfig.from_pretrained(folder).base_model_name_or_path) in card
    config = KENConfig.from_pretrained(folder)
    assert config.keep_ratio == 0.25 and config.model_class == "BertForSequenceClassification"


def test_base_with_one_changed_value_is_refused_by_name(minilm_finetune, minilm_pruned):
    base = _minilm_base(minilm_finetune["base"])
    name = "bert.encoder.layer.3.output.dense.weight"
    with torch.no_grad():
        dict(base.named_parameters())[name][5, 7] += 1e-4
    before = _state(base)
    with pytest.raises(BaseMismatchError, match=name.replace(".", r"\.")):
        KENModel.from_pretrained(base, minilm_pruned[0.25]["folder"])
    _assert_same_state(_state(base), before)  # nothing was applied


@pytest.mark.parametrize("position", [0, -1])
def test_a_changed_value_in_any_checked_tensor_is_refused(minilm_finetune, minilm_pruned, position):
    """Every base tensor the subnetwork relies on is checked in full, the first and the last
    in the model's order included, and for a value anywhere in the tensor."""
    subnetwork = minilm_pruned[0.25]["subnetwork"]
    base = _minilm_base(minilm_finetune["base"])
    name = [n for n, _ in base.named_parameters() if n in subnetwork.fingerprints][position]
    with torch.no_grad():
        dict(base.named_parameters())[name].view(-1)[-1] += 1e-3
    with pytest.raises(BaseMismatchError, match=name.replace(".", r"\.")):
        KENModel.from_pretrained(base, minilm_pruned[0.25]["folder"])


def test_loading_copies_only_weights_mapped_from_the_checkpoint(minilm_finetune, minilm_pruned):
    """transformers maps a checkpoint it loads in its own dtype: KEN copies those weights
    before writing into them (the file is never written), and leaves weights that have
    memory of their own where they are."""
    checkpoint = Path(minilm_finetune["base"]) / "model.safetensors"
    digest = xxhash.xxh3_128(checkpoint.read_bytes()).hexdigest()
    model = AutoKENModelForSequenceClassification.from_pretrained(minilm_pruned[0.25]["folder"])
    mapped = _file_mappings()
    assert not any(_in_mapping(p, mapped) for p in model.parameters())
    model.load_subnetwork(minilm_pruned[0.5]["folder"], "half")
    model.set_subnetwork("half")
    _assert_same_state(_state(model.base_model), _state(minilm_pruned[0.5]["model"]))
    assert xxhash.xxh3_128(checkpoint.read_bytes()).hexdigest() == digest

    owned = copy.deepcopy(_minilm_base(minilm_finetune["base"]))
    addresses = [p.data_ptr() for p in owned.parameters()]
    model = KENModel.from_pretrained(owned, minilm_pruned[0.25]["folder"])
    assert [p.data_ptr() for p in model.parameters()] == addresses
    _assert_same_state(_state(owned), _state(minilm_pruned[0.25]["model"]))


def _file_mappings() -> list[tuple[int, int]]:
    """Sorted ``(start, end)`` addresses of this process's mappings of files (an inode other
    than 0 in Linux's ``/proc/self/maps``)."""
    ranges = []
    for line in Path("/proc/self/maps").read_text().splitlines():
        fields = line.split()
        if len(fields) >= 5 and fields[4] != "0":
            start, end = fields[0].split("-")
            ranges.append((int(start, 16), int(end, 16)))
    return sorted(ranges)


def _in_mapping(tensor: torch.Tensor, mapped: list[tuple[int, int]]) -> bool:
    address = tensor.data_ptr()
    return any(start <= address < end for start, end in mapped)


def test_base_in_another_dtype_or_another_model_is_refused(minilm_finetune, minilm_pruned):
    folder = minilm_pruned[0.25]["folder"]
    half = _minilm_base(minilm_finetune["base"]).to(torch.bfloat16)
    with pytest.raises(BaseMismatchError, match="bert.embeddings.word_embeddings.weight"):
        KENModel.from_pretrained(half, folder)
    from ken_hf.experiments.assets import smollm2_path

    other = AutoModelForCausalLM.from_pretrained(smollm2_path(2))
    with pytest.raises(BaseMismatchError, match="of the subnetwork's base is missing"):
        KENModel.from_pretrained(other, folder)


def test_switching_subnetworks_and_unloading_restores_the_base(minilm_finetune, minilm_pruned):
    base = _minilm_base(minilm_finetune["base"])
    original = _state(base)
    model = KENModel(base)
    model.load_subnetwork(minilm_pruned[0.25]["folder"], "quarter")
    model.load_subnetwork(minilm_pruned[0.5]["folder"], "half")
    _assert_same_state(_state(base), original)  # loading applies nothing
    for name, ratio in [("quarter", 0.25), ("half", 0.5), ("quarter", 0.25)]:
        model.set_subnetwork(name)
        expected = _state(minilm_pruned[ratio]["model"])
        # the classification head is stored whole, so the whole state matches
        _assert_same_state(_state(base), expected)
    with pytest.raises(KeyError, match="no subnetwork named 'third'"):
        model.set_subnetwork("third")
    with model.disable_subnetwork():
        _assert_same_state(_state(base), original)
    _assert_same_state(_state(base), _state(minilm_pruned[0.25]["model"]))
    model.delete_subnetwork("quarter")  # the active one: taken off first
    _assert_same_state(_state(base), original)
    assert model.unload() is base
    _assert_same_state(_state(base), original)
    with pytest.raises(ValueError, match="unloaded"):
        model.set_subnetwork("half")


def test_merge_and_unload_leaves_no_subnetwork_to_write_over_it(minilm_finetune, minilm_pruned):
    model = KENModel(_minilm_base(minilm_finetune["base"]))
    model.load_subnetwork(minilm_pruned[0.25]["folder"], "quarter")
    model.load_subnetwork(minilm_pruned[0.5]["folder"], "half")
    model.set_subnetwork("quarter")
    merged = model.merge_and_unload()
    expected = _state(minilm_pruned[0.25]["model"])
    _assert_same_state(_state(merged), expected)
    for call in (lambda: model.set_subnetwork("half"), lambda: model.load_subnetwork(
            minilm_pruned[0.5]["folder"], "again")):  # fmt: skip
        with pytest.raises(ValueError, match="unloaded"):
            call()
    _assert_same_state(_state(merged), expected)


def test_unloading_twice_is_refused_as_merging_twice_is(minilm_finetune, minilm_pruned):
    for first in ("unload", "merge_and_unload"):
        for second in ("unload", "merge_and_unload"):
            model = KENModel(_minilm_base(minilm_finetune["base"]))
            model.load_subnetwork(minilm_pruned[0.25]["folder"], "quarter")
            getattr(model, first)()
            with pytest.raises(KENError, match=r"unloaded.*unload\(\).*merge_and_unload\(\)"):
                getattr(model, second)()


def test_a_base_without_config_json_is_a_missing_file_naming_base_and_file(
    minilm_finetune, minilm_pruned, tmp_path
):
    base = tmp_path / "base-without-config"
    shutil.copytree(minilm_finetune["base"], base)
    (base / "config.json").unlink()
    with pytest.raises(FileNotFoundError) as error:
        AutoKENModelForSequenceClassification.from_pretrained(
            minilm_pruned[0.25]["folder"], base_model_name_or_path=base
        )
    assert str(base) in str(error.value) and "config.json" in str(error.value)


def test_ken_model_works_in_trainer_and_pipeline(minilm_finetune, minilm_pruned, tmp_path):
    pruned = minilm_pruned[0.25]
    model = AutoKENModelForSequenceClassification.from_pretrained(pruned["folder"])
    args = TrainingArguments(
        output_dir=str(tmp_path), report_to=[], use_cpu=True, per_device_eval_batch_size=16
    )
    collate = DataCollatorWithPadding(minilm_finetune["tokenizer"])
    held_out = minilm_finetune["held_out"]
    ken_loss = Trainer(model=model, args=args, data_collator=collate).evaluate(held_out)
    plain_loss = Trainer(model=pruned["model"], args=args, data_collator=collate).evaluate(held_out)
    assert ken_loss["eval_loss"] == pytest.approx(plain_loss["eval_loss"], abs=1e-6)

    texts = ["a gorgeous, moving film", "tedious and badly acted"]
    tokenizer = minilm_finetune["tokenizer"]
    ken_pipe = pipeline("text-classification", model=model, tokenizer=tokenizer, device="cpu")
    plain_pipe = pipeline(
        "text-classification", model=pruned["model"], tokenizer=tokenizer, device="cpu"
    )
    # Same weights, separate buffers: the BLAS may round the last bit differently.
    for ken, plain in zip(ken_pipe(texts), plain_pipe(texts), strict=True):
        assert ken["label"] == plain["label"]
        assert ken["score"] == pytest.approx(plain["score"], abs=1e-6)
    merged = model.merge_and_unload()
    merged.save_pretrained(tmp_path / "merged")
    reloaded = AutoModelForSequenceClassification.from_pretrained(tmp_path / "merged")
    _assert_same_state(_state(reloaded), _state(pruned["model"]))


@pytest.fixture(scope="module")
def smollm2_pruned(tmp_path_factory):
    """SmolLM2-135M cut to 2 layers, trained a few real AdamW steps on movie snippets,
    pruned at keep ratio 0.25 and saved."""
    from ken_hf.experiments.assets import movie_reviews, smollm2_path

    path = smollm2_path(2)
    tokenizer = AutoTokenizer.from_pretrained(path)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(path)
    texts = movie_reviews()[0][:16]
    batch = tokenizer(texts, return_tensors="pt", padding=True, truncation=True, max_length=32)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    for _ in range(2):
        loss = model(**batch, labels=batch["input_ids"]).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    model.eval()
    config = KENConfig(keep_ratio=0.25, base_model_name_or_path=str(path))
    subnetwork = prune_model(model, AutoModelForCausalLM.from_pretrained(path), config)
    folder = tmp_path_factory.mktemp("smollm2-ken") / "ken"
    subnetwork.save_pretrained(folder)
    return {"model": model, "subnetwork": subnetwork, "folder": folder, "batch": batch}


def test_smollm2_round_trip_identical_state_logits_and_generation(smollm2_pruned):
    loaded = AutoKENModelForCausalLM.from_pretrained(smollm2_pruned["folder"])
    pruned = smollm2_pruned["model"]
    _assert_same_state(_state(loaded.base_model), _state(pruned))
    batch = smollm2_pruned["batch"]
    with torch.no_grad():
        assert torch.equal(loaded(**batch).logits, pruned(**batch).logits)
    prompt = {k: v[:1] for k, v in batch.items()}
    expected = pruned.generate(**prompt, max_new_tokens=8, do_sample=False)
    assert torch.equal(loaded.generate(**prompt, max_new_tokens=8, do_sample=False), expected)


def test_tied_embeddings_are_stored_once_and_tied_again(smollm2_pruned):
    subnetwork = smollm2_pruned["subnetwork"]
    stored = set(subnetwork.pruned) | set(subnetwork.whole)
    assert "model.embed_tokens.weight" in stored and "lm_head.weight" not in stored
    loaded = AutoKENModelForCausalLM.from_pretrained(smollm2_pruned["folder"]).base_model
    assert loaded.lm_head.weight.data_ptr() == loaded.model.embed_tokens.weight.data_ptr()


def test_new_head_is_found_and_stored_whole_without_being_named(minilm_finetune):
    base = _minilm_base(minilm_finetune["base"])  # its classifier is freshly random
    config = KENConfig(k=8, target_modules=["layer.0.attention.self.query"])
    subnetwork = KENSubnetwork.from_weights(base, minilm_finetune["model"], config, progress=False)
    assert set(subnetwork.whole) == {"classifier.weight", "classifier.bias"}
    assert "classifier.weight" not in subnetwork.fingerprints
    # A state dict says nothing about what was new, but the fine-tune was loaded from the
    # base's checkpoint, which holds these very values: it is found and names the head.
    plain = KENSubnetwork.from_weights(
        dict(base.named_parameters()), minilm_finetune["model"], config, progress=False
    )
    assert set(plain.whole) == {"classifier.weight", "classifier.bias"}
    assert plain.config.base_model_name_or_path == minilm_finetune["base"]


def test_subnetwork_from_state_dicts_equals_from_models(minilm_finetune):
    base = _minilm_base(minilm_finetune["base"])
    finetuned = minilm_finetune["model"]
    config = KENConfig(k=64, target_modules=["query", "value"])
    from_models = KENSubnetwork.from_weights(base, finetuned, config, progress=False)
    dicts = dict(base.named_parameters()), dict(finetuned.named_parameters())
    with pytest.raises(ValueError, match=r"cannot tell .* new_tensors="):
        KENSubnetwork.from_weights(*dicts, config, progress=False)
    with pytest.warns(UserWarning, match="names no base checkpoint"):
        from_dicts = KENSubnetwork.from_weights(
            *dicts, config, new_tensors=minilm_finetune["new"], progress=False
        )
    assert from_models.pruned.keys() == from_dicts.pruned.keys()
    # query and value, weight and bias, in 6 layers
    assert len(from_models.pruned) == 24
    assert all(".query." in name or ".value." in name for name in from_models.pruned)
    for name in from_models.pruned:
        assert torch.equal(from_models.mask(name), from_dicts.mask(name))


def test_hub_settings_reach_the_base_model_from_pretrained(
    minilm_finetune, minilm_pruned, tmp_path
):
    """``hub_kwargs`` (a private base's token, a cache folder) reach the base model's own
    ``from_pretrained``, not only the subnetwork's download and the base's config.json;
    the same setting in the model kwargs wins for the base."""
    base_files = {p.name: p.read_bytes() for p in Path(minilm_finetune["base"]).iterdir()
                  if p.is_file()}  # fmt: skip
    expected = _state(minilm_pruned[0.25]["model"])
    with FakeHub() as hub, huggingface_hub_at(hub.url, tmp_path / "hub"):  # HF_TOKEN=hf_fake
        hub.add_repo("me/private-base", base_files, token="hf_private")
        KENSubnetwork.from_pretrained(minilm_pruned[0.25]["folder"]).push_to_hub(
            "me/ken", base_model_name_or_path="me/private-base"
        )
        # the token of hub_kwargs reaches every download (nothing cached yet)
        model = AutoKENModelForSequenceClassification.from_pretrained(
            "me/ken", hub_kwargs={"token": "hf_private"}
        )
        _assert_same_state(_state(model.get_base_model()), expected)
        # a cache folder of hub_kwargs holds the base too; the model kwargs' token wins
        other = tmp_path / "other-cache"
        model = AutoKENModelForSequenceClassification.from_pretrained(
            "me/ken", hub_kwargs={"token": "hf_wrong", "cache_dir": other}, token="hf_private"
        )
        _assert_same_state(_state(model.get_base_model()), expected)
        assert (other / "models--me--private-base").is_dir()
        # and a wrong token in the model kwargs is used for the base, and refused
        with pytest.raises(FileNotFoundError, match="me/private-base.*config.json"):
            AutoKENModelForSequenceClassification.from_pretrained(
                "me/ken",
                hub_kwargs={"token": "hf_private", "cache_dir": tmp_path / "third"},
                token="hf_wrong",
            )
