"""Every Python code block of README.md and of the docs pages runs, so neither can drift
from the code.

The blocks are read from the pages when the tests run: a new block is picked up by itself,
and one this file has no set-up for fails (it is never skipped). The pages are README.md,
then the pages of mkdocs.yml's nav in its order, then any other page under docs/. Each block
is executed with ``exec``, as written, in a namespace that holds real objects for every name
the block uses without defining it, and in a fresh working directory of its own, so that
relative paths such as ``output_dir/ken`` or ``run/ken`` land in a temporary folder. The
blocks run in that order; what a later block takes from an earlier one is handed over
explicitly (``Shared`` below). After each block, checks show that it really ran.

Substitutions, the only changes made to a block's text before it runs (each must be found
in the block, so an edit of the page that removes one fails here until this file follows
it):

- ``"ken-sst2"`` and ``"ken-imdb"`` (Hub ids of two subnetworks of one base) become local
  folders: the subnetwork the Trainer block saved, and one selected here from a small real
  fine-tune of the same base (``minilm_finetune``, conftest.py).
- The quickstart's ``load_dataset(...)`` of Rotten Tomatoes becomes 64 real snippets of the
  same data set, packaged (``ken_hf.experiments.assets.movie_reviews``), with the same
  columns and splits; its one epoch becomes 2 steps.
- The TRL page (``trl_sft_block``, ``trl_dpo_block``, ``trl_reward_block``): its Hub id
  ``HuggingFaceTB/SmolLM2-135M-Instruct`` stays, served by the fake Hub from the packaged
  2-layer cut of that model (``serve_smollm2``). ``load_dataset("trl-lib/Capybara", ...)``
  becomes 24 conversations in Capybara's ``messages`` form built from real packaged review
  snippets (``trl_capybara_sample``), ``test_size=64`` becomes 4, and the SFT run 2 steps of
  2 rows with ``max_length=64``; the DPO and Reward runs (their configs set no run length) get
  2 steps of 2 rows (``TRL_SHORT_RUN``) on preference rows built from the same snippets
  (``trl_preferences``: ``preferences`` and ``held_out``). ``bf16=True`` stays, with
  ``use_cpu=True`` added: transformers refuses ``bf16=True`` without a GPU otherwise.

Not substituted: ``"me/minilm-sentiment-ken"``. ``push_to_hub`` and ``from_pretrained`` of that
id go through the real huggingface_hub client to the fake Hub of ``fake_hub.py`` on
127.0.0.1. huggingface_hub reads ``HF_ENDPOINT`` and ``HF_HUB_OFFLINE`` once, when it is
imported, into ``huggingface_hub.constants``; the endpoint (and the URL template built from
it), the offline switch and the cache folder are therefore set there for that block only
(``fake_hub.huggingface_hub_at``), and the checks confirm that the push and the download went to the
fake Hub. The base's Hub id, ``sentence-transformers/all-MiniLM-L6-v2``, is served by the
fake Hub from the packaged all-MiniLM-L6-v2 folder (``minilm_path()``) where a block names it
(the quickstart, the Trainer-to-Hub block); where a block starts from a model it is handed,
the packaged folder is the base, so a subnetwork records that folder. A subnetwork loaded
from the Hub may name only a Hub id as its base, as a user's subnetwork of a Hub model does:
the loading block's copy of the Trainer block's subnetwork is rewritten to name
``BASE_HUB_ID``.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import json
import re
import shutil
import sys
from pathlib import Path

import pytest
import torch

from fake_hub import FakeHub, huggingface_hub_at
from ken_hf import KENConfig, KENSubnetwork
from ken_hf.config import CONFIG_NAME
from ken_hf.storage.checkpoints import tensors_of
from ken_hf.storage.subnetwork_file import SUBNETWORK_NAME

ROOT = Path(__file__).resolve().parents[1]
MAX_LENGTH = 32
HUB_REPO = "me/minilm-sentiment-ken"
BASE_HUB_ID = "sentence-transformers/all-MiniLM-L6-v2"
TRL_PAGE = "docs/guides/trl.md"


# -- the blocks ---------------------------------------------------------------------------
def pages() -> list[str]:
    """README.md, the pages of mkdocs.yml's nav in order, then any other page of docs/
    (paths relative to the repository)."""
    import yaml

    def walk(entries) -> list[str]:
        found = []
        for entry in entries:
            value = next(iter(entry.values())) if isinstance(entry, dict) else entry
            found += walk(value) if isinstance(value, list) else [f"docs/{value}"]
        return found

    nav = walk(yaml.safe_load((ROOT / "mkdocs.yml").read_text(encoding="utf-8"))["nav"])
    others = sorted(
        str(path.relative_to(ROOT)) for path in (ROOT / "docs").rglob("*.md")
    )
    return ["README.md", *nav, *(page for page in others if page not in nav)]


@dataclasses.dataclass
class Block:
    page: str  # README.md or docs/...
    heading: str  # the nearest heading above the block
    line: int  # line of the opening fence in the page
    source: str
    key: str = ""  # "page: heading", with " #n" for the n-th block (n > 1) under one heading

    def where(self) -> str:
        return f"{self.page}:{self.line} (block under '{self.heading}')"


def python_blocks(page: str, text: str | None = None) -> list[Block]:
    """The fenced blocks of ``page`` whose language is Python (```python, ```py, ...)."""
    if text is None:
        text = (ROOT / page).read_text(encoding="utf-8")
    lines = text.splitlines()
    blocks: list[Block] = []
    heading, index = "(top)", 0
    while index < len(lines):
        line = lines[index]
        if re.match(r"^#{1,6}\s", line):
            heading = line.lstrip("#").strip()
        fence = re.match(r"^(\s*)(`{3,}|~{3,})\s*([\w+-]*)", line)
        if fence:
            indent, marker, language = fence.groups()
            end = index + 1
            while end < len(lines) and not lines[end].strip().startswith(marker):
                end += 1
            if end == len(lines):
                raise AssertionError(f"{page}:{index + 1}: code fence never closed")
            if language.lower().startswith("py"):
                body = "\n".join(row.removeprefix(indent) for row in lines[index + 1 : end])
                blocks.append(Block(page, heading, index + 1, body + "\n"))
            index = end
        index += 1
    seen: dict[str, int] = {}
    for block in blocks:
        seen[block.heading] = seen.get(block.heading, 0) + 1
        n = seen[block.heading]
        block.key = f"{page}: {block.heading}" + ("" if n == 1 else f" #{n}")
    return blocks


def all_blocks() -> list[Block]:
    return [block for page in pages() for block in python_blocks(page)]


def substitute(block: Block, replacements: dict[str, str]) -> str:
    """``block``'s source with each key replaced; every key must occur in it."""
    source = block.source
    for old, new in replacements.items():
        assert old in source, f"{block.where()}: expected {old!r} in the block"
        source = source.replace(old, new)
    return source


