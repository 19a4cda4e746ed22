"""The wheel as `pip install ken-hf` installs it: built from the sources, installed
non-editable into a read-only folder, run by a user with no writable home and none of the
extras, from a folder outside the repository.

The installed package must: ship its metadata (license, extras, ``py.typed``, the ``ken``
script); run ``ken --help``, ``ken prune`` on two tiny checkpoints, ``ken inspect`` and a
Python load of the result with exit code 0 and no traceback; compile the numba kernels
without a cache when it can write one nowhere, saying so once; answer ``ken viz`` and ``ken
demo`` without their extras with one line naming the extra to install; and build ``ken
inspect``'s parser without importing the experiments or matplotlib.

Its dependencies come from the repository's venv (the wheel is installed with ``--no-deps``
into its own folder, put first on ``PYTHONPATH``), with the extras' packages hidden. Run as
root, the children lose the capabilities that let root write where file modes forbid it, so
that read-only means read-only.
"""

from __future__ import annotations

import ctypes
import importlib.metadata
import os
import shutil
import stat
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
from packaging.version import Version

ROOT = Path(__file__).resolve().parent.parent
# What the wheel is built from, copied first: a build writes build/ and *.egg-info beside it.
SOURCES = ("pyproject.toml", "README.md", "LICENSE", "ken_hf")
# The extras' packages, hidden from the installed package as if never installed.
EXTRAS_MODULES = ("matplotlib", "datasets", "evaluate", "peft", "gguf")
# Imported first by the children: neither the import system nor importlib.metadata (which
# transformers asks whether a package is installed) finds the extras' packages.
HIDE_EXTRAS = f"""
import sys
from importlib.machinery import PathFinder

HIDDEN = {set(EXTRAS_MODULES)!r}


class WithoutExtras(PathFinder):
    @classmethod
    def find_spec(cls, name, path=None, target=None):
        if name.partition(".")[0] in HIDDEN:
            return None
        return super().find_spec(name, path, target)

    @classmethod
    def find_distributions(cls, *args, **kwargs):
        for distribution in super().find_distributions(*args, **kwargs):
            if (distribution.metadata["Name"] or "").lower() not in HIDDEN:
                yield distribution


sys.meta_path[:] = [WithoutExtras if f is PathFinder else f for f in sys.meta_path]
"""
NUMBA_MESSAGE = "numba finds no writable cache for the KEN kernels"
# Linux capabilities that let root ignore file modes (capability.h), dropped by prctl.
PR_CAPBSET_DROP = 24
CAP_DAC_OVERRIDE, CAP_DAC_READ_SEARCH = 1, 2

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="Linux only")


def _drop_root_powers() -> None:
    """In the child before exec: remove, from the capabilities root gets on exec, those that
    bypass file permissions."""
    libc = ctypes.CDLL(None, use_errno=True)
    for capability in (CAP_DAC_OVERRIDE, CAP_DAC_READ_SEARCH):
        if libc.prctl(PR_CAPBSET_DROP, capability, 0, 0, 0) != 0:
            raise OSError(ctypes.get_errno(), "prctl(PR_CAPBSET_DROP)")


def _read_only(path: Path) -> None:
    for folder, _, files in os.walk(path):
        for name in files:
            file = Path(folder, name)
            file.chmod(file.stat().st_mode & ~0o222)
        Path(folder).chmod(Path(folder).stat().st_mode & ~0o222)


def _writable(path: Path) -> None:
    for folder, _, files in os.walk(path):
        Path(folder).chmod(Path(folder).stat().st_mode | stat.S_IWUSR)
        for name in files:
            file = Path(folder, name)
            file.chmod(file.stat().st_mode | stat.S_IWUSR)


def _build_wheel(tmp: Path) -> Path:
    """The wheel, built offline by this interpreter's setuptools (no build isolation)."""
    try:
        setuptools = Version(importlib.metadata.version("setuptools"))
    except importlib.metadata.PackageNotFoundError:
        setuptools = None
    if setuptools is None or setuptools < Version("77"):  # pyproject's build requirement
        pytest.skip(f"building needs setuptools>=77 in this environment (found {setuptools})")
    source = tmp / "source"
    source.mkdir()
    for name in SOURCES:
        if (ROOT / name).is_dir():
            shutil.copytree(
                ROOT / name, source / name, ignore=shutil.ignore_patterns("__pycache__")
            )
        else:
            shutil.copy2(ROOT / name, source / name)
    wheels = tmp / "wheels"
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--quiet", "--disable-pip-version-check",
         "--no-deps", "--no-build-isolation", "--no-index", "-w", str(wheels), str(source)],
        check=True,
    )  # fmt: skip
    (wheel,) = wheels.glob("ken_hf-*.whl")
    return wheel


def _check_metadata(wheel: Path) -> None:
    with zipfile.ZipFile(wheel) as archive:
        names = archive.namelist()
        (metadata,) = [n for n in names if n.endswith(".dist-info/METADATA")]
        text = archive.read(metadata).decode()
        (entry_points,) = [n for n in names if n.endswith(".dist-info/entry_points.txt")]
        scripts = archive.read(entry_points).decode()
    assert "ken_hf/py.typed" in names
    assert any(n.endswith(".dist-info/licenses/LICENSE") for n in names), names
    assert "License-Expression: Apache-2.0" in text
    for extra in ("viz", "experiments", "dev"):
        assert f"Provides-Extra: {extra}" in text
    requires = [
        line.removeprefix("Requires-Dist: ")
        for line in text.splitlines()
        if line.startswith("Requires-Dist: ") and "extra ==" not in line
    ]
    for module in EXTRAS_MODULES:  # none of them a core requirement
        assert not any(r.startswith(module) for r in requires), (module, requires)
    assert "ken = ken_hf.cli:main" in scripts


