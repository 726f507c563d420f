"""Preference records on disk: the JSONL schema, its validation, and image loading.

One JSON object per line (blank lines are skipped)::

    {"id": "train-00000",                 # str, non-empty, unique within the file
     "image": "images/train_00000.png",   # str: relative to the JSONL file's directory, or absolute
     "prompt": "What colour is the square?",
     "chosen": "The square is red.",      # str, non-empty
     "rejected": "The square is blue.",   # str, non-empty, != chosen
     "meta": {...},                       # optional object, carried through untouched
     "chosen_sentence_spans": [[0, 18]],  # optional: the sentences of `chosen` (ASPO)
     "chosen_sentence_similarity": [0.31]} # optional: one image-text score per sentence (ASPO)

``chosen_sentence_spans`` are character offsets into ``chosen``: sorted, contiguous, non-empty, covering the
whole string (whitespace between sentences belongs to one of them). Without them the sentences are those of
:func:`megatron_po.data.sentences.split_sentences`. ``chosen_sentence_similarity`` holds precomputed scores
(e.g. CLIP cosine of each sentence with the image), one finite number per sentence: its length must equal the
number of given spans or, without spans, the number of sentences the splitter finds — checked when the file is
read, so a splitter change that invalidates a file fails loudly. ``null`` means absent for both.

Other keys are ignored. Any problem raises :class:`RecordError` naming ``file:line`` and the field, before
training starts, rather than a shape error thousands of steps in. Images are decoded by PIL only: nothing in
the data path unpickles.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

from megatron_po.data.sentences import check_sentence_similarity, check_sentence_spans, split_sentences

REQUIRED_FIELDS: tuple[str, ...] = ("id", "image", "prompt", "chosen", "rejected")


class RecordError(ValueError):
    """A preference record (or its image) that cannot be used; the message says where and why."""


@dataclass
class PreferenceRecord:
    """One preference pair about one image."""

    id: str
    """Unique within its file."""
    image: str
    """Path as written in the file: relative to the file's directory (see :func:`resolve_image`) or absolute."""
    prompt: str
    chosen: str
    """The preferred response."""
    rejected: str
    """The dispreferred response."""
    meta: dict[str, Any] = field(default_factory=dict)
    """Free-form annotations (the synthetic set stores kind, hallucination type and the objects drawn)."""
    chosen_sentence_spans: list[tuple[int, int]] | None = None
    """Sentences of ``chosen`` as covering ``(start, end)`` character spans; None: split by
    :func:`megatron_po.data.sentences.split_sentences`."""
    chosen_sentence_similarity: list[float] | None = None
    """One precomputed image-text similarity per sentence of ``chosen`` (ASPO's S_i); None: not given."""

    def __post_init__(self):
        # records built in code get the same checks as records read from a file
        problem = _sentence_fields_problem(self.chosen, self.chosen_sentence_spans, self.chosen_sentence_similarity)
        if problem:
            raise RecordError(f"record {self.id!r}: {problem}")

    def sentence_spans(self) -> list[tuple[int, int]]:
        """The sentences of ``chosen``: the given spans, else the splitter's."""
        if self.chosen_sentence_spans is not None:
            return [(int(a), int(b)) for a, b in self.chosen_sentence_spans]
        return split_sentences(self.chosen)


def _sentence_fields_problem(chosen: str, spans: Any, similarity: Any) -> str:
    """What is wrong with the optional sentence fields of a record, naming the field ("" if nothing)."""
    if spans is not None:
        problem = check_sentence_spans(spans, len(chosen))
        if problem:
            return f"field 'chosen_sentence_spans' {problem}"
    if similarity is not None:
        num_sentences = len(spans) if spans is not None else len(split_sentences(chosen))
        problem = check_sentence_similarity(similarity, num_sentences)
        if problem:
            source = "given spans" if spans is not None else "sentence splitter"
            return f"field 'chosen_sentence_similarity' {problem} (from the {source})"
    return ""


def parse_object(line: str, where: str) -> dict:
    """One JSONL line -> its JSON object."""
    try:
        obj = json.loads(line)
    except json.JSONDecodeError as e:
        raise RecordError(f"{where}: invalid JSON ({e.msg} at column {e.colno})") from None
    except RecursionError:
        raise RecordError(f"{where}: JSON nested too deeply") from None
    if not isinstance(obj, dict):
        raise RecordError(f"{where}: expected a JSON object, got {type(obj).__name__}")
    return obj


def require_text(obj: dict, name: str, where: str, label: str = "") -> str:
    """The non-empty string field ``name`` of ``obj``; ``label`` names it in messages (e.g. 'focus.chosen')."""
    label = label or name
    if name not in obj:
        raise RecordError(f"{where}: missing field '{label}'")
    value = obj[name]
    if not isinstance(value, str):
        raise RecordError(f"{where}: field '{label}' must be a string, got {type(value).__name__}")
    if not value.strip():
        raise RecordError(f"{where}: field '{label}' is empty")
    return value


def parse_meta(obj: dict, where: str) -> dict:
    meta = obj.get("meta", {})
    if meta is None:
        return {}
    if not isinstance(meta, dict):
        raise RecordError(f"{where}: field 'meta' must be an object, got {type(meta).__name__}")
    return meta


