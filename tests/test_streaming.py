"""`ken prune`, `ken apply`, `ken inspect`: checkpoint to checkpoint, a tensor at a time,
with the same result as the Python API on a real fine-tune."""

from __future__ import annotations

import json
import os
import socket
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
from ken_hf.storage.subnetwork_file import SUBNETWORK_NAME, read_subnetwork


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


def test_share_by_size_balances_every_prefix():
    from ken_hf.making.distributed import share_by_size

    sizes = [5, 1, 1, 1, 1, 1, 4, 2, 2]
    loads = [0, 0]
    for size, owner in zip(sizes, share_by_size(sizes, 2), strict=True):
        loads[owner] += size
        assert abs(loads[0] - loads[1]) <= max(sizes)  # each prefix: within the largest
    assert share_by_size([3, 3], 3, load=[1, 0, 0]) == [1, 2]  # rank 0 holds work already


def _torchrun(args: list[str], *, processes: int = 2) -> subprocess.CompletedProcess:
    """``args`` run by torchrun on ``processes`` CPU processes (one thread each), within a
    time limit: a hang fails the test instead of stalling it."""
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone",
               "--nproc_per_node", str(processes), *args]  # fmt: skip
    environment = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run(command, capture_output=True, text=True, env=environment, timeout=300)


def test_prune_on_two_processes_writes_the_bytes_of_one(checkpoints):
    """``ken prune`` under torchrun with 2 CPU processes (gloo, one thread each) writes the
    same files, byte for byte, as one process with every thread does."""
    root, base, finetuned = checkpoints
    args = ["prune", "--base", str(base), "--finetuned", str(finetuned), "--keep-ratio", "0.5"]
    assert main([*args, "--out", str(root / "one-process")]) == 0
    run = _torchrun(["-m", "ken_hf.cli", *args, "--out", str(root / "two-processes")])
    assert run.returncode == 0, run.stderr[-3000:]
    assert run.stdout.count("subnetwork: ") == 1  # rank 0 alone reports
    one = sorted(p.name for p in (root / "one-process").iterdir())
    assert sorted(p.name for p in (root / "two-processes").iterdir()) == one
    assert SUBNETWORK_NAME in one and "README.md" in one
    for name in one:
        expected = (root / "one-process" / name).read_bytes()
        assert (root / "two-processes" / name).read_bytes() == expected, name


# Rank 1 alone fails: it cannot open the checkpoints ("start"), or its second tensor fails,
# or it was given another keep ratio ("settings").
_FAILING_RANK = """
import os, sys
import ken_hf.making.from_checkpoints as streaming
from ken_hf.cli import main

def fail(*args, **kwargs):
    raise OSError("simulated failure on rank 1")

if os.environ["RANK"] == "1":
    if sys.argv[1] == "settings":
        sys.argv = [a.replace("0.5", "0.25") for a in sys.argv]
    elif sys.argv[1] == "start":
        streaming.Checkpoint = fail
    else:
        real, calls = streaming.process_tensor, []
        def second_fails(*args, **kwargs):
            calls.append(None)
            return fail() if len(calls) == 2 else real(*args, **kwargs)
        streaming.process_tensor = second_fails
sys.exit(main(sys.argv[2:]))
"""


@pytest.mark.parametrize("where", ["start", "tensor"])
def test_a_failure_on_one_rank_stops_every_rank(checkpoints, tmp_path, where):
    """A failure on one rank only ends the whole run (within the time limit, not a hang),
    with a non-zero exit, the failing rank's error, and nothing written."""
    _, base, finetuned = checkpoints
    script = tmp_path / "failing_rank.py"
    script.write_text(_FAILING_RANK)
    out = tmp_path / "ken"
    args = ["prune", "--base", str(base), "--finetuned", str(finetuned), "--keep-ratio", "0.5"]
    run = _torchrun([str(script), where, *args, "--out", str(out)])
    assert run.returncode != 0
    assert "ken prune: error: simulated failure on rank 1" in run.stderr, run.stderr[-3000:]
    assert not out.exists()


def test_ranks_that_see_different_work_stop_before_any(checkpoints, tmp_path):
    _, base, finetuned = checkpoints
    script = tmp_path / "failing_rank.py"
    script.write_text(_FAILING_RANK)
    out = tmp_path / "ken"
    args = ["prune", "--base", str(base), "--finetuned", str(finetuned), "--keep-ratio", "0.5"]
    run = _torchrun([str(script), "settings", *args, "--out", str(out)])
    assert run.returncode != 0
    error = "ken prune: error: ranks [1] see different tensors or settings from rank 0"
    assert error in run.stderr, run.stderr[-3000:]
    assert not out.exists()


def test_without_a_launcher_to_stop_them_the_other_ranks_fail_too(checkpoints, tmp_path):
    """Processes started by hand (no torchrun agent that stops the rest when one fails):
    rank 1 fails on a tensor, and rank 0 stops too, naming rank 1, the tensor and the
    error, and writes nothing."""
    _, base, finetuned = checkpoints
    script = tmp_path / "failing_rank.py"
    script.write_text(_FAILING_RANK)
    out = tmp_path / "ken"
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    args = ["prune", "--base", str(base), "--finetuned", str(finetuned), "--keep-ratio", "0.5"]
    launcher = {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "WORLD_SIZE": "2"}
    processes = [
        subprocess.Popen(
            [sys.executable, str(script), "tensor", *args, "--out", str(out)],
            stderr=subprocess.PIPE,
            text=True,
            env={**os.environ, **launcher, "RANK": str(rank), "LOCAL_RANK": str(rank)},
        )
        for rank in (0, 1)
    ]
    errors = [process.communicate(timeout=300)[1] for process in processes]
    assert [process.returncode for process in processes] == [2, 2]
    last = [text.replace("\r", "\n").strip().splitlines()[-1] for text in errors]
    assert last[1] == "ken prune: error: simulated failure on rank 1"
    assert last[0].startswith("ken prune: error: rank 1 failed: on tensor '"), errors[0][-3000:]
    assert last[0].endswith("OSError: simulated failure on rank 1")
    assert not out.exists()
