"""Checkpoints saved by transformers 5.x read like 4.x ones (issue 10): RoPE in `rope_parameters`, the Qwen2.5-VL
processor's pixel bounds in `size` only. A value the file sets is never replaced by a default (before, 5.x's
`rope_parameters.rope_theta` was read as 1e6 and `size`'s bounds as the processor defaults, silently), and the
converter's refusals are one `error:` line."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("transformers")

import hf_internvl3_fixture  # noqa: E402
import hf_qwen2_5_vl_fixture  # noqa: E402
from conftest import REPO  # noqa: E402

from megatron_po.data.qwen2_5_vl_processor import processor_settings  # noqa: E402
from megatron_po.models import internvl3, qwen2_5_vl  # noqa: E402
from megatron_po.models.lm import lm_shape_from_hf  # noqa: E402


def as_5x(config: dict) -> dict:
    """A 4.x config.json dict in transformers 5.x's layout: rope_theta / rope_scaling -> rope_parameters."""
    out = json.loads(json.dumps(config))
    for section in (out, out.get("text_config") or {}):
        if "rope_theta" in section or "rope_scaling" in section:
            params = dict(section.pop("rope_scaling", None) or {"rope_type": "default"})
            params.pop("type", None)
            params["rope_theta"] = section.pop("rope_theta", 1_000_000.0)
            section["rope_parameters"] = params
    return out


@pytest.fixture(scope="module")
def qwen(tmp_path_factory) -> Path:
    return hf_qwen2_5_vl_fixture.make_hf_dir(tmp_path_factory.mktemp("qwen") / "hf")


def test_qwen_5x_config_reads_like_4x(qwen):
    c4 = json.loads((qwen / "config.json").read_text())
    c5 = as_5x(c4)
    assert not {"rope_theta", "rope_scaling"} & set(c5["text_config"])
    assert qwen2_5_vl.lm_shape(c5) == qwen2_5_vl.lm_shape(c4)
    assert qwen2_5_vl.lm_shape(c5).rotary_base == 10_000.0  # the file's, not the 1e6 default
    assert qwen2_5_vl.mrope_section(c5) == qwen2_5_vl.mrope_section(c4)
    c5["text_config"]["rope_parameters"]["rope_theta"] = 5e5
    assert qwen2_5_vl.lm_shape(c5).rotary_base == 5e5


def test_internvl_5x_config_reads_like_4x(tmp_path):
    hf = hf_internvl3_fixture.make_checkpoint(tmp_path / "hf", "vit6b")  # its LLM has dynamic NTK scaling
    c4 = json.loads((hf / "config.json").read_text())
    c5 = as_5x(c4)
    internvl3.check_config(c5)
    assert lm_shape_from_hf(internvl3._text_config(c5)) == lm_shape_from_hf(internvl3._text_config(c4))
    assert internvl3._text_config(c5)["rope_scaling"]["rope_type"] == "dynamic"


def test_disagreeing_rope_fields_are_refused():
    with pytest.raises(ValueError, match="disagree"):
        lm_shape_from_hf({"num_attention_heads": 2, "hidden_size": 8, "intermediate_size": 8, "num_hidden_layers": 1,
                          "vocab_size": 10, "rope_theta": 1e4, "rope_parameters": {"rope_theta": 1e6}})


def test_qwen_processor_bounds_from_size_only():
    s5 = processor_settings({"size": {"shortest_edge": 1234, "longest_edge": 56789}, "patch_size": 14})
    assert (s5["min_pixels"], s5["max_pixels"]) == (1234, 56789)
    s4 = processor_settings({"min_pixels": 100, "max_pixels": 200, "size": {"shortest_edge": 1, "longest_edge": 2}})
    assert (s4["min_pixels"], s4["max_pixels"]) == (100, 200)  # 4.x: the explicit fields decide


def test_converter_takes_a_5x_checkpoint_and_refuses_in_one_line(qwen, tmp_path):
    tool = str(REPO / "tools" / "convert_hf.py")
    five = tmp_path / "five"
    shutil.copytree(qwen, five)
    c5 = as_5x(json.loads((qwen / "config.json").read_text()))
    (five / "config.json").write_text(json.dumps(c5))
    pre = json.loads((qwen / "preprocessor_config.json").read_text())
    for key in ("min_pixels", "max_pixels"):
        pre.pop(key)
    (five / "preprocessor_config.json").write_text(json.dumps(pre))
    ok = subprocess.run([sys.executable, tool, "hf-to-megatron", str(five), str(tmp_path / "m5")],
                        capture_output=True, text=True)
    assert ok.returncode == 0, ok.stderr
    del c5["text_config"]["rope_parameters"]["mrope_section"]
    (five / "config.json").write_text(json.dumps(c5))
    bad = subprocess.run([sys.executable, tool, "hf-to-megatron", str(five), str(tmp_path / "bad")],
                         capture_output=True, text=True)
    lines = [ln for ln in bad.stderr.splitlines() if ln.strip()]
    assert bad.returncode == 2 and len(lines) == 1 and lines[0].startswith("error: ") and "mrope_section" in lines[0]
