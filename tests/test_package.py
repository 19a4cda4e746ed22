"""The package's public names: each lazily loaded name resolves, the names type checkers and
the API reference see (the ``TYPE_CHECKING`` imports) are exactly the lazy ones, and
``import ken_hf`` loads no transformers. The layout the docs describe is the one the import
contracts enforce."""

from __future__ import annotations

import ast
import re
import subprocess
import sys
from pathlib import Path

import ken_hf

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10: pytest brings tomli
    import tomli as tomllib

INIT = Path(ken_hf.__file__)
ROOT = INIT.parents[1]


def _type_checking_imports() -> dict[str, str]:
    """``{name: module}`` of the imports under ``if TYPE_CHECKING:`` in ken_hf/__init__.py."""
    tree = ast.parse(INIT.read_text(encoding="utf-8"))
    block = next(
        node
        for node in tree.body
        if isinstance(node, ast.If) and getattr(node.test, "id", "") == "TYPE_CHECKING"
    )
    return {
        alias.asname or alias.name: statement.module
        for statement in block.body
        if isinstance(statement, ast.ImportFrom)
        for alias in statement.names
    }


def test_every_lazy_name_resolves_and_is_seen_by_type_checkers():
    lazy = dict(ken_hf._LAZY)
    assert _type_checking_imports() == lazy
    for name in lazy:
        assert (getattr(ken_hf, name).__doc__ or "").strip(), f"{name} has no docstring"
    eager = {"__version__", "ken_prune", "ken_select", "ken_select_many"}
    assert set(ken_hf.__all__) == eager | set(lazy)


def test_import_loads_no_transformers():
    code = "import sys, ken_hf; print('transformers' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def _contract_layers() -> list[list[str]]:
    """The modules of the layers contract in pyproject.toml, bottom layer first, without
    the ``ken_hf.`` prefix."""
    contracts = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["importlinter"]
    (layers,) = [c["layers"] for c in contracts["contracts"] if c["type"] == "layers"]
    return [
        [module.strip().removeprefix("ken_hf.") for module in layer.split("|")]
        for layer in reversed(layers)
    ]


def test_every_module_is_in_a_layer_of_the_import_contracts():
    """Each module of ``ken_hf`` is in a layer: a subpackage as a whole when the contracts
    name it (``selection``), else each of its modules (``storage.card``)."""
    layered = {module for layer in _contract_layers() for module in layer}
    package = ROOT / "ken_hf"
    modules = {p.stem for p in package.glob("*.py") if p.stem != "__init__"}
    for subpackage in (p for p in package.iterdir() if (p / "__init__.py").is_file()):
        if subpackage.name in layered:
            modules.add(subpackage.name)
        else:
            modules |= {f"{subpackage.name}.{p.stem}" for p in subpackage.glob("*.py")}
            modules.discard(f"{subpackage.name}.__init__")
    assert modules == layered, (modules - layered, layered - modules)


def test_the_docs_layout_names_every_module_in_the_contracts_order():
    """docs/contributing.md's "Layout" names each module (``name.py``, ``package/name.py`` or
    ``name/``), and
    every module of a lower layer is first named before every module of a higher one."""
    text = (ROOT / "docs" / "contributing.md").read_text(encoding="utf-8")
    section = text[text.index("## Layout") :]
    section = section[: section.index("\n## ", 1)]
    first = {}
    for height, layer in enumerate(_contract_layers()):
        for module in layer:
            path = module.replace(".", "/")
            found = re.search(rf"`{re.escape(path)}(\.py|/)`", section)
            assert found, f"the docs' layout does not name {module}"
            first[module] = (height, found.start())
    for lower, (low, at) in first.items():
        for higher, (high, later) in first.items():
            if low < high:
                assert at < later, f"the docs' layout names {higher} before {lower}, a lower layer"

