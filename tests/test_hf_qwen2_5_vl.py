"""Qwen2.5-VL family: conversion, preprocessing, M-RoPE positions and the chat prompt, checked against transformers 5.

The reference is a tiny random Qwen2.5-VL built offline with transformers (tests/hf_qwen2_5_vl_fixture.py).
Logit parity runs the real converter (HF -> megatron checkpoint) and the family's model at TP=1 x DP=2, TP=2
and TP=2 + SP in one 2-process launch (tests/dist/hf_qwen2_5_vl_worker.py).
"""

from __future__ import annotations

import json
import math
import re

import pytest
import torch

pytest.importorskip("transformers")

import hf_qwen2_5_vl_fixture as fx  # noqa: E402
from conftest import REPO, run_python, run_torchrun  # noqa: E402

from megatron_po.models.qwen2_5_vl import processor as qp  # noqa: E402
from megatron_po.data import image_ops  # noqa: E402
from megatron_po.models import qwen2_5_vl as fam  # noqa: E402

WORKER = str(REPO / "tests" / "dist" / "hf_qwen2_5_vl_worker.py")
TOL = 1e-4  # max |megatron - HF| / max |HF| over the real vocabulary, fp32
IMAGE_SIZES = ((60, 90), (120, 47), (200, 210), (30, 400))  # (h, w): partial windows, a 1 x 14 merged grid


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    work = tmp_path_factory.mktemp("qwen2_5_vl")
    fx.make_hf_dir(work / "hf_untied", tie=False, seed=0)
    fx.make_hf_dir(work / "hf_tied", tie=True, seed=1)
    fx.to_module_layout(work / "hf_untied", work / "hf_modules")
    return work


@pytest.fixture(scope="module")
def hf_config(work):
    return json.loads((work / "hf_untied" / "config.json").read_text())


@pytest.fixture(scope="module")
def processor(work):
    return fx.load_processor(work / "hf_untied")


@pytest.fixture(scope="module")
def preprocessor_config(work):
    return json.loads((work / "hf_untied" / "preprocessor_config.json").read_text())


def _row_texts(n: list[int]) -> list[str]:
    """Four rows over images 0..3: text between two images (row 0); rows 1 and 3 share image 2 (a pair)."""
    image = lambda k: f"{qp.VISION_START}{qp.IMAGE_PAD * n[k]}{qp.VISION_END}"  # noqa: E731
    row0 = ("<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\n"
            f"{image(0)}Compare the first picture with {image(1)} the second.<|im_end|>\n<|im_start|>assistant\n"
            "There are two circles and a red triangle.<|im_end|>\n")
    return [row0,
            qp.format_prompt("Describe the image in one sentence.", [n[2]]) + "A green square." + qp.RESPONSE_SUFFIX,
            qp.format_prompt("What colour is the square?", [n[3]], system="Answer briefly.") + "Red."
            + qp.RESPONSE_SUFFIX,
            qp.format_prompt("Describe the image in one sentence.", [n[2]]) + "A dog." + qp.RESPONSE_SUFFIX]


ROW_IMAGES = [[0, 1], [2], [3], [2]]


@pytest.fixture(scope="module")
def case(work, processor, preprocessor_config):
    """Tokens, images and transformers' logits for the parity batch (right-padded to an even length)."""
    images = qp.preprocess_images(fx.make_images(0, IMAGE_SIZES), preprocessor_config)
    tok = processor.tokenizer
    ids = [tok(t)["input_ids"] for t in _row_texts(images["num_tokens"].tolist())]
    length = max(map(len, ids))
    length += length % 2  # sequence parallel over 2 ranks
    input_ids = torch.tensor([x + [tok.pad_token_id] * (length - len(x)) for x in ids])

    def hf_logits(model, imgs):
        # transformers takes the images in the order their spans appear, row after row
        per_image = imgs["pixel_values"].split((imgs["image_grid_thw"].prod(-1)).tolist())
        order = [i for row in ROW_IMAGES for i in row]
        with torch.no_grad():
            # transformers 5 computes M-RoPE positions only when told which tokens are image tokens (its
            # processor's mm_token_type_ids); without them every position is a text position
            return model(input_ids=input_ids, pixel_values=torch.cat([per_image[i] for i in order]),
                         image_grid_thw=imgs["image_grid_thw"][order],
                         mm_token_type_ids=(input_ids == fam.image_token_id(model.config.to_dict())).int()).logits

    out = {"input_ids": input_ids, "images": images, "row_images": ROW_IMAGES}
    for variant in ("untied", "tied"):
        model = fx.load_hf_model(work / f"hf_{variant}")
        out[f"hf_{variant}"] = hf_logits(model, images)
        if variant == "untied":
            other = qp.preprocess_images(fx.make_images(1, IMAGE_SIZES), preprocessor_config)
            out["hf_other_images"] = hf_logits(model, other)
    torch.save(out, work / "case.pt")
    return out


