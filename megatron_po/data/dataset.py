"""A split's samples for training: each record read when its sample is asked for, with its images.

The rules of an input kind (:class:`PairRules` for preference pairs, :class:`P2Rules` for P2-DPO samples) say
what a record's rows are, which images it reads, and how to check it; preparing an index (data/index.py) applies
them to every record once. A dataset then holds the index (memory-mapped) and a reader: ``ds[i]`` parses the
i-th kept record from its file and loads its images, ``ds.cost(i)`` comes from the index. Records built in memory
(tests, generated sets) are examined when the dataset is built, as one small index.

Bad input is refused when the index is prepared (or the in-memory dataset built), never at the step that reads
it: a record that does not parse names ``file:line``, a missing, unreadable or escaping image names its path.
"""

from __future__ import annotations

import collections
import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Optional

import numpy as np
import torch

from megatron_po.data.collate import SKIP_REASONS, CollateConfig, PairCollator
from megatron_po.data.index import Examined, SampleIndex
from megatron_po.data.p2_collate import P2Collator
from megatron_po.data.p2_records import P2Record, check_bbox, condition_tokens, image_files, load_p2_pils
from megatron_po.data.records import (EmbeddedImage, PreferenceRecord, RecordError, open_rgb, record_image_root,
                                      resolve_images)
from megatron_po.data.sources import RecordReader, Units
from megatron_po.data.tokenizer import Tokenizer

logger = logging.getLogger(__name__)


class PairRules:
    """Preference pairs: two rows (chosen, rejected) sharing the pair's images.

    Args:
        collator: decides what fits and lays batches out.
        images: the family's image handler (slots per image, loading, collation).
        image_root: base of relative image paths, normally the data file's directory.
        images_outside_root: accept image paths (absolute, or with ``..``) that leave the image root.
        source: the data file, named in messages.
    """

    rows_per_sample = 2

    def __init__(self, collator, images, image_root: Path, images_outside_root: bool = False,
                 source: Optional[Path] = None):
        self.collator = collator
        self.images = images
        self.image_root = Path(image_root)
        self.images_outside_root = images_outside_root
        self.source = source
        self._decoded: set[Path] = set()
        """Image files this process has decoded already (records that share an image check it once)."""

    def record_images(self, record: PreferenceRecord) -> list:
        """Every image a record reads (files and embedded images), in order."""
        return resolve_images(record, self.image_root)

    def record_root(self, record: PreferenceRecord) -> Path:
        """The directory the record's image files must stay inside."""
        return record_image_root(record, self.image_root)

    def image_files(self, record) -> list[Path]:
        """The image files a record reads (embedded images are part of the data files)."""
        return [f for f in self.record_images(record) if not isinstance(f, EmbeddedImage)]

    def image_tokens(self, record: PreferenceRecord) -> list[int]:
        """Decoder slots of each image (an HF family reads them off the image's header; pixels stay on disk)."""
        images = self.record_images(record)
        for image in images:
            if not isinstance(image, EmbeddedImage) and not image.is_file():
                raise FileNotFoundError(f"image of record {record.id!r} not found: {image}")
        return [self.images.num_tokens(image) for image in images]

    def _check_root(self, record) -> None:
        if self.images_outside_root:
            return
        root = self.record_root(record).resolve()
        for image in self.image_files(record):
            if not image.resolve().is_relative_to(root):
                raise RecordError(f"image of record {record.id!r} is outside the data directory {root}: {image} "
                                  "(data.images_outside_root=true allows it)")

    def _measure(self, record, tokens):
        try:
            return self.collator.measure(record, tokens)
        except ValueError as e:  # e.g. a tokenizer that cannot encode the record's text as text
            where = f"{self.source}: " if self.source else ""
            raise RecordError(f"{where}record {record.id!r}: {e}") from e

    def examine(self, record) -> Examined:
        """Whether the record fits, its rows' tokens; a kept record's images are decoded here, once, so a missing,
        corrupt or truncated image stops the run before its first step, naming its path."""
        self._check_root(record)
        tokens = self.image_tokens(record)
        reason, rows = self._measure(record, tokens)
        if not reason:
            self._check_images(record)
        return Examined(reason, rows, int(np.sum(list(tokens.values()) if isinstance(tokens, dict) else tokens)),
                        tuple(self.image_files(record)))

    def _check_images(self, record) -> None:
        for image in self.record_images(record):
            if image not in self._decoded:
                open_rgb(image)
                if not isinstance(image, EmbeddedImage):
                    self._decoded.add(image)

    def load(self, record) -> tuple:
        """``(record, its images as the family's handler loads them)``."""
        return record, self.images.load(self.record_images(record))


