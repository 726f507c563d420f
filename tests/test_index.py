"""The prepared index (data/index.py) and the lazy dataset over it: the same samples as records read eagerly, the
same result with one or several workers, what a stale index names, refusals with the messages of eager reading,
and (end to end) the same training metrics with or without the index and with or without loader workers."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from conftest import assert_metrics_equal, read_metrics, run_python, run_torchrun
from megatron_po.data.collate import CollateConfig, PairCollator
from megatron_po.data.dataset import PairRules, PreferenceDataset
from megatron_po.data.fixed_images import FixedSizeImages
from megatron_po.data.index import IndexRefused, SampleIndex, key_components, open_index, prepare_index
from megatron_po.data.records import RecordError, iter_texts, read_records
from megatron_po.data.sources import RecordReader, hashed_files, read_all, scan, split_files
from megatron_po.data.synthetic import generate_synthetic_dataset
from megatron_po.data.tokenizer import Tokenizer, train_tokenizer

IMAGES = FixedSizeImages(32, 16)


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """300 synthetic pairs (more than one 256-record task: the workers split the file) and a tokenizer."""
    root = tmp_path_factory.mktemp("index_data")
    generate_synthetic_dataset(root, 300, 8, seed=3)
    train_tokenizer(list(iter_texts(read_records(root / "train.jsonl"))), root / "tok", vocab_size=300, seed=0)
    return root, Tokenizer(root / "tok.model")


def _rules(root: Path, tok, max_length: int = 64) -> PairRules:
    return PairRules(PairCollator(tok, CollateConfig(max_length, 16), IMAGES), IMAGES, root, source=root)


def _components(root: Path, path: Path, tok, **settings) -> dict:
    files = split_files(path)
    return key_components(files, hashed_files(path, files), root, tok.files, {"max_length": 64, **settings})


def _prepare(root, tok, path, workers=1, max_length=64):
    files = split_files(path)
    return prepare_index(_rules(root, tok, max_length), files, _components(root, path, tok), root, workers)



@pytest.mark.pure
def test_lazy_dataset_equals_records_read_eagerly_and_workers_change_nothing(data, tmp_path):
    root, tok = data
    path = root / "train.jsonl"
    one, two = _prepare(root, tok, path, 1, max_length=48), _prepare(root, tok, path, 2, max_length=48)
    for name in ("ids", "reason", "rows", "image_tokens", "image_files"):
        assert np.array_equal(getattr(one, name), getattr(two, name)), name
    assert one.components == two.components and one.skipped()["too_long"] > 0  # some pairs do not fit 48 tokens
    eager = PreferenceDataset(read_records(path), root, tok, CollateConfig(48, 16), IMAGES)
    one.save(tmp_path / "idx")
    loaded = SampleIndex.load(tmp_path / "idx", SampleIndex.read_manifest(tmp_path / "idx"))
    lazy = PreferenceDataset.indexed(_rules(root, tok, 48), loaded, path, [path])
    assert len(lazy) == len(eager) and lazy.ids == eager.ids and lazy.skipped == eager.skipped
    assert [lazy.cost(i) for i in range(len(lazy))] == [eager.collator.num_tokens(r) for r in eager.records]
    for i in (0, 7, len(lazy) - 1):
        (a, pa), (b, pb) = lazy[i], eager[i]
        assert a == b and (pa["pixel_values"] == pb["pixel_values"]).all()
    assert isinstance(loaded.ids, np.memmap) and isinstance(loaded.units.offset, np.memmap)  # nothing copied in


@pytest.mark.pure
def test_units_read_any_record_alone_in_every_format(tmp_path, data):
    """Byte offsets of JSON lines (blank lines, multi-byte text), MPO's repeat copies and JSON arrays: a record read
    alone equals the same record read with all the others."""
    root, _ = data
    lines = (root / "train.jsonl").read_text().splitlines()[:5]
    (tmp_path / "images").symlink_to(root / "images")
    ours = tmp_path / "ours.jsonl"
    ours.write_text("\n\n".join(lines[:2]) + "\n\n" + lines[2].replace("image", "imäge ✓", 1).replace(
        '"imäge ✓"', '"image"') + "\n" + "\n".join(lines[3:]) + "\n")
    trl = tmp_path / "trl.json"
    trl.write_text(json.dumps([{"prompt": "Q" + str(i), "chosen": "a", "rejected": "b",
                                "images": [json.loads(x)["image"]]} for i, x in enumerate(lines)]))
    ann = tmp_path / "ann.jsonl"
    ann.write_text("\n".join(json.dumps({"image": json.loads(x)["image"], "question": "<image>\nQ" + str(i),
                                         "chosen": "a", "rejected": "b"}) for i, x in enumerate(lines)) + "\n")
    meta = tmp_path / "meta.json"
    meta.write_text(json.dumps({"d": {"root": str(tmp_path), "annotation": "ann.jsonl", "repeat_time": 2}}))
    for path in (ours, trl, meta):
        files = split_files(path)
        units, reader = scan(files), RecordReader(files)
        eager = read_all(path)
        assert [reader.read(units, u) for u in reversed(range(len(units)))] == eager[::-1], path.name
    assert [r.id for r in read_all(meta)][-1] == "d/line-5#1"  # the second copy of the last line


@pytest.mark.pure
def test_a_bad_record_is_named_by_file_and_line_whichever_worker_finds_it(data):
    root, tok = data
    lines = (root / "train.jsonl").read_text().splitlines()
    bad = root / "bad.jsonl"  # beside the images: they stay inside the data directory
    bad.write_text("\n".join(lines[:270] + ['{"id": "x", "image": "images/train_00000.png"'] + lines[270:]) + "\n")
    for workers in (1, 2):
        with pytest.raises(RecordError, match=rf"{bad}:271: invalid JSON"):
            _prepare(root, tok, bad, workers)
    dup = root / "dup.jsonl"
    dup.write_text("\n".join(lines[:280] + [lines[3]]) + "\n")  # the copy is in the second worker's share
    with pytest.raises(RecordError, match=rf"{dup}:281: field 'id' 'train-00003' repeats line 4"):
        _prepare(root, tok, dup, 2)
    missing = root / "missing.jsonl"
    missing.write_text("\n".join(lines[:260] + [lines[260].replace("train_00260", "nowhere")]) + "\n")
    with pytest.raises(FileNotFoundError, match="nowhere.png"):
        _prepare(root, tok, missing, 2)


@pytest.mark.pure
def test_a_stale_index_names_what_changed_and_require_refuses_it(data, tmp_path):
    root, tok = data
    work = tmp_path / "d"
    work.mkdir()
    lines = (root / "train.jsonl").read_text().splitlines()[:20]
    path = work / "train.jsonl"
    path.write_text("\n".join(lines) + "\n")
    (work / "images").mkdir()
    for line in lines:
        name = json.loads(line)["image"]
        (work / name).write_bytes((root / name).read_bytes())
    where, logged = tmp_path / "idx", []

    def open_(mode="auto", **settings):
        return open_index(where, _rules(work, tok), split_files(path), _components(work, path, tok, **settings),
                          work, mode, log=logged.append)

    with pytest.raises(IndexRefused, match="no prepared index"):
        open_("require")
    first = open_()
    assert "no prepared index" in logged[-1] and len(first) == 20
    open_("require")  # valid now: loaded, nothing logged
    assert len(logged) == 1
    image = work / json.loads(lines[4])["image"]
    Image.new("RGB", (32, 32), (9, 9, 9)).save(image)
    with pytest.raises(IndexRefused, match=r"stale — images \(20 files: path, size, mtime\): index [0-9a-f]{12}…"):
        open_("require")
    path.write_text("\n".join(lines[:19]) + "\n")
    with pytest.raises(IndexRefused) as e:
        open_("require", max_length=65)
    assert "data file train.jsonl" in str(e.value) and "setting max_length: index 64, now 65" in str(e.value)
    assert len(open_()) == 19 and "stale" in logged[-1]  # auto: prepared again, the change named
    image.unlink()
    with pytest.raises(FileNotFoundError, match=str(image)):  # a vanished image: found at launch, named
        open_()


@pytest.mark.e2e
def test_training_is_the_same_with_or_without_index_and_workers(tmp_path):
    """One run prepares its index at launch and loads with 2 workers; the other uses an index from `prepare-data`
    (data.index=require) and loads inline. Every metric is identical."""
    common = ["train.progress_bar=false", "data.num_train=32", "train.train_steps=3", "train.global_batch_size=4",
              "train.micro_batch_size=2", "checkpoint.save=false", "data.packing=true", "eval.interval=2",
              "data.num_eval=8", "eval.probe_images=4"]
    a, b = tmp_path / "a", tmp_path / "b"
    run_torchrun(["-m", "megatron_po.train", f"output_dir={a}", "data.num_workers=2", *common])
    out = run_python(["-m", "megatron_po.cli", "prepare-data", f"output_dir={b}", "--workers", "2", *common])
    summary, _ = json.JSONDecoder().raw_decode(out[out.index('{\n "index_dir"'):])  # logs around it
    assert summary["splits"]["train"]["records"] == 32 and set(summary["splits"]) == {"train", "eval", "probe"}
    log = run_torchrun(["-m", "megatron_po.train", f"output_dir={b}", "data.num_workers=0", "data.index=require",
                        *common])
    assert "preparing" not in log
    ma, mb = read_metrics(a), read_metrics(b)
    assert_metrics_equal(ma, mb)
    assert all("time/data_wait" in m for m in ma if m["step"] > 0)
    for run in (a, b):  # one index per split, named by split and a tag of its data path and settings
        assert sorted(name.split("-")[0] for name in os.listdir(run / "data_index")) == ["eval", "probe", "train"]
