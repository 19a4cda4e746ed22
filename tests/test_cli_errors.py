"""Every bad input to ``ken`` ends the same way: exit code 2, one short ``error:`` line on
stderr naming what is wrong, no traceback, and no output folder left behind."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from transformers import BertConfig, BertModel, GPT2Config, GPT2Model

from ken_hf import KENConfig
from ken_hf.cli import main as ken
from ken_hf.making.from_checkpoints import prune_checkpoints

OFFLINE_HUB_ID = "ken-hf-tests/no-such-repository"
KEN_EXECUTABLE = Path(sys.executable).with_name("ken")


@pytest.fixture(scope="module")
def folders(tmp_path_factory) -> dict[str, Path]:
    """Tiny checkpoints: a BERT base, its fine-tune (base + noise), the KEN subnetwork of the
    two, an unrelated GPT-2, and broken or empty versions of them."""
    root = tmp_path_factory.mktemp("cli-errors")
    torch.manual_seed(0)
    bert = BertConfig(
        vocab_size=64,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        max_position_embeddings=32,
    )
    model = BertModel(bert)
    model.save_pretrained(root / "base")
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.add_(torch.randn_like(parameter) * 0.01)
    model.save_pretrained(root / "finetuned")
    gpt2 = GPT2Config(vocab_size=64, n_embd=32, n_layer=1, n_head=2, n_positions=32)
    GPT2Model(gpt2).save_pretrained(root / "unrelated")
    prune_checkpoints(
        root / "base", root / "finetuned", KENConfig(k=4), root / "ken", progress=False
    )
    (root / "empty").mkdir()

    def broken(source: str, target: str, file_name: str, data) -> None:
        shutil.copytree(root / source, root / target)
        path = root / target / file_name
        path.write_bytes(data(path.read_bytes()))

    subnetwork, weights = "ken_subnetwork.safetensors", "model.safetensors"
    broken("ken", "ken-truncated", subnetwork, lambda data: data[: len(data) // 2])
    broken("ken", "ken-garbage", subnetwork, lambda data: os.urandom(len(data)))
    broken("base", "base-truncated", weights, lambda data: data[: len(data) // 2])
    broken("base", "base-garbage", weights, lambda data: os.urandom(len(data)))
    return {path.name: path for path in root.iterdir()} | {"missing": root / "missing"}


CUDA = pytest.mark.skipif(torch.cuda.is_available(), reason="CUDA is available here")

# (command line with {folder} placeholders, what the error line must mention)
BAD_INPUTS = {
    # ken prune
    "prune-device-nonsense": ("prune {pair} --k 4 --device nonsense --out {out}", "--device"),
    "prune-device-cuda": ("prune {pair} --k 4 --device cuda --out {out}", "cuda"),
    "prune-k-zero": ("prune {pair} --k 0 --out {out}", "--k"),
    "prune-k-negative": ("prune {pair} --k -1 --out {out}", "--k"),
    "prune-k-text": ("prune {pair} --k four --out {out}", "--k"),
    "prune-keep-ratio-zero": ("prune {pair} --keep-ratio 0 --out {out}", "--keep-ratio"),
    "prune-keep-ratio-above-one": ("prune {pair} --keep-ratio 1.5 --out {out}", "--keep-ratio"),
    "prune-k-and-keep-ratio": ("prune {pair} --k 4 --keep-ratio 0.5 --out {out}", "--keep-ratio"),
    "prune-compression-level": ("prune {pair} --k 4 --compression-level 23 --out {out}",
                                "--compression-level"),
    "prune-compression-threads": ("prune {pair} --k 4 --compression-threads -1 --out {out}",
                                  "--compression-threads"),
    "prune-rule-unknown": ("prune {pair} --k 4 --rule unknown --out {out}", "--rule"),
    "prune-compat-other-rule": ("prune {pair} --k 4 --compat --rule random --out {out}", "compat"),
    "prune-no-out": ("prune {pair} --k 4", "--out"),
    "prune-base-missing": ("prune --base {missing} --finetuned {finetuned} --k 4 --out {out}",
                           "missing"),
    "prune-base-hub-offline": (f"prune --base {OFFLINE_HUB_ID} --finetuned {{finetuned}} --k 4 "
                               "--out {out}", OFFLINE_HUB_ID),
    "prune-finetuned-empty": ("prune --base {base} --finetuned {empty} --k 4 --out {out}",
                              "empty"),
    "prune-nothing-in-common": ("prune --base {base} --finetuned {unrelated} --k 4 --out {out}",
                                "in common"),
    "prune-base-truncated": ("prune --base {base-truncated} --finetuned {finetuned} --k 4 "
                             "--out {out}", "base-truncated"),
    "prune-base-garbage": ("prune --base {base-garbage} --finetuned {finetuned} --k 4 "
                           "--out {out}", "base-garbage"),
    # ken apply
    "apply-ken-missing": ("apply --base {base} --ken {missing} --out {out}", "missing"),
    "apply-ken-hub-offline": (f"apply --base {{base}} --ken {OFFLINE_HUB_ID} --out {{out}}",
                              OFFLINE_HUB_ID),
    "apply-ken-empty": ("apply --base {base} --ken {empty} --out {out}", "empty"),
    "apply-ken-plain-model": ("apply --base {base} --ken {finetuned} --out {out}", "finetuned"),
    "apply-ken-truncated": ("apply --base {base} --ken {ken-truncated} --out {out}",
                            "ken-truncated"),
    "apply-ken-garbage": ("apply --base {base} --ken {ken-garbage} --out {out}", "ken-garbage"),
    "apply-wrong-base": ("apply --base {unrelated} --ken {ken} --out {out}", "unrelated"),
    "apply-base-missing": ("apply --base {missing} --ken {ken} --out {out}", "missing"),
    "apply-shard-size-unit": ("apply --base {base} --ken {ken} --out {out} --max-shard-size 5XB",
                              "--max-shard-size"),
    "apply-shard-size-zero": ("apply --base {base} --ken {ken} --out {out} --max-shard-size 0",
                              "--max-shard-size"),
    # ken inspect
    "inspect-missing": ("inspect {missing}", "missing"),
    "inspect-hub-offline": (f"inspect {OFFLINE_HUB_ID}", OFFLINE_HUB_ID),
    "inspect-empty": ("inspect {empty}", "empty"),
    "inspect-plain-model": ("inspect {base}", "base"),
    "inspect-truncated": ("inspect {ken-truncated}", "ken-truncated"),
    "inspect-garbage": ("inspect {ken-garbage}", "ken-garbage"),
    # ken viz
    "viz-tensor-unknown": ("viz {ken} --tensor nope --out {out}", "'nope'"),
    "viz-tensor-misspelled": ("viz {ken} --tensor layer.0.attention.self.qurey.weight --out {out}",
                              "layer.0.attention.self.query.weight"),
    "viz-tensor-ambiguous": ("viz {ken} --tensor dense --out {out}", "ambiguous"),
    "viz-missing": ("viz {missing} --out {out}", "missing"),
    "viz-plain-model": ("viz {base} --out {out}", "base"),
    "viz-garbage": ("viz {ken-garbage} --out {out}", "ken-garbage"),
    "viz-subfolder-missing": ("viz {empty} --subfolder nope --out {out}", "nope"),
    "viz-subfolder-outside": ("viz {ken} --subfolder ../base --out {out}", "--subfolder"),
    "inspect-subfolder-missing": ("inspect {empty} --subfolder nope", "nope"),
    "inspect-hub-revision-offline": (f"inspect {OFFLINE_HUB_ID} --revision v1", "'v1'"),
    "apply-ken-subfolder-missing": ("apply --base {base} --ken {empty} --subfolder nope "
                                    "--out {out}", "nope"),
    # ken push
    "push-missing": ("push {missing} me/repo", "missing"),
    "push-plain-model": ("push {base} me/repo", "base"),
    "push-truncated": ("push {ken-truncated} me/repo", "ken-truncated"),
    "push-offline": ("push {ken} me/repo --base-model me/base", "me/repo"),
    "push-local-base": ("push {ken} me/repo", "--base-model"),
    "push-base-model-not-hub-id": ("push {ken} me/repo --base-model ../base",
                                   "--base-model='../base'"),
    "push-no-repo-id": ("push {ken}", "repo_id"),
    "push-subfolder-outside": ("push {ken} me/repo --subfolder ../up", "--subfolder"),
    # ken demo, ken compare: refused before any training
    "demo-keep-ratio": ("demo --keep-ratio 1.5 --output-dir {out}", "--keep-ratio"),
    "demo-train-size": ("demo --train-size 0 --output-dir {out}", "--train-size"),
    "demo-model-missing": ("demo --model {missing} --output-dir {out}", "missing"),
    "compare-keep-ratios": ("compare --keep-ratios 0.5 0 --output-dir {out}", "--keep-ratios"),
    "compare-rules": ("compare --rules ken unknown --output-dir {out}", "--rules"),
    "compare-lora-ranks": ("compare --lora-ranks 0 --output-dir {out}", "--lora-ranks"),
    "compare-seeds": ("compare --seeds -1 --output-dir {out}", "--seeds"),
}  # fmt: skip


def _command_line(template: str, folders: dict[str, Path], out: Path) -> list[str]:
    pair = f"--base {folders['base']} --finetuned {folders['finetuned']}"
    return template.format(pair=pair, out=out, **folders).split()


def _assert_one_short_error(stderr: str, command: str, mentions: str) -> None:
    assert "Traceback" not in stderr
    assert len(stderr) < 500, stderr
    errors = [line for line in stderr.splitlines() if "error:" in line]
    assert len(errors) == 1 and errors[0].startswith(f"ken {command}: error: "), stderr
    assert mentions in errors[0], stderr


@pytest.mark.parametrize("case", [pytest.param(c, marks=CUDA) if "cuda" in c else c
                                  for c in BAD_INPUTS])  # fmt: skip
def test_bad_input_is_one_line_and_exit_code_2(case, folders, tmp_path, capsys):
    template, mentions = BAD_INPUTS[case]
    out = tmp_path / "out"
    argv = _command_line(template, folders, out)
    with pytest.raises(SystemExit) as exit_:  # argparse exits; the rest returns
        raise SystemExit(ken(argv))
    assert exit_.value.code == 2
    _assert_one_short_error(capsys.readouterr().err, argv[0], mentions)
    assert not out.exists()


@pytest.mark.parametrize(
    "case", ["prune-device-nonsense", "inspect-garbage", "viz-tensor-misspelled"]
)
def test_a_real_process_prints_no_traceback(case, folders, tmp_path):
    template, mentions = BAD_INPUTS[case]
    out = tmp_path / "out"
    argv = _command_line(template, folders, out)
    done = subprocess.run([str(KEN_EXECUTABLE), *argv], capture_output=True, text=True, timeout=300)
    assert done.returncode == 2
    _assert_one_short_error(done.stderr, argv[0], mentions)
    assert not out.exists()


def test_viz_keeps_a_folder_that_was_there(folders, tmp_path, capsys):
    out = tmp_path / "out"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    assert ken(["viz", str(folders["ken"]), "--tensor", "nope", "--out", str(out)]) == 2
    assert [p.name for p in out.iterdir()] == ["notes.txt"]
    assert "'nope'" in capsys.readouterr().err


def test_viz_removes_the_folders_it_created_when_writing_fails(folders, tmp_path, monkeypatch):
    def fail(*_):
        raise OSError("disk full")

    monkeypatch.setattr("ken_hf.utils.atomic_files.write_text_atomic", fail)
    out = tmp_path / "new" / "out"
    assert ken(["viz", str(folders["ken"]), "--out", str(out)]) == 2
    assert not (tmp_path / "new").exists()
    existing = tmp_path / "existing"
    existing.mkdir()
    assert ken(["viz", str(folders["ken"]), "--out", str(existing / "out")]) == 2
    assert existing.is_dir() and not any(existing.iterdir())


def test_viz_reads_a_suffix_and_a_family(folders, tmp_path):
    out = tmp_path / "out"
    argv = ["viz", str(folders["ken"]), "--out", str(out)]
    assert ken([*argv, "--tensor", "layer.1.output.dense.weight", "--tensor", "query"]) == 0
    assert sorted(p.name for p in out.glob("*.png")) == [
        "layers-attention.self.query.weight.png",
        "layers-output.dense.weight.png",
        "matrix-encoder.layer.1.output.dense.weight.png",
        "neighbours-encoder.layer.1.output.dense.weight.png",
        "summary.png",
    ]
