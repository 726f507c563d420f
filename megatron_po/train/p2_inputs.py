"""P2-DPO's loss inputs from the per-row sequence log-probs of one P2 micro-batch (data/p2_collate.py)."""

from __future__ import annotations

import torch

from megatron_po.data.p2_collate import P2_TERMS
from megatron_po.objectives.p2_dpo import P2Logps

# P2_TERMS row -> (policy field, reference field) of P2Logps
_FIELDS = {
    "focus_chosen": ("policy_focus_chosen_logps", "ref_focus_chosen_logps"),
    "focus_rejected": ("policy_focus_rejected_logps", "ref_focus_rejected_logps"),
    "calib_aug": ("policy_calib_aug_logps", "ref_calib_aug_logps"),
    "calib_deg": ("policy_calib_deg_logps", "ref_calib_deg_logps"),
    "robust_chosen": ("policy_robust_chosen_logps", "ref_robust_chosen_logps"),
    "robust_rejected": ("policy_robust_rejected_logps", "ref_robust_rejected_logps"),
}


def p2_logps(batch: dict, policy_seq: torch.Tensor, ref_seq: torch.Tensor) -> P2Logps:
    """Gathers each term's [B] log-probs from the rows' sums.

    Args:
        batch: a P2 batch (``p2_rows`` [6, B], branch masks, CLIP scores).
        policy_seq: [R] policy log-prob sums of the batch's rows (with grad).
        ref_seq: [R] reference sums of the reference's rows (the same order).
    """
    # absent slots read row 0: the loss never uses them and gives them zero gradient
    rows = batch["p2_rows"].clamp_min(0)
    fields = {}
    for t, term in enumerate(P2_TERMS):
        policy_name, ref_name = _FIELDS[term]
        fields[policy_name] = policy_seq[rows[t]]
        fields[ref_name] = ref_seq[rows[t]]
    return P2Logps(**fields, clip_crop_score=batch["clip_crop_score"], clip_image_score=batch["clip_image_score"],
                   has_focus=batch["has_focus"], has_robust=batch["has_robust"])
