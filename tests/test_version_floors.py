"""requirements-min.txt (what `make test-min` installs) pins exactly pyproject.toml's floors."""

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
NOT_PINNED = {"ruff", "import-linter"}


def _floors() -> dict[str, Version]:
    """``{name: lowest version}`` of the runtime and [dev] requirements of pyproject.toml."""
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    floors = {}
    for line in project["dependencies"] + project["optional-dependencies"]["dev"]:
        requirement = Requirement(line)
        name = canonicalize_name(requirement.name)
        if name in NOT_PINNED:
            continue
        lower = [s.version for s in requirement.specifier if s.operator == ">="]
        assert len(lower) == 1, f"{line}: needs exactly one >= floor"
        floors[name] = Version(lower[0])
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
            pins[canonicalize_name(requirement.name)] = Version(spec.version)
    return pins


def test_requirements_min_pins_exactly_the_floors_of_pyproject():
    assert _pins() == _floors()
