"""The KENModel classes as transformers reads them: the class of each task, the label
arguments Trainer finds on the class and the columns it keeps by the instance's signature,
what PreTrainedModel.__init__ would set, copies and pickles, and which weights get memory
of their own. Small models built from configs (no download), real ones where it matters."""

from __future__ import annotations

import copy
import inspect
import pickle
from pathlib import Path

import pytest
import torch
from transformers import (
    AutoModelForCausalLM,
    AutoModelForQuestionAnswering,
    AutoModelForSeq2SeqLM,
    AutoModelForSequenceClassification,
    AutoModelForTokenClassification,
    BertConfig,
    BertModel,
    LlamaConfig,
    PreTrainedModel,
    T5Config,
    Trainer,
    TrainingArguments,
)
from transformers.utils import find_labels

from ken_hf import (
    KENModel,
    KENModelForCausalLM,
    KENModelForQuestionAnswering,
    KENModelForSeq2SeqLM,
    KENModelForSequenceClassification,
    KENModelForTokenClassification,
)


def _bert(**kwargs) -> BertConfig:
    return BertConfig(
        vocab_size=64, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
        intermediate_size=32, max_position_embeddings=32, **kwargs,
    )  # fmt: skip


def _llama() -> LlamaConfig:
    return LlamaConfig(
        vocab_size=64, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
        num_key_value_heads=2, intermediate_size=32, max_position_embeddings=32,
    )  # fmt: skip


def _t5() -> T5Config:
    return T5Config(
        vocab_size=64, d_model=16, d_kv=8, d_ff=32, num_layers=1, num_heads=2,
        decoder_start_token_id=0,
    )  # fmt: skip


TASKS = [
    (AutoModelForSequenceClassification, _bert, KENModelForSequenceClassification),
    (AutoModelForTokenClassification, _bert, KENModelForTokenClassification),
    (AutoModelForQuestionAnswering, _bert, KENModelForQuestionAnswering),
    (AutoModelForCausalLM, _llama, KENModelForCausalLM),
    (AutoModelForSeq2SeqLM, _t5, KENModelForSeq2SeqLM),
]


@pytest.mark.parametrize(("auto", "config", "expected"), TASKS)
def test_each_task_gets_its_class_and_trainer_finds_the_same_labels(auto, config, expected):
    """The class follows the Auto class that builds the model, not its class name; Trainer
    finds on it the label arguments it finds on the plain model."""
    torch.manual_seed(0)
    base = auto.from_config(config())
    model = KENModel(base)
    assert type(model) is expected and isinstance(model, KENModel)
    assert find_labels(type(model)) == find_labels(type(base))
    assert model.get_base_model() is base


def test_an_unknown_model_is_a_plain_kenmodel_and_a_renamed_subclass_keeps_its_task():
    base = BertModel(_bert())  # no task: the bare encoder
    assert type(KENModel(base)) is KENModel
    assert find_labels(KENModel) == ["labels"]

    class Answers(type(AutoModelForQuestionAnswering.from_config(_bert()))):
        pass  # a subclass, named as no transformers task

    assert type(KENModel(Answers(_bert()))) is KENModelForQuestionAnswering


def test_the_instance_signature_is_the_wrapped_models_and_the_class_names_the_labels():
    base = AutoModelForQuestionAnswering.from_config(_bert()).eval()
    model = KENModel(base)
    assert inspect.signature(model.forward) == inspect.signature(base.forward)
    class_parameters = inspect.signature(type(model).forward).parameters
    assert {"start_positions", "end_positions"} <= set(class_parameters)
    inputs = {"input_ids": torch.tensor([[1, 5, 7, 2]])}
    with torch.no_grad():
        assert torch.equal(model(**inputs).start_logits, base(**inputs).start_logits)
        assert torch.equal(model.forward(**inputs).end_logits, base(**inputs).end_logits)


def _rows(columns: dict) -> list[dict]:
    datasets = pytest.importorskip("datasets")
    return datasets.Dataset.from_dict(columns)


