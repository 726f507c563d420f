"""Preference data in the formats users hold, read unchanged (data.format=auto|jsonl|trl|mpo|hf): each gives the
records our own format gives; images may be several per prompt, placed where the record puts them; what cannot
be read is refused naming file:line (or file row N)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from megatron_po.data.collate import CollateConfig, PairCollator
from megatron_po.data.dataset import PreferenceDataset
from megatron_po.data.fixed_images import FixedSizeImages
from megatron_po.data.formats import detect_format
from megatron_po.data.sources import hashed_files, read_preference_file, split_files
from megatron_po.data.records import EmbeddedImage, RecordError, iter_texts, read_records
from megatron_po.data.synthetic import generate_synthetic_dataset
from megatron_po.data.tokenizer import Tokenizer, train_tokenizer

P = 16  # tiny_vlm image slots per image
IMAGES = FixedSizeImages(32, P)


@pytest.fixture(scope="module")
def ours(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("ours")
    generate_synthetic_dataset(out, num_train=6, num_eval=2, seed=2)
    return out / "train.jsonl"


@pytest.fixture(scope="module")
def tok(ours) -> Tokenizer:
    return Tokenizer(train_tokenizer(iter_texts(read_records(ours)), ours.parent / "spm", vocab_size=256))


def _write(path: Path, objs: list) -> Path:
    path.write_text("".join(json.dumps(o) + "\n" for o in objs))
    return path


def _key(records) -> list:
    return [([str(i) for i in r.images], r.prompt, r.chosen, r.rejected) for r in records]


def _as_trl(record, conversational: bool) -> dict:
    if not conversational:
        return {"prompt": record.prompt, "chosen": record.chosen, "rejected": record.rejected,
                "images": [record.image]}
    return {"prompt": [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": record.prompt}]}],
            "chosen": [{"role": "assistant", "content": [{"type": "text", "text": record.chosen}]}],
            "rejected": [{"role": "assistant", "content": record.rejected}],
            "images": [record.image]}


def _prompt_ids(tok, record) -> list[int]:
    return PairCollator(tok, CollateConfig(400, P), IMAGES)._encode(record)[0]


# ------------------------------------------------------------------------------------------------ TRL


@pytest.mark.pure
@pytest.mark.parametrize("conversational", [False, True])
@pytest.mark.parametrize("fmt", ["auto", "trl"])
def test_trl_records_read_like_ours(ours, tok, conversational, fmt):
    records = read_records(ours)
    trl = _write(ours.parent / f"trl_{conversational}.jsonl", [_as_trl(r, conversational) for r in records])
    got = read_preference_file(trl, fmt)
    assert _key(got) == _key(records)
    assert [_prompt_ids(tok, r) for r in got] == [_prompt_ids(tok, r) for r in records]
    assert [r.id for r in got] == [f"line-{i}" for i in range(1, len(records) + 1)]
    assert read_preference_file(ours, "auto") == records  # ours still auto-detected as ours


@pytest.mark.pure
def test_trl_json_array_reads_like_jsonl(ours):
    records = read_records(ours)
    array = ours.parent / "trl_array.json"
    array.write_text(json.dumps([_as_trl(r, True) for r in records]))
    assert detect_format(array) == "trl"
    assert _key(read_preference_file(array)) == _key(records)


@pytest.mark.pure
def test_interleaved_images_sit_where_the_message_puts_them(ours, tok):
    first = read_records(ours)[0]
    record = {"prompt": [{"role": "user", "content": [{"type": "text", "text": "Left:"}, {"type": "image"},
                                                      {"type": "text", "text": "right:"}, {"type": "image"},
                                                      {"type": "text", "text": "which is red?"}]}],
              "chosen": "The left one.", "rejected": "The right one.", "images": [first.image, first.image]}
    (got,) = read_preference_file(_write(ours.parent / "two.jsonl", [record]))
    assert got.image_offsets == [5, 11] and got.prompt == "Left:right:which is red?"
    ids = _prompt_ids(tok, got)
    slots = [i for i, t in enumerate(ids) if t == tok.image_id]
    assert len(slots) == 2 * P
    # text, P slots, text, P slots, text: the slots are two runs with the middle text between them
    left, right = tok.encode("Left:"), tok.encode("right:")
    assert ids[2:2 + len(left)] == left and slots[0] == 2 + len(left)
    assert ids[slots[P - 1] + 1: slots[P - 1] + 1 + len(right)] == right and slots[P] == slots[P - 1] + 1 + len(right)


@pytest.mark.pure
@pytest.mark.parametrize("change, message", [
    ({"images": ["a.png", "b.png"], "prompt": [{"role": "user", "content": [{"type": "image"}, {"type": "text",
                                                                                                "text": "q"}]}]},
     "the prompt has 1 image parts for 2 image"),
    ({"images": [3]}, "field 'images' must be an image path or a non-empty list of images"),
    ({"images": []}, "field 'images' must be an image path or a non-empty list"),
    ({"prompt": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]}, "multi-turn"),
    ({"chosen": "same", "rejected": "same"}, "identical"),
])
def test_unsupported_trl_records_name_file_and_line(ours, tmp_path, change, message):
    good = _as_trl(read_records(ours)[0], conversational=False)
    path = _write(tmp_path / "trl.jsonl", [good, dict(good, **change)])
    with pytest.raises(RecordError, match=rf"{path}:2: .*{message}"):
        read_preference_file(path, "trl")


@pytest.mark.pure
def test_auto_names_what_it_saw(tmp_path):
    path = _write(tmp_path / "x.jsonl", [{"query": "q", "answer": "a"}])
    with pytest.raises(RecordError, match=rf"{path}:1: data.format=auto: keys \['answer', 'query'\]"):
        read_preference_file(path)


# ------------------------------------------------------------------------------------------------ MPO


def _mpo_layout(ours: Path, tmp_path: Path) -> Path:
    """A meta file naming two datasets with their own image roots, as InternVL's MPO data is laid out."""
    records = read_records(ours)
    for name, part in (("shapes_a", records[:3]), ("shapes_b", records[3:])):
        (tmp_path / name / "images").mkdir(parents=True)
        for r in part:
            (tmp_path / name / "images" / Path(r.image).name).write_bytes((ours.parent / r.image).read_bytes())
        _write(tmp_path / f"{name}.jsonl", [{"image": Path(r.image).name, "question": "<image>\n" + r.prompt,
                                             "chosen": r.chosen, "rejected": r.rejected} for r in part])
    meta = {"shapes_a": {"root": "shapes_a/images", "annotation": "shapes_a.jsonl", "repeat_time": 1},
            "shapes_b": {"root": str(tmp_path / "shapes_b" / "images"), "annotation": "shapes_b.jsonl",
                         "repeat_time": 2}}
    (tmp_path / "meta.json").write_text(json.dumps(meta))
    return tmp_path / "meta.json"


