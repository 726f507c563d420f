"""Data for the trainer: the embedded task's files, the tokenizer, each split's dataset over its prepared index,
and the micro-batches of a step.

Every split (training, held-out pairs, probe) is read through a prepared index (data/index.py) found under
data.index_dir: a valid one is used as it is (no record read, tokenized or decoded before step 1), a missing or
stale one is prepared here by all ranks together, or refused with data.index=require.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from pathlib import Path
from typing import Iterator, Optional

import torch.distributed as dist

from megatron_po.config import Config
from megatron_po.data import index as data_index
from megatron_po.data.collate import CollateConfig
from megatron_po.data.dataset import PreferenceDataset
from megatron_po.data.records import read_records
from megatron_po.data.sampler import PairBatchSampler
from megatron_po.data.sources import hashed_files, read_all, split_files
from megatron_po.data.tokenizer import Tokenizer, train_tokenizer
from megatron_po.kinds import INPUT_KINDS, InputKind, kind_of
from megatron_po.models.family import FamilySpec
from megatron_po.models.specs import use_te_spec
from megatron_po.objectives import Objective
from megatron_po.train.batch import MicroBatch
from megatron_po.train.loader import BatchLayout, host_micro_batch, host_step_batches

logger = logging.getLogger(__name__)


def prepare_data(cfg: Config, objective: Objective, family: FamilySpec) -> tuple[Path, Path]:
    """Returns (training data, tokenizer model). Rank 0 generates what is missing; the others wait for it.

    For the embedded default the data and tokenizer live under `output_dir/data`: the records of the objective's
    input kind (preference pairs, or P2-DPO samples of the same task). A stage that starts from a previous stage's
    checkpoint must use the same tokenizer: point `data.tokenizer_path` at it.
    """
    d, kind = cfg.data, kind_of(objective)
    if d.source == "synthetic":
        data_dir = Path(cfg.output_dir) / "data"
        train_path = data_dir / kind.train_file
        tok_path = Path(d.tokenizer_path) if d.tokenizer_path else data_dir / "tokenizer.model"
        if dist.get_rank() == 0:
            if not train_path.exists():
                kind.generate_synthetic(data_dir, d, cfg.model.vision.image_size)
            if not tok_path.exists() and family.trains_tokenizer:  # HF: theirs
                texts = list(kind.texts(read_all(train_path, parser=kind.parser)))
                train_tokenizer(texts, tok_path.with_suffix(""), vocab_size=d.tokenizer_vocab_size, seed=d.seed)
        dist.barrier()
    else:
        train_path = Path(d.train_path)
        tok_path = Path(d.tokenizer_path)
        checks = (("data.train_path", train_path),)
        if family.trains_tokenizer:  # HF families read theirs from model.hf_path
            checks += (("data.tokenizer_path", tok_path),)
        for name, p in checks:
            if not (p.is_file() or (name == "data.train_path" and p.is_dir())):  # a dataset directory (data.format)
                raise FileNotFoundError(f"{name}: no such file {p}")
    return train_path, tok_path


def build_tokenizer(cfg: Config, family: FamilySpec, tok_path: Path):
    """The family's tokenizer and chat layout: our sentencepiece model (tiny_vlm), or an HF family's tokenizer +
    chat template from model.hf_path."""
    return family.build_tokenizer(cfg, tok_path)


def collate_config(cfg: Config) -> CollateConfig:
    return CollateConfig(max_length=cfg.model.max_seq_length, num_image_tokens=cfg.model.vision.num_patches,
                         pad_to_multiple_of=pad_to_multiple_of(cfg))


def pad_to_multiple_of(cfg: Config) -> int:
    """Row lengths every rank can split: sequence parallelism splits rows over TP, context parallelism into 2 x cp
    chunks (each then split over TP under SP)."""
    par = cfg.parallel
    return (par.tp if par.sp else 1) * (2 * par.cp if par.cp > 1 else 1)


def data_root(path: Path) -> Path:
    """Where a data path's relative image paths start: its directory (a dataset directory: itself)."""
    return path if path.is_dir() else path.parent


def index_dir(cfg: Config) -> Path:
    return Path(cfg.data.index_dir) if cfg.data.index_dir else Path(cfg.output_dir) / "data_index"


def _settings(cfg: Config, family: FamilySpec, kind: InputKind, objective_cfg, fmt: str) -> dict:
    """The configuration values that change what an index records (besides the hashed data and tokenizer)."""
    return {"index format": data_index.FORMAT, "input kind": kind.name, "data.format": fmt,
            "model.family": family.name, "model.max_seq_length": cfg.model.max_seq_length,
            # tiny_vlm's image slots (an HF family's follow from its hashed processor files)
            "model.vision.num_patches": cfg.model.vision.num_patches,
            "data.images_outside_root": cfg.data.images_outside_root, **kind.settings(objective_cfg)}


def _images_and_collator(cfg: Config, family: FamilySpec, kind: InputKind, objective_cfg, tokenizer) -> tuple:
    """The family's image handler and the input kind's collator around it."""
    images = family.image_handler(cfg.model, tokenizer)
    return images, kind.build_collator(tokenizer, collate_config(cfg), images, objective_cfg)