def run_block(block: Block, source: str, namespace: dict) -> dict:
    """Execute ``source`` (the block, after substitutions) in ``namespace``; returns it."""
    code = compile(source, f"<{block.where()}>", "exec")
    try:
        exec(code, namespace)
    except Exception as error:
        raise AssertionError(f"{block.where()} failed: {type(error).__name__}: {error}") from error
    return namespace


# -- what the set-ups share ---------------------------------------------------------------
@dataclasses.dataclass
class Shared:
    """What crosses from one block to a later one, and the objects the set-ups reuse."""

    base: str  # the packaged all-MiniLM-L6-v2 folder
    tokenizer: object
    finetune: dict  # the conftest fixture: a real small fine-tune of the same base
    trainer_namespace: dict | None = None  # what the Trainer block bound
    trainer_ken: Path | None = None  # <output_dir>/ken that the Trainer block wrote
    trl_namespace: dict | None = None  # what the TRL page's SFT block bound


def fresh_base(shared: Shared):
    """The pre-trained model, as a user loads it: the packaged folder, a new 2-label head."""
    from transformers import AutoModelForSequenceClassification

    return AutoModelForSequenceClassification.from_pretrained(shared.base, num_labels=2)


def serve_base(hub: FakeHub, shared: Shared) -> None:
    """The packaged base folder, served by ``hub`` as the repository ``BASE_HUB_ID``."""
    folder = Path(shared.base)
    hub.add_repo(BASE_HUB_ID, {p.name: p.read_bytes() for p in folder.iterdir() if p.is_file()})


def name_hub_base(folder: Path) -> None:
    """Make the subnetwork in ``folder`` name ``BASE_HUB_ID`` (the same weights) as its base."""
    path = folder / CONFIG_NAME
    values = json.loads(path.read_text())
    values["base_model_name_or_path"] = BASE_HUB_ID
    path.write_text(json.dumps(values))


def padded_splits(shared: Shared, train_size: int, eval_size: int):
    """Movie snippets padded to one length, so the Trainer's default collator stacks them
    (the callback guide's Trainer call names no collator)."""
    from ken_hf.experiments.tasks import movie_review_splits

    tokenizer = shared.tokenizer
    splits = movie_review_splits(
        tokenizer, train_size=train_size, eval_size=eval_size, max_length=MAX_LENGTH
    )
    columns = ("input_ids", "token_type_ids", "attention_mask")

    def pad(batch):
        inputs = {name: batch[name] for name in columns if name in batch}
        return dict(tokenizer.pad(inputs, padding="max_length", max_length=MAX_LENGTH))

    return tuple(split.map(pad, batched=True) for split in splits)