@pytest.fixture(scope="module")
def parity(work, case):
    run_python([WORKER, "convert", str(work)])
    run_torchrun([WORKER, "parity", str(work)])
    return {p.stem.removeprefix("logits_"): torch.load(p) for p in work.glob("logits_*.pt")}


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).abs().max() / b.abs().max()).item()


# ------------------------------------------------------------------------------------------- logits parity


@pytest.mark.pure
def test_images_move_the_logits(case):
    # guards the parity check: with other pixels the reference logits move by far more than TOL
    assert _rel(case["hf_other_images"], case["hf_untied"]) > 100 * TOL


@pytest.mark.multirank
def test_logits_match_transformers_on_every_layout(parity, case, capsys):
    expected = {f"{layout}_untied" for layout in ("tp1", "tp2", "tp2_sp")} | {"tp2_tied", "tp1_modules"}
    assert set(parity) == expected
    vocab = case["hf_untied"].shape[-1]
    errors = {}
    for key, logits in sorted(parity.items()):
        assert logits.shape[-1] == 512 and logits.shape[:2] == case["input_ids"].shape  # padded vocabulary
        ref = case["hf_tied" if key.endswith("tied") and not key.endswith("untied") else "hf_untied"]
        errors[key] = _rel(logits[..., :vocab], ref)
    with capsys.disabled():
        print("\nQwen2.5-VL max rel logit error vs transformers:", {k: f"{v:.2e}" for k, v in errors.items()})
    assert all(e <= TOL for e in errors.values()), errors


@pytest.mark.multirank
def test_conversion_round_trip_is_bit_identical(parity, work):
    from safetensors.torch import load_file

    a = load_file(str(work / "hf_untied" / "model.safetensors"))
    b = load_file(str(work / "back_untied" / "model.safetensors"))
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) and a[k].dtype == b[k].dtype for k in a)
    assert json.loads((work / "back_untied" / "config.json").read_text()) == json.loads(
        (work / "hf_untied" / "config.json").read_text())


# ------------------------------------------------------------------------------------------- rules / layouts


@pytest.mark.pure
@pytest.mark.parametrize("variant", ["untied", "tied", "modules"])
def test_rules_cover_every_hf_tensor_and_round_trip(work, variant):
    from safetensors.torch import load_file

    hf = load_file(str(work / f"hf_{variant}" / "model.safetensors"))
    config = json.loads((work / f"hf_{variant}" / "config.json").read_text())
    rules = fam.hf_rules(config, hf.keys())
    used = [n for r in rules for n in r.hf]
    assert sorted(used) == sorted(hf), set(used) ^ set(hf)
    assert len({r.megatron for r in rules}) == len(rules)
    for r in rules:
        back = r.to_hf(r.to_megatron(*[hf[n] for n in r.hf]))
        assert all(torch.equal(x, hf[n]) for x, n in zip(back, r.hf, strict=True)), r.megatron


@pytest.mark.pure
def test_layout_detection(work):
    from safetensors import safe_open

    def names(v):
        with safe_open(str(work / f"hf_{v}" / "model.safetensors"), "pt") as f:
            return set(f.keys())

    assert fam.detect_layout(names("untied")) == "hub"
    assert fam.detect_layout(names("modules")) == "modules"
    assert fam.detect_layout(None) == "hub"
    with pytest.raises(ValueError, match="mixes"):
        fam.detect_layout({"visual.blocks.0.norm1.weight", "model.language_model.norm.weight"})


@pytest.mark.pure
def test_module_layout_loads_in_transformers_like_the_hub_layout(work):
    # the module layout is a real transformers layout, not one invented here
    a, b = fx.load_hf_model(work / "hf_untied"), fx.load_hf_model(work / "hf_modules")
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


@pytest.mark.pure
def test_flat_hub_config_reads_like_the_nested_one(hf_config):
    """The hub's original config.json has the text fields at the top level; transformers reads both alike."""
    from transformers import Qwen2_5_VLConfig

    text = {k: v for k, v in hf_config["text_config"].items() if k not in ("model_type", "architectures")}
    flat = {k: v for k, v in hf_config.items() if k != "text_config"} | text
    assert fam.lm_shape(flat) == fam.lm_shape(hf_config)
    assert fam.mrope_section(flat) == fam.mrope_section(hf_config) == [2, 3, 3]
    assert fam.vision_shape(flat) == fam.vision_shape(hf_config)
    for cfg in (flat, dict(flat, tie_word_embeddings=True), hf_config):
        full = Qwen2_5_VLConfig(**cfg)
        text = full.text_config
        shape = fam.lm_shape(cfg)
        # transformers 5 keeps rope_theta in rope_parameters and tie_word_embeddings on the top-level config
        assert (shape.vocab_size, shape.hidden_size, shape.num_query_groups, shape.norm_epsilon, shape.rotary_base,
                shape.tie_embeddings) == (text.vocab_size, text.hidden_size, text.num_key_value_heads,
                                          text.rms_norm_eps, text.rope_parameters["rope_theta"],
                                          full.tie_word_embeddings)


