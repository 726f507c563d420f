"""Several images per prompt and P2-DPO with the HF families (Qwen2.5-VL, InternVL3), against transformers'
processors and chat templates, on the tiny checkpoints the fixtures write."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

pytest.importorskip("transformers")

import hf_internvl3_fixture  # noqa: E402
import hf_qwen2_5_vl_fixture  # noqa: E402
from conftest import REPO, run_python, run_torchrun  # noqa: E402

from megatron_po.data.collate import CollateConfig  # noqa: E402
from megatron_po.data.formats import trl_record  # noqa: E402
from megatron_po.data.hf_chat import HFImages, HFTokenizer  # noqa: E402
from megatron_po.data.dataset import P2Dataset  # noqa: E402
from megatron_po.data.p2_collate import P2_TERMS  # noqa: E402
from megatron_po.data.p2_records import read_p2_records, vcd_noise  # noqa: E402
from megatron_po.data.synthetic_p2 import generate_p2_dataset  # noqa: E402
from megatron_po.families import family_spec  # noqa: E402

FAMILIES = {
    "qwen2_5_vl": (lambda d: hf_qwen2_5_vl_fixture.make_hf_dir(d), hf_qwen2_5_vl_fixture.load_processor),
    "internvl3": (lambda d: hf_internvl3_fixture.make_checkpoint(d, "vit300m"), hf_internvl3_fixture.processor),
}


@pytest.fixture(scope="module", params=sorted(FAMILIES))
def family(request, tmp_path_factory):
    name = request.param
    hf = Path(FAMILIES[name][0](tmp_path_factory.mktemp(name) / "hf"))
    return name, hf


def _images(sizes):
    from PIL import Image

    g = torch.Generator().manual_seed(3)
    return [Image.fromarray(torch.randint(0, 256, (h, w, 3), generator=g, dtype=torch.uint8).numpy())
            for w, h in sizes]


@pytest.mark.pure
def test_interleaved_images_match_the_processor(family, tmp_path):
    """Two images between text parts: our prompt ids equal the processor's on its own chat template's text."""
    name, hf = family
    pils = _images([(64, 48), (40, 90)])
    paths = []
    for i, im in enumerate(pils):
        paths.append(tmp_path / f"im{i}.png")
        im.save(paths[-1])
    content = [{"type": "text", "text": "Left:"}, {"type": "image"}, {"type": "text", "text": " right:"},
               {"type": "image"}, {"type": "text", "text": " which one is red?"}]
    record = trl_record({"prompt": [{"role": "user", "content": content}], "chosen": "The left.",
                         "rejected": "The right.", "images": [str(p) for p in paths]}, "x:1", "a")
    tok = HFTokenizer(family_spec(name).hf, hf)
    counts = [HFImages(tok).num_tokens(p) for p in paths]
    ours = tok.prompt_ids(record.prompt, counts, record.image_offsets)

    processor = FAMILIES[name][1](hf)
    text = processor.apply_chat_template([{"role": "user", "content": content}], add_generation_prompt=True,
                                         tokenize=False)
    theirs = processor(text=[text], images=pils, return_tensors="pt")["input_ids"][0].tolist()
    assert ours == theirs, (tok.decode(ours), tok.decode(theirs))
    assert record.image_offsets == [5, 12] and sum(t == tok.image_id for t in ours) == sum(counts)


@pytest.fixture(scope="module")
def p2_data(tmp_path_factory):
    out = tmp_path_factory.mktemp("p2")
    generate_p2_dataset(out, num_train=8, num_eval=2, seed=4, image_size=64)
    return out / "p2_train.jsonl"


@pytest.mark.pure
def test_p2_batches_for_hf_families(family, p2_data):
    """Each image condition at its own size: the crop takes its own slots, every row's slots are its images', the
    calibration row shows I then I_crop, and I_noise is VCD noise on the processor's normalised pixels."""
    name, hf = family
    tok = HFTokenizer(family_spec(name).hf, hf)
    images = HFImages(tok)
    records = read_p2_records(p2_data)
    ds = P2Dataset(records, p2_data.parent, tok, CollateConfig(max_length=2000, num_image_tokens=0),
                   images=images)
    assert len(ds) == len(records)
    samples = [ds[i] for i in range(4)]
    batch = ds.collator(samples)
    per_image = batch["images"]["num_tokens"].tolist()
    for r, row in enumerate(batch["row_images"]):
        assert int((batch["tokens"][r] == tok.image_id).sum()) == sum(per_image[i] for i in row)
    for i, (record, conditions) in enumerate(samples):
        if record.focus is not None:
            left, top, right, bottom = record.focus.bbox
            assert int(conditions["crop"]["num_tokens"]) == images.num_tokens_of_size(right - left, bottom - top)
            row = int(batch["p2_rows"][P2_TERMS.index("calib_aug"), i])
            n = [int(conditions[k]["num_tokens"]) for k in ("image", "crop")]
            prefix = tok.prompt_ids(record.prompt, n)
            assert batch["tokens"][row, :len(prefix)].tolist() == prefix
        if record.robust is not None:
            expect = vcd_noise(conditions["image"]["pixel_values"], record.robust.noise_step, record.robust.noise_seed)
            assert torch.equal(conditions["noise"]["pixel_values"], expect)
            assert not torch.equal(expect, conditions["image"]["pixel_values"])