def training_arguments(output_dir: str, **overrides):
    from transformers import TrainingArguments

    settings = dict(
        output_dir=output_dir,
        per_device_train_batch_size=8,
        per_device_eval_batch_size=32,
        max_steps=2,
        learning_rate=5e-5,
        use_cpu=True,
        report_to=[],
        save_strategy="no",
        disable_tqdm=True,
        seed=0,
    )
    return TrainingArguments(**(settings | overrides))


def state_of(model) -> dict[str, torch.Tensor]:
    return {name: tensor.detach().clone() for name, tensor in tensors_of(model).items()}


def assert_same_state(actual, expected, what: str) -> None:
    assert actual.keys() == expected.keys(), what
    for name in expected:
        assert torch.equal(actual[name], expected[name]), f"{what}: {name} differs"


def rebuilt(shared: Shared, subnetwork: KENSubnetwork) -> dict[str, torch.Tensor]:
    """The weights ``subnetwork`` rebuilds on a freshly loaded base (its new head is stored
    whole, so the random head of the fresh base does not matter)."""
    model = fresh_base(shared)
    subnetwork.apply_to(model)
    return state_of(model)


# -- one set-up and one check per block ---------------------------------------------------
def trainer_block(block: Block, shared: Shared, workdir: Path, monkeypatch) -> None:
    """``Trainer(... callbacks=[KENCallback(keep_ratio=0.75)])``: a real (2-step) fine-tune
    of the packaged MiniLM on movie snippets, evaluated before and after KEN."""
    from ken_hf.experiments.metrics import classification_metrics

    train, dev = padded_splits(shared, train_size=32, eval_size=32)
    torch.manual_seed(0)
    namespace = {
        "model": fresh_base(shared),
        "args": training_arguments("output_dir"),  # so <output_dir>/ken is output_dir/ken
        "train": train,
        "dev": dev,
        "compute_metrics": classification_metrics("accuracy"),
    }
    namespace = run_block(block, block.source, namespace)

    trainer = namespace["trainer"]
    logged = {key for entry in trainer.state.log_history for key in entry}
    assert {"ken_before_accuracy", "ken_after_accuracy"} <= logged, sorted(logged)
    ken = workdir / "output_dir" / "ken"
    assert (ken / CONFIG_NAME).is_file() and (ken / "ken_report.json").is_file()
    subnetwork = KENSubnetwork.from_pretrained(ken)
    assert subnetwork.config.keep_ratio == 0.75
    assert 0.7 < subnetwork.kept_fraction() < 0.8
    assert Path(subnetwork.config.base_model_name_or_path) == Path(shared.base)
    # the pruned model in trainer.model is the base with the saved subnetwork written in
    assert_same_state(state_of(trainer.model), rebuilt(shared, subnetwork), "trainer.model")
    shared.trainer_namespace, shared.trainer_ken = namespace, ken


def loading_block(block: Block, shared: Shared, workdir: Path, monkeypatch) -> None:
    """Loading a subnetwork, the Hub round trip, Trainer and pipeline on a KENModel, and
    several subnetworks on one base."""
    assert shared.trainer_ken is not None, "the Trainer block must run first"
    # "output_dir/ken" is what the Trainer block wrote: handed over into this directory.
    shutil.copytree(shared.trainer_ken, workdir / "output_dir" / "ken")
    name_hub_base(workdir / "output_dir" / "ken")
    sst2 = shared.trainer_ken
    # "ken-imdb": another subnetwork of the same base, from another real fine-tune.
    imdb = workdir / "subnetwork-imdb"
    config = KENConfig(keep_ratio=0.25, target_modules=["attention.self.query"])
    KENSubnetwork.from_weights(
        fresh_base(shared), shared.finetune["model"], config, progress=False
    ).save_pretrained(imdb)
    source = substitute(block, {'"ken-sst2"': repr(str(sst2)), '"ken-imdb"': repr(str(imdb))})
    from transformers import pipeline

    base_model = fresh_base(shared)
    base_before = state_of(base_model)
    namespace = {
        "Trainer": shared.trainer_namespace["Trainer"],  # imported by the Trainer block
        "args": training_arguments(str(workdir / "trainer")),
        "pipeline": pipeline,
        "tokenizer": shared.tokenizer,
        "base_model": base_model,
    }
    with FakeHub() as hub, huggingface_hub_at(hub.url, workdir / "hf-cache"):
        serve_base(hub, shared)
        namespace = run_block(block, source, namespace)
    # the push published the subnetwork folder only, and the load downloaded it from there
    assert sorted(hub.repos[HUB_REPO]) == sorted(
        ["README.md", "config.json", CONFIG_NAME, SUBNETWORK_NAME]
    )
    downloads = [r for r in hub.requests if r.startswith(f"GET /{HUB_REPO}/resolve/")]
    assert any(r.endswith(SUBNETWORK_NAME) for r in downloads), hub.requests
    expected = rebuilt(shared, KENSubnetwork.from_pretrained(sst2))
    # trainer.save_model("out") wrote the subnetwork, the same one
    saved = KENSubnetwork.from_pretrained(workdir / "out")
    assert_same_state(rebuilt(shared, saved), expected, "trainer.save_model")
    # pipeline on model.base_model classifies
    prediction = namespace["pipe"]("a gripping, beautifully acted film")
    assert prediction[0]["label"] in {"LABEL_0", "LABEL_1"}
    # plain: a transformers model holding base + the subnetwork loaded from the Hub
    plain = namespace["plain"]
    assert type(plain).__name__ == "BertForSequenceClassification"
    assert_same_state(state_of(plain), expected, "merge_and_unload()")
    # the multi-subnetwork part ended with unload(): the base, bit for bit
    assert namespace["base_again"] is base_model
    assert_same_state(state_of(namespace["base_again"]), base_before, "unload()")
    with pytest.raises(ValueError, match="unloaded"):
        namespace["model"].set_subnetwork("imdb")