# The Python side, run in the installed package: load the subnetwork, skip the summary
# picture, and build `ken inspect`'s parser without importing the experiments or matplotlib.
LOAD = """
import contextlib, io, sys
import ken_hf
from ken_hf import KENSubnetwork
from ken_hf.cli import main
from ken_hf.viz import summary_png_if_available

subnetwork = KENSubnetwork.from_pretrained(sys.argv[1])
assert summary_png_if_available(subnetwork) is None
with contextlib.redirect_stdout(io.StringIO()), contextlib.suppress(SystemExit):
    main(["inspect", "--help"])
heavy = sorted(m for m in sys.modules if m.startswith(("ken_hf.experiments", "matplotlib")))
print(ken_hf.__file__, len(subnetwork.pruned))
print("imported:", heavy)
"""


def _tiny_checkpoints(folder: Path) -> tuple[Path, Path]:
    import torch
    from transformers import BertConfig, BertForSequenceClassification

    torch.manual_seed(0)
    config = BertConfig(
        vocab_size=64, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
        intermediate_size=64, max_position_embeddings=32, num_labels=2,
    )  # fmt: skip
    model = BertForSequenceClassification(config)
    base, finetuned = folder / "base", folder / "finetuned"
    model.save_pretrained(base)
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.add_(0.01 * torch.randn_like(parameter))
    model.save_pretrained(finetuned)
    return base, finetuned


def test_the_installed_wheel_runs_read_only_without_extras(tmp_path):
    root_user = os.geteuid() == 0
    if root_user:
        try:
            subprocess.run(["true"], preexec_fn=_drop_root_powers, check=True)
        except (OSError, subprocess.SubprocessError):
            pytest.skip("cannot drop root's file-permission capabilities here")
    wheel = _build_wheel(tmp_path)
    _check_metadata(wheel)

    site = tmp_path / "site"
    subprocess.run(
        [sys.executable, "-m", "pip", "install", "--quiet", "--disable-pip-version-check",
         "--no-deps", "--no-index", "--target", str(site), str(wheel)],
        check=True,
    )  # fmt: skip
    hidden = tmp_path / "no-extras"  # first on the path: its sitecustomize hides the extras
    hidden.mkdir()
    (hidden / "sitecustomize.py").write_text(HIDE_EXTRAS)
    data = tmp_path / "data"
    base, finetuned = _tiny_checkpoints(data)
    home = tmp_path / "home"  # exists, not writable: no ~/.cache for numba or anyone
    home.mkdir()
    work = tmp_path / "work"  # the only writable folder (with the system's temporary one)
    work.mkdir()
    for path in (site, hidden, data, home):
        _read_only(path)

    environment = {
        name: value
        for name, value in os.environ.items()
        if not name.startswith(("NUMBA_", "PYTHON", "KEN_HF_", "HF_", "XDG_", "MPL"))
    }
    environment.update(
        PYTHONPATH=os.pathsep.join([str(hidden), str(site)]),
        HOME=str(home),
        XDG_CACHE_HOME=str(home / ".cache"),
        HF_HUB_OFFLINE="1",
    )

    def run(*args: str) -> subprocess.CompletedProcess:
        """``ken *args`` (the installed script), or ``python *args`` when they start with -c."""
        command = [sys.executable, *args] if args[0] == "-c" else [str(site / "bin" / "ken"), *args]
        done = subprocess.run(
            command,
            cwd=work,
            env=environment,
            capture_output=True,
            text=True,
            timeout=300,
            preexec_fn=_drop_root_powers if root_user else None,
        )
        print(f"$ {' '.join(args)[:120]}  (exit {done.returncode})\n{done.stdout}{done.stderr}")
        return done

    try:
        out = work / "subnetwork"
        helped = run("--help")
        assert helped.returncode == 0 and "prune" in helped.stdout
        assert "Traceback" not in helped.stderr

        pruned = run(
            "prune", "--base", str(base), "--finetuned", str(finetuned), "--keep-ratio", "0.5",
            "--out", str(out),
        )  # fmt: skip
        assert pruned.returncode == 0, pruned.stderr
        assert "Traceback" not in pruned.stderr
        assert pruned.stderr.count(NUMBA_MESSAGE) == 1, pruned.stderr
        assert "subnetwork:" in pruned.stdout

        inspected = run("inspect", str(out))
        assert inspected.returncode == 0, inspected.stderr
        assert "Traceback" not in inspected.stderr
        assert "kept" in inspected.stdout

        drawn = run("viz", str(out), "--out", str(work / "kenviz"))
        assert drawn.returncode == 2
        assert drawn.stderr.strip().splitlines() == [drawn.stderr.strip()]
        assert 'pip install "ken-hf[viz]"' in drawn.stderr
        assert not (work / "kenviz").exists()

        demo = run("demo", "--output-dir", str(work / "demo"))
        assert demo.returncode == 2
        assert demo.stderr.strip().splitlines() == [demo.stderr.strip()]
        assert 'pip install "ken-hf[experiments]"' in demo.stderr

        loaded = run("-c", LOAD, str(out))
        assert loaded.returncode == 0, loaded.stderr
        assert "Traceback" not in loaded.stderr
        assert loaded.stdout.startswith(str(site / "ken_hf" / "__init__.py"))
        assert int(loaded.stdout.splitlines()[0].split()[-1]) > 0
        assert loaded.stderr.count("no summary picture saved") == 1, loaded.stderr
        assert "imported: []" in loaded.stdout
    finally:
        for path in (site, hidden, data, home):
            _writable(path)
