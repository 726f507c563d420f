"""Preference data in the formats users hold, read unchanged into `PreferenceRecord`s (`data.format`).

- ``jsonl``: ours (data/records.py): ``id``, ``image`` (a path or a list), ``prompt``, ``chosen``, ``rejected``.
- ``trl``: TRL's preference data as `DPOTrainer` takes it, in JSON lines or a JSON array: ``prompt`` / ``chosen`` /
  ``rejected`` as strings or conversational message lists (``[{"role": "user", "content": [{"type": "image"},
  {"type": "text", "text": ...}]}]``), ``images`` a list of paths relative to the file. Image parts place their
  images in the prompt (interleaved, as the chat template lays them out); a string prompt has its images first. A
  record without an id takes its line number (``line-17``), stable while the file is.
- ``mpo``: InternVL's MPO / MMPR data. A meta JSON file names datasets, each ``{"root": image dir, "annotation":
  jsonl file, "repeat_time": 1}`` (relative paths are relative to the meta file); an annotation line is
  ``{"image": path or list, "question": ..., "chosen": ..., "rejected": ...}``, its ``<image>`` placeholders
  marking where the images go. An annotation file alone is read with its own directory as the image root. Ids
  are ``<dataset>/line-N`` (or ``<dataset>/<id>``), so datasets never collide.
- ``hf``: a Hugging Face dataset on disk (a ``save_to_disk`` directory, or a parquet / arrow file) through the
  ``datasets`` library (the ``[data]`` extra): TRL columns (``prompt``, ``chosen``, ``rejected``, ``images``) or
  MPO / RLAIF-V columns (``question``, ``chosen``, ``rejected``, ``image``); images embedded as bytes (read
  without copying them out) or as paths. Row ids are the ``id`` column or ``row-N``.
- ``auto``: decided by the path (a directory, ``.parquet``, ``.arrow``: hf; a meta JSON: mpo) or the first
  record's keys; anything else is an error that says what it saw.

Every problem names ``file:line`` (``file row N`` for a dataset); nothing is evaluated or unpickled. This module
parses one record; data/sources.py finds the records of a file and reads them, eagerly or one at a time.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Callable

from megatron_po.data.records import (EmbeddedImage, PreferenceRecord, RecordError, check_distinct,
                                      parse_image_field, parse_meta, parse_object, require_text)

FORMATS = ("auto", "jsonl", "trl", "mpo", "hf")
HF_SUFFIXES = (".parquet", ".arrow")
MPO_PLACEHOLDER = re.compile(r"<image>\n?")
"""InternVL's image placeholder in a question, with the newline its template writes after the image."""


# ------------------------------------------------------------------------------------------------ TRL


def _text_of(value, field: str, where: str, role: str) -> tuple[str, list[int]]:
    """(text, character offset of each image part) of a TRL field: a string, or one turn of messages."""
    if isinstance(value, str):
        return value, []
    if not isinstance(value, list) or not value:
        raise RecordError(f"{where}: field '{field}' must be a string or a non-empty list of messages")
    text, offsets = "", []
    for m in value:
        if not isinstance(m, dict) or m.get("role") not in (role, "system"):
            raise RecordError(f"{where}: field '{field}': messages must be {{'role': '{role}', 'content': ...}} "
                              f"(one turn; multi-turn conversations are not supported), got {m!r:.80}")
        if m["role"] == "system":
            raise RecordError(f"{where}: field '{field}': system messages are not supported (the family's chat "
                              "template supplies its default system prompt)")
        content = m.get("content")
        parts = [{"type": "text", "text": content}] if isinstance(content, str) else content
        if not isinstance(parts, list):
            raise RecordError(f"{where}: field '{field}': message content must be a string or a list of parts")
        for part in parts:
            kind = part.get("type") if isinstance(part, dict) else None
            if kind == "text" and isinstance(part.get("text"), str):
                text += part["text"]
            elif kind == "image":
                offsets.append(len(text))
            else:
                raise RecordError(f"{where}: field '{field}': unsupported content part {part!r:.80}")
    return text, offsets


