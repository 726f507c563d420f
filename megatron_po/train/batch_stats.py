"""Batch statistics over the optimizer step's whole global batch (all DP ranks and micro-batches).

Objectives such as ACPO's batch-α reading, β-DPO and CW-DPO's SFT-C gate need statistics of the batch. Computed
per micro-step (what the reference codes do) they change when the layout splits the batch differently. With
`objective.batch_stat_scope=global_batch` the trainer first runs a no-grad pass over every micro-batch of the
step, gathers the per-pair quantities the objective asks for over DP, and hands them to each micro-batch's loss
through `ObjectiveContext`: the objective is then identical for any TP/DP/micro-batch layout. The reference
log-probs of that pass are kept, so the main pass skips the reference forward (net cost: one no-grad policy
forward per step, only for objectives that need it).
"""

from __future__ import annotations

from typing import Optional

import torch

from megatron_po.parallel.reduce import all_gather_cat
from megatron_po.train.step import PreferenceStep, policy_and_reference_logps, split_pairs


def gather_global_stats(step: PreferenceStep, batches: list[dict], model) -> Optional[dict[str, torch.Tensor]]:
    """Runs the no-grad pass; returns per-pair statistics [N] in global pair order, or None if not needed.

    Global order is DP-rank-major then micro-batch, which is exactly the order of the sampler's global batch.
    Each batch gets `_ref_logps` (reused by the main pass) and `_pair_index` (its pairs' global positions).
    """
    obj = step.objective
    if not step.use_global_stats:
        return None
    per_mb: list[dict[str, torch.Tensor]] = []
    with torch.no_grad():
        for batch in batches:
            policy_logps, ref_logps = policy_and_reference_logps(step, batch, model)
            batch["_ref_logps"] = ref_logps
            per_mb.append(obj.global_stats(split_pairs(batch, policy_logps, ref_logps), step.objective_cfg))
    local_n = sum(b["num_pairs"] for b in batches)
    offset = step.groups.dp_rank * local_n
    for batch in batches:
        batch["_pair_index"] = torch.arange(offset, offset + batch["num_pairs"], device=batch["tokens"].device)
        offset += batch["num_pairs"]
    return {k: all_gather_cat(torch.cat([m[k] for m in per_mb]), step.groups.dp) for k in per_mb[0]}
