"""An objective's loss inputs from one micro-batch's per-row log-prob sums: ``PairLogps`` for preference pairs,
``P2Logps`` for P2-DPO samples (the registry entry's ``inputs`` says which)."""

from __future__ import annotations

from typing import Optional, Union

from megatron_po.data.p2_collate import P2_TERMS
from megatron_po.objectives.common import PairLogps
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


def pair_inputs(mb: MicroBatch, policy: SeqLogps, ref: Optional[SeqLogps]) -> PairLogps:
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


def p2_inputs(mb: MicroBatch, policy: SeqLogps, ref: Optional[SeqLogps]) -> P2Logps:
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


LOSS_INPUTS = {"pairs": pair_inputs, "p2": p2_inputs}
"""``ObjectiveSpec.inputs`` -> ``(micro-batch, policy sums, reference sums or None) -> loss inputs``."""


def loss_inputs(kind: str, mb: MicroBatch, policy: SeqLogps, ref: Optional[SeqLogps]) -> Union[PairLogps, P2Logps]:
    return LOSS_INPUTS[kind](mb, policy, ref)