def _image_offsets(offsets: list[int], num_images: int, where: str, what: str) -> list[int] | None:
    """Placement of the images: where the placeholders are, or None (all first) without placeholders."""
    if not offsets:
        return None
    if len(offsets) != num_images:
        raise RecordError(f"{where}: the prompt has {len(offsets)} {what} for {num_images} image(s)")
    return offsets


def trl_record(obj: dict, where: str, default_id: str) -> PreferenceRecord:
    """A TRL preference record (a JSON object, or a dataset row with its images decoded to sources)."""
    for name in ("prompt", "chosen", "rejected"):
        if name not in obj:
            raise RecordError(f"{where}: missing field '{name}' (TRL preference format)")
    prompt, offsets = _text_of(obj["prompt"], "prompt", where, "user")
    chosen, _ = _text_of(obj["chosen"], "chosen", where, "assistant")
    rejected, _ = _text_of(obj["rejected"], "rejected", where, "assistant")
    for name, text in (("prompt", prompt), ("chosen", chosen), ("rejected", rejected)):
        if not text.strip():
            raise RecordError(f"{where}: field '{name}' is empty")
    field = "images" if "images" in obj else "image"
    if field not in obj:
        raise RecordError(f"{where}: no 'images' field (a preference pair needs an image)")
    images = parse_image_field(obj[field], where, field)
    check_distinct(chosen, rejected, where)
    return PreferenceRecord(id=str(obj.get("id", default_id)), image=images, prompt=prompt, chosen=chosen,
                            rejected=rejected, image_offsets=_image_offsets(offsets, len(images), where,
                                                                            "image parts"))


def parse_trl_line(line: str, where: str) -> PreferenceRecord:
    return trl_record(parse_object(line, where), where, f"line-{where.rsplit(':', 1)[1]}")


# ------------------------------------------------------------------------------------------------ MPO


def mpo_record(obj: dict, where: str, record_id: str, image_root: str | None = None) -> PreferenceRecord:
    """An MPO / MMPR annotation record (or a dataset row in its columns); `<image>` marks where images go."""
    question = require_text(obj, "question", where)
    chosen, rejected = require_text(obj, "chosen", where), require_text(obj, "rejected", where)
    if "image" not in obj:
        raise RecordError(f"{where}: no 'image' field (a preference pair needs an image)")
    images = parse_image_field(obj["image"], where, "image")
    prompt, offsets, last = "", [], 0
    for m in MPO_PLACEHOLDER.finditer(question):
        prompt += question[last:m.start()]
        offsets.append(len(prompt))
        last = m.end()
    prompt += question[last:]
    if not prompt.strip():
        raise RecordError(f"{where}: field 'question' has no text besides its <image> placeholders")
    check_distinct(chosen, rejected, where)
    return PreferenceRecord(id=record_id, image=images, prompt=prompt, chosen=chosen,
                            rejected=rejected, meta=parse_meta(obj, where), image_root=image_root,
                            image_offsets=_image_offsets(offsets, len(images), where, "<image> placeholders"))


def _first_byte(path: Path) -> bytes:
    """The first non-whitespace byte of a file (b"" if none), without reading the whole of it."""
    with Path(path).open("rb") as f:
        while chunk := f.read(1 << 16):
            if chunk.strip():
                return chunk.lstrip()[:1]
    return b""


def _mpo_meta(path: Path) -> dict | None:
    """The meta file's datasets if `path` is one (a JSON object of objects with 'annotation'), else None."""
    if _first_byte(path) != b"{":  # a JSON array (TRL's .json) is never parsed twice to find out
        return None
    try:
        obj = json.loads(path.read_bytes())
    except (json.JSONDecodeError, UnicodeDecodeError, RecursionError):
        return None
    if isinstance(obj, dict) and obj and all(isinstance(v, dict) and "annotation" in v for v in obj.values()):
        return obj
    return None