def hub_trainer_block(block: Block, shared: Shared, workdir: Path, monkeypatch) -> None:
    """``TrainingArguments(push_to_hub=True, hub_model_id=...)`` with ``KENCallback``: a real
    fine-tune (16 snippets, the block's own arguments), the push to the fake Hub into
    ``ken/`` of the Trainer's repository, and the loads back by repo id and subfolder."""
    from transformers import AutoModelForSequenceClassification

    from ken_hf.experiments.metrics import classification_metrics

    train, dev = padded_splits(shared, train_size=16, eval_size=16)
    with FakeHub() as hub, huggingface_hub_at(hub.url, workdir / "hf-cache"):
        serve_base(hub, shared)
        torch.manual_seed(0)
        namespace = {  # the base as a user loads it: by Hub id, so the subnetwork names it
            "model": AutoModelForSequenceClassification.from_pretrained(BASE_HUB_ID, num_labels=2),
            "train": train,
            "dev": dev,
            "tokenizer": shared.tokenizer,
            "compute_metrics": classification_metrics("accuracy"),
        }
        namespace = run_block(block, block.source, namespace)
    repo = "me/minilm-sentiment"
    pushed = hub.repos[repo]
    for filename in (CONFIG_NAME, SUBNETWORK_NAME, "README.md", "ken_report.json"):
        local = workdir / "run" / "ken" / filename
        assert pushed[f"ken/{filename}"] == local.read_bytes(), filename
    assert "ken/tokenizer.json" in pushed
    downloads = [r for r in hub.requests if r.startswith(f"GET /{repo}/resolve/")]
    assert any(r.endswith(f"ken/{SUBNETWORK_NAME}") for r in downloads), hub.requests
    expected = rebuilt(shared, KENSubnetwork.from_pretrained(workdir / "run" / "ken"))
    assert_same_state(state_of(namespace["trainer"].model), expected, "trainer.model")
    assert_same_state(state_of(namespace["model"].base_model), expected, "loaded by repo id")
    prediction = namespace["pipe"]("a gripping, beautifully acted film")
    assert prediction[0]["label"] in {"LABEL_0", "LABEL_1"}


def without_trainer_block(block: Block, shared: Shared, workdir: Path, monkeypatch) -> None:
    """``prune_model``, ``save_pretrained``, ``apply_to``; ``ken_select`` and ``ken_prune``
    on a real fine-tuned and pre-trained weight."""
    finetuned = copy.deepcopy(shared.finetune["model"])  # prune_model resets it in place
    name = "bert.encoder.layer.0.attention.self.query.weight"
    pretrained_weight = tensors_of(fresh_base(shared))[name].detach().clone()
    finetuned_weight = tensors_of(finetuned)[name].detach().clone()
    other_copy = fresh_base(shared)
    other_before = state_of(other_copy)
    namespace = {
        "finetuned_model": finetuned,
        "base_model_or_state_dict": fresh_base(shared),
        "other_copy_of_base": other_copy,
        "finetuned_weight": finetuned_weight,
        "pretrained_weight": pretrained_weight,
    }
    namespace = run_block(block, block.source, namespace)

    for filename in (CONFIG_NAME, SUBNETWORK_NAME, "config.json", "README.md"):
        assert (workdir / "ken" / filename).is_file(), filename
    loaded = KENSubnetwork.from_pretrained(workdir / "ken")
    assert loaded.config.k == 300
    # apply_to wrote into the other copy exactly what prune_model left in the fine-tune
    assert_same_state(state_of(other_copy), state_of(finetuned), "apply_to")
    assert set(namespace["saved"]) == set(loaded.pruned) | set(loaded.whole)
    # ... and the block's comment: restore() makes the other copy the base again
    namespace["subnetwork"].restore(other_copy, namespace["saved"])
    assert_same_state(state_of(other_copy), other_before, "restore")
    mask, pruned = namespace["mask"], namespace["pruned"]
    assert mask.dtype == torch.bool and mask.shape == finetuned_weight.shape
    assert (mask.sum(dim=1) == 96).all()
    assert torch.equal(pruned, torch.where(mask, finetuned_weight, pretrained_weight))


