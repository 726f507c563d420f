"""Where a split's records live, and reading any one of them without reading the others.

A split's data is a list of :class:`DataFile` (one file; an MPO meta file's annotation files; a dataset). Scanning
them (:func:`scan`) finds one *unit* per record without parsing any: its file, where it starts (a byte offset in
JSON lines, an item of a JSON array, a row of a dataset), its length in bytes, its line (or row) for messages, and
its copy number (MPO's ``repeat_time``). :class:`RecordReader` then parses the record of any unit on demand:
JSON lines by ``os.pread`` at the stored offset (no shared file position, so forked DataLoader workers may read
at once), datasets through the ``datasets`` library's memory-mapped Arrow tables. A JSON array (TRL's ``.json``)
has no per-record offsets: it is parsed whole, once per process — use JSON lines for large sets.

Every record is parsed by the format's own parser (data/formats.py, records.py, p2_records.py), so a bad record
gives the same ``file:line`` message whether it is read eagerly (:func:`read_all`), while an index is prepared,
or lazily during training.
"""

from __future__ import annotations

import json
import os
import random
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, NamedTuple, Optional

import numpy as np

from megatron_po.data.formats import (FORMATS, _first_byte, _load_hf, _mpo_meta, detect_format, hf_row, mpo_record,
                                      parse_trl_line, trl_record)
from megatron_po.data.p2_records import parse_p2_line
from megatron_po.data.records import RecordError, parse_line, parse_object, resolve_path

PARSERS = ("ours", "trl", "mpo", "p2")


@dataclass(frozen=True)
class DataFile:
    """One file of a split's data and how its records are laid out and parsed."""

    path: str
    layout: str
    """'lines' (JSON lines), 'array' (one JSON array) or 'dataset' (a Hugging Face dataset on disk)."""
    parser: str
    """Which record schema: 'ours', 'trl', 'mpo' (preference pairs) or 'p2' (P2-DPO samples)."""
    dataset: str = ""
    """MPO meta file: the dataset's name, prefixed to its ids so datasets never collide."""
    root: Optional[str] = None
    """MPO meta file: the dataset's image root (None: the data file's directory)."""
    repeat: float = 1.0
    """MPO's repeat_time: a seeded sample of that fraction below 1, whole copies above."""

    @property
    def unit(self) -> str:
        """What a position counts in messages."""
        return {"lines": "line", "array": "record", "dataset": "row"}[self.layout]


def split_files(path: Path, fmt: str = "auto", parser: str = "") -> list[DataFile]:
    """The files of the data at `path` in format `fmt` (data/formats.py); `parser="p2"` for P2-DPO samples.

    Raises:
        FileNotFoundError: `path` does not exist.
        RecordError: the format cannot be told, or an MPO meta file names a bad dataset (naming it).
    """
    if fmt not in FORMATS:
        raise ValueError(f"data.format must be one of {FORMATS}, got {fmt!r}")
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"data: no such file or directory {path}")
    if parser == "p2":
        return [DataFile(str(path), "lines", "p2")]
    if fmt == "auto":
        fmt = detect_format(path)
    if fmt == "hf":
        return [DataFile(str(path), "dataset", "hf")]
    if fmt == "trl":
        return [DataFile(str(path), "array" if _first_byte(path) == b"[" else "lines", "trl")]
    if fmt == "jsonl":
        return [DataFile(str(path), "lines", "ours")]
    meta = _mpo_meta(path)
    if meta is None:
        return [DataFile(str(path), "lines", "mpo")]
    files = []
    for name, entry in meta.items():
        where = f"{path}: dataset {name!r}"
        for key in ("annotation", "root"):
            if not isinstance(entry.get(key), str):
                raise RecordError(f"{where}: field '{key}' must be a path")
        annotation, root = (resolve_path(entry[k], path.parent) for k in ("annotation", "root"))
        if not annotation.is_file():
            raise RecordError(f"{where}: annotation file not found: {annotation}")
        repeat = entry.get("repeat_time", 1)
        if not isinstance(repeat, (int, float)) or isinstance(repeat, bool) or repeat <= 0:
            raise RecordError(f"{where}: repeat_time must be a positive number, got {repeat!r}")
        if repeat > 1 and int(repeat) != repeat:
            raise RecordError(f"{where}: repeat_time above 1 must be a whole number, got {repeat}")
        files.append(DataFile(str(annotation), "lines", "mpo", dataset=name, root=str(root), repeat=float(repeat)))
    if not files:
        raise RecordError(f"{path}: no datasets")
    return files