@pytest.mark.pure
def test_mpo_meta_reads_every_dataset_with_its_root(ours, tok, tmp_path):
    records = read_records(ours)
    meta = _mpo_layout(ours, tmp_path)
    assert detect_format(meta) == "mpo"
    got = read_preference_file(meta)
    assert [r.id for r in got] == ["shapes_a/line-1", "shapes_a/line-2", "shapes_a/line-3", "shapes_b/line-1",
                                   "shapes_b/line-2", "shapes_b/line-3", "shapes_b/line-1#1", "shapes_b/line-2#1",
                                   "shapes_b/line-3#1"]
    assert [(r.prompt, r.chosen) for r in got[:6]] == [(r.prompt, r.chosen) for r in records]
    # `<image>\n` is where the template puts the image: at the start here, as images-first
    assert [_prompt_ids(tok, r) for r in got[:6]] == [_prompt_ids(tok, r) for r in records]
    ds = PreferenceDataset(got, meta.parent, tok, CollateConfig(160, P), images=IMAGES)
    assert ds.image_files(got[0]) == [tmp_path / "shapes_a" / "images" / Path(records[0].image).name]
    assert hashed_files(meta, split_files(meta)) == [meta, tmp_path / "shapes_a.jsonl", tmp_path / "shapes_b.jsonl"]
    # an annotation file alone: its directory is the image root
    alone = read_preference_file(tmp_path / "shapes_a.jsonl")
    assert [r.id for r in alone] == ["line-1", "line-2", "line-3"] and alone[0].image_root is None


def _mpo_lines(tmp_path: Path, name: str, n: int, repeat_time) -> Path:
    """A meta file naming one annotation file of `n` distinct lines, read with `repeat_time`."""
    _write(tmp_path / f"{name}.jsonl", [{"image": f"{i}.png", "question": f"<image>\nQuestion {i}?",
                                         "chosen": f"Yes {i}.", "rejected": f"No {i}."} for i in range(1, n + 1)])
    meta = tmp_path / f"{name}_meta.json"
    meta.write_text(json.dumps({name: {"root": "img", "annotation": f"{name}.jsonl", "repeat_time": repeat_time}}))
    return meta


