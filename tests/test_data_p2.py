"""P2-DPO data: record validation (file:line + field), image conditions (crop, degrade, VCD noise), the synthetic
P2 task, and the collator's row layout (terms, images per row, the reference's own calibration rows)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from megatron_po.data.collate import IGNORE_INDEX, CollateConfig
from megatron_po.data.fixed_images import FixedSizeImages
from megatron_po.data.dataset import P2Dataset
from megatron_po.data.p2_collate import P2_TERMS, P2Collator
from megatron_po.data.p2_records import (ROBUST_PROMPT, RecordError, degrade, iter_p2_texts, load_p2_pils,
                                         noised_pixels, read_p2_records, vcd_coefficients, vcd_noise)
from megatron_po.data.records import read_records, to_tensor
from megatron_po.data.synthetic import generate_synthetic_dataset
from megatron_po.data.synthetic_p2 import generate_p2_dataset
from megatron_po.data.tokenizer import Tokenizer, train_tokenizer

pytestmark = pytest.mark.pure

P = 4  # image tokens per image in these tests
IMAGES_16, IMAGES_32 = FixedSizeImages(16, P), FixedSizeImages(32, P)  # tiny_vlm's handler at two sizes


@pytest.fixture(scope="module")
def p2_dir(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("p2")
    generate_p2_dataset(out, num_train=40, num_eval=6, seed=3)
    return out


@pytest.fixture(scope="module")
def p2_records(p2_dir):
    return read_p2_records(p2_dir / "p2_train.jsonl")


@pytest.fixture(scope="module")
def tokenizer(p2_records, tmp_path_factory) -> Tokenizer:
    return Tokenizer(train_tokenizer(iter_p2_texts(p2_records), tmp_path_factory.mktemp("tok") / "spm", 512))


def _write(path: Path, objs: list) -> Path:
    path.write_text("".join((o if isinstance(o, str) else json.dumps(o)) + "\n" for o in objs))
    return path


FOCUS = {"chosen": "It is red.", "rejected": "It is blue.", "bbox": [2, 2, 10, 10]}
ROBUST = {"chosen": "It is red.", "rejected": "It is green.", "noise_seed": 5}
GOOD = {"id": "a", "image": "x.png", "prompt": "What colour is it?", "focus": FOCUS, "robust": ROBUST,
        "clip_crop_score": 0.3, "clip_image_score": 0.28}


# ---------------------------------------------------------------- records
@pytest.mark.parametrize("bad, field", [
    ({"focus": {k: v for k, v in FOCUS.items() if k != "bbox"}}, "'focus.bbox' or 'focus.crop_image'"),  # no I_crop
    ({"focus": {k: v for k, v in FOCUS.items() if k != "bbox"} | {"crop_image": "c.png"}}, "'focus.deg_image'"),
    ({"focus": FOCUS | {"bbox": [1, 2, 3]}}, "'focus.bbox'"),
    ({"focus": FOCUS | {"bbox": [5, 2, 5, 9]}}, "'focus.bbox'"),
    ({"focus": FOCUS | {"bbox": [1.5, 2, 8, 9]}}, "'focus.bbox'"),
    ({"focus": FOCUS | {"rejected": "It is red."}}, "'focus.chosen' and 'focus.rejected' are identical"),
    ({"focus": FOCUS | {"chosen": ""}}, "'focus.chosen' is empty"),
    ({"focus": [1]}, "'focus' must be an object"),
    ({"robust": {k: v for k, v in ROBUST.items() if k != "noise_seed"}}, "'robust.noise_seed'"),
    ({"robust": ROBUST | {"noise_seed": -1}}, "'robust.noise_seed'"),
    ({"robust": ROBUST | {"noise_step": 1000}}, "'robust.noise_step'"),
    ({"robust": ROBUST | {"rejected": 3}}, "'robust.rejected' must be a string"),
    ({"clip_crop_score": "high"}, "'clip_crop_score' must be a CLIP cosine"),
    ({"clip_image_score": 1.5}, "'clip_image_score' must be a CLIP cosine"),
    ({"clip_image_score": float("nan")}, "'clip_image_score' must be a CLIP cosine"),
    ({"clip_crop_score": True}, "'clip_crop_score' must be a CLIP cosine"),
    ({"clip_image_score": None}, "'clip_image_score' is required when a record has both branches"),
    ({"focus": None, "robust": None}, "needs field 'focus' or 'robust'"),
    ({"prompt": ""}, "'prompt' is empty"),
])
def test_bad_record_names_file_line_and_field(tmp_path, bad, field):
    path = _write(tmp_path / "p2.jsonl", [GOOD, "", GOOD | {"id": "b"} | bad])
    with pytest.raises(RecordError) as info:
        read_p2_records(path)
    assert f"{path}:3" in str(info.value) and field in str(info.value), str(info.value)


def test_good_records_and_defaults(tmp_path):
    path = _write(tmp_path / "p2.jsonl", [
        GOOD,
        # one branch: no CLIP scores needed; the robust prompt defaults to §9.4's template
        {"id": "r", "image": "x.png", "prompt": "Q?", "robust": ROBUST},
        {"id": "f", "image": "x.png", "prompt": "Q?", "focus": {"chosen": "a.", "rejected": "b.",
                                                                  "crop_image": "c.png", "deg_image": "d.png"},
         "robust": None},
    ])
    a, r, f = read_p2_records(path)
    assert a.focus.bbox == (2, 2, 10, 10) and a.robust.noise_step == 600 and a.clip_image_score == 0.28
    assert a.source == f"{path}:1"
    assert r.focus is None and r.robust.prompt == ROBUST_PROMPT.format(question="Q?") and r.clip_crop_score is None
    assert f.robust is None and (f.focus.crop_image, f.focus.deg_image, f.focus.bbox) == ("c.png", "d.png", None)
    with pytest.raises(RecordError, match="repeats line 1"):
        read_p2_records(_write(tmp_path / "dup.jsonl", [GOOD, GOOD]))


def test_bbox_outside_the_image_names_file_line(tmp_path, tokenizer):
    Image.new("RGB", (16, 16), (255, 0, 0)).save(tmp_path / "x.png")
    path = _write(tmp_path / "p2.jsonl", [GOOD, GOOD | {"id": "b", "focus": FOCUS | {"bbox": [4, 4, 17, 12]}}])
    with pytest.raises(RecordError, match=rf"{path}:2: field 'focus.bbox' \[4, 4, 17, 12\] leaves the 16x16 image"):
        P2Dataset(read_p2_records(path), tmp_path, tokenizer, CollateConfig(160, P), images=IMAGES_16)
    with pytest.raises(FileNotFoundError, match="c.png"):
        bad = GOOD | {"focus": {"chosen": "a.", "rejected": "b.", "bbox": [0, 0, 4, 4], "crop_image": "c.png"}}
        P2Dataset(read_p2_records(_write(tmp_path / "c.jsonl", [bad])), tmp_path, tokenizer, CollateConfig(160, P),
                  images=IMAGES_16)


# ---------------------------------------------------------------- image conditions
def test_vcd_noise_schedule_and_determinism():
    # OBJECTIVES.md §9.4: √ᾱ, √(1 − ᾱ) at t = 600 and t = 500
    assert [round(x, 4) for x in vcd_coefficients(600)] == [0.7342, 0.6789]
    assert [round(x, 4) for x in vcd_coefficients(500)] == [0.8630, 0.5052]
    x = torch.rand(3, 8, 8)
    a, b = vcd_coefficients(600)
    eps = torch.randn(3, 8, 8, generator=torch.Generator().manual_seed(11))
    torch.testing.assert_close(vcd_noise(x, 600, 11), a * x + b * eps, rtol=0, atol=0)
    assert torch.equal(vcd_noise(x, 600, 11), vcd_noise(x, 600, 11))
    assert not torch.equal(vcd_noise(x, 600, 11), vcd_noise(x, 600, 12))


def test_degrade_fills_the_box_with_the_mean_colour():
    array = np.zeros((8, 8, 3), dtype=np.uint8)
    array[:, 4:] = (200, 100, 50)
    deg = np.asarray(degrade(Image.fromarray(array), (1, 2, 3, 5)))
    assert (deg[2:5, 1:3] == (100, 50, 25)).all()  # per-channel mean of the whole image
    outside = np.ones((8, 8), dtype=bool)
    outside[2:5, 1:3] = False
    assert (deg[outside] == array[outside]).all()


def _conditions(ds, record) -> dict[str, torch.Tensor]:
    """The sample's conditions as [3, S, S] pixels (each a one-image part of the handler)."""
    _, parts = ds[ds.records.index(record)]
    assert all(part["num_tokens"].tolist() == [P] for part in parts.values())
    return {k: part["pixel_values"][0] for k, part in parts.items()}


