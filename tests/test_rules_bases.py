"""Every selection rule against every form of the base: a model (parameters requiring
grad), a state dict, a checkpoint folder (streamed, and read lazily as the callback reads
it): one subnetwork, and the right one, on a real MiniLM fine-tune."""

from __future__ import annotations

import copy
from collections import Counter
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForSequenceClassification

from ken_hf import KENConfig, KENSubnetwork, prune_model
from ken_hf.making.base_source import locate_base, record_checkpoint
from ken_hf.making.from_checkpoints import prune_checkpoints
from ken_hf.selection import RULES, ken_select_many, select_by_rule
from ken_hf.selection.ken import BACKEND_VARIABLE
from ken_hf.selection.rows import as_rows
from ken_hf.storage.checkpoints import LazyTensors, tensors_of

# Two layers only, to keep selection quick; everything else goes back to pre-trained.
LAYERS_0_1 = r"bert\.encoder\.layer\.[01]\..*"
QUERY = "bert.encoder.layer.0.attention.self.query.weight"


def _config(rule: str) -> KENConfig:
    return KENConfig(keep_ratio=0.5, rule=rule, target_modules=LAYERS_0_1)


def _base_model(base: str) -> torch.nn.Module:
    model = AutoModelForSequenceClassification.from_pretrained(base, num_labels=2)
    assert all(p.requires_grad for p in model.parameters())
    return model