@pytest.mark.pure
def test_mpo_repeat_time_below_one_is_a_fixed_ordered_subset(tmp_path):
    """repeat_time < 1 trains on a sample of int(n * repeat_time) lines (InternVL's MPO reader: `random.sample` of
    that many lines, unseeded there). Ours is seeded, so every rank, relaunch and resume reads the same pairs; the
    subset keeps file order and its ids (the reference cache and the sampler's order are keyed by them)."""
    full = {r.id: r for r in read_preference_file(_mpo_lines(tmp_path, "d", 20, 1))}
    assert list(full) == [f"d/line-{i}" for i in range(1, 21)]
    half = read_preference_file(_mpo_lines(tmp_path, "d", 20, 0.5))
    ids = [r.id for r in half]
    assert len(ids) == 10 == int(20 * 0.5)
    assert set(ids) <= set(full), "ids changed"  # never suffixed or renumbered
    lines = [int(i.rsplit("-", 1)[1]) for i in ids]
    assert lines == sorted(set(lines)), "not in file order, or repeated"
    assert all((r.prompt, r.chosen, r.rejected, r.image) == (full[r.id].prompt, full[r.id].chosen,
                                                              full[r.id].rejected, full[r.id].image) for r in half)
    assert lines != list(range(1, 11)), "the first lines, not a sample"
    # fixed: the same subset on every read (and in every process: pinned here, so a change of it is deliberate)
    assert [r.id for r in read_preference_file(_mpo_lines(tmp_path, "d", 20, 0.5))] == ids
    assert lines == [2, 5, 6, 7, 8, 9, 13, 14, 16, 20], lines
    # int(), not round(): 7 * 0.5 keeps 3, 20 * 0.99 keeps 19
    assert len(read_preference_file(_mpo_lines(tmp_path, "e", 7, 0.5))) == 3
    assert len(read_preference_file(_mpo_lines(tmp_path, "f", 20, 0.99))) == 19


@pytest.mark.pure
@pytest.mark.parametrize("change, message", [
    ({"question": "<image>\n<image>\nq"}, "2 <image> placeholders for 1 image"),
    ({"question": "<image>\n"}, "no text besides its <image> placeholders"),
    ({"image": None}, "field 'image' must be an image path"),
])
def test_bad_mpo_records_name_file_and_line(tmp_path, change, message):
    good = {"image": "x.png", "question": "<image>\nWhat is it?", "chosen": "a", "rejected": "b"}
    path = _write(tmp_path / "ann.jsonl", [good, dict(good, **change)])
    with pytest.raises(RecordError, match=rf"{path}:2: .*{message}"):
        read_preference_file(path, "mpo")


@pytest.mark.pure
def test_mpo_meta_with_a_missing_annotation_file_names_it(tmp_path):
    (tmp_path / "meta.json").write_text(json.dumps({"d": {"root": "img", "annotation": "nope.jsonl"}}))
    with pytest.raises(RecordError, match=r"dataset 'd': annotation file not found: .*nope.jsonl"):
        read_preference_file(tmp_path / "meta.json")


# ------------------------------------------------------------------------------------ Hugging Face datasets


def _png(path: Path) -> bytes:
    return path.read_bytes()


def _hf_table(ours: Path, layout: str):
    """Our records as a `datasets.Dataset` with embedded image bytes: RLAIF-V's columns, or TRL's with a list."""
    datasets = pytest.importorskip("datasets")
    records = read_records(ours)
    image = {"bytes": None, "path": None}
    if layout == "rlaif_v":
        features = datasets.Features({"image": datasets.Image(), "question": datasets.Value("string"),
                                      "chosen": datasets.Value("string"), "rejected": datasets.Value("string"),
                                      "idx": datasets.Value("int64")})
        rows = {"image": [dict(image, bytes=_png(ours.parent / r.image)) for r in records],
                "question": [r.prompt for r in records], "chosen": [r.chosen for r in records],
                "rejected": [r.rejected for r in records], "idx": list(range(len(records)))}
    else:
        features = datasets.Features({"images": datasets.List(datasets.Image()), "prompt": datasets.Value("string"),
                                      "chosen": datasets.Value("string"), "rejected": datasets.Value("string")})
        rows = {"images": [[dict(image, bytes=_png(ours.parent / r.image))] for r in records],
                "prompt": [r.prompt for r in records], "chosen": [r.chosen for r in records],
                "rejected": [r.rejected for r in records]}
    return datasets.Dataset.from_dict(rows, features=features)


