"""Fine-tunes whose vocabulary gained tokens (``add_special_tokens`` and
``resize_token_embeddings``, as chat templates do): the embedding (and an untied head) grew
along its first dimension. The base's rows are pruned against the base, the new rows are
stored whole, and every way in and out rebuilds the fine-tune: ``prune_model``, the
callback and ``ken prune`` make the subnetwork; ``AutoKENModel*``, ``KENModel`` and ``ken
apply`` grow the base before applying it, and taking the subnetwork off gives the base
back, bit for bit."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from transformers import (
    AutoModelForCausalLM,
    AutoModelForSequenceClassification,
    AutoTokenizer,
    DataCollatorForLanguageModeling,
    Trainer,
    TrainingArguments,
)

from ken_hf import (
    AutoKENModelForCausalLM,
    AutoKENModelForSequenceClassification,
    KENCallback,
    KENConfig,
    KENModel,
    KENSubnetwork,
    prune_model,
)
from ken_hf.cli import main
from ken_hf.experiments.assets import minilm_path, movie_reviews, smollm2_path
from ken_hf.making.plan import PlanError
from ken_hf.storage.subnetwork_file import SUBNETWORK_NAME, SubnetworkReader

NEW_TOKENS = {"additional_special_tokens": ["<|user|>", "<|assistant|>"]}
HEAD = {"classifier.weight", "classifier.bias"}
EMBEDDING = "bert.embeddings.word_embeddings.weight"


def _grown_minilm(tmp_path):
    """A MiniLM 'fine-tune' with two added tokens: every weight moved a little, the new
    embedding rows initialised by ``resize_token_embeddings``; saved with its tokenizer."""
    tokenizer = AutoTokenizer.from_pretrained(minilm_path())
    tokenizer.add_special_tokens(NEW_TOKENS)
    torch.manual_seed(0)
    model = AutoModelForSequenceClassification.from_pretrained(minilm_path(), num_labels=2)
    model.resize_token_embeddings(len(tokenizer))
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.add_(torch.randn_like(parameter) * 1e-3)
    folder = tmp_path / "finetuned"
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    batch = dict(tokenizer(["<|user|> a fine film <|assistant|>"], return_tensors="pt"))
    return model.eval(), tokenizer, folder, batch


def _base():
    torch.manual_seed(1)
    return AutoModelForSequenceClassification.from_pretrained(minilm_path(), num_labels=2).eval()


def _logits(model, batch) -> torch.Tensor:
    with torch.no_grad():
        return model(**batch).logits


def test_prune_model_stores_the_new_rows_whole_and_every_loader_grows_the_base(tmp_path):
    finetuned, tokenizer, _, batch = _grown_minilm(tmp_path)
    pruned = copy.deepcopy(finetuned)
    subnetwork = prune_model(pruned, _base(), KENConfig(keep_ratio=0.5), new_tensors=HEAD)
    embedding = subnetwork.pruned[EMBEDDING]
    assert embedding.base_rows == 30522 and tuple(embedding.added.shape) == (2, 384)
    assert torch.equal(embedding.added, finetuned.get_input_embeddings().weight[30522:])
    # the base's rows were pruned (half of each row kept), the new rows kept whole
    kept_rows = torch.bincount(embedding.positions // 384, minlength=30522)
    assert (kept_rows == 192).all()
    assert torch.equal(pruned.get_input_embeddings().weight[30522:], embedding.added)
    expected = _logits(pruned, batch)
    subnetwork.save_pretrained(tmp_path / "ken", tokenizer=tokenizer)
    with SubnetworkReader(tmp_path / "ken" / SUBNETWORK_NAME) as reader:
        assert reader.version == "3" and reader.entry(EMBEDDING)["rows"] == 30522
    assert json.loads((tmp_path / "ken" / "config.json").read_text())["vocab_size"] == 30524
    loaded = AutoKENModelForSequenceClassification.from_pretrained(tmp_path / "ken")
    assert torch.equal(_logits(loaded, batch), expected)
    assert loaded.config.vocab_size == 30524
    assert len(AutoTokenizer.from_pretrained(tmp_path / "ken")) == 30524  # the grown one
    # taken off: the base again, bit for bit, in its own size
    base = loaded.unload()
    assert base.config.vocab_size == 30522
    assert base.get_input_embeddings().num_embeddings == 30522
    for name, tensor in _base().state_dict().items():
        if not name.startswith("classifier"):
            assert torch.equal(base.state_dict()[name], tensor), name
    # KENModel on a base the user loaded, and saving it again, round trip
    wrapped = KENModel.from_pretrained(_base(), tmp_path / "ken")
    assert torch.equal(_logits(wrapped, batch), expected)
    wrapped.save_pretrained(tmp_path / "again")
    again = AutoKENModelForSequenceClassification.from_pretrained(tmp_path / "again")
    assert torch.equal(_logits(again, batch), expected)


def test_ken_prune_and_ken_apply_carry_the_grown_vocabulary(tmp_path):
    finetuned, tokenizer, folder, batch = _grown_minilm(tmp_path)
    base = str(minilm_path())
    args = ["prune", "--base", base, "--finetuned", str(folder), "--keep-ratio", "0.5"]
    assert main([*args, "--out", str(tmp_path / "ken")]) == 0
    subnetwork = KENSubnetwork.from_pretrained(tmp_path / "ken")
    assert subnetwork.pruned[EMBEDDING].base_rows == 30522
    loaded = AutoKENModelForSequenceClassification.from_pretrained(tmp_path / "ken")
    apply = ["apply", "--base", base, "--ken", str(tmp_path / "ken"), "--out"]
    assert main([*apply, str(tmp_path / "merged")]) == 0
    merged = AutoModelForSequenceClassification.from_pretrained(tmp_path / "merged").eval()
    assert merged.config.vocab_size == 30524
    state = loaded.base_model.state_dict()
    for name, tensor in merged.state_dict().items():
        assert torch.equal(tensor, state[name]), name
    assert len(AutoTokenizer.from_pretrained(tmp_path / "merged")) == 30524
    torch.testing.assert_close(_logits(merged, batch), _logits(loaded, batch))


def test_a_shrunk_or_reshaped_tensor_still_stops_naming_it(tmp_path):
    finetuned, _, _, _ = _grown_minilm(tmp_path)
    shrunk = copy.deepcopy(_base())
    shrunk.resize_token_embeddings(30000)
    with pytest.raises(PlanError, match="word_embeddings.weight.*only a first dimension"):
        prune_model(shrunk, _base(), KENConfig(keep_ratio=0.5), new_tensors=HEAD)


def _two_steps(output_dir, batch_size: int) -> TrainingArguments:
    """Two training steps on the CPU, nothing saved but what the callback saves."""
    return TrainingArguments(
        output_dir=str(output_dir),
        max_steps=2,
        per_device_train_batch_size=batch_size,
        report_to=[],
        save_strategy="no",
        use_cpu=True,
        disable_tqdm=True,
    )


def _chat_data(tokenizer):
    from datasets import Dataset

    texts = [f"<|user|> {text} <|assistant|> ok" for text in movie_reviews()[0][:16]]
    return Dataset.from_dict({"text": texts}).map(
        lambda b: tokenizer(b["text"], truncation=True, max_length=24),
        batched=True,
        remove_columns=["text"],
    )


@pytest.mark.parametrize("tied", [True, False], ids=["tied-head", "untied-head"])
def test_the_callback_on_a_decoder_with_added_tokens_reloads_identically(tmp_path, tied):
    """SmolLM2 (2 layers) with two added tokens, fine-tuned a few steps with KENCallback:
    the tied embedding, or the embedding and an untied head, grew."""
    path = smollm2_path(2)
    if not tied:  # a base with a head of its own: the cut, untied and saved
        model = AutoModelForCausalLM.from_pretrained(path, tie_word_embeddings=False)
        model.lm_head.weight = torch.nn.Parameter(model.get_input_embeddings().weight.clone())
        model.save_pretrained(tmp_path / "untied")
        AutoTokenizer.from_pretrained(path).save_pretrained(tmp_path / "untied")
        path = tmp_path / "untied"
    tokenizer = AutoTokenizer.from_pretrained(path)
    tokenizer.add_special_tokens(NEW_TOKENS)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(path)
    model.resize_token_embeddings(len(tokenizer))
    callback = KENCallback(keep_ratio=0.5)
    trainer = Trainer(
        model=model,
        args=_two_steps(tmp_path / "run", batch_size=8),
        train_dataset=_chat_data(tokenizer),
        data_collator=DataCollatorForLanguageModeling(tokenizer, mlm=False),
        processing_class=tokenizer,
        callbacks=[callback],
    )
    trainer.train()
    grown = {n for n, p in callback.subnetwork.pruned.items() if p.base_rows is not None}
    assert grown == ({"model.embed_tokens.weight"} | (set() if tied else {"lm_head.weight"}))
    pruned = trainer.accelerator.unwrap_model(trainer.model).eval()
    batch = dict(tokenizer(["<|user|> a fine film <|assistant|>"], return_tensors="pt"))
    loaded = AutoKENModelForCausalLM.from_pretrained(tmp_path / "run" / "ken")
    assert torch.equal(_logits(loaded, batch), _logits(pruned, batch))
    assert len(AutoTokenizer.from_pretrained(tmp_path / "run" / "ken")) == len(tokenizer)


def test_prune_model_and_ken_prune_on_a_decoder_with_added_tokens(tmp_path):
    """SmolLM2 (2 layers, tied head) with two added tokens: the in-memory and the
    checkpoint drivers make subnetworks that both reload to the pruned model's logits."""
    path = smollm2_path(2)
    tokenizer = AutoTokenizer.from_pretrained(path)
    tokenizer.add_special_tokens(NEW_TOKENS)
    torch.manual_seed(0)
    finetuned = AutoModelForCausalLM.from_pretrained(path)
    finetuned.resize_token_embeddings(len(tokenizer))
    with torch.no_grad():
        for parameter in finetuned.parameters():
            parameter.add_(torch.randn_like(parameter) * 1e-3)
    finetuned.save_pretrained(tmp_path / "finetuned")
    tokenizer.save_pretrained(tmp_path / "finetuned")
    pruned = copy.deepcopy(finetuned).eval()
    base = AutoModelForCausalLM.from_pretrained(path)
    subnetwork = prune_model(pruned, base, KENConfig(keep_ratio=0.5), progress=False)
    assert subnetwork.pruned["model.embed_tokens.weight"].base_rows == len(tokenizer) - 2
    subnetwork.save_pretrained(tmp_path / "ken", tokenizer=tokenizer)
    batch = dict(tokenizer(["<|user|> a fine film <|assistant|>"], return_tensors="pt"))
    expected = _logits(pruned, batch)
    loaded = AutoKENModelForCausalLM.from_pretrained(tmp_path / "ken")
    assert torch.equal(_logits(loaded, batch), expected)
    args = ["prune", "--base", str(path), "--finetuned", str(tmp_path / "finetuned")]
    assert main([*args, "--keep-ratio", "0.5", "--out", str(tmp_path / "streamed")]) == 0
    streamed = AutoKENModelForCausalLM.from_pretrained(tmp_path / "streamed")
    assert torch.equal(_logits(streamed, batch), expected)


