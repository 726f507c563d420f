"""InternVL3: our megatron model, conversion, image tiling and chat layout against transformers 5.

Tiny random checkpoints written by transformers (tests/hf_internvl3_fixture.py): an InternViT-300M style tower
with tied embeddings and an InternViT-6B style one (RMSNorm, qk-norm, final LayerNorm) untied. The megatron side
runs in tests/dist/hf_internvl3_worker.py: conversion in one process, then TP=1 x DP=2, TP=2 and TP=2 + SP in one
2-process launch. Everything is fp32; logits are compared over the real (unpadded) vocabulary.
"""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

pytest.importorskip("transformers")  # the [hf] extra
from PIL import Image  # noqa: E402

sys.path.insert(0, str(Path(__file__).parent))
import hf_internvl3_fixture as fx  # noqa: E402
from conftest import REPO, run_python, run_torchrun  # noqa: E402

from megatron_po.models.internvl3 import processor as ip  # noqa: E402
from megatron_po.models import internvl3 as fam  # noqa: E402

WORKER = str(REPO / "tests" / "dist" / "hf_internvl3_worker.py")
TOL = 1e-4
IMAGE_SIZES = [(70, 150), (120, 50), (40, 40)]  # (h, w): wide (2x1 tiles + thumbnail), tall, one tile
ROWS = [  # (images, question, answer, system); row 2 shares image 0 with row 0, as a pair's rows share theirs
    ([0, 1], "Compare the two images.", "The first one is brighter.", "Answer briefly."),
    ([2], "What colour is the square?", "The square is red.", None),
    ([0], "Is there a dog in the picture?", "No, there is no dog.", None),
]
INTERP_SIDES = (84, 28)  # tiles of another size than the tower's 56: bicubic-interpolated positions
MODULE_PREFIXES = {  # InternVLForConditionalGeneration._checkpoint_conversion_mapping, applied
    "language_model.model.": "model.language_model.", "language_model.lm_head.": "lm_head.",
    "vision_tower.": "model.vision_tower.", "multi_modal_projector.": "model.multi_modal_projector.",
}


def make_images(seed: int, sizes) -> list[Image.Image]:
    rng = np.random.default_rng(seed)
    return [Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)) for h, w in sizes]


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / b.abs().max())


def to_module_layout(name: str) -> str:
    for old, new in MODULE_PREFIXES.items():
        if name.startswith(old):
            return new + name[len(old):]
    raise AssertionError(name)


# ------------------------------------------------------------------------------------------------ fixtures


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    from safetensors.torch import load_file, save_file

    work = tmp_path_factory.mktemp("internvl3")
    for variant in fx.VARIANTS:
        fx.make_checkpoint(work / f"hf_{variant}", variant, seed=1)
    # the same weights under the layout transformers maps the saved one to on load (its in-memory state_dict)
    shutil.copytree(work / "hf_vit300m", work / "hf_modules")
    sd = load_file(str(work / "hf_vit300m" / "model.safetensors"))
    save_file({to_module_layout(k): v for k, v in sd.items()}, str(work / "hf_modules" / "model.safetensors"),
              metadata={"format": "pt"})
    return work


@pytest.fixture(scope="module")
def hf_config(work):
    return fx.read_json(work / "hf_vit300m", "config.json")


@pytest.fixture(scope="module")
def processor(work):
    return fx.processor(work / "hf_vit300m")


@pytest.fixture(scope="module")
def preprocessor_config(work):
    return fx.read_json(work / "hf_vit300m", "preprocessor_config.json")


def _messages(images, question, answer, system):
    msgs = [{"role": "system", "content": system}] if system is not None else []
    msgs.append({"role": "user", "content": [{"type": "image"}] * len(images) + [{"type": "text", "text": question}]})
    if answer is not None:
        msgs.append({"role": "assistant", "content": [{"type": "text", "text": answer}]})
    return msgs