@pytest.mark.pure
@pytest.mark.parametrize("layout", ["rlaif_v", "trl"])
def test_hf_datasets_on_disk_read_like_ours(ours, tok, tmp_path, layout):
    records = read_records(ours)
    table = _hf_table(ours, layout)
    table.to_parquet(str(tmp_path / "train.parquet"))
    table.save_to_disk(str(tmp_path / "saved"))
    for path in (tmp_path / "train.parquet", tmp_path / "saved"):
        got = read_preference_file(path)
        assert [(r.prompt, r.chosen, r.rejected) for r in got] == [(r.prompt, r.chosen, r.rejected) for r in records]
        assert [r.id for r in got] == [f"row-{i}" for i in range(len(records))]
        assert all(isinstance(r.images[0], EmbeddedImage) for r in got)
        assert str(got[2].images[0]) == f"{path} row 2 image 0"
        # the embedded bytes decode to the very pixels of the files
        ds = PreferenceDataset(got, tmp_path, tok, CollateConfig(160, P), images=IMAGES, source=path,
                               data_files=hashed_files(path, split_files(path)))
        theirs = PreferenceDataset(records, ours.parent, tok, CollateConfig(160, P), images=IMAGES)
        assert all(torch.equal(ds[i][1]["pixel_values"], theirs[i][1]["pixel_values"]) for i in range(len(records)))
        assert ds.image_files(got[0]) == [] and ds.data_files and all(p.is_file() for p in ds.data_files)


@pytest.mark.pure
def test_hf_dataset_problems_are_named(ours, tok, tmp_path):
    datasets = pytest.importorskip("datasets")
    table = _hf_table(ours, "rlaif_v")
    rows = table.cast_column("image", datasets.Image(decode=False)).to_list()
    rows[3]["image"]["bytes"] = b"\x89PNG\r\n\x1a\n broken"
    broken = tmp_path / "broken.parquet"
    datasets.Dataset.from_list(rows, features=table.features).to_parquet(str(broken))
    with pytest.raises(RecordError, match=rf"cannot read image {broken} row 3 image 0"):
        PreferenceDataset(read_preference_file(broken), tmp_path, tok, CollateConfig(160, P), images=IMAGES)
    datasets.DatasetDict({"train": table}).save_to_disk(str(tmp_path / "dd"))
    with pytest.raises(RecordError, match=r"a DatasetDict with splits \['train'\]: point data.train_path at one"):
        read_preference_file(tmp_path / "dd")
    other = datasets.Dataset.from_dict({"text": ["a"]})
    other.to_parquet(str(tmp_path / "other.parquet"))
    with pytest.raises(RecordError, match=r"columns \['text'\] are neither TRL's"):
        read_preference_file(tmp_path / "other.parquet")


# ------------------------------------------------------------------------------------------------ multi-image


@pytest.mark.pure
def test_several_images_per_pair_collate_in_order(ours, tok, tmp_path):
    records = read_records(ours)
    two = [json.loads(line) for line in ours.read_text().splitlines()]
    two[1]["image"] = [records[1].image, records[2].image]  # our format takes a list too
    path = _write(ours.parent / "multi.jsonl", two)
    got = read_preference_file(path)
    ds = PreferenceDataset(got, path.parent, tok, CollateConfig(200, P), images=IMAGES)
    batch = ds.collator([ds[i] for i in range(3)])
    assert batch["images"].shape[0] == 4  # 1 + 2 + 1 images, pair order
    assert batch["row_images"] == [[0], [1, 2], [3], [0], [1, 2], [3]]
    assert batch["image_token_mask"].sum(1).tolist() == [P * n for n in (1, 2, 1, 1, 2, 1)]
    two_images = ds[1][1]["pixel_values"]
    assert two_images.shape[0] == 2 and torch.equal(batch["images"][1:3], two_images)
    with pytest.raises(RecordError, match=r"record 'x': image_offsets \[0\] are not 2 ordered offsets"):
        type(got[0])("x", ["a.png", "b.png"], "q", "a", "b", image_offsets=[0])


@pytest.mark.e2e
def test_dry_run_reads_a_trl_file(ours, tmp_path):
    import subprocess
    import sys

    records = read_records(ours)
    trl = _write(ours.parent / "trl_dry.jsonl", [_as_trl(r, True) for r in records])
    tok = train_tokenizer(iter_texts(records), tmp_path / "spm", vocab_size=256)
    run = subprocess.run([sys.executable, "-m", "megatron_po.cli", "train", "--dry-run", "--world-size", "1",
                          "data.source=jsonl", f"data.train_path={trl}", f"data.tokenizer_path={tok}",
                          "train.global_batch_size=2", "train.micro_batch_size=2"], capture_output=True, text=True)
    assert run.returncode == 0, run.stderr
    assert f"data {trl}: 6 samples kept" in run.stdout
