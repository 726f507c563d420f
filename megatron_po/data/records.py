"""Preference records on disk: the JSONL schema, its validation, and image loading.

One JSON object per line (blank lines are skipped)::

    {"id": "train-00000",                 # str, non-empty, unique within the file
     "image": "images/train_00000.png",   # str: relative to the JSONL file's directory, or absolute; or a
                                          # non-empty list of them (several images, shown before the prompt)
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

import io
import json
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Union

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

from megatron_po.data.image_ops import to_rgb
from megatron_po.data.sentences import check_sentence_similarity, check_sentence_spans, split_sentences

REQUIRED_FIELDS: tuple[str, ...] = ("id", "image", "prompt", "chosen", "rejected")


class RecordError(ValueError):
    """A preference record (or its image) that cannot be used; the message says where and why."""


@dataclass(frozen=True)
class EmbeddedImage:
    """An image stored in the data file itself (a Hugging Face dataset's image bytes), named for messages."""

    data: bytes
    name: str
    """Where it comes from, e.g. ``train.parquet row 17 image 0``."""

    def __str__(self) -> str:
        return self.name


ImageSource = Union[str, EmbeddedImage]
"""An image as a record names it: a path (relative to the record's image root, or absolute) or the bytes."""
ImageFile = Union[Path, EmbeddedImage]
"""An image resolved for reading: a file path, or the bytes."""


@dataclass
class PreferenceRecord:
    """One preference pair about one image, or several (shown in order: before the prompt, or at
    ``image_offsets``)."""

    id: str
    """Unique within its file."""
    image: ImageSource | list[ImageSource]
    """As written in the file: a path relative to the image root (see :func:`resolve_image`) or absolute,
    embedded bytes, or a non-empty list of these."""
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
    image_offsets: list[int] | None = None
    """Where each image sits in ``prompt`` (character offsets, non-decreasing): the chat template places the image
    there, as an interleaved message does. None: every image before the prompt text."""
    image_root: str | None = None
    """Directory of this record's relative image paths (an MPO meta file's per-dataset ``root``). None: the data
    file's directory."""

    def __post_init__(self):
        # records built in code get the same checks as records read from a file
        problem = _sentence_fields_problem(self.chosen, self.chosen_sentence_spans, self.chosen_sentence_similarity)
        if not problem and not self.images:
            problem = "no image"
        offsets = self.image_offsets
        if not problem and offsets is not None and (
                len(offsets) != len(self.images) or any(not 0 <= a <= b <= len(self.prompt)
                                                        for a, b in zip(offsets, offsets[1:] + [len(self.prompt)]))):
            problem = f"image_offsets {offsets} are not {len(self.images)} ordered offsets into the prompt"
        if problem:
            raise RecordError(f"record {self.id!r}: {problem}")

    @property
    def images(self) -> list[ImageSource]:
        """The record's images in order (one or more)."""
        return list(self.image) if isinstance(self.image, (list, tuple)) else [self.image]

    def sentence_spans(self) -> list[tuple[int, int]]:
        """The sentences of ``chosen``: the given spans, else the splitter's."""
        if self.chosen_sentence_spans is not None:
            return [(int(a), int(b)) for a, b in self.chosen_sentence_spans]
        return split_sentences(self.chosen)


def prompt_parts(prompt: str, num_images: int, image_offsets=None) -> list[str]:
    """The prompt cut at its images: ``num_images + 1`` texts, image k between parts k and k + 1 (every image
    before the text when ``image_offsets`` is None)."""
    cuts = [0, *(image_offsets if image_offsets is not None else [0] * num_images), len(prompt)]
    return [prompt[a:b] for a, b in zip(cuts, cuts[1:])]


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


def parse_image_field(value: Any, where: str, name: str) -> list[ImageSource]:
    """A record's image field (ours, TRL's ``images``, MPO's ``image``, a dataset's column): an image (a non-empty
    path, or embedded bytes) or a non-empty list of them."""
    images = value if isinstance(value, list) else [value]
    if not images or not all(isinstance(p, EmbeddedImage) or (isinstance(p, str) and p.strip()) for p in images):
        raise RecordError(f"{where}: field '{name}' must be an image path or a non-empty list of images, got "
                          f"{value!r:.80}")
    return images


def parse_line(line: str, where: str) -> PreferenceRecord:
    """One line of our JSONL schema -> its record (the message of any problem starts with `where`)."""
    obj = parse_object(line, where)
    images = parse_image_field(obj.get("image"), where, "image")
    for name in REQUIRED_FIELDS:
        if name != "image":
            require_text(obj, name, where)
    meta = parse_meta(obj, where)
    check_distinct(obj["chosen"], obj["rejected"], where)
    spans, similarity = obj.get("chosen_sentence_spans"), obj.get("chosen_sentence_similarity")
    problem = _sentence_fields_problem(obj["chosen"], spans, similarity)
    if problem:
        raise RecordError(f"{where}: {problem}")
    return PreferenceRecord(
        id=obj["id"], image=images[0] if isinstance(obj["image"], str) else images, prompt=obj["prompt"],
        chosen=obj["chosen"], rejected=obj["rejected"],
        meta=meta,
        chosen_sentence_spans=None if spans is None else [(a, b) for a, b in spans],
        chosen_sentence_similarity=None if similarity is None else [float(x) for x in similarity],
    )


def collect_records(parsed: Iterable[tuple[str, int, Any]], path: Path, unit: str, empty: str) -> list:
    """The records of ``(where, position, record)`` in order: an id that repeats names both places (``unit`` N),
    none at all is an error saying ``empty``."""
    records: list = []
    first: dict[str, int] = {}
    for where, position, record in parsed:
        if record.id in first:
            raise RecordError(f"{where}: field 'id' {record.id!r} repeats {unit} {first[record.id]}")
        first[record.id] = position
        records.append(record)
    if not records:
        raise RecordError(f"{path}: no records ({empty})")
    return records


def decode_line(raw: bytes, where: str) -> str:
    """A JSON line's text; a line that is not UTF-8 is named, not a bare UnicodeDecodeError."""
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise RecordError(f"{where}: not UTF-8 text (byte {e.start} of the line: {raw[e.start:e.start + 1]!r})") from None


def read_jsonl(path: Path, parse: Callable[[str, str], Any]) -> list:
    """Parses every non-blank line of a JSONL file with ``parse(line, "path:line")``; ids must not repeat."""
    path = Path(path)

    def parsed():
        with path.open("rb") as f:  # bytes: a line that is not UTF-8 is named, not a bare UnicodeDecodeError
            for lineno, raw in enumerate(f, start=1):
                where = f"{path}:{lineno}"
                line = decode_line(raw, where)
                if line.strip():
                    yield where, lineno, parse(line, where)

    return collect_records(parsed(), path, "line", "the file is empty or has blank lines only")


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
    return read_jsonl(path, parse_line)


def iter_texts(records: Iterable[PreferenceRecord]) -> Iterator[str]:
    """Prompts and both responses of every record: the corpus to train a tokenizer on."""
    for r in records:
        yield r.prompt
        yield r.chosen
        yield r.rejected


def record_image_root(record: PreferenceRecord, data_root: Path) -> Path:
    """The directory the record's relative image paths are relative to (and must stay inside)."""
    return Path(record.image_root) if record.image_root is not None else Path(data_root)


def resolve_path(path: str | Path, root: Path) -> Path:
    """`path` as written in a data file: absolute, or relative to `root`."""
    return Path(path) if Path(path).is_absolute() else Path(root) / path


def resolve_images(record: PreferenceRecord, data_root: Path) -> list[ImageFile]:
    """The record's images, relative paths taken relative to its image root (default ``data_root``, the data
    file's directory); embedded images as they are."""
    root = record_image_root(record, data_root)
    return [src if isinstance(src, EmbeddedImage) else resolve_path(src, root) for src in record.images]


def resolve_image(record: PreferenceRecord, data_root: Path) -> ImageFile:
    """The record's first image (see :func:`resolve_images`)."""
    return resolve_images(record, data_root)[0]


def _open(source: ImageFile) -> Image.Image:
    if isinstance(source, EmbeddedImage):
        return Image.open(io.BytesIO(source.data))
    path = Path(source)
    if not path.is_file():
        raise FileNotFoundError(f"image not found: {path}")
    return Image.open(path)


_PIL_ERRORS = (UnidentifiedImageError, Image.DecompressionBombError, OSError, ValueError)


def image_size(source: ImageFile) -> tuple[int, int]:
    """(width, height) from the image's header; an image PIL refuses (unreadable, a decompression bomb) is named.

    Raises:
        FileNotFoundError, RecordError: as `open_rgb`.
    """
    try:
        with _open(source) as im:
            return im.size
    except FileNotFoundError:
        raise
    except _PIL_ERRORS as e:
        raise RecordError(f"cannot read image {source}: {e}") from e


def open_rgb(source: ImageFile) -> Image.Image:
    """Decodes an image (a file, or embedded bytes) to an RGB PIL image at its own size.

    Raises:
        FileNotFoundError: the file does not exist (the message names it).
        RecordError: PIL cannot decode the image (the message names its file, or its row of the data file).
    """
    try:
        with _open(source) as im:
            im.load()  # decodes it all here: a truncated file is named now
            return to_rgb(im)  # transparency onto white, as transformers 5 (and so the HF families) converts
    except FileNotFoundError:
        raise
    except _PIL_ERRORS as e:
        raise RecordError(f"cannot read image {source}: {e}") from e


def to_tensor(im: Image.Image, image_size: int) -> torch.Tensor:
    """RGB PIL image -> ``[3, image_size, image_size]`` float32 in ``[0, 1]`` (bicubic resize; aspect ratio is
    not kept)."""
    if im.size != (image_size, image_size):
        im = im.resize((image_size, image_size), Image.Resampling.BICUBIC)
    array = np.asarray(im, dtype=np.uint8)
    return torch.from_numpy(array.copy()).permute(2, 0, 1).float().div_(255.0)


def load_image(path: ImageFile, image_size: int) -> torch.Tensor:
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