@pytest.mark.parametrize(
    ("auto", "labels"),
    [
        (AutoModelForSequenceClassification, {"labels": [1, 0]}),
        (AutoModelForQuestionAnswering, {"start_positions": [1, 2], "end_positions": [2, 3]}),
    ],
)
def test_trainer_keeps_the_columns_the_wrapped_model_takes_and_finds_the_labels(
    auto, labels, tmp_path
):
    torch.manual_seed(0)
    base = auto.from_config(_bert(num_labels=2))
    model = KENModel(base)
    args = TrainingArguments(output_dir=str(tmp_path), report_to=[], use_cpu=True)
    trainer = Trainer(model=model, args=args)
    plain = Trainer(model=base, args=args)
    assert trainer.label_names == plain.label_names == list(labels)
    columns = {
        "input_ids": [[1, 5, 7, 2], [1, 6, 8, 2]],
        "attention_mask": [[1, 1, 1, 1], [1, 1, 1, 1]],
        "token_type_ids": [[0, 0, 0, 0], [0, 0, 0, 0]],
        "text": ["a", "b"],  # not an argument of the model: dropped
        **labels,
    }
    kept = trainer._remove_unused_columns(_rows(columns)).column_names
    assert kept == plain._remove_unused_columns(_rows(columns)).column_names
    assert set(kept) == set(columns) - {"text"}
    loss = trainer.evaluate(_rows({k: v for k, v in columns.items() if k != "text"}))
    expected = plain.evaluate(_rows({k: v for k, v in columns.items() if k != "text"}))
    assert loss["eval_loss"] == pytest.approx(expected["eval_loss"], abs=1e-6)


def test_what_pretrainedmodel_init_sets_is_the_wrapped_models():
    """KENModel skips PreTrainedModel.__init__ (see KENModel.__init__): every attribute it
    sets on a model is read from the wrapped model, with the wrapped model's value."""

    class Probe(PreTrainedModel):
        config_class = LlamaConfig

    config = _llama()
    config._attn_implementation = "eager"  # what PreTrainedModel itself supports
    probe = Probe(config)
    names = set(probe.__dict__) - set(torch.nn.Module().__dict__)
    assert {"config", "loss_type", "name_or_path"} <= names
    base = AutoModelForCausalLM.from_config(_llama())
    model = KENModel(base)
    for name in names:
        assert getattr(model, name) is getattr(base, name, None) or getattr(
            model, name
        ) == getattr(base, name), name
    assert model.loss_type == base.loss_type == "ForCausalLM"
    assert model.generation_config is base.generation_config
    assert model.can_generate()


def test_pretrainedmodel_init_would_refuse_or_change_the_shared_config():
    """Why KENModel skips PreTrainedModel.__init__: it checks the config's attention
    implementation against the class it runs for, and a wrapper holds no attention code.
    When this fails, a transformers release accepts it: KENModel could call it."""
    base = AutoModelForSequenceClassification.from_config(_bert(), attn_implementation="sdpa")
    assert base.config._attn_implementation == "sdpa"
    with pytest.raises(ValueError, match="sdpa|scaled_dot_product_attention"):
        PreTrainedModel.__init__(KENModel.__new__(KENModel), base.config)
    before = dict(base.config.__dict__)
    KENModel(base)  # leaves the wrapped model's config as it was
    assert base.config.__dict__ == before


def test_a_kenmodel_deep_copies_and_pickles_whole():
    torch.manual_seed(0)
    base = AutoModelForSequenceClassification.from_config(_bert(num_labels=2)).eval()
    model = KENModel(base)
    calls = []
    twin = copy.deepcopy(model)
    assert type(twin) is KENModelForSequenceClassification and twin.model is not base
    base.register_forward_hook(lambda *_: calls.append("original"))
    twin.model.register_forward_hook(lambda *_: calls.append("copy"))
    inputs = {"input_ids": torch.tensor([[1, 5, 7, 2]])}
    with torch.no_grad():
        assert torch.equal(twin(**inputs).logits, base(**inputs).logits)
    assert calls == ["copy", "original"]
    again = pickle.loads(pickle.dumps(KENModel(AutoModelForCausalLM.from_config(_llama()))))
    assert type(again) is KENModelForCausalLM
    assert inspect.signature(again.forward) == inspect.signature(again.model.forward)


def test_only_weights_in_memory_torch_did_not_allocate_are_copied(minilm_finetune):
    """The weights transformers maps from the checkpoint are those torch did not allocate,
    as Linux's list of mapped files (the oracle) says; only they are copied."""
    base = AutoModelForSequenceClassification.from_pretrained(minilm_finetune["base"])
    mapped = []
    for line in Path("/proc/self/maps").read_text().splitlines():
        fields = line.split()
        if len(fields) >= 5 and fields[4] != "0":
            start, end = (int(x, 16) for x in fields[0].split("-"))
            mapped.append((start, end))

    def in_file(p: torch.Tensor) -> bool:
        return any(start <= p.data_ptr() < end for start, end in mapped)

    parameters = dict(base.named_parameters())
    foreign = {n for n, p in parameters.items() if not p.untyped_storage().resizable()}
    assert foreign == {n for n, p in parameters.items() if in_file(p)}
    assert "bert.embeddings.word_embeddings.weight" in foreign
    assert "classifier.weight" not in foreign  # new, torch's own
    addresses = {n: p.data_ptr() for n, p in parameters.items()}
    KENModel(base)
    for name, parameter in base.named_parameters():
        assert not in_file(parameter), name
        assert (parameter.data_ptr() == addresses[name]) == (name not in foreign), name