def build_split(cfg: Config, family: FamilySpec, kind: InputKind, objective_cfg, name: str, path: Path,
                tokenizer: Tokenizer, fmt: str = "auto", limit: Optional[int] = None,
                workers: Optional[int] = None, force: bool = False) -> PreferenceDataset:
    """Split `name` of the data at `path` (its first `limit` records when given) over its prepared index, which
    is prepared here when missing or stale, or with `force` (collective over all ranks; `workers` processes per
    rank, default data.num_workers)."""
    path = Path(path)
    files = split_files(path, fmt, kind.parser)
    hashed, root = hashed_files(path, files), data_root(path)
    images, collator = _images_and_collator(cfg, family, kind, objective_cfg, tokenizer)
    rules = kind.dataset.rules_class(collator, images, root, cfg.data.images_outside_root, path)
    settings = _settings(cfg, family, kind, objective_cfg, fmt)
    components = data_index.key_components(files, hashed, root, tokenizer.files, settings)
    # one directory per data path and settings: runs that differ in them (a sweep over max_seq_length) never
    # overwrite each other's index; a change of the data's or tokenizer's bytes makes the index stale
    tag = hashlib.sha256(json.dumps([str(path.resolve()), settings], sort_keys=True).encode()).hexdigest()[:12]
    index = data_index.open_index(index_dir(cfg) / f"{name}-{tag}", rules, files, components, root, cfg.data.index,
                                  cfg.data.num_workers if workers is None else workers, force=force)
    ds = kind.dataset.indexed(rules, index, path, hashed, limit)
    if not dist.is_initialized() or dist.get_rank() == 0:
        logger.warning("data %s: %d samples kept; skipped %s", path.name, len(ds), dict(ds.skipped))
    return ds


def build_dataset(cfg: Config, family: FamilySpec, path: Path, tokenizer: Tokenizer, records=None,
                  fmt: str = "auto", name: str = "train") -> PreferenceDataset:
    """Preference pairs of the data at `path` over its prepared index, or the given records of it (held in memory,
    examined here)."""
    return _build_kind(cfg, family, INPUT_KINDS["pairs"], None, path, tokenizer, records, fmt, name)


def build_p2_dataset(cfg: Config, family: FamilySpec, path: Path, tokenizer: Tokenizer, objective: Objective,
                     records=None) -> PreferenceDataset:
    """P2-DPO samples of `path` over its prepared index, or the given records of it; the reference's calibration
    rows follow the objective's calib_reference."""
    return _build_kind(cfg, family, INPUT_KINDS["p2"], objective.cfg, path, tokenizer, records, "auto", "train")


def _build_kind(cfg, family, kind, objective_cfg, path, tokenizer, records, fmt, name) -> PreferenceDataset:
    if records is None:
        return build_split(cfg, family, kind, objective_cfg, name, path, tokenizer, fmt)
    images, collator = _images_and_collator(cfg, family, kind, objective_cfg, tokenizer)
    return kind.dataset(records, data_root(Path(path)), tokenizer, collate_config(cfg), images, collator=collator,
                        source=Path(path), images_outside_root=cfg.data.images_outside_root)


def build_train_dataset(cfg: Config, family: FamilySpec, train_path: Path, tokenizer: Tokenizer,
                        objective: Objective, workers: Optional[int] = None, force: bool = False) -> PreferenceDataset:
    """The training set in the form the objective takes (its input kind's samples)."""
    return build_split(cfg, family, kind_of(objective), objective.cfg, "train", train_path, tokenizer,
                       cfg.data.format, workers=workers, force=force)


def check_data(cfg: Config, objective: Objective, family: FamilySpec) -> str:
    """`--dry-run`'s data check, in this process: prepares (or checks) the training data's index, which reads
    every record and decodes every image as training would, before any job starts; a one-line summary."""
    if cfg.data.source != "jsonl":
        return "data: the embedded synthetic task (generated at the first launch)"
    if not cfg.data.train_path:
        return "data: data.train_path not given here: not checked (give it to read and check the data)"
    train_path, tok_path = prepare_data(cfg, objective, family)
    ds = build_train_dataset(cfg, family, train_path, build_tokenizer(cfg, family, tok_path), objective, force=True)
    skipped = ", ".join(f"{k}={v}" for k, v in sorted(ds.skipped.items()))
    return f"data {train_path}: {len(ds)} samples kept, skipped: {skipped}"


def prepare_all(cfg: Config, objective: Objective, family: FamilySpec, workers: int) -> dict:
    """`megatron-po prepare-data`: every split's index prepared anew (`workers` processes per rank; collective);
    a summary per split."""
    t0 = time.perf_counter()
    train_path, tok_path = prepare_data(cfg, objective, family)
    tokenizer = build_tokenizer(cfg, family, tok_path)
    splits = {"train": build_train_dataset(cfg, family, train_path, tokenizer, objective, workers, force=True),
              **build_eval_datasets(cfg, family, tokenizer, workers, force=True)}
    seconds = time.perf_counter() - t0
    records = sum(len(ds.index) for ds in splits.values())
    return {"index_dir": str(index_dir(cfg)), "seconds": round(seconds, 2), "records_per_s": round(records / seconds),
            "ranks": dist.get_world_size(), "workers_per_rank": workers,
            "splits": {name: {"data": str(ds.source), "records": len(ds.index), "kept": len(ds),
                              "skipped": dict(ds.skipped), "image_files": len(ds.index.image_files)}
                       for name, ds in splits.items()}}