def hashed_files(path: Path, files: list[DataFile]) -> list[Path]:
    """The files whose bytes are the records (what the index and the reference cache key): the data files, an MPO
    meta file too, a dataset directory's Arrow files (its state.json holds a fingerprint that changes with every
    save)."""
    out = [] if Path(path).is_dir() or Path(path) == Path(files[0].path) else [Path(path)]
    for f in files:
        p = Path(f.path)
        out += sorted(p.rglob("*.arrow")) if p.is_dir() else [p]
    return out


class Units(NamedTuple):
    """One entry per record, in the split's order (numpy arrays of equal length)."""

    file: np.ndarray
    """int32: index into the split's DataFile list."""
    offset: np.ndarray
    """int64: byte offset of the JSON line, or the item / row number."""
    nbytes: np.ndarray
    """int32: bytes of the JSON line (0 for items and rows)."""
    line: np.ndarray
    """int64: 1-based line (JSON lines), or the item / row number: for messages."""
    copy: np.ndarray
    """int32: MPO repeat copy (its id gets a ``#copy`` suffix when > 0)."""

    def __len__(self) -> int:
        return len(self.file)

    @staticmethod
    def concat(parts: list["Units"]) -> "Units":
        return Units(*(np.concatenate([getattr(p, k) for p in parts]) for k in Units._fields))


def _line_units(path: Path) -> tuple[list[int], list[int], list[int]]:
    offsets, sizes, lines = [], [], []
    pos = 0
    with open(path, "rb") as f:
        for lineno, raw in enumerate(f, start=1):
            if raw.strip():
                offsets.append(pos)
                sizes.append(len(raw))
                lines.append(lineno)
            pos += len(raw)
    return offsets, sizes, lines


def _json_array(path: Path) -> list:
    try:
        items = json.loads(Path(path).read_bytes())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise RecordError(f"{path}: not a JSON array of records ({e})") from None
    except RecursionError:
        raise RecordError(f"{path}: JSON nested too deeply") from None
    if not isinstance(items, list):
        raise RecordError(f"{path}: not a JSON array of records")
    return items


_EMPTY = {"lines": "the file is empty or has blank lines only", "array": "an empty JSON array",
          "dataset": "the dataset is empty"}


def _file_units(k: int, f: DataFile) -> Units:
    if f.layout == "lines":
        offsets, sizes, lines = _line_units(Path(f.path))
    else:
        n = len(_json_array(Path(f.path))) if f.layout == "array" else len(_load_hf(Path(f.path)))
        offsets, sizes, lines = list(range(n)), [0] * n, list(range(n))
    if not offsets:
        raise RecordError(f"{f.path}: no records ({_EMPTY[f.layout]})")
    base = np.arange(len(offsets))
    if f.repeat < 1:  # InternVL's sampling of a fraction, as its loader draws it
        base = np.array(sorted(random.Random(0).sample(range(len(offsets)), k=int(len(offsets) * f.repeat))),
                        dtype=np.int64)
        copies = np.zeros(len(base), dtype=np.int32)
    else:
        copies = np.repeat(np.arange(int(f.repeat), dtype=np.int32), len(base))
        base = np.tile(base, int(f.repeat))
    return Units(np.full(len(base), k, dtype=np.int32), np.asarray(offsets, dtype=np.int64)[base],
                 np.asarray(sizes, dtype=np.int32)[base], np.asarray(lines, dtype=np.int64)[base], copies)