@pytest.fixture(scope="module")
def case(work, processor, preprocessor_config, hf_config):
    """Our batch (written to WORK/case.pt for the worker), HF's ids for it, and HF's logits per variant."""
    images = make_images(0, IMAGE_SIZES)
    # the pixels of the processor's own backend, so that both models see the same ones
    ours_images = fam.preprocess_images(images, preprocessor_config, hf_config,
                                        backend=processor.image_processor.backend)
    rows, hf_ids = [], []
    for idx, question, answer, system in ROWS:
        text = ip.format_prompt(question, ours_images["num_tokens"][idx].tolist(), system) + answer + ip.RESPONSE_SUFFIX
        rows.append(processor.tokenizer(text, add_special_tokens=False)["input_ids"])
        templated = processor.apply_chat_template(_messages(idx, question, answer, system), tokenize=False)
        hf_ids.append(processor(text=[templated], images=[images[i] for i in idx], return_tensors="pt"))
    s = max(map(len, rows))
    s += s % 2  # sequence parallelism splits the sequence over 2 ranks
    input_ids = torch.full((len(rows), s), processor.tokenizer.pad_token_id, dtype=torch.long)
    for r, ids in enumerate(rows):
        input_ids[r, :len(ids)] = torch.tensor(ids)
    rng = torch.Generator().manual_seed(3)
    interp = {side: torch.randn(2, 3, side, side, generator=rng) for side in INTERP_SIDES}
    batch = {"input_ids": input_ids, "images": ours_images, "row_images": [r[0] for r in ROWS],
             "interp_pixels": interp}
    torch.save(batch, work / "case.pt")
    refs = {}
    for variant in ("vit300m", "vit6b"):
        model, _ = fx.load_hf(work / f"hf_{variant}")
        with torch.no_grad():
            logits = [model(input_ids=e["input_ids"], pixel_values=e["pixel_values"]).logits[0] for e in hf_ids]
            # transformers 5 returns the vision output with the projected features as its pooler_output
            hidden = model.config.text_config.hidden_size
            feats = {k: model.model.get_image_features(v).pooler_output.reshape(-1, hidden) for k, v in interp.items()}
        refs[variant] = {"logits": logits, "interp": feats}
    return {"batch": batch, "lengths": [len(r) for r in rows], "hf_inputs": hf_ids, "images": images, "refs": refs}


@pytest.fixture(scope="module")
def parity(work, case):
    run_python([WORKER, "convert", str(work)])
    run_torchrun([WORKER, "parity", str(work)])
    return {p.stem[len("out_"):]: torch.load(p, weights_only=False) for p in sorted(work.glob("out_*.pt"))}


# ------------------------------------------------------------------------------------------------ model parity


@pytest.mark.pure
def test_our_inputs_are_the_processors(case):
    """Prompt ids and pixels built by our code equal what InternVLProcessor makes of the same chat."""
    batch = case["batch"]
    for r, (idx, *_rest) in enumerate(ROWS):
        n = case["lengths"][r]
        assert batch["input_ids"][r, :n].tolist() == case["hf_inputs"][r]["input_ids"][0].tolist()
        per_image = batch["images"]["pixel_values"].split(batch["images"]["num_patches"].tolist())
        assert torch.equal(torch.cat([per_image[i] for i in idx]), case["hf_inputs"][r]["pixel_values"])
    # the wide and the tall image become 2 tiles + a thumbnail, the small one a single tile
    assert batch["images"]["num_patches"].tolist() == [3, 3, 1]


