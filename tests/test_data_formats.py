"""Preference data in TRL's format, read unchanged (data.format=trl|auto): string and conversational records give
the records our own format gives; what is not supported yet is refused naming file:line."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from megatron_po.data.formats import read_preference_file
from megatron_po.data.records import RecordError, read_records
from megatron_po.data.synthetic import generate_synthetic_dataset


@pytest.fixture(scope="module")
def ours(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("ours")
    generate_synthetic_dataset(out, num_train=6, num_eval=2, seed=2)
    return out / "train.jsonl"


def _write(path: Path, objs: list) -> Path:
    path.write_text("".join(json.dumps(o) + "\n" for o in objs))
    return path


def _as_trl(record, conversational: bool) -> dict:
    if not conversational:
        return {"prompt": record.prompt, "chosen": record.chosen, "rejected": record.rejected,
                "images": [record.image]}
    return {"prompt": [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": record.prompt}]}],
            "chosen": [{"role": "assistant", "content": [{"type": "text", "text": record.chosen}]}],
            "rejected": [{"role": "assistant", "content": record.rejected}],
            "images": [record.image]}


@pytest.mark.parametrize("conversational", [False, True])
@pytest.mark.parametrize("fmt", ["auto", "trl"])
def test_trl_records_read_like_ours(ours, conversational, fmt):
    records = read_records(ours)
    trl = _write(ours.parent / f"trl_{conversational}.jsonl", [_as_trl(r, conversational) for r in records])
    got = read_preference_file(trl, fmt)
    assert [(r.image, r.prompt, r.chosen, r.rejected) for r in got] == [
        (r.image, r.prompt, r.chosen, r.rejected) for r in records]
    assert [r.id for r in got] == [f"line-{i}" for i in range(1, len(records) + 1)]
    assert read_preference_file(ours, "auto") == records  # ours still auto-detected as ours


@pytest.mark.parametrize("change, message", [
    ({"images": ["a.png", "b.png"]}, "2 images: one image per prompt is supported so far"),
    ({"images": [{"bytes": "..."}]}, "field 'images' must be a list of image paths"),
    ({"prompt": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]}, "multi-turn"),
    ({"chosen": "same", "rejected": "same"}, "identical"),
])
def test_unsupported_trl_records_name_file_and_line(ours, tmp_path, change, message):
    good = _as_trl(read_records(ours)[0], conversational=False)
    path = _write(tmp_path / "trl.jsonl", [good, dict(good, **change)])
    with pytest.raises(RecordError, match=rf"{path}:2: .*{message}"):
        read_preference_file(path, "trl")


def test_auto_names_what_it_saw(tmp_path):
    path = _write(tmp_path / "x.jsonl", [{"question": "q", "answer": "a"}])
    with pytest.raises(RecordError, match=rf"{path}:1: data.format=auto: keys \['answer', 'question'\]"):
        read_preference_file(path)


def test_dry_run_reads_a_trl_file(ours, tmp_path):
    import subprocess
    import sys

    from megatron_po.data.records import iter_texts
    from megatron_po.data.tokenizer import train_tokenizer

    records = read_records(ours)
    trl = _write(ours.parent / "trl_dry.jsonl", [_as_trl(r, True) for r in records])
    tok = train_tokenizer(iter_texts(records), tmp_path / "spm", vocab_size=256)
    run = subprocess.run([sys.executable, "-m", "megatron_po.cli", "train", "--dry-run", "--world-size", "1",
                          "data.source=jsonl", f"data.train_path={trl}", f"data.tokenizer_path={tok}",
                          "train.global_batch_size=2", "train.micro_batch_size=2"], capture_output=True, text=True)
    assert run.returncode == 0, run.stderr
    assert f"data {trl}: 6 samples kept" in run.stdout
