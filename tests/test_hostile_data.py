"""Broken and hostile data files fail before training starts, with a message that names the file and line or the
image path (issue 10): non-UTF-8 bytes, an empty file, JSON nested past the parser's depth, corrupt and
truncated images, decompression bombs, and image paths that leave the data directory."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from PIL import Image

from conftest import subprocess_env
from megatron_po.data.collate import CollateConfig
from megatron_po.data.dataset import PreferenceDataset
from megatron_po.data.fixed_images import FixedSizeImages
from megatron_po.data.records import RecordError, image_size, iter_texts, open_rgb, read_records
from megatron_po.data.synthetic import generate_synthetic_dataset
from megatron_po.data.tokenizer import Tokenizer, train_tokenizer


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> tuple[Path, Tokenizer]:
    out = tmp_path_factory.mktemp("hostile")
    generate_synthetic_dataset(out, num_train=6, num_eval=2, seed=1)
    tok = Tokenizer(train_tokenizer(iter_texts(read_records(out / "train.jsonl")), out / "spm", vocab_size=256))
    return out, tok


def _copy(data_dir: Path, dst: Path) -> Path:
    shutil.copytree(data_dir, dst)
    return dst / "train.jsonl"


def _dataset(path: Path, tok: Tokenizer, **kw) -> PreferenceDataset:
    return PreferenceDataset(read_records(path), path.parent, tok, CollateConfig(160, 16),
                             images=FixedSizeImages(32, 16), **kw)


@pytest.mark.pure
def test_non_utf8_line_is_named(data, tmp_path):
    path = _copy(data[0], tmp_path / "d")
    lines = path.read_bytes().splitlines(keepends=True)
    lines[2] = lines[2].replace(b"the", b"th\xff", 1)
    path.write_bytes(b"".join(lines))
    with pytest.raises(RecordError, match=rf"{path}:3: not UTF-8 text"):
        read_records(path)


@pytest.mark.pure
@pytest.mark.parametrize("content", ["", "\n  \n\t\n"])
def test_empty_file_says_so(tmp_path, content):
    path = tmp_path / "train.jsonl"
    path.write_text(content)
    with pytest.raises(RecordError, match=rf"{path}: no records \(the file is empty"):
        read_records(path)


@pytest.mark.pure
def test_deeply_nested_json_is_named(data, tmp_path):
    path = _copy(data[0], tmp_path / "d")
    with path.open("a") as f:
        f.write('{"id": "deep", "meta": ' + "[" * 100_000 + "]" * 100_000 + "}\n")
    with pytest.raises(RecordError, match=rf"{path}:7: JSON nested too deeply"):
        read_records(path)


@pytest.mark.pure
def test_truncated_and_corrupt_images_fail_at_preparation(data, tmp_path):
    path = _copy(data[0], tmp_path / "d")
    records = read_records(path)
    truncated = path.parent / records[1].image
    truncated.write_bytes(truncated.read_bytes()[:60])
    with pytest.raises(RecordError, match=rf"cannot read image {truncated}"):
        _dataset(path, data[1])
    truncated.write_bytes(b"not an image at all")
    with pytest.raises(RecordError, match=rf"cannot read image {truncated}"):
        _dataset(path, data[1])


@pytest.mark.pure
def test_decompression_bomb_names_its_path(tmp_path, monkeypatch):
    bomb = tmp_path / "bomb.png"
    Image.new("RGB", (200, 200)).save(bomb)
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 100)  # 40,000 pixels > 2 x the limit: PIL refuses
    for read in (image_size, open_rgb):
        with pytest.raises(RecordError, match=rf"cannot read image {bomb}: .*decompression bomb"):
            read(bomb)


@pytest.mark.pure
def test_images_outside_the_data_directory_are_refused(data, tmp_path):
    path = _copy(data[0], tmp_path / "d")
    outside = tmp_path / "elsewhere.png"
    Image.new("RGB", (32, 32)).save(outside)
    lines = path.read_text().splitlines()
    for i, image in ((0, str(outside)), (1, "../elsewhere.png")):
        record = json.loads(lines[i])
        record["image"] = image
        lines[i] = json.dumps(record)
        path.write_text("\n".join(lines) + "\n")
        with pytest.raises(RecordError, match="outside the data directory .*data.images_outside_root=true"):
            _dataset(path, data[1])
    assert len(_dataset(path, data[1], images_outside_root=True)) == 6


@pytest.mark.e2e
def test_dry_run_reads_the_data_and_names_a_broken_image(data, tmp_path):
    import subprocess
    import sys

    path = _copy(data[0], tmp_path / "d")
    common = [sys.executable, "-m", "megatron_po.cli", "train", "--dry-run", "--world-size", "1", "data.source=jsonl",
              f"data.train_path={path}", f"data.tokenizer_path={data[0] / 'spm.model'}", "train.global_batch_size=2",
              "train.micro_batch_size=2", "--json"]
    ok = subprocess.run(common[:-1], capture_output=True, text=True)
    assert ok.returncode == 0, ok.stderr
    assert f"data {path}: 6 samples kept, skipped: " in ok.stdout
    broken = path.parent / read_records(path)[3].image
    broken.write_bytes(b"\x89PNG\r\n")
    bad = subprocess.run(common[:-1], capture_output=True, text=True)
    assert bad.returncode == 2 and f"data error: cannot read image {broken}" in bad.stderr, bad.stderr
    assert "Traceback" not in bad.stderr


@pytest.mark.e2e
def test_torchrun_job_with_a_broken_image_says_so_once(data, tmp_path):
    """Under torchrun every rank finds the broken image while the data is prepared: the job prints one `data error:`
    line (rank 0) and exits non-zero, without a traceback from each rank."""
    import subprocess
    import sys

    path = _copy(data[0], tmp_path / "d")
    broken = path.parent / read_records(path)[2].image
    broken.write_bytes(b"GIF89a")
    run = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m", "megatron_po.train",
         f"output_dir={tmp_path / 'out'}", "data.source=jsonl", f"data.train_path={path}",
         f"data.tokenizer_path={data[0] / 'spm.model'}", "train.global_batch_size=2", "train.micro_batch_size=1"],
        capture_output=True, text=True, env=subprocess_env())
    assert run.returncode != 0
    errors = [ln for ln in run.stderr.splitlines() if "data error:" in ln]
    assert len(errors) == 1 and f"cannot read image {broken}" in errors[0], run.stderr[-3000:]
    # torchrun itself reports the failed job (with its own frames); no rank shows a traceback of ours
    assert 'megatron_po/' not in "".join(ln for ln in run.stderr.splitlines() if ln.lstrip().startswith("File "))