@pytest.mark.multirank
def test_logits_match_transformers_on_every_layout(parity, case, capsys):
    v = fx.TEXT_VOCAB
    expected = {f"{layout}_{variant}" for layout in ("tp1", "tp2", "tp2_sp") for variant in ("vit300m", "vit6b")}
    expected = (expected - {"tp2_vit6b"}) | {"tp1_modules"}
    assert set(parity) == expected
    worst = {}
    for key, out in parity.items():
        ref = case["refs"]["vit6b" if key.endswith("vit6b") else "vit300m"]["logits"]
        assert out["logits"].shape[-1] == fam.padded_vocab_size(v, 1)
        worst[key] = max(rel(out["logits"][r, :n, :v], ref[r]) for r, n in enumerate(case["lengths"]))
    with capsys.disabled():
        print("\nInternVL3 logits, max |ours - HF| / max |HF|:", json.dumps({k: f"{e:.2e}" for k, e in worst.items()}))
    assert all(e <= TOL for e in worst.values()), worst


@pytest.mark.multirank
def test_text_only_batches_encode_to_no_rows(parity):
    assert {out["text_only_shape"] for out in parity.values()} == {(0, fx.text_config("vit300m")["hidden_size"])}


@pytest.mark.multirank
def test_interpolated_positions_match_transformers(parity, case):
    for key, out in parity.items():
        ref = case["refs"]["vit6b" if key.endswith("vit6b") else "vit300m"]["interp"]
        for side in INTERP_SIDES:
            assert rel(out["interp"][side], ref[side]) <= TOL, (key, side)


@pytest.mark.pure
def test_images_move_the_logits(work, case):
    """The comparison above is sensitive to the images: other pixels give other logits after the image span."""
    model, _ = fx.load_hf(work / "hf_vit300m")
    e = case["hf_inputs"][1]
    with torch.no_grad():
        a = model(input_ids=e["input_ids"], pixel_values=e["pixel_values"]).logits[0, -1]
        b = model(input_ids=e["input_ids"], pixel_values=e["pixel_values"].flip(-1)).logits[0, -1]
    assert rel(a, b) > 100 * TOL


@pytest.mark.multirank
def test_conversion_round_trip_is_bit_identical(parity, work):
    from safetensors.torch import load_file

    for variant in ("vit300m", "vit6b"):
        a = load_file(str(work / f"hf_{variant}" / "model.safetensors"))
        b = load_file(str(work / f"back_{variant}" / "model.safetensors"))
        assert set(a) == set(b), variant
        for k in a:
            assert a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]), (variant, k)


# ------------------------------------------------------------------------------------------------ rules


@pytest.mark.pure
@pytest.mark.parametrize("variant", ["vit300m", "vit6b", "modules"])
def test_rules_cover_every_hf_tensor_and_round_trip(work, variant):
    from safetensors.torch import load_file

    hf = load_file(str(work / f"hf_{variant}" / "model.safetensors"))
    cfg = fx.read_json(work / f"hf_{variant}", "config.json")
    rules = fam.hf_rules(cfg, hf.keys())
    used = [n for r in rules for n in r.hf]
    assert len(used) == len(set(used)), "an HF tensor feeds two rules"
    assert set(used) == set(hf), set(hf) ^ set(used)
    assert len({r.megatron for r in rules}) == len(rules)
    for r in rules:
        back = r.to_hf(r.to_megatron(*[hf[n] for n in r.hf]))
        for n, t in zip(r.hf, back, strict=True):
            assert t.dtype == hf[n].dtype and torch.equal(t, hf[n]), n


@pytest.mark.pure
def test_tied_lm_head_is_ignored_not_needed(work):
    import re

    cfg = fx.read_json(work / "hf_vit300m", "config.json")
    assert cfg["text_config"]["tie_word_embeddings"]
    names = {n for r in fam.hf_rules(cfg) for n in r.hf}
    assert not any("lm_head" in n for n in names)
    assert any(re.search(p, "language_model.lm_head.weight") for p in fam.HF_IGNORED)
    assert any(re.search(p, "lm_head.weight") for p in fam.HF_IGNORED)
    untied = fx.read_json(work / "hf_vit6b", "config.json")
    assert "language_model.lm_head.weight" in {n for r in fam.hf_rules(untied) for n in r.hf}


