"""LoRA checkpoints exported to Hugging Face (`megatron-to-hf --merge-lora` / `--adapter`), checked against
transformers 5 and peft for both HF families.

Each family's tiny random fixture (tests/hf_*_fixture.py) is converted, built as our model (TP=1, one process),
given adapters on every target (decoder linears and the projector) with random nonzero B (B starts at zero, which
would make every comparison vacuous), and saved as a LoRA training checkpoint is: the adapters only, with
trainer_state.json's lora_base (train/models.base_identity) and conversion.json + hf/. Then, on one image-and-text
batch, fp32:
    the merged export, loaded by transformers            == our model with its adapters on
    the base + the adapter directory, loaded by peft     == our model with its adapters on
    the same with peft's adapter disabled                == our model with its adapters off
"""

from __future__ import annotations

import importlib.util
import json
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

pytest.importorskip("transformers")  # the [hf] extra
pytest.importorskip("peft")
from PIL import Image  # noqa: E402

sys.path.insert(0, str(Path(__file__).parent))
import hf_internvl3_fixture as ivl_fx  # noqa: E402
import hf_qwen2_5_vl_fixture as qwen_fx  # noqa: E402
from conftest import REPO  # noqa: E402

from megatron_po.convert.core import ConversionError, conversion_record, hf_to_megatron  # noqa: E402
from megatron_po.convert.lora import ADAPTER_CONFIG, ADAPTER_WEIGHTS  # noqa: E402
from megatron_po.convert.lora import export_hf as megatron_to_hf  # noqa: E402

pytestmark = pytest.mark.pure

TOL = 1e-4  # max |ours - HF| / max |HF| over the real vocabulary, fp32 (as the parity tests)
TARGETS = "linear_qkv,linear_proj,linear_fc1,linear_fc2,projector"
FAMILIES = ("qwen2_5_vl", "internvl3")


def _make_hf(family: str, out: Path) -> Path:
    return qwen_fx.make_hf_dir(out) if family == "qwen2_5_vl" else ivl_fx.make_checkpoint(out, "vit300m", seed=1)


def _load_hf(family: str, path: Path):
    return qwen_fx.load_hf_model(path) if family == "qwen2_5_vl" else ivl_fx.load_hf(path)[0]


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / b.abs().max())


def _case(family: str, hf_dir: Path, hf_config: dict) -> dict:
    """One row: a system prompt, an image, a question and an answer; our ids, pixels and positions."""
    from megatron_po.families import FAMILIES as REGISTRY

    fam = REGISTRY[family].spec().hf
    proc = importlib.import_module(f"megatron_po.models.{family}.processor")
    pre = json.loads((hf_dir / "preprocessor_config.json").read_text())
    rng = np.random.default_rng(0)
    images = fam.preprocess_images([Image.fromarray(rng.integers(0, 256, (70, 90, 3), dtype=np.uint8))], pre,
                                   hf_config)
    text = proc.format_prompt("Describe the image in one sentence.", images["num_tokens"].tolist()) \
        + "A green square." + proc.RESPONSE_SUFFIX
    tok = (qwen_fx.load_processor(hf_dir) if family == "qwen2_5_vl" else ivl_fx.processor(hf_dir)).tokenizer
    ids = torch.tensor([tok(text, add_special_tokens=False)["input_ids"]])
    return {"input_ids": ids, "images": images, "positions": fam.position_ids(hf_config, ids, images, [[0]]),
            "image_mask": ids == fam.image_token_id(hf_config)}


def _our_logits(model, case: dict) -> torch.Tensor:
    tokens = case["input_ids"]
    s = tokens.shape[1]
    mask = torch.triu(torch.ones(s, s, dtype=torch.bool), diagonal=1)[None, None]
    with torch.no_grad():
        slots = model.encode_images(case["images"])
        return model(tokens, case["positions"], mask, slots, case["image_mask"])


def _hf_logits(family: str, model, case: dict) -> torch.Tensor:
    images, ids = case["images"], case["input_ids"]
    with torch.no_grad():
        if family == "qwen2_5_vl":
            # transformers 5 computes M-RoPE positions only when told which tokens are image tokens
            return model(input_ids=ids, pixel_values=images["pixel_values"], image_grid_thw=images["image_grid_thw"],
                         mm_token_type_ids=case["image_mask"].int()).logits
        return model(input_ids=ids, pixel_values=images["pixel_values"]).logits