def test_p2_image_conditions(p2_dir, p2_records, tokenizer):
    ds = P2Dataset(p2_records, p2_dir, tokenizer, CollateConfig(160, P), images=IMAGES_32)
    record = next(r for r in p2_records if r.focus is not None and r.robust is not None)
    images = _conditions(ds, record)
    assert set(images) == {"image", "crop", "deg", "noise"} and all(v.shape == (3, 32, 32) for v in images.values())
    # bit for bit the tensors tiny_vlm trained on before it had an image handler (P2 metrics stay the same)
    before = {k: to_tensor(im, 32) for k, im in load_p2_pils(record, p2_dir).items()}
    before["noise"] = noised_pixels(before["image"], record.robust.noise_step, record.robust.noise_seed)
    assert all(torch.equal(images[k], before[k]) for k in before)
    original = Image.open(p2_dir / record.image).convert("RGB")
    crop = np.asarray(original.crop(record.focus.bbox).resize((32, 32), Image.Resampling.BICUBIC))
    assert torch.equal(images["crop"], torch.from_numpy(crop.copy()).permute(2, 0, 1).float() / 255)
    left, top, right, bottom = record.focus.bbox
    box = images["deg"][:, top:bottom, left:right]
    assert torch.equal(box, box[:, :1, :1].expand_as(box))  # the asked object is erased by one flat colour
    # VCD's noise on the tower's normalised input (CLIP mean / std), handed over in pixel units
    mean, std = torch.tensor([0.48145466, 0.4578275, 0.40821073])[:, None, None], \
        torch.tensor([0.26862954, 0.26130258, 0.27577711])[:, None, None]
    noised = vcd_noise((images["image"] - mean) / std, 600, record.robust.noise_seed)
    assert torch.allclose((images["noise"] - mean) / std, noised, atol=1e-5)
    robust_only = next(r for r in p2_records if r.focus is None)
    assert set(_conditions(ds, robust_only)) == {"image", "noise"}