@pytest.mark.pure
def test_layout_detection(work):
    from safetensors import safe_open

    def names(d):
        with safe_open(str(work / d / "model.safetensors"), "pt") as f:
            return list(f.keys())

    assert fam.detect_layout(names("hf_vit300m")) == "transformers"
    assert fam.detect_layout(names("hf_modules")) == "module"
    with pytest.raises(ValueError, match="layout"):
        fam.hf_rules(fx.read_json(work / "hf_vit300m", "config.json"), layout="remote_code")


@pytest.mark.pure
def test_module_layout_loads_in_transformers_like_the_saved_one(work):
    """The renamed checkpoint is one transformers accepts: it loads to the very same weights."""
    a, _ = fx.load_hf(work / "hf_vit300m")
    b, _ = fx.load_hf(work / "hf_modules")
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def to_original(hf_config: dict, sd: dict) -> tuple[dict, dict]:
    """A transformers-layout checkpoint written the way OpenGVLab's remote code stores it: the inverse of the key
    mapping in transformers' convert_internvl_weights_to_hf.py (vision renames, q/k/v fused into attn.qkv,
    mlp1.{0,1,3}), and an InternVLChatConfig-style config.json."""
    import re

    renames = [(r"^vision_tower\.", "vision_model."), (r"\.layer\.(\d+)\.", r".layers.\1."),
               (r"cls_token", "class_embedding"), (r"position_embeddings", "position_embedding"),
               (r"patch_embeddings\.projection", "patch_embedding"), (r"lambda_(\d)", r"ls\1"),
               (r"attention\.projection_layer", "attn.proj"), (r"attention\.", "attn."),
               (r"layernorm_before", "norm1"), (r"layernorm_after", "norm2"),
               (r"^multi_modal_projector\.layer_norm", "mlp1.0"), (r"^multi_modal_projector\.linear_1", "mlp1.1"),
               (r"^multi_modal_projector\.linear_2", "mlp1.3")]
    out = {}
    for name, t in sd.items():
        if re.search(r"attention\.[kv]_proj", name):
            continue
        if re.search(r"attention\.q_proj", name):
            t = torch.cat([sd[name.replace("q_proj", x)] for x in ("q_proj", "k_proj", "v_proj")])
            name = name.replace("q_proj", "qkv")
        for pat, rep in renames:
            name = re.sub(pat, rep, name)
        out[name] = t
    v = hf_config["vision_config"]
    config = {
        "model_type": "internvl_chat", "architectures": ["InternVLChatModel"], "template": "internvl2_5",
        "llm_config": dict(hf_config["text_config"], architectures=["Qwen2ForCausalLM"]),
        "vision_config": {"model_type": "intern_vit_6b", "architectures": ["InternVisionModel"],
                          "hidden_size": v["hidden_size"], "num_hidden_layers": v["num_hidden_layers"],
                          "num_attention_heads": v["num_attention_heads"], "intermediate_size": v["intermediate_size"],
                          "qkv_bias": v["attention_bias"], "qk_normalization": v["use_qk_norm"],
                          "norm_type": v["norm_type"], "layer_norm_eps": v["layer_norm_eps"], "hidden_act": "gelu",
                          "image_size": v["image_size"][0], "patch_size": v["patch_size"][0], "num_channels": 3,
                          "initializer_factor": 0.1, "drop_path_rate": 0.0, "use_flash_attn": False},
        "downsample_ratio": 0.5, "force_image_size": v["image_size"][0], "ps_version": "v2", "select_layer": -1,
        "dynamic_image_size": True, "use_thumbnail": True, "min_dynamic_patch": 1, "max_dynamic_patch": 12,
    }
    return config, out