def scan(files: list[DataFile]) -> Units:
    """Every record's unit, in order; reads line ends only (JSON arrays and datasets: their length)."""
    return Units.concat([_file_units(k, f) for k, f in enumerate(files)])


class RecordReader:
    """Parses the record of any unit; holds this process's open files, arrays and datasets.

    Safe to use from forked DataLoader workers: file reads are positional (``os.pread``), and each process opens
    its own descriptors (the pid is checked)."""

    def __init__(self, files: list[DataFile]):
        self.files = files
        self._pid = -1
        self._open: dict[int, Any] = {}

    def _handle(self, k: int):
        if self._pid != os.getpid():  # a forked worker: never share the parent's descriptors or tables
            self._open, self._pid = {}, os.getpid()
        if k not in self._open:
            f = self.files[k]
            if f.layout == "lines":
                self._open[k] = os.open(f.path, os.O_RDONLY)
            elif f.layout == "array":
                self._open[k] = _json_array(Path(f.path))
            else:
                self._open[k] = _load_hf(Path(f.path))
        return self._open[k]

    def where(self, units: Units, u: int) -> str:
        f = self.files[int(units.file[u])]
        if f.layout == "lines":
            return f"{f.path}:{int(units.line[u])}"
        return f"{f.path} {f.unit} {int(units.line[u])}"

    def read(self, units: Units, u: int):
        """The record of unit `u` (a PreferenceRecord, or a P2Record)."""
        k, offset = int(units.file[u]), int(units.offset[u])
        f, handle, where = self.files[k], self._handle(k), self.where(units, u)
        if f.layout == "lines":
            raw = os.pread(handle, int(units.nbytes[u]), offset)
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                raise RecordError(f"{where}: not UTF-8 text (byte {e.start} of the line: "
                                  f"{raw[e.start:e.start + 1]!r})") from None
            record = _parse(f, line, where)
        elif f.layout == "array":
            obj = handle[offset]
            if not isinstance(obj, dict):
                raise RecordError(f"{where}: expected a JSON object, got {type(obj).__name__}")
            record = trl_record(obj, where, f"record-{offset}")
        else:
            record = hf_row(handle, offset, where)
        copy = int(units.copy[u])
        return replace(record, id=f"{record.id}#{copy}") if copy else record


def _parse(f: DataFile, line: str, where: str):
    if f.parser == "ours":
        return parse_line(line, where)
    if f.parser == "trl":
        return parse_trl_line(line, where)
    if f.parser == "p2":
        return parse_p2_line(line, where)
    obj = parse_object(line, where)
    record_id = str(obj.get("id", f"line-{where.rsplit(':', 1)[1]}"))
    return mpo_record(obj, where, f"{f.dataset}/{record_id}" if f.dataset else record_id, f.root)


def check_unique_ids(ids: list[str], reader: RecordReader, units: Units) -> None:
    """Raises RecordError at the second place an id appears, naming the first."""
    first: dict[str, int] = {}
    for u, sid in enumerate(ids):
        if sid in first:
            f = reader.files[int(units.file[u])]
            raise RecordError(f"{reader.where(units, u)}: field 'id' {sid!r} repeats {f.unit} "
                              f"{int(units.line[first[sid]])}")
        first[sid] = u


def read_all(path: Path, fmt: str = "auto", parser: str = "") -> list:
    """Every record of the data at `path`, read and checked eagerly (ids must not repeat)."""
    files = split_files(path, fmt, parser)
    units = scan(files)
    reader = RecordReader(files)
    records = [reader.read(units, u) for u in range(len(units))]
    check_unique_ids([r.id for r in records], reader, units)
    return records


def read_preference_file(path: Path, fmt: str = "auto") -> list:
    """The records of preference data in `fmt` (see data/formats.py)."""
    return read_all(path, fmt)