# ---------------------------------------------------------------- synthetic task
def test_synthetic_p2(tmp_path, p2_dir, p2_records):
    generate_p2_dataset(tmp_path / "a", 40, 6, seed=3)
    assert (tmp_path / "a" / "p2_train.jsonl").read_bytes() == (p2_dir / "p2_train.jsonl").read_bytes()
    # the pair task's eval split, so held-out metrics compare across objectives
    generate_synthetic_dataset(tmp_path / "pairs", 0, 6, seed=3)
    assert (p2_dir / "eval.jsonl").read_bytes() == (tmp_path / "pairs" / "eval.jsonl").read_bytes()
    assert len(read_records(p2_dir / "eval.jsonl")) == 6
    kinds = {(r.focus is not None, r.robust is not None) for r in p2_records}
    assert kinds == {(True, True), (True, False), (False, True)}
    for r in p2_records:
        x0, y0, x1, y1 = r.meta["target"]["bbox"]
        if r.focus is not None:
            left, top, right, bottom = r.focus.bbox
            assert left <= x0 and top <= y0 and right > x1 and bottom > y1  # the crop holds the asked object
            assert r.focus.chosen != r.focus.rejected
        share = (x1 - x0 + 1) * (y1 - y0 + 1) / 32**2
        assert r.clip_crop_score == 0.3 and r.clip_image_score == round(0.25 + 0.5 * share, 4)
    ratios = [r.clip_crop_score / r.clip_image_score for r in p2_records]
    assert min(ratios) < 1 < max(ratios)  # DDW shifts weight both ways


# ---------------------------------------------------------------- collator
def _response(tokenizer, labels_row) -> str:
    ids = labels_row[labels_row != IGNORE_INDEX].tolist()
    assert ids[-1] == tokenizer.end_id
    return tokenizer.decode(ids[:-1])