class P2Rules(PairRules):
    """P2-DPO samples: up to six rows (P2_TERMS) over the image conditions I, I_crop, I_deg, I_noise."""

    rows_per_sample = 6

    def record_images(self, record: P2Record) -> list[Path]:
        return image_files(record, self.image_root)

    def record_root(self, record: P2Record) -> Path:
        return self.image_root

    def image_tokens(self, record: P2Record) -> dict[str, int]:
        return condition_tokens(record, self.image_root, self.images)

    def _check_images(self, record: P2Record) -> None:
        super()._check_images(record)
        check_bbox(record, self.image_root)

    def load(self, record: P2Record) -> tuple:
        pils = load_p2_pils(record, self.image_root)
        out = {k: self.images.load_pils([pil]) for k, pil in pils.items()}
        if record.robust is not None:
            out["noise"] = self.images.noised(out["image"], record.robust.noise_step, record.robust.noise_seed)
        return record, out


class _ListReader:
    """Records held in memory, read by position."""

    def __init__(self, records: Sequence):
        self.records = records

    def read(self, units, u: int):
        return self.records[u]


def examine_records(rules, records: Sequence) -> SampleIndex:
    """The index of records held in memory, examined in this process (errors raised as found)."""
    codes = {r: i + 1 for i, r in enumerate(SKIP_REASONS)}
    found = [rules.examine(r) for r in records]
    n = len(found)
    zeros = np.zeros(n, dtype=np.int64)
    ids = [r.id.encode("utf-8") for r in records]
    return SampleIndex([], Units(zeros.astype(np.int32), zeros, zeros.astype(np.int32), np.arange(n), zeros.astype(np.int32)),
                       np.array(ids, dtype=f"S{max([1, *map(len, ids)])}"),
                       np.array([codes.get(e.reason, 0) for e in found], dtype=np.int8),
                       np.array([e.rows for e in found], dtype=np.int32).reshape(n, rules.rows_per_sample),
                       np.array([e.image_tokens for e in found], dtype=np.int32))


class _Records(Sequence):
    """A dataset's kept records, each parsed when asked for."""

    def __init__(self, ds: "PreferenceDataset"):
        self.ds = ds

    def __len__(self) -> int:
        return len(self.ds)

    def __getitem__(self, i):
        if isinstance(i, slice):
            return [self[j] for j in range(*i.indices(len(self)))]
        return self.ds.record(i)