def test_the_callback_on_an_encoder_with_added_tokens_reloads_identically(tmp_path):
    from ken_hf.experiments.tasks import movie_review_splits

    tokenizer = AutoTokenizer.from_pretrained(minilm_path())
    tokenizer.add_special_tokens(NEW_TOKENS)
    train, _ = movie_review_splits(tokenizer, train_size=32, eval_size=8, max_length=24)
    torch.manual_seed(0)
    model = AutoModelForSequenceClassification.from_pretrained(minilm_path(), num_labels=2)
    model.resize_token_embeddings(len(tokenizer))
    callback = KENCallback(keep_ratio=0.5)
    trainer = Trainer(
        model=model,
        args=_two_steps(tmp_path / "run", batch_size=16),
        train_dataset=train,
        processing_class=tokenizer,
        callbacks=[callback],
    )
    trainer.train()
    assert callback.subnetwork.pruned[EMBEDDING].base_rows == 30522
    pruned = trainer.accelerator.unwrap_model(trainer.model).state_dict()
    loaded = AutoKENModelForSequenceClassification.from_pretrained(tmp_path / "run" / "ken")
    reloaded = loaded.base_model.state_dict()
    assert reloaded.keys() == pruned.keys()
    for name, tensor in pruned.items():  # the same weights, bit for bit (grown ones too)
        assert torch.equal(reloaded[name], tensor), name