@pytest.mark.parametrize("calib_reference", ["rejected", "chosen"])
def test_collator_rows(p2_dir, p2_records, tokenizer, calib_reference):
    ds = P2Dataset(p2_records, p2_dir, tokenizer, CollateConfig(160, P, pad_to_multiple_of=4),
                   calib_reference=calib_reference, images=IMAGES_32)
    picks = [next(i for i, r in enumerate(ds.records) if (r.focus is not None, r.robust is not None) == kind)
             for kind in ((True, True), (False, True), (True, False))]
    samples = [ds[i] for i in picks]
    batch = ds.collator(samples)
    b, rows = 3, batch["tokens"].shape[0]
    assert batch["num_pairs"] == b and rows == 4 * 2 + 2 * 2 and batch["tokens"].shape[1] % 4 == 0
    assert batch["has_focus"].tolist() == [True, False, True] and batch["has_robust"].tolist() == [True, True, False]
    assert batch["clip_image_score"][0] == pytest.approx(samples[0][0].clip_image_score)
    p2_rows = batch["p2_rows"]
    assert p2_rows.shape == (6, b) and (p2_rows[:4, 1] == -1).all() and (p2_rows[4:, 2] == -1).all()
    present = p2_rows[p2_rows >= 0]
    assert sorted(present.tolist()) == list(range(rows)) and present.tolist() == sorted(present.tolist())  # term-major
    images = batch["images"]
    ref = batch.get("ref_rows")
    assert (ref is not None) == (calib_reference == "rejected")
    for t, term in enumerate(P2_TERMS):
        for i, (record, conditions) in enumerate(samples):
            row = int(p2_rows[t, i])
            if row < 0:
                continue
            keys = {"calib_aug": ["image", "crop"], "calib_deg": ["deg"]}.get(term, ["image"] if "focus" in term
                                                                              else ["noise"])
            shown = batch["row_images"][row]
            assert [torch.equal(images[j], conditions[k]["pixel_values"][0])
                    for j, k in zip(shown, keys)] == [True] * len(keys), term
            assert batch["image_token_mask"][row].sum() == P * len(keys)
            branch = record.focus if "focus" in term or "calib" in term else record.robust
            expected = branch.rejected if term.endswith("rejected") else branch.chosen
            assert _response(tokenizer, batch["labels"][row]) == expected, term
            prompt = tokenizer.encode(record.robust.prompt if "robust" in term else record.prompt)
            start = 2 + P * len(keys)  # after <bos> <|user|> and the image slots
            assert batch["tokens"][row, start : start + len(prompt) + 1].tolist() == prompt + [tokenizer.assistant_id]
            view = ref if ref is not None else batch
            ref_expected = record.focus.rejected if ref is not None and "calib" in term else expected
            assert _response(tokenizer, view["labels"][row]) == ref_expected, term
            assert view["row_images"][row] == shown
    # each condition a row shows enters the batch once; robust-only samples carry no clean image
    assert images.shape[0] == 4 + 1 + 3


def test_unfit_samples_are_dropped_and_counted(tmp_path, tokenizer):
    Image.new("RGB", (16, 16), (0, 0, 255)).save(tmp_path / "x.png")
    Image.new("RGB", (8, 8), (255, 0, 0)).save(tmp_path / "c.png")
    Image.new("RGB", (16, 16), (9, 9, 9)).save(tmp_path / "d.png")
    files = {"chosen": "It is red.", "rejected": "It is blue.", "crop_image": "c.png", "deg_image": "d.png"}
    records = read_p2_records(_write(tmp_path / "p2.jsonl", [
        GOOD,
        GOOD | {"id": "long", "robust": ROBUST | {"chosen": "It is red. " * 40}},
        GOOD | {"id": "files", "focus": files, "robust": None},
    ]))
    cfg = CollateConfig(64, P)
    assert P2Collator(tokenizer, cfg, IMAGES_16).fits(records[1]) == (False, "too_long")
    with pytest.raises(ValueError, match="too_long"):
        P2Collator(tokenizer, cfg, IMAGES_16)([(records[1], {})])
    ds = P2Dataset(records, tmp_path, tokenizer, cfg, images=IMAGES_16)
    assert [r.id for r in ds.records] == ["a", "files"] and ds.skipped["too_long"] == 1
    images = _conditions(ds, ds.records[1])  # I_crop and I_deg read from their files
    assert torch.equal(images["crop"], torch.tensor([1.0, 0.0, 0.0])[:, None, None].expand(3, 16, 16))
    assert torch.equal(images["deg"], torch.full((3, 16, 16), 9 / 255))