class PreferenceDataset(torch.utils.data.Dataset):
    """Samples that fit, each record read (and its images loaded) on access.

    Built from records in memory (examined here, one summary line logged), or with :meth:`indexed` from a prepared
    index. Unfit samples are left out and counted in :attr:`skipped` (a ``collections.Counter`` over
    :data:`SKIP_REASONS`, zeros included).

    Args:
        records: e.g. from :func:`megatron_po.data.sources.read_preference_file`.
        image_root: base of relative image paths, normally the data file's directory.
        tokenizer, collate_cfg: the collator's (when none is given).
        images: the family's image handler.
        collator: what turns records into batches (default: :class:`PairCollator`).
        source: the data file (or dataset directory) the records come from, named in messages.
        data_files: the files whose bytes are the records (keyed); default ``[source]``.
        images_outside_root: accept image paths that leave ``image_root``.

    Raises:
        FileNotFoundError: an image is missing (checked up front, not at step N).
        RecordError: an image of a kept sample cannot be decoded, or lies outside ``image_root`` (unless allowed).
        ValueError: no sample is left.
    """

    rules_class = PairRules

    def __init__(self, records: Sequence, image_root: Path, tokenizer: Tokenizer, collate_cfg: CollateConfig,
                 images, collator=None, source: Optional[Path] = None, images_outside_root: bool = False,
                 data_files: Optional[Sequence[Path]] = None):
        collator = collator or self.default_collator(tokenizer, collate_cfg, images)
        rules = self.rules_class(collator, images, image_root, images_outside_root, source)
        files = [Path(p) for p in data_files] if data_files is not None else [] if source is None else [Path(source)]
        self._setup(rules, _ListReader(records), examine_records(rules, records), source, files)
        logger.info("%s: kept %d of %d samples (skipped %s)", source or "data", len(self), len(records),
                    ", ".join(f"{k}={v}" for k, v in sorted(self.skipped.items())))

    @staticmethod
    def default_collator(tokenizer, collate_cfg, images):
        return PairCollator(tokenizer, collate_cfg, images)

    @classmethod
    def indexed(cls, rules, index: SampleIndex, source: Path, data_files: Sequence[Path],
                limit: Optional[int] = None) -> "PreferenceDataset":
        """The kept samples of a prepared index (of the first `limit` records when given), read lazily."""
        ds = cls.__new__(cls)
        ds._setup(rules, RecordReader(index.files), index, source, list(data_files), limit)
        return ds

    def _setup(self, rules, reader, index: SampleIndex, source, data_files, limit: Optional[int] = None) -> None:
        self.rules = rules
        self.collator = rules.collator
        self.images = rules.images
        self.image_root = rules.image_root
        self.source = source
        """The file the records were read from (None for records built in memory)."""
        self.data_files = data_files
        """The files whose bytes the records are: a meta file and its annotation files, a dataset's files."""
        self.index = index
        self._reader = reader
        kept = index.kept
        self._costs = index.costs
        if limit is not None:
            n = int(np.searchsorted(kept, limit))
            kept, self._costs = kept[:n], self._costs[:n]
        self._kept = kept
        reasons = np.bincount(np.asarray(index.reason)[: limit], minlength=len(SKIP_REASONS) + 1)
        self.skipped: collections.Counter[str] = collections.Counter(
            {r: int(reasons[i + 1]) for i, r in enumerate(SKIP_REASONS)})
        self.records = _Records(self)
        if not len(kept):
            raise ValueError(f"no sample fits max_length={self.collator.cfg.max_length} (skipped: {dict(self.skipped)})")

    def __len__(self) -> int:
        return len(self._kept)

    def record(self, i: int):
        """The i-th kept record, parsed now."""
        return self._reader.read(self.index.units, int(self._kept[i]))

    @property
    def ids(self) -> list[str]:
        """The kept samples' ids, in order (from the index: no record is read)."""
        return [bytes(b).decode("utf-8") for b in np.asarray(self.index.ids)[self._kept]]

    def cost(self, i: int) -> int:
        """Tokens of sample i's rows (from the index)."""
        return int(self._costs[i])

    def image_files(self, record) -> list[Path]:
        return self.rules.image_files(record)

    def record_images(self, record) -> list:
        return self.rules.record_images(record)

    def __getitem__(self, i: int) -> tuple:
        return self.rules.load(self.record(i))


class P2Dataset(PreferenceDataset):
    """P2-DPO samples that fit the collator, with their image conditions built on access.

    Args:
        records: from :func:`megatron_po.data.p2_records.read_p2_records`.
        calib_reference: as :class:`P2Collator`.
        Others as :class:`PreferenceDataset`.

    Raises:
        FileNotFoundError: an image of a sample is missing.
        RecordError: a bbox leaves its image (at the record's ``file:line``).
        ValueError: no sample is left.
    """

    rules_class = P2Rules

    def __init__(self, records: Sequence[P2Record], image_root: Path, tokenizer: Tokenizer,
                 collate_cfg: CollateConfig, images, calib_reference: str = "rejected",
                 source: Optional[Path] = None, images_outside_root: bool = False, collator=None):
        super().__init__(records, image_root, tokenizer, collate_cfg, images,
                         collator=collator or P2Collator(tokenizer, collate_cfg, images, calib_reference),
                         source=source, images_outside_root=images_outside_root)