@pytest.mark.pure
def test_unsupported_configs_fail_with_the_field(hf_config):
    bad = json.loads(json.dumps(hf_config))
    # transformers 5 writes the M-RoPE sections into rope_parameters (4.x: rope_scaling)
    bad["text_config"]["rope_parameters"] = {"rope_type": "default", "rope_theta": 10000.0}
    with pytest.raises(ValueError, match="mrope_section"):
        fam.mrope_section(bad)
    bad["text_config"] = {k: v for k, v in bad["text_config"].items() if k != "rope_parameters"}
    bad["text_config"].update(rope_theta=10000.0, rope_scaling={"rope_type": "default"})  # the 4.x layout
    with pytest.raises(ValueError, match="mrope_section"):
        fam.mrope_section(bad)
    bad = json.loads(json.dumps(hf_config))
    bad["text_config"]["use_sliding_window"] = True
    with pytest.raises(ValueError, match="sliding"):
        fam.lm_shape(bad)


# ------------------------------------------------------------------------------------------- preprocessing


@pytest.mark.pure
def test_smart_resize_matches_transformers():
    # the PIL backend's module: the torchvision one's (the same function) does not import without torchvision
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import smart_resize

    sizes = [(h, w) for h in (1, 5, 27, 28, 29, 56, 100, 333, 1000, 4000) for w in (1, 14, 57, 280, 999, 3001)
             if max(h, w) / min(h, w) <= 200]
    for h, w in sizes:
        for lo, hi in ((56 * 56, 28 * 28 * 1280), (3136, 12845056), (28 * 28 * 4, 28 * 28 * 40)):
            assert qp.smart_resize(h, w, 28, lo, hi) == smart_resize(h, w, 28, lo, hi), (h, w, lo, hi)
    with pytest.raises(ValueError, match="aspect ratio"):
        qp.smart_resize(10, 2010)


PREPROCESS_CASES = [  # (h, w, PIL mode)
    (5, 7, "RGB"),        # tiny: scaled up to min_pixels
    (37, 53, "RGB"),      # odd sizes
    (120, 47, "RGB"),
    (1000, 1400, "RGB"),  # large: scaled down to max_pixels
    (20, 3000, "RGB"),    # extreme aspect ratio (150)
    (3001, 16, "RGB"),
    (64, 48, "L"),        # converted to RGB
    (50, 70, "RGBA"),     # transformers 5 composites the transparency onto white
    (37, 53, "RGB"),      # a size seen before: the torchvision backend resizes such images as one batch
]