def _lora_run(groups, family: str, work: Path, hf: Path, base: Path):
    """Our model with adapters (random nonzero B), saved as a LoRA run's checkpoint; (model, checkpoint dir)."""
    from megatron.core import dist_checkpointing

    from megatron_po.config import ModelConfig, ParallelConfig, config_from_dict
    from megatron_po.families import FAMILIES as REGISTRY
    from megatron_po.models.lora import adapters, apply_lora
    from megatron_po.train import checkpoint as ckpt
    from megatron_po.train.models import base_identity

    entry = REGISTRY[family]
    hf_config = json.loads((hf / "config.json").read_text())
    cfg = config_from_dict({"model": {"family": family, "hf_path": str(base / "hf"),
                                      "lora": {"rank": 4, "alpha": 8.0, "target_modules": TARGETS}},
                            "checkpoint": {"init_from": str(base)}})
    model = entry.spec().hf.build(hf_config, ModelConfig(spec="local", logprobs="logits"),
                                  ParallelConfig(backend="gloo"), groups).eval()
    ckpt.load_model_weights(base, model)
    names = apply_lora(model, cfg.model.lora, groups.tp, seed=0)
    assert sum("projector" in n for n in names) == 2  # both projector linears are adapted
    gen = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for a in adapters(model):
            a.lora_b.copy_(0.05 * torch.randn(a.lora_b.shape, generator=gen))
    path = work / "run" / "checkpoints" / "iter_0000001"
    path.mkdir(parents=True)
    dist_checkpointing.save({"model": ckpt._model_sd(model)}, str(path))
    (path / ckpt.STATE_FILE).write_text(json.dumps({"step": 1, ckpt.BASE: base_identity(cfg, entry.spec())}))
    from megatron_po.convert.core import write_conversion

    write_conversion(path, base / "hf", conversion_record(base, base / "hf", family, torch.float32))
    return model, path


@pytest.fixture(scope="module", params=FAMILIES)
def exported(request, groups, tmp_path_factory):
    """Per family: our logits (adapters on / off), the exports, and transformers' / peft's logits of them."""
    from peft import PeftModel

    from megatron_po.models.lora import adapters_off

    family = request.param
    work = tmp_path_factory.mktemp(f"lora_{family}")
    hf = _make_hf(family, work / "hf")
    hf_to_megatron(hf, work / "base", family=family)
    model, path = _lora_run(groups, family, work, hf, work / "base")
    case = _case(family, hf, json.loads((hf / "config.json").read_text()))
    ours_on = _our_logits(model, case)
    with adapters_off(model):
        ours_off = _our_logits(model, case)
    megatron_to_hf(path, work / "merged", lora="merge")
    megatron_to_hf(path, work / "adapter", lora="adapter")
    merged = _hf_logits(family, _load_hf(family, work / "merged"), case)
    peft_model = PeftModel.from_pretrained(_load_hf(family, hf), str(work / "adapter")).eval()
    peft_on = _hf_logits(family, peft_model, case)
    with peft_model.disable_adapter():
        peft_off = _hf_logits(family, peft_model, case)
    vocab = merged.shape[-1]
    return {"family": family, "work": work, "ckpt": path, "hf": hf, "vocab": vocab, "peft": peft_model,
            "ours_on": ours_on[..., :vocab], "ours_off": ours_off[..., :vocab], "merged": merged,
            "peft_on": peft_on, "peft_off": peft_off}


def test_adapters_move_the_logits(exported, capsys):
    # guards the comparisons below: the adapters change the logits by far more than their tolerance
    e = exported
    with capsys.disabled():
        print(f"\n{e['family']} LoRA export, max rel logit error: merged {_rel(e['merged'], e['ours_on']):.1e}, "
              f"peft {_rel(e['peft_on'], e['ours_on']):.1e}, peft disabled {_rel(e['peft_off'], e['ours_off']):.1e}; "
              f"adapters move ours by {_rel(e['ours_on'], e['ours_off']):.1e}")
    assert _rel(e["ours_on"], e["ours_off"]) > 100 * TOL