@pytest.mark.e2e
@pytest.mark.parametrize("fam", ["qwen2_5_vl"])
def test_p2_dpo_trains_an_hf_family(fam, tmp_path):
    """P2-DPO end to end at TP=2 + SP on a converted checkpoint: the focus pair's loss is ln 2 at step 1 (the
    reference is the policy), every term is finite, and the policy moves."""
    hf = FAMILIES[fam][0](tmp_path / "hf")
    ckpt = tmp_path / "megatron"
    run_python([str(REPO / "tools" / "convert_hf.py"), "hf-to-megatron", str(hf), str(ckpt), "--family", fam])
    out = tmp_path / "run"
    run_torchrun(["-m", "megatron_po.train", f"output_dir={out}", f"model.family={fam}", f"model.hf_path={ckpt / 'hf'}",
                  f"checkpoint.init_from={ckpt}", "model.max_seq_length=320", "objective.name=p2_dpo",
                  "parallel.tp=2", "parallel.sp=true", "train.progress_bar=false", "data.num_train=8",
                  "data.num_eval=2", "train.global_batch_size=4", "train.micro_batch_size=2", "train.train_steps=2",
                  "optim.lr=1e-3", "eval.interval=0", "checkpoint.save=false"])
    m = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert abs(m[0]["p2/focus_loss"] - math.log(2)) < 1e-6, m[0]
    assert all(math.isfinite(v) for r in m for v in r.values() if isinstance(v, float))
    assert m[1]["loss"] != m[0]["loss"]


@pytest.mark.pure
def test_transparent_images_read_from_disk_as_the_processor_sees_them(family, tmp_path):
    """A PNG with alpha, read by the data path (open_rgb) then processed, gives the pixels the family's processor
    gives the PIL image itself: transparency onto white, as transformers 5 converts (PIL's convert drops it)."""
    from PIL import Image

    name, hf = family
    rgba = Image.fromarray(torch.randint(0, 256, (40, 60, 4), generator=torch.Generator().manual_seed(1),
                                         dtype=torch.uint8).numpy(), "RGBA")
    rgba.save(tmp_path / "a.png")
    tok = HFTokenizer(family_spec(name).hf, hf)
    ours = HFImages(tok).load([tmp_path / "a.png"])["pixel_values"]
    direct = tok.family.preprocess_images([rgba], tok.preprocessor_config, tok.hf_config)["pixel_values"]
    dropped = tok.family.preprocess_images([rgba.convert("RGB")], tok.preprocessor_config, tok.hf_config)
    assert torch.equal(ours, direct) and not torch.equal(ours, dropped["pixel_values"])