# ------------------------------------------------------------------------------------ Hugging Face datasets


def _load_hf(path: Path):
    try:
        import datasets
    except ImportError:
        raise RecordError(f"{path}: data.format=hf reads Hugging Face datasets with the `datasets` library: "
                          "pip install -e '.[data]'") from None
    datasets.disable_progress_bars()
    if path.is_dir():
        ds = datasets.load_from_disk(str(path))
        if isinstance(ds, datasets.DatasetDict):
            raise RecordError(f"{path}: a DatasetDict with splits {sorted(ds)}: point data.train_path at one "
                              "split's directory")
    elif path.suffix == ".parquet":
        ds = datasets.Dataset.from_parquet(str(path), keep_in_memory=True)
    else:
        ds = datasets.Dataset.from_file(str(path))  # memory-mapped: rows are read as they are used
    # image columns as their stored bytes or paths: decoded once, by us, when the dataset is built
    for name, feature in ds.features.items():
        if isinstance(feature, datasets.Image):
            ds = ds.cast_column(name, datasets.Image(decode=False))
        elif isinstance(getattr(feature, "feature", None), datasets.Image):
            ds = ds.cast_column(name, type(feature)(datasets.Image(decode=False)))
    return ds


def _hf_image(value, where: str):
    if isinstance(value, dict) and ("bytes" in value or "path" in value):
        if value.get("bytes"):
            return EmbeddedImage(value["bytes"], where)
        if value.get("path"):
            return value["path"]
        raise RecordError(f"{where}: the image has neither bytes nor a path")
    return value


def hf_row(ds, i: int, where: str) -> PreferenceRecord:
    """Row `i` of a Hugging Face dataset with TRL or MPO / RLAIF-V columns, its images as bytes or paths."""
    columns = set(ds.column_names)
    if {"prompt", "chosen", "rejected"} <= columns:
        make: Callable = trl_record
    elif {"question", "chosen", "rejected"} <= columns:
        make = mpo_record
    else:
        raise RecordError(f"{where.rsplit(' row ', 1)[0]}: columns {sorted(columns)} are neither TRL's (prompt, "
                          "chosen, rejected, images) nor MPO's (question, chosen, rejected, image)")
    row = ds[i]
    for field in ("image", "images"):
        if field in row:
            value = row[field]
            row[field] = ([_hf_image(v, f"{where} image {k}") for k, v in enumerate(value)]
                          if isinstance(value, list) else _hf_image(value, f"{where} image 0"))
    return make(row, where, str(row.get("id", f"row-{i}")))


# ------------------------------------------------------------------------------------------------ dispatch


def detect_format(path: Path) -> str:
    """The format of `path` (see the module docstring); an error naming what was seen otherwise."""
    path = Path(path)
    if path.is_dir() or path.suffix in HF_SUFFIXES:
        return "hf"
    if path.suffix == ".json" and _mpo_meta(path) is not None:
        return "mpo"
    if _first_byte(path) == b"[":
        return "trl"  # a JSON array: TRL's json files
    with path.open("rb") as f:
        for lineno, raw in enumerate(f, start=1):
            if raw.strip():
                try:
                    obj = json.loads(raw)
                except (json.JSONDecodeError, UnicodeDecodeError, RecursionError):
                    break  # the reader names the problem
                keys = set(obj) if isinstance(obj, dict) else set()
                if {"id", "image", "prompt", "chosen", "rejected"} <= keys and isinstance(obj["prompt"], str):
                    return "jsonl"
                if {"prompt", "chosen", "rejected"} <= keys:
                    return "trl"
                if {"question", "chosen", "rejected"} <= keys:
                    return "mpo"
                raise RecordError(f"{path}:{lineno}: data.format=auto: keys {sorted(keys)} are neither ours (id, "
                                  "image, prompt, chosen, rejected), TRL's (prompt, chosen, rejected, images) nor "
                                  "MPO's (question, chosen, rejected, image)")
    return "jsonl"
