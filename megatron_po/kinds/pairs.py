"""Preference pairs (every objective but P2-DPO): two rows per sample, [chosen 0..B-1 ; rejected 0..B-1]."""

from __future__ import annotations

from typing import Optional

import torch

from megatron_po.data.collate import PairCollator
from megatron_po.data.dataset import PreferenceDataset
from megatron_po.data.records import iter_texts
from megatron_po.data.synthetic import generate_synthetic_dataset
from megatron_po.kinds.spec import InputKind
from megatron_po.objectives.common import PairLogps
from megatron_po.train.batch import MicroBatch, SeqLogps


def loss_inputs(mb: MicroBatch, policy: SeqLogps, ref: Optional[SeqLogps]) -> PairLogps:
    """Rows [chosen 0..B-1; rejected 0..B-1] -> per-pair sums; ``ref`` None for reference-free objectives."""
    b = mb.num_samples
    dtype = policy.seq.dtype
    seg_lengths = None
    if policy.segments is not None:
        seg_lengths = mb.chosen_segment_lengths.to(dtype)
    return PairLogps(
        policy_chosen_logps=policy.seq[:b],
        policy_rejected_logps=policy.seq[b:],
        ref_chosen_logps=None if ref is None else ref.seq[:b],
        ref_rejected_logps=None if ref is None else ref.seq[b:],
        chosen_lengths=mb.chosen_lengths.to(dtype),
        rejected_lengths=mb.rejected_lengths.to(dtype),
        policy_chosen_segment_logps=policy.segments,
        ref_chosen_segment_logps=None if ref is None else ref.segments,
        chosen_segment_lengths=seg_lengths,
        chosen_segment_similarity=mb.segment_similarity,
    )


def cache_values(mb: MicroBatch, ref: SeqLogps) -> dict[str, torch.Tensor]:
    """``chosen`` [B], ``rejected`` [B], ``chosen_segments`` [B, K] (per-sentence sums: ASPO)."""
    b = mb.num_samples
    return {"chosen": ref.seq[:b], "rejected": ref.seq[b:], "chosen_segments": ref.segments}


def _pad_columns(t: torch.Tensor, k: int) -> torch.Tensor:
    return torch.cat([t, t.new_zeros(t.shape[0], k - t.shape[1])], 1) if t.shape[1] < k else t


def cache_lookup(table: dict[str, torch.Tensor], rows: torch.Tensor, mb: MicroBatch, device) -> SeqLogps:
    seq = torch.cat([table["chosen"][rows], table["rejected"][rows]])
    segments = None
    if mb.chosen_segment_ids is not None:
        k = mb.num_segment_slots
        segments = _pad_columns(table["chosen_segments"][rows], k)[:, :k].to(device)
    return SeqLogps(seq.to(device), segments)


def generate(data_dir, data, image_size: int) -> None:
    generate_synthetic_dataset(data_dir, data.num_train, data.num_eval, seed=data.seed, image_size=image_size,
                               yesno_share=data.yesno_share, near_miss=data.near_miss)


KIND = InputKind(
    name="pairs", rows_per_sample=2, parser="", train_file="train.jsonl", dataset=PreferenceDataset,
    build_collator=lambda tokenizer, collate_cfg, images, objective_cfg: PairCollator(tokenizer, collate_cfg, images),
    generate_synthetic=generate, texts=iter_texts, settings=lambda objective_cfg: {},
    loss_inputs=loss_inputs, cache_values=cache_values, cache_lookup=cache_lookup, evaluates=True,
)
