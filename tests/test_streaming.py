"""`ken prune`, `ken apply`, `ken inspect`: checkpoint to checkpoint, a tensor at a time,
with the same result as the Python API on a real fine-tune."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

from ken_hf import AutoKENModelForSequenceClassification, KENConfig, KENSubnetwork
from ken_hf.cli import main
from ken_hf.serialization import SUBNETWORK_NAME, read_subnetwork


@pytest.fixture(scope="module")
def checkpoints(minilm_finetune, tmp_path_factory):
    """The real MiniLM base (a BertModel checkpoint: no ``bert.`` prefix) and its real
    fine-tune saved as a sharded BertForSequenceClassification checkpoint."""
    root = tmp_path_factory.mktemp("streaming")
    finetuned = root / "finetuned"
    minilm_finetune["model"].save_pretrained(finetuned, max_shard_size="20MB")
    minilm_finetune["tokenizer"].save_pretrained(finetuned)
    assert (finetuned / "model.safetensors.index.json").is_file()
    return root, Path(minilm_finetune["base"]), finetuned


@pytest.fixture(scope="module")
def pruned(checkpoints):
    root, base, finetuned = checkpoints
    out = root / "ken"
    args = ["prune", "--base", str(base), "--finetuned", str(finetuned), "--keep-ratio", "0.5"]
    assert main([*args, "--out", str(out)]) == 0
    return out


def test_prune_matches_the_python_api(checkpoints, pruned, minilm_finetune):
    _, base, _ = checkpoints
    streamed = read_subnetwork(pruned / SUBNETWORK_NAME)
    reference_base = AutoModelForSequenceClassification.from_pretrained(base, num_labels=2)
    reference = KENSubnetwork.from_weights(
        reference_base, minilm_finetune["model"], KENConfig(keep_ratio=0.5), progress=False
    )
    assert set(streamed.pruned) == set(reference.pruned)
    assert set(streamed.whole) == set(reference.whole) == {"classifier.weight", "classifier.bias"}
    assert streamed.fingerprints == reference.fingerprints  # names matched across the prefix
    for name, expected in reference.pruned.items():
        assert torch.equal(streamed.pruned[name].positions, expected.positions), name
        assert torch.equal(streamed.pruned[name].changed, expected.changed), name
        assert torch.equal(streamed.pruned[name].difference, expected.difference), name
        assert streamed.pruned[name].delta_kept == pytest.approx(expected.delta_kept)
    config = KENConfig.from_pretrained(pruned)
    assert config.base_model_name_or_path == str(base)
    assert config.model_class == "BertForSequenceClassification"
    assert (pruned / "tokenizer.json").is_file() and (pruned / "README.md").is_file()


def test_prune_then_load_and_apply_give_the_same_model(checkpoints, pruned, minilm_finetune):
    root, base, _ = checkpoints
    batch = minilm_finetune["tokenizer"](
        ["a quietly moving film", "dull and far too long"], return_tensors="pt", padding=True
    )
    loaded = AutoKENModelForSequenceClassification.from_pretrained(pruned).eval()
    merged_folder = root / "merged"
    assert main(["apply", "--base", str(base), "--ken", str(pruned), "--out", str(merged_folder),
                 "--max-shard-size", "30MB"]) == 0  # fmt: skip
    shards = sorted(p.name for p in merged_folder.glob("model-*.safetensors"))
    assert len(shards) >= 2 and (merged_folder / "model.safetensors.index.json").is_file()
    merged = AutoModelForSequenceClassification.from_pretrained(merged_folder).eval()
    with torch.no_grad():
        assert torch.equal(loaded(**batch).logits, merged(**batch).logits)
    from transformers import AutoTokenizer

    assert AutoTokenizer.from_pretrained(merged_folder)("film")["input_ids"]


def test_inspect_reports_the_header(pruned, capsys):
    assert main(["inspect", str(pruned), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    stored = read_subnetwork(pruned / SUBNETWORK_NAME)
    kept = sum(p.positions.numel() for p in stored.pruned.values())
    assert info["kept_values"] == kept
    assert info["kept_fraction"] == pytest.approx(0.5, abs=0.01)
    assert info["keep_ratio"] == 0.5 and info["format_version"] == "2"
    assert info["bytes"] == (pruned / SUBNETWORK_NAME).stat().st_size
    assert main(["inspect", str(pruned), "--tensors"]) == 0
    text = capsys.readouterr().out
    assert "classifier.weight" in text and "keep ratio 0.5" in text


def _error_of(args: list[str], capsys) -> str:
    assert main(args) == 2
    lines = capsys.readouterr().err.replace("\r", "\n").strip().splitlines()
    assert lines[-1].startswith(f"ken {args[0]}: error: "), lines  # one clear line, last
    return lines[-1]


def test_mismatched_checkpoints_fail_before_any_work(checkpoints, capsys):
    root, base, finetuned = checkpoints
    out = root / "never"
    weights = load_file(str(base / "model.safetensors"))
    for problem, change in (
        ("shape", lambda w: {**w, "pooler.dense.bias": torch.zeros(5)}),
        ("dtype", lambda w: {n: t.to(torch.bfloat16) for n, t in w.items()}),
        ("no tensor in common", lambda w: {f"other.{n}": t for n, t in w.items()}),
    ):
        bad = root / f"bad-{problem.replace(' ', '-')}"
        bad.mkdir()
        save_file(change(weights), str(bad / "model.safetensors"))
        args = ["prune", "--base", str(bad), "--finetuned", str(finetuned), "--k", "8"]
        assert problem in _error_of([*args, "--out", str(out)], capsys)
        assert not out.exists()
    args = ["prune", "--base", str(root / "missing"), "--finetuned", str(finetuned), "--k", "8"]
    assert "missing" in _error_of([*args, "--out", str(out)], capsys)


def test_apply_refuses_a_base_it_was_not_made_from(checkpoints, pruned, capsys):
    root, base, _ = checkpoints
    other = root / "other-base"
    other.mkdir()
    weights = load_file(str(base / "model.safetensors"))
    weights["encoder.layer.3.output.dense.weight"][0, 0] += 1e-3
    save_file(weights, str(other / "model.safetensors"))
    out = root / "never-merged"
    error = _error_of(
        ["apply", "--base", str(other), "--ken", str(pruned), "--out", str(out)], capsys
    )
    assert "encoder.layer.3.output.dense.weight" in error and "differs" in error
    assert not out.exists()


def test_a_killed_prune_leaves_the_old_or_the_new_subnetwork_and_foreign_files(checkpoints):
    """``ken prune`` into a folder that holds a subnetwork and a user's files, killed (SIGKILL)
    at several points of its save: the folder always loads, as the old subnetwork or the new
    one, and the user's files are untouched."""
    root, base, finetuned = checkpoints
    out = root / "killed"
    common = [sys.executable, "-m", "ken_hf.cli", "prune", "--base", str(base), "--finetuned",
              str(finetuned), "--out", str(out)]  # fmt: skip
    assert subprocess.run([*common, "--keep-ratio", "0.25"], capture_output=True).returncode == 0
    (out / "my_notes.txt").write_text("mine")
    (out / "checkpoint-500").mkdir()
    (out / "checkpoint-500" / "model.safetensors").write_bytes(b"not ken's")
    old = KENSubnetwork.from_pretrained(out).kept_fraction()
    for delay in (0.0, 0.05, 0.1, 0.2, 0.4, 0.8, 1.6):
        process = subprocess.Popen([*common, "--keep-ratio", "0.5"], stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 120
        while not list(out.glob(".ken_subnetwork.safetensors.*")):
            if process.poll() is not None:
                break
            assert time.monotonic() < deadline, "prune never started"
            time.sleep(0.01)
        time.sleep(delay)
        process.kill()
        process.wait()
        kept = KENSubnetwork.from_pretrained(out).kept_fraction()
        assert abs(kept - old) < 1e-9 or abs(kept - 0.5) < 0.01, kept
        assert (out / "my_notes.txt").read_text() == "mine"
        assert (out / "checkpoint-500" / "model.safetensors").read_bytes() == b"not ken's"
        if process.returncode == 0:  # finished before the kill: start again from the old one
            assert subprocess.run([*common, "--keep-ratio", "0.25"]).returncode == 0


def test_llama_base_against_its_sequence_classifier_in_bf16(tmp_path):
    """A causal-LM base (tied head, not stored) against a bf16 LlamaForSequenceClassification
    fine-tune: shared tensors matched, the new score head stored whole, and the folder loads
    into the same model the Python API builds."""
    from ken_hf.experiments.assets import smollm2_path

    base_folder = smollm2_path(num_layers=2)
    base = tmp_path / "base"
    torch.manual_seed(0)
    causal = AutoModelForCausalLM.from_pretrained(base_folder, dtype=torch.bfloat16)
    causal.save_pretrained(base)
    tuned = AutoModelForSequenceClassification.from_pretrained(
        base, num_labels=2, dtype=torch.bfloat16
    )
    with torch.no_grad():
        for parameter in tuned.model.layers.parameters():
            parameter.add_(0.01 * torch.randn_like(parameter))
    tuned.save_pretrained(tmp_path / "finetuned")
    out = tmp_path / "ken"
    args = ["prune", "--base", str(base), "--finetuned", str(tmp_path / "finetuned")]
    assert main([*args, "--k", "16", "--exclude-modules", "embed_tokens", "--out", str(out)]) == 0
    stored = read_subnetwork(out / SUBNETWORK_NAME)
    assert set(stored.whole) == {"score.weight"}
    assert "model.embed_tokens.weight" in stored.fingerprints
    assert "model.embed_tokens.weight" not in stored.pruned  # excluded: reset to the base
    assert all(p.dtype == torch.bfloat16 for p in stored.pruned.values())
    assert all(p.difference.dtype == torch.int16 for p in stored.pruned.values())
    loaded = AutoKENModelForSequenceClassification.from_pretrained(out, dtype=torch.bfloat16)
    reference = KENSubnetwork.from_weights(
        AutoModelForSequenceClassification.from_pretrained(
            base, num_labels=2, dtype=torch.bfloat16
        ),
        tuned,
        KENConfig(k=16, exclude_modules=["embed_tokens"]),
        progress=False,
    )
    assert set(reference.pruned) == set(stored.pruned)
    for name, expected in reference.pruned.items():
        assert torch.equal(stored.pruned[name].positions, expected.positions), name
    ids = torch.tensor([[1, 2, 3, 4]])
    with torch.no_grad():
        rebuilt = AutoModelForSequenceClassification.from_pretrained(
            base, num_labels=2, dtype=torch.bfloat16
        )
        reference.apply_to(rebuilt)
        assert torch.equal(loaded(input_ids=ids).logits, rebuilt(input_ids=ids).logits)
