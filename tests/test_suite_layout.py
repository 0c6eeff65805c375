"""The test suite's own layout: shared code lives in tests/helpers.py and tests/fakes.py; a test module never
imports another test module or conftest (pytest loads those itself)."""

from __future__ import annotations

import ast
from pathlib import Path
from typing import List

TESTS = Path(__file__).resolve().parent


def imported_test_modules(source: str) -> List[str]:
    """The test modules (`test_*`) and conftest that `source` imports, relatively or as `tests.…`."""
    found = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.ImportFrom):
            module = node.module or ""
            names = [module] if module else [a.name for a in node.names]  # `from . import test_x`
            if node.level == 0 and not module.startswith("tests."):
                continue
        elif isinstance(node, ast.Import):
            names = [a.name for a in node.names if a.name.startswith("tests.")]
        else:
            continue
        found += [n for n in names if n.split(".")[-1].startswith("test_") or n.split(".")[-1] == "conftest"]
    return found


def test_no_test_module_imports_another_test_module_or_conftest():
    offenders = {path.name: imported_test_modules(path.read_text()) for path in sorted(TESTS.glob("*.py"))}
    assert {name: found for name, found in offenders.items() if found} == {}


def test_the_import_check_can_fail():
    assert imported_test_modules("from .test_aggregator_rounds import FakeClock\n") == ["test_aggregator_rounds"]
    assert imported_test_modules("from .conftest import export_tiny\n") == ["conftest"]
    assert imported_test_modules("from . import test_lora\nimport tests.test_sim\n") == ["test_lora", "tests.test_sim"]
    assert imported_test_modules("from tests.conftest import REPO\n") == ["tests.conftest"]
    assert imported_test_modules("from .fakes import FakeClock\nfrom .helpers import REPO\nimport os\n") == []
