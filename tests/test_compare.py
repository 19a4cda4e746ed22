"""The comparison recipe end to end on a tiny budget: every row of its table comes from a
real run whose files exist and whose metric can be computed again from those files."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
from safetensors import safe_open

from ken_hf import AutoKENModelForSequenceClassification, KENConfig
from ken_hf.cli import build_parser, main
from ken_hf.experiments.compare import run_comparison
from ken_hf.experiments.finetune import build_trainer, load_splits, load_tokenizer
from ken_hf.experiments.run_settings import CompareSettings, FineTuneSettings
from ken_hf.selection import RULES


@pytest.fixture(scope="module")
def comparison(tmp_path_factory):
    out = tmp_path_factory.mktemp("compare")
    code = main(
        [
            "compare",
            "--train-size", "48",
            "--eval-size", "48",
            "--epochs", "1",
            "--seeds", "0",
            "--keep-ratios", "0.5",
            "--paper-k", "0",
            "--lora-ranks", "2",
            "--output-dir", str(out),
        ]
    )  # fmt: skip
    assert code == 0
    return out, json.loads((out / "results.json").read_text())


def test_every_row_is_a_real_run(comparison):
    out, results = comparison
    methods = [row["method"] for row in results["runs"]]
    assert methods == ["full", *RULES, "lora"]
    for row in results["runs"]:
        assert 0.0 <= row["metric"] <= 1.0
        assert Path(row["files"][0]).is_relative_to(out / "seed0")
        assert row["bytes"] == sum(os.path.getsize(f) for f in row["files"]) > 0, row["label"]
        assert 0 < row["zstd_bytes"] <= row["bytes"] * 1.01, row["label"]
    by_method = {row["method"]: row for row in results["runs"]}
    assert by_method["lora"]["bytes"] < by_method["ken"]["bytes"] < by_method["full"]["bytes"]
    assert by_method["lora"]["trainable_parameters"] < by_method["full"]["trainable_parameters"]
    with safe_open(by_method["lora"]["files"][0], "pt") as adapter:
        ranks = {adapter.get_slice(n).get_shape()[0] for n in adapter.keys() if "lora_A" in n}
    assert ranks == {2}
    for entry in results["summary"]:
        assert entry["seeds"] == 1 and entry["std"] is None
    table = (out / "results.md").read_text()
    assert all(f"| {row['label']} |" in table for row in results["runs"])
    assert (out / "results.png").stat().st_size > 10_000


def test_a_sparse_row_metric_is_reproduced_from_its_files(comparison):
    """Load the KEN row's saved subnetwork onto the base and evaluate it again."""
    _, results = comparison
    row = next(r for r in results["runs"] if r["method"] == "ken")
    folder = Path(row["files"][0]).parent
    config = KENConfig.from_pretrained(folder)
    assert config.rule == "ken" and config.keep_ratio == 0.5
    task = FineTuneSettings(**{**results["settings"]["task"], "seed": 0})
    tokenizer = load_tokenizer(task)
    train, held_out = load_splits(task, tokenizer)
    model = AutoKENModelForSequenceClassification.from_pretrained(folder)
    trainer = build_trainer(task, model, tokenizer, train, held_out, output_dir=folder.parent)
    assert trainer.evaluate()["eval_accuracy"] == pytest.approx(row["metric"], abs=1e-9)
    baseline = next(r for r in results["runs"] if r["method"] == "random")
    assert KENConfig.from_pretrained(Path(baseline["files"][0]).parent).rule == "random"


def test_compare_rejects_an_unknown_rule():
    with pytest.raises(ValueError, match="unknown rule 'best'"):
        run_comparison(CompareSettings(rules=("best",)))


def test_compare_lora_ranks_may_be_none():
    parser = build_parser()
    assert parser.parse_args(["compare", "--lora-ranks"]).lora_ranks == []
    assert parser.parse_args(["compare"]).lora_ranks == list(CompareSettings().lora_ranks)
