"""Data for the trainer: preparation on rank 0, the dataset, and per-rank micro-batch iterators."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Iterator, Optional

import torch
import torch.distributed as dist

from megatron_po.config import Config
from megatron_po.data.collate import CollateConfig, PreferenceDataset
from megatron_po.data.formats import data_files, read_preference_file
from megatron_po.data.p2_collate import P2Dataset
from megatron_po.data.packing import balance_over_dp, pack_rows
from megatron_po.data.p2_records import iter_p2_texts, read_p2_records
from megatron_po.data.records import iter_texts, read_records
from megatron_po.data.sampler import PairBatchSampler
from megatron_po.data.synthetic import generate_synthetic_dataset
from megatron_po.data.synthetic_p2 import generate_p2_dataset
from megatron_po.data.tokenizer import Tokenizer, train_tokenizer
from megatron_po.families import family_spec
from megatron_po.models.specs import use_te_spec
from megatron_po.objectives import Objective
from megatron_po.train.batch import MicroBatch, move

logger = logging.getLogger(__name__)


def takes_p2_records(objective: Objective) -> bool:
    """Whether the objective trains on P2-DPO records (data/p2_records.py) rather than preference pairs."""
    return objective.inputs == "p2"


def prepare_data(cfg: Config, objective: Objective) -> tuple[Path, Path]:
    """Returns (train jsonl, tokenizer model). Rank 0 generates what is missing; the others wait for it.

    For the embedded default the data and tokenizer live under `output_dir/data`: preference pairs, or P2-DPO
    samples of the same task when the objective takes them. A stage that starts from a previous stage's checkpoint
    must use the same tokenizer: point `data.tokenizer_path` at it.
    """
    d = cfg.data
    if d.source == "synthetic":
        p2 = takes_p2_records(objective)
        data_dir = Path(cfg.output_dir) / "data"
        train_path = data_dir / ("p2_train.jsonl" if p2 else "train.jsonl")
        tok_path = Path(d.tokenizer_path) if d.tokenizer_path else data_dir / "tokenizer.model"
        if dist.get_rank() == 0:
            if not train_path.exists():
                kw = dict(seed=d.seed, image_size=cfg.model.vision.image_size)
                if p2:
                    generate_p2_dataset(data_dir, d.num_train, d.num_eval, **kw)
                else:
                    generate_synthetic_dataset(data_dir, d.num_train, d.num_eval, yesno_share=d.yesno_share,
                                               near_miss=d.near_miss, **kw)
            if not tok_path.exists() and family_spec(cfg.model.family).trains_tokenizer:  # HF: theirs
                texts = list(iter_p2_texts(read_p2_records(train_path)) if p2 else iter_texts(read_records(train_path)))
                train_tokenizer(texts, tok_path.with_suffix(""), vocab_size=d.tokenizer_vocab_size, seed=d.seed)
        dist.barrier()
    else:
        train_path = Path(d.train_path)
        tok_path = Path(d.tokenizer_path)
        checks = (("data.train_path", train_path),)
        if family_spec(cfg.model.family).trains_tokenizer:  # HF families read theirs from model.hf_path
            checks += (("data.tokenizer_path", tok_path),)
        for name, p in checks:
            if not (p.is_file() or (name == "data.train_path" and p.is_dir())):  # a dataset directory (data.format)
                raise FileNotFoundError(f"{name}: no such file {p}")
    return train_path, tok_path


def build_tokenizer(cfg: Config, tok_path: Path):
    """The family's tokenizer and chat layout: our sentencepiece model (tiny_vlm), or an HF family's tokenizer +
    chat template from model.hf_path."""
    return family_spec(cfg.model.family).build_tokenizer(cfg, tok_path)


def _images(cfg: Config, tokenizer):
    return family_spec(cfg.model.family).image_handler(tokenizer)


def _collate_cfg(cfg: Config) -> CollateConfig:
    return CollateConfig(
        max_length=cfg.model.max_seq_length,
        num_image_tokens=cfg.model.vision.num_patches,
        pad_to_multiple_of=pad_to_multiple_of(cfg),
    )


def pad_to_multiple_of(cfg: Config) -> int:
    """Row lengths every rank can split: sequence parallelism splits rows over TP, context parallelism into 2 x cp
    chunks (each then split over TP under SP)."""
    par = cfg.parallel
    return (par.tp if par.sp else 1) * (2 * par.cp if par.cp > 1 else 1)


def _log_kept(path: Path, ds: PreferenceDataset) -> None:
    if not dist.is_initialized() or dist.get_rank() == 0:
        logger.warning("data %s: %d samples kept; skipped %s", path.name, len(ds), dict(ds.skipped))


def data_root(path: Path) -> Path:
    """Where a data path's relative image paths start: its directory (a dataset directory: itself)."""
    return path if path.is_dir() else path.parent


def build_dataset(cfg: Config, train_path: Path, tokenizer: Tokenizer, records=None, fmt: str = "auto"
                  ) -> PreferenceDataset:
    """Preference pairs from `train_path` in format `fmt` (or the given records of it)."""
    records = read_preference_file(train_path, fmt) if records is None else records
    ds = PreferenceDataset(records, data_root(train_path), tokenizer, _collate_cfg(cfg), cfg.model.vision.image_size,
                           images=_images(cfg, tokenizer), source=train_path,
                           images_outside_root=cfg.data.images_outside_root, data_files=data_files(train_path, fmt))
    _log_kept(train_path, ds)
    return ds