def test_merged_export_matches_our_adapted_model(exported):
    assert _rel(exported["merged"], exported["ours_on"]) <= TOL


def test_peft_adapter_matches_our_adapted_model(exported):
    assert _rel(exported["peft_on"], exported["ours_on"]) <= TOL


def test_peft_adapter_disabled_matches_our_adapters_off(exported):
    assert _rel(exported["peft_off"], exported["ours_off"]) <= TOL


def test_adapter_directory_names_the_loaded_modules(exported):
    """Targets are exact names of the transformers model's modules (7 per decoder layer + 2 projector linears),
    every tensor of the file is one peft loaded, and no config.json makes the directory look like a model."""
    from safetensors.torch import load_file

    out = exported["work"] / "adapter"
    config = json.loads((out / ADAPTER_CONFIG).read_text())
    assert (config["peft_type"], config["r"], config["lora_alpha"], config["bias"]) == ("LORA", 4, 8, "none")
    assert config["base_model_name_or_path"] == str(exported["hf"].resolve())
    layers = json.loads((exported["hf"] / "config.json").read_text())["text_config"]["num_hidden_layers"]
    modules = set(config["target_modules"])
    assert len(modules) == 7 * layers + 2
    base = exported["peft"].get_base_model()
    assert modules <= {n for n, _ in base.named_modules()}
    loaded = exported["peft"].state_dict()
    for key, value in load_file(str(out / ADAPTER_WEIGHTS)).items():
        assert torch.equal(loaded[key.replace(".weight", ".default.weight")], value), key
    assert not (out / "config.json").exists() and (out / "tokenizer.json").exists()


# ------------------------------------------------------------------------------------------------ refusals


def _cli():
    spec = importlib.util.spec_from_file_location("convert_hf_cli", REPO / "tools" / "convert_hf.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_lora_checkpoint_needs_a_lora_export(exported, tmp_path, capsys):
    """A LoRA checkpoint exported as a full one fails with one line naming both flags, before writing."""
    assert _cli().main(["megatron-to-hf", str(exported["ckpt"]), str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "--merge-lora" in err and "--adapter" in err, err
    assert not (tmp_path / "o").exists()


def test_lora_checkpoint_needs_a_lora_mode_in_the_api(exported, tmp_path):
    """The same refusal from the export function itself (convert.lora.export_hf, the one entry for any checkpoint):
    naming both flags, nothing written."""
    with pytest.raises(ConversionError, match="holds LoRA adapters only: pass --merge-lora .* or --adapter"):
        megatron_to_hf(exported["ckpt"], tmp_path / "o")
    assert not (tmp_path / "o").exists()


def test_lora_flags_need_a_lora_checkpoint(exported, tmp_path):
    with pytest.raises(ConversionError, match="need a LoRA training checkpoint"):
        megatron_to_hf(exported["work"] / "base", tmp_path / "o", lora="merge")


def test_random_init_base_cannot_be_exported(exported, tmp_path):
    ckpt = tmp_path / "iter_0000001"
    shutil.copytree(exported["ckpt"], ckpt)
    state = json.loads((ckpt / "trainer_state.json").read_text())
    state["lora_base"]["init_from"] = ""
    (ckpt / "trainer_state.json").write_text(json.dumps(state))
    for mode in ("merge", "adapter"):
        with pytest.raises(ConversionError, match="randomly initialised base"):
            megatron_to_hf(ckpt, tmp_path / mode, lora=mode)


def test_merge_refuses_another_base(exported, tmp_path):
    """A moved base is accepted with --lora-base; one whose files differ from the run's base is refused."""
    other = tmp_path / "other"
    shutil.copytree(exported["work"] / "base", other)
    megatron_to_hf(exported["ckpt"], tmp_path / "moved", lora="merge", lora_base=other)
    (other / "conversion.json").write_text((other / "conversion.json").read_text() + " ")
    with pytest.raises(ConversionError, match="not the base its adapters were trained on"):
        megatron_to_hf(exported["ckpt"], tmp_path / "o", lora="merge", lora_base=other)