def rotten_tomatoes_sample(size: int = 32):
    """What ``load_dataset("cornell-movie-review-data/rotten_tomatoes")`` gives, in little:
    real Rotten Tomatoes snippets (packaged) in ``train`` and ``validation`` splits of
    ``size`` rows, with the Hub data set's columns ``text`` and ``label``."""
    from datasets import Dataset, DatasetDict

    from ken_hf.experiments.assets import movie_reviews

    texts, labels = movie_reviews()
    rows = [{"text": t, "label": x} for t, x in zip(texts, labels, strict=True)]
    by_label = {label: [row for row in rows if row["label"] == label] for label in (0, 1)}
    half = size // 2  # both labels in each split, interleaved

    def split(start: int):
        pairs = zip(
            by_label[0][start : start + half], by_label[1][start : start + half], strict=True
        )
        return Dataset.from_list([row for pair in pairs for row in pair])

    return DatasetDict(train=split(0), validation=split(half))


def quickstart_block(block: Block, shared: Shared, workdir: Path, monkeypatch) -> None:
    """The quickstart, as a new user runs it: the base and its tokenizer by Hub id (the fake
    Hub serves the packaged MiniLM), a real 2-step fine-tune with ``KENCallback``, and the
    subnetwork loaded back with ``AutoKENModelForSequenceClassification``."""
    source = substitute(
        block,
        {
            'load_dataset("cornell-movie-review-data/rotten_tomatoes")': "rotten_tomatoes_sample()",
            "num_train_epochs=1": "max_steps=2",
        },
    )
    torch.manual_seed(0)
    namespace = {"rotten_tomatoes_sample": rotten_tomatoes_sample}
    with FakeHub() as hub, huggingface_hub_at(hub.url, workdir / "hf-cache"):
        serve_base(hub, shared)
        namespace = run_block(block, source, namespace)
    # the base and the tokenizer came from the (fake) Hub, by id
    assert any(r.startswith(f"GET /{BASE_HUB_ID}/resolve/") for r in hub.requests)
    trainer = namespace["trainer"]
    logged = {key for entry in trainer.state.log_history for key in entry}
    assert {"ken_before_loss", "ken_after_loss"} <= logged, sorted(logged)
    subnetwork = KENSubnetwork.from_pretrained(workdir / "run" / "ken")
    assert subnetwork.config.keep_ratio == 0.75
    assert subnetwork.config.base_model_name_or_path == BASE_HUB_ID
    # what was loaded back is the pruned model the trainer holds
    assert_same_state(state_of(namespace["model"].base_model), state_of(trainer.model), "reload")


# -- the TRL page -------------------------------------------------------------------------
SMOLLM2_HUB_ID = "HuggingFaceTB/SmolLM2-135M-Instruct"
ADDED_TOKENS = ["<|system|>", "<|user|>", "<|assistant|>", "<|end|>"]  # the SFT block's


def serve_smollm2(hub: FakeHub) -> None:
    """The packaged 2-layer cut of SmolLM2-135M-Instruct (every file of its folder: weights,
    config, tokenizer, chat template), served by ``hub`` as ``SMOLLM2_HUB_ID``."""
    from ken_hf.experiments.assets import smollm2_path

    folder = Path(smollm2_path(2))
    hub.add_repo(SMOLLM2_HUB_ID, {p.name: p.read_bytes() for p in folder.iterdir() if p.is_file()})


def trl_reviews() -> dict[str, list[str]]:
    """Short real movie-review snippets (packaged), by sentiment, as tests/test_trl.py
    picks them."""
    from ken_hf.experiments.assets import movie_reviews

    texts, labels = movie_reviews()
    short = [(t, label) for t, label in zip(texts, labels, strict=True) if 40 < len(t) < 90]
    return {
        "positive": [t for t, label in short if label == 1],
        "negative": [t for t, label in short if label == 0],
    }


