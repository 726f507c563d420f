"""Checkpoints saved by transformers 5.x read like 4.x ones (issue 10): RoPE in `rope_parameters`, the Qwen2.5-VL
processor's pixel bounds in `size` only. A value the file sets is never replaced by a default (before, 5.x's
`rope_parameters.rope_theta` was read as 1e6 and `size`'s bounds as the processor defaults, silently), and the
converter's refusals are one `error:` line.

The fixtures are written by transformers 5 itself; `as_4x` gives the same config in 4.x's layout."""

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

from megatron_po.models.qwen2_5_vl.processor import processor_settings  # noqa: E402
from megatron_po.models import internvl3, qwen2_5_vl  # noqa: E402
from megatron_po.models.lm import lm_shape_from_hf  # noqa: E402


def as_4x(config: dict) -> dict:
    """A 5.x config.json dict in transformers 4.x's layout: rope_parameters -> rope_theta / rope_scaling (none when
    plain RoPE), no RoPE fields in the vision config."""
    out = json.loads(json.dumps(config))
    out.pop("rope_parameters", None)
    (out.get("vision_config") or {}).pop("rope_parameters", None)
    text = out.get("text_config") or {}
    if "rope_parameters" in text:
        params = dict(text.pop("rope_parameters"))
        text["rope_theta"] = params.pop("rope_theta")
        plain = params.get("rope_type", "default") == "default" and "mrope_section" not in params
        text["rope_scaling"] = None if plain else params
    out["transformers_version"] = "4.57.1"
    return out


@pytest.fixture(scope="module")
def qwen(tmp_path_factory) -> Path:
    return hf_qwen2_5_vl_fixture.make_hf_dir(tmp_path_factory.mktemp("qwen") / "hf")


@pytest.fixture(scope="module")
def internvl_6b(tmp_path_factory) -> Path:
    # untied embeddings, and an LLM with dynamic NTK scaling
    return hf_internvl3_fixture.make_checkpoint(tmp_path_factory.mktemp("internvl") / "hf", "vit6b")


@pytest.mark.pure
def test_qwen_5x_config_reads_like_4x(qwen):
    c5 = json.loads((qwen / "config.json").read_text())
    c4 = as_4x(c5)
    assert not {"rope_theta", "rope_scaling"} & set(c5["text_config"]) and "rope_parameters" not in c4["text_config"]
    assert qwen2_5_vl.lm_shape(c5) == qwen2_5_vl.lm_shape(c4)
    assert qwen2_5_vl.lm_shape(c5).rotary_base == 10_000.0  # the file's, not the 1e6 default
    assert qwen2_5_vl.mrope_section(c5) == qwen2_5_vl.mrope_section(c4)
    c5["text_config"]["rope_parameters"]["rope_theta"] = 5e5
    assert qwen2_5_vl.lm_shape(c5).rotary_base == 5e5


@pytest.mark.pure
def test_internvl_5x_config_reads_like_4x(internvl_6b):
    c5 = json.loads((internvl_6b / "config.json").read_text())
    c4 = as_4x(c5)
    assert "rope_parameters" in c5["text_config"] and c4["text_config"]["rope_scaling"]["rope_type"] == "dynamic"
    internvl3.check_config(c5)
    internvl3.check_config(c4)
    assert lm_shape_from_hf(internvl3._text_config(c5)) == lm_shape_from_hf(internvl3._text_config(c4))
    assert internvl3._text_config(c5)["rope_scaling"]["rope_type"] == "dynamic"


@pytest.mark.pure
def test_disagreeing_rope_fields_are_refused():
    with pytest.raises(ValueError, match="disagree"):
        lm_shape_from_hf({"num_attention_heads": 2, "hidden_size": 8, "intermediate_size": 8, "num_hidden_layers": 1,
                          "vocab_size": 10, "rope_theta": 1e4, "rope_parameters": {"rope_theta": 1e6}})


@pytest.mark.pure
def test_qwen_processor_bounds_from_size_only():
    s5 = processor_settings({"size": {"shortest_edge": 1234, "longest_edge": 56789}, "patch_size": 14})
    assert (s5["min_pixels"], s5["max_pixels"]) == (1234, 56789)
    s4 = processor_settings({"min_pixels": 100, "max_pixels": 200, "size": {"shortest_edge": 1, "longest_edge": 2}})
    assert (s4["min_pixels"], s4["max_pixels"]) == (100, 200)  # 4.x: the explicit fields decide


@pytest.mark.pure
def test_internvl_tying_follows_the_version_that_wrote_the_config(internvl_6b):
    """transformers 5 ties InternVL's lm_head by the top-level tie_word_embeddings (default true), 4.x by
    text_config's: where the two disagree, the writer's version decides, as it decided what was saved."""
    import torch
    from transformers import InternVLConfig, InternVLForConditionalGeneration

    c5 = dict(json.loads((internvl_6b / "config.json").read_text()), tie_word_embeddings=True)  # text: untied
    assert c5["transformers_version"].startswith("5.") and not c5["text_config"]["tie_word_embeddings"]
    assert internvl3.tied_embeddings(c5)
    with torch.device("meta"):
        model = InternVLForConditionalGeneration(InternVLConfig(**c5))
    assert model.lm_head.weight is model.get_input_embeddings().weight  # what transformers 5 builds
    assert not internvl3.tied_embeddings(dict(c5, transformers_version="4.57.1"))
    assert lm_shape_from_hf(internvl3._text_config(c5)).tie_embeddings
    assert not internvl3.tied_embeddings(dict(c5, tie_word_embeddings=False))


@pytest.mark.e2e
@pytest.mark.slow
@pytest.mark.parametrize("layout", ["5.x", "4.x"])
def test_converter_takes_a_5x_or_4x_checkpoint_and_refuses_in_one_line(qwen, tmp_path, layout):
    tool = str(REPO / "tools" / "convert_hf.py")
    ckpt = tmp_path / "ckpt"
    shutil.copytree(qwen, ckpt)
    config = json.loads((qwen / "config.json").read_text())
    pre = json.loads((qwen / "preprocessor_config.json").read_text())
    assert "min_pixels" not in pre and pre["size"]["longest_edge"] == 28 * 28 * 40  # 5.x: the bounds in size only
    if layout == "4.x":
        config = as_4x(config)
        pre = dict(pre, min_pixels=pre["size"]["shortest_edge"], max_pixels=pre["size"]["longest_edge"])
        (ckpt / "preprocessor_config.json").write_text(json.dumps(pre))
    (ckpt / "config.json").write_text(json.dumps(config))
    ok = subprocess.run([sys.executable, tool, "hf-to-megatron", str(ckpt), str(tmp_path / "m")],
                        capture_output=True, text=True)
    assert ok.returncode == 0, ok.stderr
    rope = config["text_config"]["rope_parameters" if layout == "5.x" else "rope_scaling"]
    del rope["mrope_section"]
    (ckpt / "config.json").write_text(json.dumps(config))
    bad = subprocess.run([sys.executable, tool, "hf-to-megatron", str(ckpt), str(tmp_path / "bad")],
                         capture_output=True, text=True)
    lines = [ln for ln in bad.stderr.splitlines() if ln.strip()]
    assert bad.returncode == 2 and len(lines) == 1 and lines[0].startswith("error: ") and "mrope_section" in lines[0]
