"""requirements-min.txt (what `make test-min` installs) pins exactly pyproject.toml's floors,
of the runtime requirements and of every extra; [dev] pulls every other extra, so that
`pip install -e '.[dev]'` (the Makefile) installs everything."""

from __future__ import annotations

from pathlib import Path

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10: pytest brings tomli
    import tomli as tomllib

ROOT = Path(__file__).resolve().parent.parent
# Lint tools: `make test-min` runs the tests, not the linters, so their floors are not pinned.
# trl: every release needs newer datasets, transformers and accelerate than the floors (and
# Python 3.11), so `make test-min` runs without it and tests/test_trl.py is skipped there.
NOT_PINNED = {"ruff", "import-linter", "trl"}


def _project() -> dict:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]


def _floors() -> dict[str, Version]:
    """``{name: lowest version}`` of the runtime requirements and of every extra of
    pyproject.toml (an extra naming ken-hf's own extras adds nothing of its own)."""
    project = _project()
    own = canonicalize_name(project["name"])
    lines = list(project["dependencies"])
    for extra in project["optional-dependencies"].values():
        lines += extra
    floors: dict[str, Version] = {}
    for line in lines:
        requirement = Requirement(line)
        name = canonicalize_name(requirement.name)
        if name in NOT_PINNED or name == own:
            continue
        lower = [s.version for s in requirement.specifier if s.operator == ">="]
        assert len(lower) == 1, f"{line}: needs exactly one >= floor"
        assert floors.setdefault(name, Version(lower[0])) == Version(lower[0]), (
            f"{line}: another line names a different floor for {name}"
        )
    return floors


def _pins() -> dict[str, Version]:
    """``{name: version}`` of requirements-min.txt, every line ``name==version``."""
    pins = {}
    for line in (ROOT / "requirements-min.txt").read_text().splitlines():
        line = line.split("#")[0].strip()
        if line:
            requirement = Requirement(line)
            (spec,) = requirement.specifier
            assert spec.operator == "==", line
            name = canonicalize_name(requirement.name)
            assert name not in pins, f"{line}: pinned twice"
            pins[name] = Version(spec.version)
    return pins


def test_requirements_min_pins_exactly_the_floors_of_pyproject():
    assert _pins() == _floors()


def test_dev_extra_pulls_every_other_extra():
    project = _project()
    own = canonicalize_name(project["name"])
    extras = project["optional-dependencies"]
    pulled: set[str] = set()
    for line in extras["dev"]:
        requirement = Requirement(line)
        if canonicalize_name(requirement.name) == own:
            pulled |= requirement.extras
    assert pulled == set(extras) - {"dev"}