@pytest.fixture(scope="module")
def finetuned_folder(minilm_finetune, tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("rules-finetuned")
    minilm_finetune["model"].save_pretrained(folder)
    return folder


def _pruned_in_memory(minilm_finetune, base_form: str, rule: str):
    """(subnetwork, pruned weights) of a copy of the fine-tune against the base given as
    ``base_form``."""
    base = minilm_finetune["base"]
    model = copy.deepcopy(minilm_finetune["model"])
    if base_form == "model":
        pretrained = _base_model(base)
    elif base_form == "state dict":
        pretrained = load_file(str(Path(base) / "model.safetensors"))  # names without "bert."
    else:  # "lazy checkpoint": as KENCallback reads it when training ends
        base_model = _base_model(base)
        source, _ = locate_base(base_model, model, _config(rule), tensors_of(base_model))
        recorded = record_checkpoint(source, tensors_of(model), compare=False)
        with recorded.open() as lazy:
            subnetwork = prune_model(model, lazy, _config(rule), progress=False)
        return subnetwork, {n: t.detach().clone() for n, t in model.state_dict().items()}
    subnetwork = prune_model(model, pretrained, _config(rule), progress=False)
    return subnetwork, {n: t.detach().clone() for n, t in model.state_dict().items()}


@pytest.mark.parametrize("rule", RULES)
def test_every_rule_gives_one_subnetwork_whatever_form_the_base_takes(
    rule, minilm_finetune, finetuned_folder, tmp_path
):
    finetuned = minilm_finetune["model"]
    reference, weights = _pruned_in_memory(minilm_finetune, "model", rule)

    # right: k kept per row, the fine-tuned value where kept, the pre-trained one elsewhere
    pretrained = dict(_base_model(minilm_finetune["base"]).named_parameters())
    tuned = dict(finetuned.named_parameters())
    assert set(reference.whole) == {"classifier.weight", "classifier.bias"}
    assert len(reference.pruned) == 32  # 16 tensors per layer, layers 0 and 1
    for name in reference.pruned:
        mask = reference.mask(name)
        k = reference.config.k_for(as_rows(mask).shape[1])
        assert (as_rows(mask).sum(dim=1) == k).all(), name
        expected = torch.where(mask, tuned[name], pretrained[name]).detach()
        assert torch.equal(weights[name], expected), name
    assert not torch.equal(weights[QUERY], pretrained[QUERY])  # fine-tuned values kept
    untargeted = "bert.encoder.layer.4.output.dense.weight"
    assert torch.equal(weights[untargeted], pretrained[untargeted])
    assert torch.equal(weights["classifier.weight"], tuned["classifier.weight"])

    others = {
        form: _pruned_in_memory(minilm_finetune, form, rule)
        for form in ("state dict", "lazy checkpoint")
    }
    out = tmp_path / "ken"
    prune_checkpoints(minilm_finetune["base"], finetuned_folder, _config(rule), out, progress=False)
    streamed = KENSubnetwork.from_pretrained(out)
    for form, subnetwork in [*((f, s) for f, (s, _) in others.items()), ("folder", streamed)]:
        assert set(subnetwork.pruned) == set(reference.pruned), form
        assert subnetwork.fingerprints == reference.fingerprints, form
        for name, expected in reference.pruned.items():
            assert torch.equal(subnetwork.pruned[name].positions, expected.positions), (form, name)
            for field in ("changed", "difference"):  # the kept values, as stored
                got, want = getattr(subnetwork.pruned[name], field), getattr(expected, field)
                assert torch.equal(got, want), (form, name, field)
    for form, (_, other_weights) in others.items():
        for name, value in weights.items():
            assert torch.equal(other_weights[name], value), (form, name)


@pytest.mark.parametrize("rule", RULES)
def test_rules_take_tensors_that_require_grad_on_the_torch_path(rule, monkeypatch):
    """The torch path (every CUDA selection) writes into out= buffers, which autograd
    refuses for tensors that require grad: the rules read them detached."""
    torch.manual_seed(0)
    base = torch.randn(48, 96, requires_grad=True)
    tuned = (base.detach() + 0.01 * torch.randn(48, 96)).requires_grad_()
    expected = select_by_rule(
        {"w": tuned.detach()}, 20, rule=rule, pretrained={"w": base.detach()}
    )["w"]
    monkeypatch.setenv(BACKEND_VARIABLE, "torch")
    mask = select_by_rule({"w": tuned}, 20, rule=rule, pretrained={"w": base})["w"]
    assert torch.equal(mask, expected)
    assert (mask.sum(dim=1) == 20).all()


def test_ken_delta_in_chunks_equals_ken_on_the_whole_changes():
    """``ken_delta`` forms the changes a chunk of rows at a time (here many chunks, some
    spanning tensors): the masks of KEN on the whole changes, and each pre-trained tensor
    read once from a lazy mapping."""
    torch.manual_seed(1)
    shapes = {"a": (300, 64), "b": (64,), "c": (7, 64), "d": (40, 8, 8), "e": (33, 17)}
    base = {name: torch.randn(shape) for name, shape in shapes.items()}
    tuned = {name: t + 0.05 * torch.randn(t.shape) for name, t in base.items()}
    whole = ken_select_many({name: tuned[name] - base[name] for name in tuned}, 5)
    reads = Counter()

    def read(name: str) -> torch.Tensor:
        reads[name] += 1
        return base[name].clone()

    memory = 96 * 64 * 50  # 50 rows of 64 per chunk
    chunked = select_by_rule(
        tuned, 5, rule="ken_delta", pretrained=LazyTensors(read, base), max_memory=memory
    )
    for name in shapes:
        assert torch.equal(chunked[name], whole[name]), name
    assert reads == Counter(dict.fromkeys(shapes, 1))


@pytest.mark.parametrize("rule", RULES)
def test_a_lazy_base_is_read_once_per_tensor_or_never(rule):
    """Through ``select_masks`` (the drivers' path): the rules that look at the pre-trained
    values read each tensor once, the others not at all."""
    from ken_hf.making.plan import plan_tensors, select_masks, specs_of

    torch.manual_seed(2)
    base = {f"layer{i}.weight": torch.randn(32, 48) for i in range(4)}
    tuned = {name: t + 0.05 * torch.randn(t.shape) for name, t in base.items()}
    reads = Counter()

    def read(name: str) -> torch.Tensor:
        reads[name] += 1
        return base[name].clone()

    config = KENConfig(k=6, rule=rule)
    plans = plan_tensors(specs_of(tuned), specs_of(base), config)
    masks = select_masks(plans, tuned, LazyTensors(read, base), config)
    assert masks.keys() == base.keys()
    wanted = 1 if rule in ("ken_delta", "largest_delta") else 0
    assert reads == Counter({name: wanted for name in base if wanted})
