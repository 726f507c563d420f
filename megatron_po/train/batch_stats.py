"""Batch statistics over the optimizer step's whole global batch (all DP ranks and micro-batches).

Objectives such as ACPO's batch-α reading, β-DPO and CW-DPO's SFT-C gate need statistics of the batch. Computed
per micro-step (what the reference codes do) they change when the layout splits the batch differently. With
`objective.batch_stat_scope=global_batch` the trainer first runs the policy forward-only over every micro-batch of
the step through megatron's schedule (the same mechanism as the reference pass), gathers the per-pair quantities
the objective asks for over DP on the last pipeline stage, and hands them to each micro-batch's loss through
`ObjectiveContext`: the objective is then identical for any TP/PP/DP/micro-batch layout. Net cost: one no-grad
policy forward per step, only for objectives that need it; a frozen tower's image embeddings are reused.
"""

from __future__ import annotations

from typing import Optional

import torch

from megatron_po.parallel.reduce import all_gather_cat
from megatron_po.train.batch import MicroBatch
from megatron_po.kinds import kind_of
from megatron_po.train.step import PreferenceStep, run_logps_pass


def gather_global_stats(step: PreferenceStep, policy, batches: list[MicroBatch]) -> Optional[dict[str, torch.Tensor]]:
    """Per-pair statistics [N] in global pair order (the order of ``MicroBatch.sample_index``), on the last
    pipeline stage; None on the other stages and when the objective takes none.

    The micro-batches must carry their reference log-probs already (the reference pass or the cache runs first).
    """
    objective = step.objective
    if not objective.global_batch_stats:
        return None
    policy_logps = run_logps_pass(step.groups, policy, batches, step.policy_tower)
    if policy_logps is None:  # not the last stage: the loss, and so the statistics, live there
        return None
    per_mb = [objective.stats(kind_of(objective).loss_inputs(mb, logps, mb.ref_logps))
              for mb, logps in zip(batches, policy_logps)]
    # ranks may hold any positions of the global batch (packing spreads it by tokens): place each pair's
    # statistics at its global position, where `ObjectiveContext.pair_index` looks them up
    index = all_gather_cat(torch.cat([mb.sample_index for mb in batches]), step.groups.dp)
    out = {}
    for k in per_mb[0]:
        values = all_gather_cat(torch.cat([m[k] for m in per_mb]), step.groups.dp)
        out[k] = torch.empty_like(values).index_copy_(0, index, values)
    return out
