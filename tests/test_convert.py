"""The HF converter refuses bad input before writing anything, and log-probs ignore the padded vocabulary.

The conversion core runs in this process on one shared 1-rank gloo group (built once for the module: megatron's
parallel state must not be re-initialised test after test). The successful conversions and logit parity of each
family are in tests/test_hf_*.py.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

pytest.importorskip("transformers")

import hf_qwen2_5_vl_fixture as fx  # noqa: E402
from conftest import REPO, run_python  # noqa: E402

from megatron_po.convert.core import ConversionError, HFCheckpoint, hf_to_megatron  # noqa: E402


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory) -> Path:
    return fx.make_hf_dir(tmp_path_factory.mktemp("qwen") / "hf")


def _copy(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def _assert_refused(src: Path, out: Path, match: str, **kw) -> None:
    with pytest.raises(ConversionError, match=match):
        hf_to_megatron(src, out, **kw)
    assert not out.exists(), "a refused conversion must not create its output"


@pytest.mark.pure
def test_not_a_model_directory(tmp_path, groups):
    _assert_refused(tmp_path, tmp_path / "out", "no config.json")


@pytest.mark.pure
def test_wrong_family_is_refused(hf_dir, tmp_path, groups):
    _assert_refused(hf_dir, tmp_path / "out", "family 'qwen2_5_vl', not 'internvl3'", family="internvl3")


@pytest.mark.pure
def test_unknown_model_type_is_refused(hf_dir, tmp_path, groups):
    src = _copy(hf_dir, tmp_path / "hf")
    cfg = json.loads((src / "config.json").read_text())
    cfg["model_type"] = "llava"
    (src / "config.json").write_text(json.dumps(cfg))
    _assert_refused(src, tmp_path / "out", "'llava' is not a supported family")


@pytest.mark.pure
def test_missing_shard_is_named(hf_dir, tmp_path, groups):
    from transformers import Qwen2_5_VLForConditionalGeneration

    src = tmp_path / "sharded"
    shutil.copytree(hf_dir, src, ignore=shutil.ignore_patterns("model.safetensors"))
    Qwen2_5_VLForConditionalGeneration.from_pretrained(hf_dir).save_pretrained(src, max_shard_size="100KB")
    shards = sorted(src.glob("model-*.safetensors"))
    assert len(shards) > 2
    shards[1].unlink()
    _assert_refused(src, tmp_path / "out", f"missing: \\['{shards[1].name}'\\]")


@pytest.mark.pure
def test_shape_mismatch_names_tensor_and_shapes(hf_dir, tmp_path, groups):
    src = _copy(hf_dir, tmp_path / "hf")
    cfg = json.loads((src / "config.json").read_text())
    cfg["text_config"]["intermediate_size"] = 80  # the weights were made with 96
    cfg.pop("intermediate_size", None)
    (src / "config.json").write_text(json.dumps(cfg))
    _assert_refused(src, tmp_path / "out", r"mlp\.(gate|up|down)_proj\.weight.*(shape|fit)")


@pytest.mark.pure
def test_unknown_tensor_would_be_dropped(hf_dir, tmp_path, groups):
    from safetensors.torch import load_file, save_file

    src = _copy(hf_dir, tmp_path / "hf")
    tensors = load_file(src / "model.safetensors")
    tensors["visual.extra_head.weight"] = torch.zeros(2, 2)
    save_file(tensors, src / "model.safetensors", metadata={"format": "pt"})
    _assert_refused(src, tmp_path / "out", "would be dropped.*visual.extra_head.weight")


@pytest.mark.pure
def test_missing_tensor_is_named(hf_dir, tmp_path, groups):
    from safetensors.torch import load_file, save_file

    src = _copy(hf_dir, tmp_path / "hf")
    tensors = load_file(src / "model.safetensors")
    name = next(n for n in tensors if n.endswith("layers.1.self_attn.k_proj.weight"))
    del tensors[name]
    save_file(tensors, src / "model.safetensors", metadata={"format": "pt"})
    _assert_refused(src, tmp_path / "out", f"missing, e.g. \\['{name}'\\]")


@pytest.mark.pure
def test_non_empty_output_is_never_overwritten(hf_dir, tmp_path, groups):
    out = tmp_path / "out"
    out.mkdir()
    (out / "precious.txt").write_text("keep")
    with pytest.raises(ConversionError, match="not empty"):
        hf_to_megatron(hf_dir, out)
    assert [p.name for p in out.iterdir()] == ["precious.txt"]


@pytest.mark.pure
def test_checkpoint_index_is_read_lazily(hf_dir):
    ck = HFCheckpoint(hf_dir)
    name = next(iter(sorted(ck.names())))
    assert ck.shape(name) == tuple(ck.get(name).shape)


@pytest.mark.e2e
def test_cli_reports_errors_with_exit_code_2(hf_dir, tmp_path):
    proc_out = None
    with pytest.raises(pytest.fail.Exception) as e:
        run_python([str(REPO / "tools" / "convert_hf.py"), "hf-to-megatron", str(hf_dir), str(tmp_path / "o"),
                    "--family", "internvl3"])
    proc_out = str(e.value)
    assert "exited 2" in proc_out and "error:" in proc_out and "not 'internvl3'" in proc_out
    assert not (tmp_path / "o").exists()


@pytest.mark.pure
def test_logps_exclude_padded_vocabulary():
    from megatron_po.logprobs import vocab_parallel_token_logps

    torch.manual_seed(0)
    real, padded = 300, 384
    logits = torch.randn(2, 5, padded, requires_grad=True)
    labels = torch.randint(0, real, (2, 5))
    got = vocab_parallel_token_logps(logits, labels, None, vocab_size=real)
    want = torch.log_softmax(logits[..., :real], -1).gather(-1, labels[..., None])[..., 0]
    torch.testing.assert_close(got, want, rtol=0, atol=1e-6)
    got.sum().backward()
    assert torch.all(logits.grad[..., real:] == 0), "padded entries must get no gradient"
    # without the real size the padded entries (logit 0 after conversion) would take probability mass
    assert not torch.allclose(vocab_parallel_token_logps(logits, labels, None), want)
