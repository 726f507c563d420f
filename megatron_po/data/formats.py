"""Preference files in the formats users hold, read unchanged into `PreferenceRecord`s (`data.format`).

- ``jsonl``: ours (data/records.py): ``id``, ``image``, ``prompt``, ``chosen``, ``rejected``.
- ``trl``: TRL's preference JSONL, as `DPOTrainer` takes it: ``prompt`` / ``chosen`` / ``rejected`` as strings or
  conversational message lists (``[{"role": "user", "content": [{"type": "image"}, {"type": "text", "text":
  ...}]}]``), ``images`` a list of paths (relative to the file). A record has no id in TRL: its line number is
  its id (``line-17``), stable while the file is.
- ``auto``: decided by the first record's keys; anything else is an error that says what it saw.

Every problem names ``file:line``. One image per prompt so far (the collator lays out one image per pair): a
record with several is refused with that reason rather than trained on with one of them.
"""

from __future__ import annotations

import json
from pathlib import Path

from megatron_po.data.records import (PreferenceRecord, RecordError, check_distinct, parse_object, read_jsonl,
                                      read_records)

FORMATS = ("auto", "jsonl", "trl")


def _text_of(value, field: str, where: str, role: str) -> tuple[str, int]:
    """(text, image placeholders) of a TRL field: a string, or a message list whose messages have `role`."""
    if isinstance(value, str):
        return value, 0
    if not isinstance(value, list) or not value:
        raise RecordError(f"{where}: field '{field}' must be a string or a non-empty list of messages")
    texts, images = [], 0
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
                texts.append(part["text"])
            elif kind == "image":
                images += 1
            else:
                raise RecordError(f"{where}: field '{field}': unsupported content part {part!r:.80}")
    return "".join(texts), images


def parse_trl_line(line: str, where: str) -> PreferenceRecord:
    obj = parse_object(line, where)
    for name in ("prompt", "chosen", "rejected"):
        if name not in obj:
            raise RecordError(f"{where}: missing field '{name}' (TRL preference format)")
    prompt, placeholders = _text_of(obj["prompt"], "prompt", where, "user")
    chosen, _ = _text_of(obj["chosen"], "chosen", where, "assistant")
    rejected, _ = _text_of(obj["rejected"], "rejected", where, "assistant")
    for name, text in (("prompt", prompt), ("chosen", chosen), ("rejected", rejected)):
        if not text.strip():
            raise RecordError(f"{where}: field '{name}' is empty")
    images = obj.get("images", [obj["image"]] if "image" in obj else [])
    if not isinstance(images, list) or not all(isinstance(p, str) for p in images):
        raise RecordError(f"{where}: field 'images' must be a list of image paths (embedded image bytes: use a "
                          "Hugging Face dataset directory)")
    if len(images) != 1:
        raise RecordError(f"{where}: {len(images)} images: one image per prompt is supported so far")
    if placeholders not in (0, 1):
        raise RecordError(f"{where}: the prompt has {placeholders} image placeholders for 1 image")
    check_distinct(chosen, rejected, where)
    return PreferenceRecord(id=str(obj.get("id", f"line-{where.rsplit(':', 1)[1]}")), image=images[0],
                            prompt=prompt, chosen=chosen, rejected=rejected)


def detect_format(path: Path) -> str:
    """`jsonl` (ours) or `trl`, from the first record's keys; an error naming what was seen otherwise."""
    with Path(path).open("rb") as f:
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
                raise RecordError(f"{path}:{lineno}: data.format=auto: keys {sorted(keys)} are neither ours (id, "
                                  "image, prompt, chosen, rejected) nor TRL's (prompt, chosen, rejected, images)")
    return "jsonl"


def read_preference_file(path: Path, fmt: str = "auto") -> list[PreferenceRecord]:
    """The records of a preference file in `fmt` (see the module docstring)."""
    if fmt not in FORMATS:
        raise ValueError(f"data.format must be one of {FORMATS}, got {fmt!r}")
    if fmt == "auto":
        fmt = detect_format(path)
    return read_records(path) if fmt == "jsonl" else read_jsonl(path, parse_trl_line)