@pytest.mark.pure
@pytest.mark.parametrize("variant", ["vit300m", "vit6b"])
def test_original_layout_gives_the_same_megatron_tensors_and_round_trips(work, variant):
    from safetensors.torch import load_file

    from megatron_po.models.internvl3.vision import InternViTShape

    hf_config = fx.read_json(work / f"hf_{variant}", "config.json")
    hf = load_file(str(work / f"hf_{variant}" / "model.safetensors"))
    if variant == "vit6b":  # the original tower has neither a final norm nor a mask token
        hf_config["vision_config"].update(use_mean_pooling=True, use_mask_token=False)
        hf = {k: t for k, t in hf.items()
              if not k.startswith(("vision_tower.layernorm.", "vision_tower.embeddings.mask"))}
    orig_config, orig = to_original(hf_config, hf)
    native = fam.native_config(orig_config)
    assert fam.tokens_per_tile(native) == hf_config["image_seq_length"] == native["image_seq_length"]
    assert (InternViTShape.from_hf(native["vision_config"]) == InternViTShape.from_hf(hf_config["vision_config"]))
    fam.check_config(orig_config)
    assert fam.detect_layout(orig) == "original"
    ours = {r.megatron: r.to_megatron(*[hf[n] for n in r.hf]) for r in fam.hf_rules(hf_config, hf.keys())}
    rules = fam.hf_rules(orig_config)  # the config alone says 'original'
    assert set(n for r in rules for n in r.hf) == set(orig)
    for r in rules:
        t = r.to_megatron(*[orig[n] for n in r.hf])
        assert torch.equal(t, ours[r.megatron]), r.megatron  # the very tensors the transformers layout gives
        for n, back in zip(r.hf, r.to_hf(t), strict=True):
            assert torch.equal(back, orig[n]), n
    assert {r.megatron for r in rules} == set(ours)


# ------------------------------------------------------------------------------------------------ images


TILING_SIZES = [(2, 5), (7, 4), (56, 56), (57, 113), (113, 57), (1000, 30), (30, 1000), (300, 200), (13, 17),
                (224, 448), (999, 1001), (56, 168)]


@pytest.mark.pure
@pytest.mark.parametrize("backend", ["pil", "torchvision"])
@pytest.mark.parametrize("min_max", [(1, 12), (1, 6), (2, 4), (3, 9), (1, 1)])
@pytest.mark.parametrize("crop", [True, False])
def test_preprocess_matches_got_ocr2_image_processor(preprocessor_config, min_max, crop, backend):
    cfg = dict(preprocessor_config, min_patches=min_max[0], max_patches=min_max[1], crop_to_patches=crop)
    hf = fx.image_processor_class(backend)(**{k: v for k, v in cfg.items() if k != "image_processor_type"})
    images = make_images(1, TILING_SIZES)
    ref = hf(images=images, return_tensors="pt")
    ours = ip.preprocess(images, ip.TilingConfig.from_preprocessor_config(cfg, crop_to_patches=None), 4, backend)
    assert ours["num_patches"].tolist() == ref["num_patches"].tolist()
    assert ours["pixel_values"].dtype == ref["pixel_values"].dtype == torch.float32
    assert torch.equal(ours["pixel_values"], ref["pixel_values"])
    assert ours["num_tokens"].tolist() == [4 * n for n in ref["num_patches"].tolist()]


@pytest.mark.pure
@pytest.mark.parametrize("backend", ["pil", "torchvision"])
@pytest.mark.parametrize("crop", [False, True])
def test_preprocess_with_other_resample(preprocessor_config, crop, backend):
    # transformers 5 crops with `resample` too (4.x: always bicubic)
    cfg = dict(preprocessor_config, resample=2, crop_to_patches=crop)  # bilinear
    images = make_images(2, TILING_SIZES[:6])
    ref = fx.image_processor_class(backend)(**cfg)(images=images, return_tensors="pt")
    ours = ip.preprocess(images, ip.TilingConfig.from_preprocessor_config(cfg, crop_to_patches=None),
                         backend=backend)
    assert torch.equal(ours["pixel_values"], ref["pixel_values"])


