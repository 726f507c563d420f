"""Every test sits in exactly one tier (pytest.ini: pure, multirank, e2e; `slow` on top), so `-m "not slow"` and
`-m pure` select what they say: a test without a tier would run in every selection but be named by none."""

from __future__ import annotations

import ast
import configparser
from pathlib import Path

import pytest

pytestmark = pytest.mark.pure

TESTS = Path(__file__).resolve().parent
TIERS = {"pure", "multirank", "e2e"}


def _marks(node: ast.expr) -> set[str]:
    """Names of the `pytest.mark.X` / `pytest.mark.X(...)` in a decorator or a pytestmark value (list or single)."""
    if isinstance(node, (ast.List, ast.Tuple)):
        return set().union(*(_marks(e) for e in node.elts))
    if isinstance(node, ast.Call):
        node = node.func
    if (isinstance(node, ast.Attribute) and isinstance(node.value, ast.Attribute) and node.value.attr == "mark"
            and isinstance(node.value.value, ast.Name) and node.value.value.id == "pytest"):
        return {node.attr}
    return set()


def _declared_tiers(path: Path) -> dict[str, set[str]]:
    """test name -> the tiers its module's pytestmark and its own decorators give it (from the source)."""
    tree = ast.parse(path.read_text())
    module = set()
    for node in tree.body:
        if isinstance(node, ast.Assign) and any(isinstance(t, ast.Name) and t.id == "pytestmark" for t in node.targets):
            module |= _marks(node.value)
    tests = {}
    for node in tree.body:
        defs = [(node, set())]
        if isinstance(node, ast.ClassDef) and node.name.startswith("Test"):
            cls = set().union(*(_marks(d) for d in node.decorator_list))
            defs = [(n, cls) for n in node.body if isinstance(n, ast.FunctionDef)]
        for fn, inherited in defs:
            if isinstance(fn, ast.FunctionDef) and fn.name.startswith("test_"):
                own = set().union(*(_marks(d) for d in fn.decorator_list))
                tests[fn.name] = (module | inherited | own) & TIERS
    return tests


def test_every_test_module_declares_one_tier_per_test():
    wrong = {f"{path.name}::{name}": sorted(tiers) for path in sorted(TESTS.glob("test_*.py"))
             for name, tiers in _declared_tiers(path).items() if len(tiers) != 1}
    assert not wrong, f"tests without exactly one tier marker ({', '.join(sorted(TIERS))}): {wrong}"


def test_collected_tests_carry_one_tier(request):
    """What pytest itself sees for this session's tests (the whole suite under launch/test.sh)."""
    wrong = [item.nodeid for item in request.session.items
             if len({m.name for m in item.iter_markers()} & TIERS) != 1]
    assert not wrong, wrong


def test_tiers_are_registered_and_strict():
    ini = configparser.ConfigParser()
    ini.read(TESTS.parent / "pytest.ini")
    registered = {line.split(":")[0].strip() for line in ini["pytest"]["markers"].strip().splitlines()}
    assert TIERS | {"slow"} <= registered
    assert "--strict-markers" in ini["pytest"]["addopts"].split()  # a misspelt tier is a collection error