def build_p2_dataset(cfg: Config, train_path: Path, tokenizer: Tokenizer, objective: Objective,
                     records=None) -> P2Dataset:
    """P2-DPO samples from `train_path` (or the given records of it); the reference's calibration rows follow the
    objective's calib_reference."""
    records = read_p2_records(train_path) if records is None else records
    ds = P2Dataset(records, train_path.parent, tokenizer, _collate_cfg(cfg), cfg.model.vision.image_size,
                   calib_reference=objective.cfg.calib_reference, source=train_path,
                   images_outside_root=cfg.data.images_outside_root, images=_images(cfg, tokenizer))
    _log_kept(train_path, ds)
    return ds


def build_train_dataset(cfg: Config, train_path: Path, tokenizer: Tokenizer,
                        objective: Objective) -> PreferenceDataset:
    """The training set in the form the objective takes (pairs or P2-DPO samples)."""
    if takes_p2_records(objective):
        return build_p2_dataset(cfg, train_path, tokenizer, objective)
    return build_dataset(cfg, train_path, tokenizer, fmt=cfg.data.format)


def check_data(cfg: Config, objective: Objective) -> str:
    """`--dry-run`'s data check, in this process: reads every record and decodes every image of the user's
    training file (data.source=jsonl) as training would, before any job starts; a one-line summary."""
    if cfg.data.source != "jsonl":
        return "data: the embedded synthetic task (generated at the first launch)"
    if not cfg.data.train_path:
        return "data: data.train_path not given here: not checked (give it to read and check the data)"
    train_path, tok_path = prepare_data(cfg, objective)
    ds = build_train_dataset(cfg, train_path, build_tokenizer(cfg, tok_path), objective)
    skipped = ", ".join(f"{k}={v}" for k, v in sorted(ds.skipped.items()))
    return f"data {train_path}: {len(ds)} samples kept, skipped: {skipped}"


def build_eval_datasets(cfg: Config, tokenizer: Tokenizer) -> dict[str, PreferenceDataset]:
    """Held-out preference pairs ("eval") and yes/no probe records ("probe") for `eval.interval > 0` (else none)."""
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
    out = {}
    for name, path in (("eval", eval_path), ("probe", probe_path)):
        if path is None:
            continue
        if not path.is_file():
            raise FileNotFoundError(f"eval: no such file {path}")
        records = read_preference_file(path)[: cfg.eval.max_pairs if name == "eval" else None]
        out[name] = build_dataset(cfg, path, tokenizer, records=records)
    return out


def build_eval_sets(cfg: Config, datasets: dict[str, PreferenceDataset], groups) -> tuple[list, list]:
    """The held-out sets split over DP ranks: (pairs scored with the objective, yes/no probes)."""
    from megatron_po.train.evaluate import build_eval_set

    mbs = cfg.train.micro_batch_size
    sets = [build_eval_set(name, ds, mbs, groups.dp_rank, groups.dp_size) for name, ds in datasets.items()]
    return [e for e in sets if e.name == "eval"], [e for e in sets if e.name == "probe"]


def make_micro_batch(ds: PreferenceDataset, indices: list[int], groups, packing: Optional[Config] = None) -> MicroBatch:
    """Dataset samples `indices` as one micro-batch on this rank: collated, with `packing` (a config with
    data.packing) packed into rows of model.max_seq_length (one THD row on the TE spec), this CP rank's share.

    Everything is laid out on the host (the supervised positions, THD runs and image layout the step needs there
    are computed from CPU tensors: `Rows`), then moved to the device at once (`MicroBatch.to`: pinned, async)."""
    batch = ds.collator([ds[i] for i in indices])
    pack = packing is not None and packing.data.packing
    if pack:
        batch = pack_rows(batch, packing.model.max_seq_length, pad_to_multiple_of(packing),
                          ds.collator.tokenizer.pad_id)
    mb = MicroBatch.from_collated(batch).cp_shard(groups.cp_size, groups.cp_rank)
    if pack and use_te_spec(packing.model):
        mb = mb.as_thd()  # TE attention isolates the sequences by cu_seqlens in one row (train/rows.thd_params)
    return mb.to(groups.device)


def micro_batches(ds: PreferenceDataset, indices: list[list[int]], groups) -> Iterator[MicroBatch]:
    """Micro-batches of the given dataset indices, unpacked, collated lazily (images load on demand)."""
    for idx in indices:
        yield make_micro_batch(ds, idx, groups)


def step_micro_batches(cfg: Config, ds: PreferenceDataset, sampler: PairBatchSampler, step: int,
                       groups) -> list[MicroBatch]:
    """This rank's micro-batches of optimizer step `step`, each with its samples' positions in the global batch.

    Unpacked, a rank takes a contiguous share of the sampler's global batch. With `data.packing` the global
    batch is first spread over the DP ranks by token counts (equal sample counts), and each micro-batch's rows
    are packed (data/packing.py). Either way every rank trains on the same global batch: the objective, its
    normalisation by the global pair count and its statistics do not change.
    """
    order = sampler.global_batch(step)
    if cfg.data.packing:
        mine = balance_over_dp([ds.cost(i) for i in order], groups.dp_size)[groups.dp_rank]
    else:
        share = len(order) // groups.dp_size
        mine = list(range(groups.dp_rank * share, (groups.dp_rank + 1) * share))
    out = []
    for start in range(0, len(mine), cfg.train.micro_batch_size):
        positions = mine[start:start + cfg.train.micro_batch_size]
        mb = make_micro_batch(ds, [order[p] for p in positions], groups, packing=cfg)
        mb.sample_index = move(torch.tensor(positions), groups.device)
        out.append(mb)
    return out


def build_sampler(cfg: Config, num_samples: int, dp_rank: int, dp_size: int) -> PairBatchSampler:
    return PairBatchSampler(
        num_samples=num_samples,
        global_batch_size=cfg.train.global_batch_size,
        micro_batch_size=cfg.train.micro_batch_size,
        dp_rank=dp_rank,
        dp_size=dp_size,
        seed=cfg.train.seed,
    )