@pytest.mark.pure
def test_grid_choice_and_its_tie_breaking_match_transformers():
    # the PIL backend's module: the torchvision one's (the same function) does not import without torchvision
    from transformers.models.got_ocr2.image_processing_pil_got_ocr2 import get_optimal_tiled_canvas

    ties = 0
    for h in range(8, 460, 9):
        for w in (h, 2 * h, h // 2 + 1, 3 * h, 5 * h // 4, 40, 448):
            for lo, hi in ((1, 12), (1, 6), (2, 8), (4, 4)):
                assert ip.best_grid(h, w, 56, 56, lo, hi) == get_optimal_tiled_canvas((h, w), (56, 56), lo, hi)
                diffs = sorted(abs(w / h - c / r) for c, r in ip.supported_grids(lo, hi))
                ties += diffs[0] == diffs[1]
    assert ties > 50  # the sweep does exercise exact ties (square images with (1,1) excluded: min 2, 4)


@pytest.mark.pure
def test_preprocess_follows_the_processor(processor, preprocessor_config, hf_config):
    """InternVLProcessor tiles even though preprocessor_config.json says crop_to_patches: false (real -hf
    checkpoints do), and expands each image to image_seq_length x tiles <IMG_CONTEXT> tokens."""
    assert preprocessor_config["crop_to_patches"] is False
    images = make_images(4, [(70, 150), (40, 40), (300, 20)])
    ours = fam.preprocess_images(images, preprocessor_config, hf_config, backend=processor.image_processor.backend)
    text = processor.apply_chat_template(_messages(images, "Hi", None, None), add_generation_prompt=True,
                                         tokenize=False)
    ref = processor(text=[text], images=images, return_tensors="pt")
    assert torch.equal(ours["pixel_values"], ref["pixel_values"])
    ids = ref["input_ids"][0]
    starts = (ids == processor.start_image_token_id).nonzero().flatten().tolist()
    ends = (ids == processor.end_image_token_id).nonzero().flatten().tolist()
    assert [e - s - 1 for s, e in zip(starts, ends)] == ours["num_tokens"].tolist()
    assert int((ids == fam.image_token_id(hf_config)).sum()) == int(ours["num_tokens"].sum())
    # without the model config: processor_config.json's image_seq_length, else InternVLProcessor's 256
    with_seq = fam.preprocess_images(images, dict(preprocessor_config, image_seq_length=4))
    assert torch.equal(with_seq["num_tokens"], ours["num_tokens"])
    assert fam.preprocess_images(images, preprocessor_config)["num_tokens"].tolist() == \
        [256 * n for n in ours["num_patches"].tolist()]


@pytest.mark.pure
@pytest.mark.parametrize("mode", ["RGBA", "L", "P", "CMYK", "LA"])
def test_non_rgb_images_convert_like_transformers(processor, mode):
    rgb = make_images(5, [(90, 60)])[0]
    im = rgb.convert(mode)
    if mode == "RGBA":
        im.putalpha(Image.fromarray(np.random.default_rng(0).integers(0, 256, (90, 60), dtype=np.uint8)))
    # transformers 5 composites transparency onto white (4.x dropped the alpha channel)
    ref = processor.image_processor(images=[im], crop_to_patches=True, return_tensors="pt")
    ours = ip.preprocess([im], ip.TilingConfig.from_preprocessor_config(processor.image_processor.to_dict()),
                         backend=processor.image_processor.backend)
    assert torch.equal(ours["pixel_values"], ref["pixel_values"])


@pytest.mark.pure
def test_collate_images_concatenates_in_order(preprocessor_config, hf_config):
    images = make_images(0, IMAGE_SIZES)
    parts = [fam.preprocess_images(images[:1], preprocessor_config, hf_config),
             fam.preprocess_images(images[1:], preprocessor_config, hf_config)]
    whole = fam.preprocess_images(images, preprocessor_config, hf_config)
    merged = fam.collate_images(parts)
    assert all(torch.equal(merged[k], whole[k]) for k in whole)


# ------------------------------------------------------------------------------------------------ text side


@pytest.mark.pure
@pytest.mark.parametrize("n_images", [0, 1, 2])
@pytest.mark.parametrize("system", [None, "Answer briefly."])
def test_format_prompt_matches_chat_template_and_processor(processor, preprocessor_config, hf_config, n_images,
                                                           system):
    images = make_images(3, IMAGE_SIZES[:n_images])
    question = "Compare the two pictures."
    msgs = _messages(images, question, None, system)
    text = processor.apply_chat_template(msgs, add_generation_prompt=True, tokenize=False)
    ref = processor(text=[text], images=images or None)
    num_tokens = fam.preprocess_images(images, preprocessor_config, hf_config)["num_tokens"].tolist()
    ours = fam.format_prompt(question, num_tokens, system=system)
    assert processor.tokenizer(ours, add_special_tokens=False)["input_ids"] == ref["input_ids"][0]
    # the response is followed by exactly what the template writes after an assistant turn
    full = processor.apply_chat_template(msgs + [{"role": "assistant", "content": "Two circles."}], tokenize=False)
    assert full == text + "Two circles." + fam.RESPONSE_SUFFIX


@pytest.mark.pure
def test_chat_template_constant_is_the_official_one(work):
    assert ip.CHAT_TEMPLATE == fx.OFFICIAL_CHAT_TEMPLATE == (work / "hf_vit300m" / "chat_template.jinja").read_text()


@pytest.mark.pure
def test_position_ids_are_plain_and_what_transformers_uses(work, case, hf_config):
    ids = case["batch"]["input_ids"]
    pos = fam.position_ids(hf_config, ids, case["batch"]["images"], case["batch"]["row_images"])
    assert pos.shape == ids.shape and pos.dtype == torch.long
    assert torch.equal(pos, torch.arange(ids.shape[1]).expand_as(ids))
    # HF's default (cache positions) is the same numbering: passing ours explicitly changes nothing
    model, _ = fx.load_hf(work / "hf_vit300m")
    e = case["hf_inputs"][1]
    with torch.no_grad():
        a = model(input_ids=e["input_ids"], pixel_values=e["pixel_values"]).logits
        b = model(input_ids=e["input_ids"], pixel_values=e["pixel_values"],
                  position_ids=pos[:1, :e["input_ids"].shape[1]]).logits
    assert torch.equal(a, b)


# ------------------------------------------------------------------------------------------------ contract


@pytest.mark.pure
def test_family_contract_exports(hf_config):
    from megatron_po.families import family_for_hf_config, family_spec

    module = family_spec("internvl3").hf
    for name in ("build", "hf_rules", "HF_IGNORED", "image_token_id", "preprocess_images", "position_ids",
                 "format_prompt", "RESPONSE_SUFFIX", "collate_images"):
        assert hasattr(module, name), name
    assert module.image_token_id(hf_config) == hf_config["image_token_id"]
    assert family_for_hf_config(hf_config).name == "internvl3"


@pytest.mark.pure
@pytest.mark.parametrize("change, field", [
    ({"text_config": {"model_type": "qwen3"}}, "qwen3"),
    ({"text_config": {"rope_scaling": {"type": "linear", "factor": 2.0}}}, "rope_scaling"),
    ({"vision_feature_layer": -2}, "vision_feature_layer"),
    ({"vision_feature_select_strategy": "full"}, "vision_feature_select_strategy"),
    ({"image_seq_length": 256}, "image_seq_length"),
    ({"vision_config": {"norm_type": "batch_norm"}}, "norm_type"),
    ({"vision_config": {"hidden_act": "swish_glu"}}, "swish_glu"),
])
def test_unsupported_configs_fail_with_the_field(hf_config, change, field):
    cfg = json.loads(json.dumps(hf_config))
    for k, v in change.items():
        if isinstance(v, dict):
            cfg[k].update(v)
        else:
            cfg[k] = v
    with pytest.raises(ValueError, match=field):
        fam.check_config(cfg)