def check_distinct(chosen: str, rejected: str, where: str, prefix: str = "") -> None:
    if chosen == rejected:
        # an identical pair has a zero preference margin by construction: it only dilutes the batch
        raise RecordError(f"{where}: fields '{prefix}chosen' and '{prefix}rejected' are identical")


def _parse_line(line: str, where: str) -> PreferenceRecord:
    obj = parse_object(line, where)
    for name in REQUIRED_FIELDS:
        require_text(obj, name, where)
    meta = parse_meta(obj, where)
    check_distinct(obj["chosen"], obj["rejected"], where)
    spans, similarity = obj.get("chosen_sentence_spans"), obj.get("chosen_sentence_similarity")
    problem = _sentence_fields_problem(obj["chosen"], spans, similarity)
    if problem:
        raise RecordError(f"{where}: {problem}")
    return PreferenceRecord(
        id=obj["id"], image=obj["image"], prompt=obj["prompt"], chosen=obj["chosen"], rejected=obj["rejected"],
        meta=meta,
        chosen_sentence_spans=None if spans is None else [(a, b) for a, b in spans],
        chosen_sentence_similarity=None if similarity is None else [float(x) for x in similarity],
    )


def read_jsonl(path: Path, parse: Callable[[str, str], Any]) -> list:
    """Parses every non-blank line of a JSONL file with ``parse(line, "path:line")``; ids must not repeat."""
    path = Path(path)
    records: list = []
    first_line_of_id: dict[str, int] = {}
    with path.open("rb") as f:  # bytes: a line that is not UTF-8 is named, not a bare UnicodeDecodeError
        for lineno, raw in enumerate(f, start=1):
            where = f"{path}:{lineno}"
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                raise RecordError(f"{where}: not UTF-8 text (byte {e.start} of the line: {raw[e.start:e.start + 1]!r})"
                                  ) from None
            if not line.strip():
                continue
            record = parse(line, where)
            if record.id in first_line_of_id:
                raise RecordError(f"{where}: field 'id' {record.id!r} repeats line {first_line_of_id[record.id]}")
            first_line_of_id[record.id] = lineno
            records.append(record)
    if not records:
        raise RecordError(f"{path}: no records (the file is empty or has blank lines only)")
    return records


def read_records(path: Path) -> list[PreferenceRecord]:
    """Reads and validates a preference JSONL file.

    Args:
        path: the JSONL file; relative image paths in it are relative to ``path.parent``.

    Returns:
        The records in file order.

    Raises:
        FileNotFoundError: ``path`` does not exist.
        RecordError: a line is not a JSON object, a required field is missing, empty or not a string, ``meta``
            is not an object, ``chosen == rejected``, an ``id`` repeats, ``chosen_sentence_spans`` do not cover
            ``chosen``, or ``chosen_sentence_similarity`` is not one finite number per sentence. The message starts with
            ``{path}:{line}`` (1-based).
    """
    return read_jsonl(path, _parse_line)


def iter_texts(records: Iterable[PreferenceRecord]) -> Iterator[str]:
    """Prompts and both responses of every record: the corpus to train a tokenizer on."""
    for r in records:
        yield r.prompt
        yield r.chosen
        yield r.rejected


def resolve_image(record: PreferenceRecord, image_root: Path) -> Path:
    """The record's image path; relative paths are taken relative to ``image_root`` (the JSONL's directory)."""
    p = Path(record.image)
    return p if p.is_absolute() else Path(image_root) / p


def image_size(path: Path) -> tuple[int, int]:
    """(width, height) from the file's header; a file PIL refuses (unreadable, a decompression bomb) is named.

    Raises:
        FileNotFoundError, RecordError: as `open_rgb`.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"image not found: {path}")
    try:
        with Image.open(path) as im:
            return im.size
    except (UnidentifiedImageError, Image.DecompressionBombError, OSError, ValueError) as e:
        raise RecordError(f"cannot read image {path}: {e}") from e


def open_rgb(path: Path) -> Image.Image:
    """Decodes an image file to an RGB PIL image at its own size.

    Raises:
        FileNotFoundError: ``path`` does not exist (the message names it).
        RecordError: PIL cannot decode the file (the message names it).
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"image not found: {path}")
    try:
        with Image.open(path) as im:
            return im.convert("RGB")
    except (UnidentifiedImageError, Image.DecompressionBombError, OSError, ValueError) as e:
        raise RecordError(f"cannot read image {path}: {e}") from e


def to_tensor(im: Image.Image, image_size: int) -> torch.Tensor:
    """RGB PIL image -> ``[3, image_size, image_size]`` float32 in ``[0, 1]`` (bicubic resize; aspect ratio is
    not kept)."""
    if im.size != (image_size, image_size):
        im = im.resize((image_size, image_size), Image.Resampling.BICUBIC)
    array = np.asarray(im, dtype=np.uint8)
    return torch.from_numpy(array.copy()).permute(2, 0, 1).float().div_(255.0)


def load_image(path: Path, image_size: int) -> torch.Tensor:
    """Loads an image as RGB and resizes it to a square.

    Args:
        path: any format PIL reads.
        image_size: output side in pixels (bicubic resize; aspect ratio is not kept).

    Returns:
        ``[3, image_size, image_size]`` float32 in ``[0, 1]``.

    Raises:
        FileNotFoundError: ``path`` does not exist (the message names it).
        RecordError: PIL cannot decode the file (the message names it).
    """
    return to_tensor(open_rgb(path), image_size)