def trl_capybara_sample(rows: int = 24):
    """What ``load_dataset("trl-lib/Capybara", split="train")`` gives, in little: ``rows``
    conversations in its ``messages`` column (a user's request, the assistant's answer, a
    real review snippet), both sentiments interleaved."""
    from datasets import Dataset

    reviews = trl_reviews()
    return Dataset.from_list(
        [
            {
                "messages": [
                    {"role": "user", "content": f"Write a {sentiment} movie review."},
                    {"role": "assistant", "content": reviews[sentiment][i]},
                ]
            }
            for i in range(rows // 2)
            for sentiment in ("positive", "negative")
        ]
    )


def trl_preferences(rows: slice):
    """Conversational preference rows (prompt / chosen / rejected), as tests/test_trl.py
    builds them: the review of the asked sentiment is chosen, one of the other rejected."""
    from datasets import Dataset

    reviews = {sentiment: texts[rows] for sentiment, texts in trl_reviews().items()}
    other = {"positive": "negative", "negative": "positive"}
    system = {"role": "system", "content": "You review films."}

    def prompt(sentiment: str) -> list[dict]:
        return [system, {"role": "user", "content": f"Write a {sentiment} movie review."}]

    return Dataset.from_list(
        [
            {
                "prompt": prompt(sentiment),
                "chosen": [{"role": "assistant", "content": text}],
                "rejected": [{"role": "assistant", "content": reviews[other[sentiment]][i]}],
            }
            for sentiment in ("positive", "negative")
            for i, text in enumerate(reviews[sentiment])
        ]
    )


def trl_fetched(hub: FakeHub) -> bool:
    """Whether a file of ``SMOLLM2_HUB_ID`` was downloaded from ``hub``."""
    return any(r.startswith(f"GET /{SMOLLM2_HUB_ID}/resolve/") for r in hub.requests)


def trl_trained(trainer, *, evaluated: bool = True) -> None:
    """``trainer`` ran its 2 steps as the block configured it (bf16 autocast, and TRL's
    default activation checkpointing), and KEN ran; evaluated before and after KEN where
    the block gives an eval set."""
    assert trainer.state.global_step == 2
    args = trainer.args
    assert args.bf16
    assert getattr(args, "activation_checkpointing", None) or args.gradient_checkpointing
    logged = {key for entry in trainer.state.log_history for key in entry}
    assert "ken_kept_fraction" in logged, sorted(logged)
    assert ({"ken_before_loss", "ken_after_loss"} <= logged) == evaluated, sorted(logged)


def trl_subnetwork(folder: Path) -> KENSubnetwork:
    """The subnetwork a TRL block's ``KENCallback(keep_ratio=0.5)`` saved in ``folder``."""
    for filename in (CONFIG_NAME, SUBNETWORK_NAME):
        assert (folder / filename).is_file(), f"{folder}: no {filename}"
    subnetwork = KENSubnetwork.from_pretrained(folder)
    assert subnetwork.config.keep_ratio == 0.5
    assert subnetwork.kept_fraction() == 0.5  # every row has an even number of values
    assert subnetwork.config.base_model_name_or_path == SMOLLM2_HUB_ID  # as loaded: by Hub id
    return subnetwork


def trl_sft_block(block: Block, shared: Shared, workdir: Path, monkeypatch) -> None:
    """The complete SFT example: SmolLM2 by Hub id (the fake Hub serves the packaged 2-layer
    cut), the chat template with 4 tokens of its own (a grown vocabulary), a real 2-step
    ``SFTTrainer`` run with ``bf16=True`` on real snippets in Capybara's ``messages`` form,
    and the subnetwork reloaded from ``smollm2-sft/ken`` (the base from the fake Hub)."""
    source = substitute(
        block,
        {
            'load_dataset("trl-lib/Capybara", split="train")': "trl_capybara_sample(24)",
            "test_size=64": "test_size=4",
            "max_steps=500": "max_steps=2",
            "per_device_train_batch_size=8": "per_device_train_batch_size=2",
            "max_length=1024": "max_length=64",
            # transformers refuses bf16=True without a GPU unless told to run on the CPU
            "bf16=True,": "bf16=True, use_cpu=True,",
        },
    )
    torch.manual_seed(0)
    namespace = {"trl_capybara_sample": trl_capybara_sample}
    with FakeHub() as hub, huggingface_hub_at(hub.url, workdir / "hf-cache"):
        serve_smollm2(hub)
        namespace = run_block(block, source, namespace)
    assert trl_fetched(hub), hub.requests
    trainer = namespace["trainer"]
    trl_trained(trainer)
    ken = workdir / "smollm2-sft" / "ken"
    subnetwork = trl_subnetwork(ken)
    # the grown vocabulary: the 4 added tokens, saved with the tokenizer; the new rows
    from transformers import AutoTokenizer

    saved = AutoTokenizer.from_pretrained(ken)
    assert len(saved) == 49152 + len(ADDED_TOKENS)
    assert all(saved.convert_tokens_to_ids(t) >= 49152 for t in ADDED_TOKENS)
    assert saved.eos_token == "<|end|>"
    grown = {name for name, p in subnetwork.pruned.items() if p.base_rows is not None}
    assert "model.embed_tokens.weight" in grown, sorted(subnetwork.pruned)
    # the reload holds the trainer's pruned model, bit for bit (the grown rows too) ...
    pruned, reloaded, batch = namespace["pruned"], namespace["reloaded"], namespace["batch"]
    assert reloaded.get_input_embeddings().weight.shape[0] == 49216  # padded to 64
    assert_same_state(state_of(reloaded), state_of(pruned), "reloaded")
    # ... and the two differences the block prints are 0, as the page says
    with torch.no_grad():
        fp32 = (pruned(**batch).logits - reloaded(**batch).logits).abs().max()
        with torch.autocast(pruned.device.type, dtype=torch.bfloat16):
            under_autocast = (pruned(**batch).logits - reloaded(**batch).logits).abs().max()
    assert fp32.item() == 0 and under_autocast.item() == 0, (fp32, under_autocast)
    shared.trl_namespace = namespace


def trl_namespace(shared: Shared) -> dict:
    """A copy of what the SFT block bound (``model_id``, ``torch``, ``AutoTokenizer``,
    ``KENCallback``, ...), with the preference rows the later blocks train on: 2 real
    reviews of each sentiment, and one of each held out."""
    assert shared.trl_namespace is not None, "the SFT block must run first"
    return dict(shared.trl_namespace) | {
        "preferences": trl_preferences(slice(0, 2)),
        "held_out": trl_preferences(slice(2, 3)),
    }


# DPOConfig's and RewardConfig's defaults otherwise: 3 epochs, 8 rows a step
TRL_SHORT_RUN = "bf16=True, use_cpu=True, max_steps=2, per_device_train_batch_size=2)"


@contextlib.contextmanager
def trl_short_run(block: Block, shared: Shared, workdir: Path):
    """Run the DPO or Reward block (2 steps of 2 rows), starting from the SFT block's names,
    with the fake Hub serving SmolLM2; yields ``(namespace, hub)`` while it still serves."""
    source = substitute(block, {"bf16=True)": TRL_SHORT_RUN})
    torch.manual_seed(0)
    with FakeHub() as hub, huggingface_hub_at(hub.url, workdir / "hf-cache"):
        serve_smollm2(hub)
        yield run_block(block, source, trl_namespace(shared)), hub


def trl_dpo_block(block: Block, shared: Shared, workdir: Path, monkeypatch) -> None:
    """``DPOTrainer`` with ``KENCallback``: the policy by Hub id (the fake Hub), the
    reference model built by DPOTrainer itself, a real run on preference rows; the saved
    subnetwork reloads to the trainer's policy, and the reference model is untouched."""
    from ken_hf import AutoKENModelForCausalLM
    from ken_hf.experiments.assets import smollm2_path

    with trl_short_run(block, shared, workdir) as (namespace, hub):
        ken = workdir / "smollm2-dpo" / "ken"
        trl_subnetwork(ken)
        reloaded = AutoKENModelForCausalLM.from_pretrained(ken).base_model
    assert trl_fetched(hub), hub.requests
    trainer = namespace["trainer"]
    trl_trained(trainer)
    policy = trainer.accelerator.unwrap_model(trainer.model, keep_fp32_wrapper=False)
    assert_same_state(state_of(reloaded), state_of(policy), "reloaded policy")
    # KEN pruned the policy only: the reference model holds the pre-trained weights
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(smollm2_path(2))
    assert_same_state(state_of(trainer.ref_model), state_of(base), "reference model")


def trl_reward_block(block: Block, shared: Shared, workdir: Path, monkeypatch) -> None:
    """``RewardTrainer`` with ``KENCallback``: a one-label sequence classifier on SmolLM2 by
    Hub id (the fake Hub), a real run on preference rows; ``reward_model`` (a KENModel
    loaded from ``smollm2-rm/ken``) holds the trainer's model, its new ``score`` head
    stored whole."""
    from ken_hf import KENModel

    with trl_short_run(block, shared, workdir) as (namespace, hub):
        pass
    assert trl_fetched(hub), hub.requests
    subnetwork = trl_subnetwork(workdir / "smollm2-rm" / "ken")
    trainer = namespace["trainer"]
    trl_trained(trainer, evaluated=False)  # the block gives no eval set
    model = trainer.accelerator.unwrap_model(trainer.model, keep_fp32_wrapper=False)
    assert list(subnetwork.whole) == ["score.weight"]
    assert torch.equal(subnetwork.whole["score.weight"], model.score.weight.detach())
    reward_model = namespace["reward_model"]
    assert isinstance(reward_model, KENModel)
    assert_same_state(state_of(reward_model.base_model), state_of(model), "reward_model")


SETUPS = {
    "README.md: Quickstart": quickstart_block,
    "docs/index.md: Quickstart": quickstart_block,
    "docs/guides/callback.md: At the end of a Trainer run": trainer_block,
    "docs/guides/loading.md: Loading, like a PEFT adapter": loading_block,
    "docs/guides/hub.md: On the Hub, from a Trainer": hub_trainer_block,
    "docs/guides/without-trainer.md: Without a Trainer": without_trainer_block,
    "docs/guides/trl.md: A complete SFT example": trl_sft_block,
    "docs/guides/trl.md: DPO": trl_dpo_block,
    "docs/guides/trl.md: Reward models": trl_reward_block,
}


# -- the tests ----------------------------------------------------------------------------
def test_every_python_block_has_a_setup_and_compiles():
    blocks = all_blocks()
    assert any(block.page == "README.md" for block in blocks), "README.md has no Python block?"
    unknown = [block.where() for block in blocks if block.key not in SETUPS]
    assert not unknown, f"no set-up in tests/test_docs_code.py for {unknown}: add one to SETUPS"
    stale = set(SETUPS) - {block.key for block in blocks}
    assert not stale, f"SETUPS names blocks the pages no longer have: {sorted(stale)}"
    for block in blocks:
        compile(block.source, block.where(), "exec")


def test_pages_are_the_readme_then_the_nav_then_every_other_page():
    found = pages()
    assert found[0] == "README.md"
    assert found.index("docs/guides/callback.md") < found.index("docs/guides/loading.md")
    on_disk = {str(p.relative_to(ROOT)) for p in (ROOT / "docs").rglob("*.md")}
    assert on_disk <= set(found) and len(found) == len(set(found))


def test_python_blocks_parser_finds_every_fence():
    text = (
        "# A\n```python\nx = 1\n```\n```bash\n# not a heading\n```\n"
        "## B\n  ```py\n  y = 2\n  ```\n```python\nz\n```\n"
    )
    blocks = python_blocks("page.md", text)
    assert [(b.key, b.source) for b in blocks] == [
        ("page.md: A", "x = 1\n"),
        ("page.md: B", "y = 2\n"),
        ("page.md: B #2", "z\n"),
    ]


def run_blocks(blocks: list[Block], shared: Shared, tmp_path: Path, monkeypatch) -> None:
    """Each block's set-up, in order, each in a working directory of its own."""
    missing = [block.where() for block in blocks if block.key not in SETUPS]
    assert not missing, f"no set-up for {missing}"  # never skipped: add one to SETUPS
    for number, block in enumerate(blocks, 1):
        workdir = tmp_path / f"block-{number}"
        workdir.mkdir()
        with monkeypatch.context() as patch:
            patch.chdir(workdir)
            print(f"running {block.where()}", file=sys.stderr)
            SETUPS[block.key](block, shared, workdir, monkeypatch)


def test_every_python_block_of_the_pages_runs(minilm_finetune, tmp_path, monkeypatch):
    """Every block but the TRL page's (the next test)."""
    from transformers import AutoTokenizer

    from ken_hf.experiments.assets import minilm_path

    blocks = [block for block in all_blocks() if block.page != TRL_PAGE]
    base = str(minilm_path())
    shared = Shared(
        base=base,
        tokenizer=AutoTokenizer.from_pretrained(base),
        finetune=minilm_finetune,
    )
    run_blocks(blocks, shared, tmp_path, monkeypatch)


def test_every_python_block_of_the_trl_page_runs(minilm_finetune, tmp_path, monkeypatch):
    """The TRL page's blocks, in order (the later ones use names the first defines)."""
    # Installed by `make test` (the dev extra); absent only from `make test-min`, whose
    # version floors no trl release accepts (see tests/test_version_floors.py).
    pytest.importorskip("trl")
    blocks = [block for block in all_blocks() if block.page == TRL_PAGE]
    assert blocks, f"{TRL_PAGE} has no Python block?"
    run_blocks(blocks, Shared(base="", tokenizer=None, finetune={}), tmp_path, monkeypatch)