@pytest.mark.pure
@pytest.mark.parametrize("backend", ["pil", "torchvision"])
@pytest.mark.parametrize("pp_source", ["fixture", "hub_defaults"])
def test_preprocess_matches_qwen2vl_image_processor(processor, preprocessor_config, pp_source, backend):
    import numpy as np
    from PIL import Image

    if pp_source == "fixture":
        pp = preprocessor_config
    else:  # Qwen2.5-VL's published preprocessor_config.json values
        pp = {"min_pixels": 3136, "max_pixels": 12845056, "patch_size": 14, "temporal_patch_size": 2,
              "merge_size": 2, "image_mean": list(image_ops.OPENAI_CLIP_MEAN), "image_std": list(image_ops.OPENAI_CLIP_STD),
              "image_processor_type": "Qwen2VLImageProcessor", "processor_class": "Qwen2_5_VLProcessor"}
    hf_proc = fx.image_processor_class(backend)(**{k: v for k, v in pp.items() if not k.endswith("_type")
                                                   and k != "processor_class"})
    rng = np.random.default_rng(7)
    images = []
    for h, w, mode in PREPROCESS_CASES:
        channels = {"RGB": 3, "L": 1, "RGBA": 4}[mode]
        px = rng.integers(0, 256, (h, w, channels), dtype=np.uint8)
        images.append(Image.fromarray(px[..., 0] if mode == "L" else px, mode))
    ours = qp.preprocess_images(images, pp, backend=backend)
    ref = hf_proc(images=images, return_tensors="pt")
    assert torch.equal(ours["image_grid_thw"], ref["image_grid_thw"])
    assert ours["pixel_values"].dtype == ref["pixel_values"].dtype == torch.float32
    assert torch.equal(ours["pixel_values"], ref["pixel_values"])
    # per image, separately too (the batch above concatenates them)
    one = qp.preprocess_images(images[3:4], pp, backend=backend)
    assert torch.equal(one["pixel_values"], hf_proc(images=images[3:4], return_tensors="pt")["pixel_values"])
    if pp_source == "fixture":
        # the processor expands each <|image_pad|> to as many tokens as num_tokens says
        msgs = [{"role": "user", "content": [{"type": "image"}] * len(images) + [{"type": "text", "text": "Hi"}]}]
        text = processor.apply_chat_template(msgs, add_generation_prompt=True, tokenize=False)
        ids = processor(text=[text], images=images, return_tensors="pt")["input_ids"][0]
        pad = processor.tokenizer.convert_tokens_to_ids(qp.IMAGE_PAD)
        assert int((ids == pad).sum()) == int(ours["num_tokens"].sum())
        assert ours["num_tokens"].tolist() == [int(g.prod()) // 4 for g in ref["image_grid_thw"]]


@pytest.mark.pure
def test_collate_images_concatenates_in_order(preprocessor_config):
    images = fx.make_images(0, IMAGE_SIZES)
    parts = [qp.preprocess_images(images[:1], preprocessor_config),
             qp.preprocess_images(images[1:], preprocessor_config)]
    whole = qp.preprocess_images(images, preprocessor_config)
    merged = qp.collate_images(parts)
    assert all(torch.equal(merged[k], whole[k]) for k in whole)


# ------------------------------------------------------------------------------------------- positions, prompt


@pytest.mark.pure
@pytest.mark.parametrize("masked", [False, True])
def test_position_ids_match_get_rope_index(work, case, hf_config, masked):
    model = fx.load_hf_model(work / "hf_untied")
    ids, images = case["input_ids"], case["images"]
    order = [i for row in ROW_IMAGES for i in row]
    mask = (ids != fx.load_processor(work / "hf_untied").tokenizer.pad_token_id).long() if masked else None
    # transformers 5 finds the image spans from mm_token_type_ids (1 = image token), as its processor marks them
    ref, _ = model.model.get_rope_index(ids, mm_token_type_ids=(ids == fam.image_token_id(hf_config)).int(),
                                        image_grid_thw=images["image_grid_thw"][order], attention_mask=mask)
    ours = fam.position_ids(hf_config, ids, images, ROW_IMAGES, attention_mask=mask)
    assert ours.shape == (3, *ids.shape) and ours.dtype == torch.long
    assert torch.equal(ours, ref)
    # the image spans really are 2-D: height and width positions differ inside them
    assert not torch.equal(ours[1], ours[2])


@pytest.mark.pure
def test_position_ids_reject_inconsistent_rows(case, hf_config):
    ids, images = case["input_ids"], case["images"]
    with pytest.raises(ValueError, match="more image tokens"):
        fam.position_ids(hf_config, ids, images, [[0], [2], [3], [2]])
    with pytest.raises(ValueError, match="consecutive image tokens"):
        fam.position_ids(hf_config, ids, images, [[0, 1], [3], [3], [2]])


@pytest.mark.pure
@pytest.mark.parametrize("n_images", [0, 1, 2])
@pytest.mark.parametrize("system", [None, "Answer briefly."])
def test_format_prompt_matches_chat_template_and_processor(processor, n_images, system):
    images = fx.make_images(3, IMAGE_SIZES[:n_images])
    question = "Compare the two pictures."
    msgs = ([{"role": "system", "content": system}] if system is not None else []) + [
        {"role": "user", "content": [{"type": "image"}] * n_images + [{"type": "text", "text": question}]}]
    text = processor.apply_chat_template(msgs, add_generation_prompt=True, tokenize=False)
    ref = processor(text=[text], images=images or None)
    num_tokens = [int(g.prod()) // 4 for g in ref["image_grid_thw"]] if images else []
    ours = qp.format_prompt(question, num_tokens, system=system)
    assert processor.tokenizer(ours)["input_ids"] == ref["input_ids"][0]
    # the response is followed by exactly what the template writes after an assistant turn
    full = processor.apply_chat_template(msgs + [{"role": "assistant", "content": "Two circles."}], tokenize=False)
    assert full == text + "Two circles." + qp.RESPONSE_SUFFIX


@pytest.mark.pure
def test_family_contract_exports(hf_config):
    from megatron_po.families import family_spec

    module = family_spec("qwen2_5_vl").hf
    for name in ("build", "hf_rules", "HF_IGNORED", "image_token_id", "preprocess_images", "position_ids",
                 "format_prompt", "RESPONSE_SUFFIX"):
        assert hasattr(module, name), name
    assert module.image_token_id(hf_config) == hf_config["image_token_id"]
    assert not any(re.search(p, "visual.blocks.0.norm1.weight") for p in module.HF_IGNORED)
    assert math.isclose(fam.lm_shape(hf_config).norm_epsilon, 1e-6)
