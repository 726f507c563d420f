"""P2-DPO samples (OBJECTIVES.md §9): up to six rows per sample, one per term of P2_TERMS (data/p2_collate.py)."""

from __future__ import annotations

from typing import Optional

import torch

from megatron_po.data.dataset import P2Dataset
from megatron_po.data.p2_collate import P2_TERMS, P2Collator
from megatron_po.data.p2_records import iter_p2_texts
from megatron_po.data.synthetic_p2 import generate_p2_dataset
from megatron_po.kinds.spec import InputKind
from megatron_po.objectives.p2_dpo import P2Logps
from megatron_po.train.batch import MicroBatch, SeqLogps

# P2_TERMS row -> (policy field, reference field) of P2Logps
_P2_FIELDS = {
    "focus_chosen": ("policy_focus_chosen_logps", "ref_focus_chosen_logps"),
    "focus_rejected": ("policy_focus_rejected_logps", "ref_focus_rejected_logps"),
    "calib_aug": ("policy_calib_aug_logps", "ref_calib_aug_logps"),
    "calib_deg": ("policy_calib_deg_logps", "ref_calib_deg_logps"),
    "robust_chosen": ("policy_robust_chosen_logps", "ref_robust_chosen_logps"),
    "robust_rejected": ("policy_robust_rejected_logps", "ref_robust_rejected_logps"),
}


def loss_inputs(mb: MicroBatch, policy: SeqLogps, ref: Optional[SeqLogps]) -> P2Logps:
    """Each P2 term's [B] log-probs from the rows' sums (policy rows and the reference's rows: the same order)."""
    if ref is None:
        raise ValueError("objective 'p2_dpo' needs the reference's log-probs (reference.source model or cache)")
    # absent slots read row 0: the loss never uses them and gives them zero gradient
    rows = mb.p2.p2_rows.clamp_min(0)
    fields = {}
    for t, term in enumerate(P2_TERMS):
        policy_name, ref_name = _P2_FIELDS[term]
        fields[policy_name] = policy.seq[rows[t]]
        fields[ref_name] = ref.seq[rows[t]]
    p2 = mb.p2
    return P2Logps(**fields, clip_crop_score=p2.clip_crop_score, clip_image_score=p2.clip_image_score,
                   has_focus=p2.has_focus, has_robust=p2.has_robust)


def cache_values(mb: MicroBatch, ref: SeqLogps) -> dict[str, torch.Tensor]:
    """``terms`` [B, 6]: the reference rows of P2_TERMS, NaN where a branch is absent."""
    rows = mb.p2.p2_rows  # [6, B]
    nan = torch.full_like(rows, float("nan"), dtype=ref.seq.dtype)
    return {"terms": torch.where(rows >= 0, ref.seq[rows.clamp_min(0)], nan).t().contiguous()}


def cache_lookup(table: dict[str, torch.Tensor], rows: torch.Tensor, mb: MicroBatch, device) -> SeqLogps:
    terms = table["terms"][rows]  # [B, 6]
    p2_rows = mb.p2.p2_rows.cpu()
    seq = torch.zeros(mb.reference_rows.num_logical, dtype=terms.dtype)
    present = p2_rows >= 0
    seq[p2_rows[present]] = terms.t()[present]
    return SeqLogps(seq.to(device))


def generate(data_dir, data, image_size: int) -> None:
    generate_p2_dataset(data_dir, data.num_train, data.num_eval, seed=data.seed, image_size=image_size)


KIND = InputKind(
    name="p2", rows_per_sample=6, parser="p2", train_file="p2_train.jsonl", dataset=P2Dataset,
    build_collator=lambda tokenizer, collate_cfg, images, objective_cfg: P2Collator(
        tokenizer, collate_cfg, images, objective_cfg.calib_reference),
    generate_synthetic=generate, texts=iter_p2_texts,
    # the reference's calibration rows hold y_l^f or y_w^f
    settings=lambda objective_cfg: {"objective.params.calib_reference": objective_cfg.calib_reference},
    loss_inputs=loss_inputs, cache_values=cache_values, cache_lookup=cache_lookup,
    # held-out pairs are scored by the policy only: the objective takes other inputs than pairs
    evaluates=False,
)
