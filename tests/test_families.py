"""The family registry: every family (the tiny one too) is one entry whose spec carries everything about it, the
HF families' modules meet the typed contract, and nothing outside a family's package asks for a family by name."""

from __future__ import annotations

import re
import subprocess
import sys

import pytest

from conftest import REPO
from megatron_po.families import FAMILIES, family_for_hf_config, family_spec
from megatron_po.models.family import FamilySpec, HFFamilyModule

pytestmark = pytest.mark.pure


@pytest.mark.parametrize("name", sorted(FAMILIES))
def test_every_entry_has_a_spec_of_its_own(name):
    spec = family_spec(name)
    assert isinstance(spec, FamilySpec) and spec.name == name
    assert (spec.hf is not None) == FAMILIES[name].from_hf
    if spec.hf is not None:
        assert isinstance(spec.hf, HFFamilyModule), name  # every function of the contract is there
        for model_type in FAMILIES[name].hf_model_types:
            assert family_for_hf_config({"model_type": model_type}, name).name == name


def test_config_imports_no_model_code():
    code = ("import sys, megatron_po.config; bad = sorted(m for m in sys.modules if m.startswith(('megatron_po.models', "
            "'megatron.core', 'transformers'))); print(bad); sys.exit(1 if bad else 0)")
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO)
    assert run.returncode == 0, run.stdout + run.stderr


def test_no_family_is_special_cased_outside_its_package():
    names = "|".join(FAMILIES)
    own = {"megatron_po/families.py", "megatron_po/models/tiny_vlm", "megatron_po/models/qwen2_5_vl",
           "megatron_po/models/internvl3"}
    hits = []
    for path in sorted((REPO / "megatron_po").rglob("*.py")):
        rel = path.relative_to(REPO).as_posix()
        if any(rel == o or rel.startswith(o + "/") or rel.startswith(o + ".") for o in own):
            continue
        for no, line in enumerate(path.read_text().splitlines(), 1):
            # a comparison with a family's name, or a lookup by it (docstrings may name families)
            if re.search(rf"""(==|!=|\bin)\s*[(\[{{]?["']({names})["']|\[["']({names})["']\]""", line):
                hits.append(f"{rel}:{no}: {line.strip()}")
    assert not hits, "\n".join(hits)


LOOKUP = re.compile(r"\bfamily_spec\s*\(|\bFAMILIES\s*(\[|\.get\s*\()")
"""A family spec looked up by name (`family_spec(cfg.model.family)`, `FAMILIES[...]`)."""
LOOKUP_ALLOWED = {"megatron_po/cli.py", "megatron_po/families.py", "megatron_po/config.py",
                  "megatron_po/sweep/screen.py"}
"""The driver builds the family once and passes it down; the registry; config validation (imports no model code);
the sweep's screening, once per point (each point's config names its own family)."""


def family_lookups(root=REPO) -> list[str]:
    hits = []
    for path in sorted((root / "megatron_po").rglob("*.py")):
        rel = path.relative_to(root).as_posix()
        if rel in LOOKUP_ALLOWED:
            continue
        for no, line in enumerate(path.read_text().splitlines(), 1):
            if LOOKUP.search(line):
                hits.append(f"{rel}:{no}: {line.strip()}")
    return hits


def test_the_family_is_looked_up_by_name_only_in_the_driver():
    hits = family_lookups()
    assert not hits, "take the FamilySpec the driver built (megatron_po/cli.py) as a parameter:\n" + "\n".join(hits)


@pytest.mark.parametrize("where, line", [
    ("train/data.py", "    spec = family_spec(cfg.model.family)"),
    ("data/hf_chat.py", "        self.family = FAMILIES[family].spec().hf"),
])
def test_a_family_lookup_below_the_driver_is_found(tmp_path, where, line):
    planted = tmp_path / "megatron_po" / where
    planted.parent.mkdir(parents=True)
    planted.write_text(f"def f(cfg, family):\n{line}\n")
    (tmp_path / "megatron_po" / "cli.py").write_text("family = family_spec(cfg.model.family)\n")
    assert family_lookups(tmp_path) == [f"megatron_po/{where}:2: {line.strip()}"]
