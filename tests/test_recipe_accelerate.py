"""recipes/accelerate_loop.py end to end on a tiny budget: a custom accelerate loop trains,
the main process prunes the unwrapped model, saves the subnetwork and reloads it."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForSequenceClassification

from ken_hf import AutoKENModelForSequenceClassification, KENSubnetwork
from ken_hf.storage.checkpoints import tensors_of

RECIPE = Path(__file__).resolve().parents[1] / "recipes" / "accelerate_loop.py"
KEEP_RATIO = 0.5


def _load_recipe():
    spec = importlib.util.spec_from_file_location("accelerate_loop_recipe", RECIPE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """The recipe's ``main`` with tiny settings; the pruned model and held-out batches are
    caught on their way into ``prune_and_save``."""
    recipe = _load_recipe()
    out = tmp_path_factory.mktemp("accelerate-loop")
    caught = {}

    def spy(model, base_path, tokenizer, held_out, **kwargs):
        figures = prune_and_save(model, base_path, tokenizer, held_out, **kwargs)
        caught.update(model=model, base_path=base_path, held_out=held_out)
        return figures

    prune_and_save = recipe.prune_and_save
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(recipe, "prune_and_save", spy)
        figures = recipe.main(
            [
                "--train-size", "48",
                "--eval-size", "32",
                "--max-length", "16",
                "--batch-size", "16",
                "--epochs", "1",
                "--keep-ratio", str(KEEP_RATIO),
                "--cpu",
                "--output-dir", str(out),
            ]
        )  # fmt: skip
    return out, figures, caught, recipe


def test_main_process_prunes_saves_and_reloads(run):
    out, figures, caught, recipe = run
    folder = out / "ken"
    assert (folder / "ken_config.json").is_file() and (folder / "tokenizer.json").is_file()
    assert json.loads((out / "results.json").read_text()) == figures
    assert figures["num_processes"] == 1 and figures["steps"] == 3
    assert figures["reloaded_logits_equal"] is True
    assert figures["stored_whole"] == ["classifier.bias", "classifier.weight"]
    assert figures["kept_fraction"] == pytest.approx(KEEP_RATIO, abs=0.01)
    assert KENSubnetwork.from_pretrained(folder).kept_fraction() == figures["kept_fraction"]

    # Checked here again, on the pruned model itself: the reloaded logits are the same bits.
    pruned = caught["model"].eval()
    reloaded = AutoKENModelForSequenceClassification.from_pretrained(folder).eval()
    pruned_logits, labels = recipe.predict(pruned, caught["held_out"])
    reloaded_logits, _ = recipe.predict(reloaded, caught["held_out"])
    assert torch.equal(reloaded_logits, pruned_logits)
    assert recipe.accuracy(pruned_logits, labels) == figures["accuracy_pruned"]


def test_training_changed_the_weights_and_ken_reset_the_rest(run):
    _, _, caught, _ = run
    pruned = tensors_of(caught["model"])
    base = tensors_of(
        AutoModelForSequenceClassification.from_pretrained(caught["base_path"], num_labels=2)
    )
    encoder = [name for name in pruned if name.startswith("bert.encoder.")]
    changed = sum(int((pruned[n] != base[n]).sum()) for n in encoder)
    total = sum(pruned[n].numel() for n in encoder)
    # Training moved most values; KEN kept at most half of each row fine-tuned.
    assert 0 < changed <= KEEP_RATIO * total
    query = "bert.encoder.layer.0.attention.self.query.weight"
    assert ((pruned[query] != base[query]).sum(dim=1) <= pruned[query].shape[1] // 2).all()


def test_two_processes_prune_once_on_the_main_process(tmp_path):
    """Under torchrun with 2 CPU processes (gloo; --cpu, also where a GPU is): the loop
    trains on both, only the main process prunes, saves and reloads (one report printed,
    by rank 0)."""
    out = tmp_path / "out"
    done = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
         str(RECIPE), "--train-size", "32", "--eval-size", "16", "--max-length", "16",
         "--batch-size", "8", "--cpu", "--output-dir", str(out)],
        capture_output=True,
        text=True,
        timeout=300,
        env=dict(os.environ, OMP_NUM_THREADS="1"),
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-4000:]
    assert done.stdout.count('"reloaded_logits_equal"') == 1
    figures = json.loads((out / "results.json").read_text())
    assert figures["num_processes"] == 2 and figures["process_index"] == 0
    assert figures["steps"] == 2  # 32 snippets, 8 a batch, shared by 2 processes
    assert figures["reloaded_logits_equal"] is True
    assert (out / "ken" / "ken_config.json").is_file()
