"""The package's public names: each lazily loaded name resolves, the names type checkers and
the API reference see (the ``TYPE_CHECKING`` imports) are exactly the lazy ones, and
``import ken_hf`` loads no transformers."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import ken_hf

INIT = Path(ken_hf.__file__)


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