def eval_paths(cfg: Config) -> dict[str, Path]:
    """The held-out pairs ("eval") and yes/no probe ("probe") of `eval.interval > 0` (else none); the embedded
    task's are generated by rank 0 when missing."""
    from megatron_po.data.pope import generate_pope_set
    from megatron_po.data.synthetic import generate_probe_set

    if cfg.eval.interval == 0:
        return {}
    data_dir = Path(cfg.output_dir) / "data"
    eval_path = Path(cfg.eval.path) if cfg.eval.path else data_dir / "eval.jsonl"
    probe_path = Path(cfg.eval.probe_path) if cfg.eval.probe_path else None
    if probe_path is None and cfg.data.source == "synthetic":
        pope = cfg.eval.probe_style == "pope"
        probe_path = data_dir / ("pope/pope.jsonl" if pope else "probe/probe.jsonl")
        if dist.get_rank() == 0 and not probe_path.exists():
            kw = dict(num_images=cfg.eval.probe_images, seed=cfg.data.seed + 7919,
                      image_size=cfg.model.vision.image_size)
            if pope:  # popular / adversarial absent objects follow the training pairs' object statistics
                train = data_dir / "train.jsonl"
                generate_pope_set(probe_path.parent, read_records(train) if train.is_file() else [], **kw)
            else:
                generate_probe_set(probe_path.parent, **kw)
        dist.barrier()
    out = {"eval": eval_path} if eval_path else {}
    if probe_path is not None:
        out["probe"] = probe_path
    for path in out.values():
        if not path.is_file():
            raise FileNotFoundError(f"eval: no such file {path}")
    return out


def build_eval_datasets(cfg: Config, family: FamilySpec, tokenizer: Tokenizer, workers: Optional[int] = None,
                        force: bool = False) -> dict[str, PreferenceDataset]:
    """Held-out preference pairs ("eval", the first eval.max_pairs records) and yes/no probe records ("probe")
    for `eval.interval > 0` (else none), each over its prepared index."""
    pairs = INPUT_KINDS["pairs"]
    return {name: build_split(cfg, family, pairs, None, name, path, tokenizer,
                              limit=cfg.eval.max_pairs if name == "eval" else None, workers=workers, force=force)
            for name, path in eval_paths(cfg).items()}


def batch_layout(cfg: Config, groups, packing: Optional[bool] = None) -> BatchLayout:
    """This rank's micro-batch layout: packing (data.packing unless given), padding, THD, its DP and CP share."""
    return BatchLayout(cfg.train.micro_batch_size, cfg.data.packing if packing is None else packing,
                       cfg.model.max_seq_length, pad_to_multiple_of(cfg), use_te_spec(cfg.model),
                       groups.dp_rank, groups.dp_size, groups.cp_rank, groups.cp_size)


def make_micro_batch(ds: PreferenceDataset, indices: list[int], groups, packing: Optional[Config] = None) -> MicroBatch:
    """Dataset samples `indices` as one micro-batch on this rank's device: packed as `packing` (a config) says."""
    layout = batch_layout(packing, groups) if packing is not None else _unpacked(len(indices), groups)
    return host_micro_batch(ds, indices, layout, pack=layout.packing).to(groups.device)


def _unpacked(micro_batch_size: int, groups) -> BatchLayout:
    return BatchLayout(micro_batch_size, False, 0, 1, False, cp_rank=groups.cp_rank, cp_size=groups.cp_size)


def micro_batches(ds: PreferenceDataset, indices: list[list[int]], groups) -> Iterator[MicroBatch]:
    """Micro-batches of the given dataset indices on this rank's device, unpacked, collated lazily (images load on
    demand): held-out sets and the reference precompute."""
    layout = _unpacked(len(indices[0]) if indices else 1, groups)
    for idx in indices:
        yield host_micro_batch(ds, idx, layout).to(groups.device)


def step_micro_batches(cfg: Config, ds: PreferenceDataset, sampler: PairBatchSampler, step: int,
                       groups) -> list[MicroBatch]:
    """This rank's micro-batches of optimizer step `step` on its device, made inline (train/loader.py makes them
    ahead in workers during training)."""
    return [mb.to(groups.device) for mb in host_step_batches(ds, sampler, step, batch_layout(cfg, groups))]


def build_sampler(cfg: Config, num_samples: int, dp_rank: int, dp_size: int) -> PairBatchSampler:
    return PairBatchSampler(
        num_samples=num_samples,
        global_batch_size=cfg.train.global_batch_size,
        micro_batch_size=cfg.train.micro_batch_size,
        dp_rank=dp_rank,
        dp_size=dp_size,
        seed=cfg.train.seed,
    )
