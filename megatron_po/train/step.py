"""Megatron's step contract for preference pairs: `forward_step(data_iterator, model) -> (output, loss_func)`.

A micro-batch holds B pairs laid out as rows [chosen_0..chosen_{B-1}; rejected_0..rejected_{B-1}], or B P2-DPO
samples whose rows are the six forwards of OBJECTIVES.md §9.2 (data/p2_collate.py). Each image is encoded once
and serves every row that shows it (train/rows.py); the policy runs with grad and the frozen reference runs under
no_grad on bit-identical inputs in the same step. The loss returned to the schedule is the *sum* of per-pair
losses with the pair count as "num_tokens": with `calculate_per_token_loss=True` megatron divides the gradients
once by the global pair count (all-reduced over DP), so any micro-batch split equals one large batch.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial
from typing import Any, Iterator, Optional

import torch
from megatron.core.pipeline_parallel import get_forward_backward_func

from megatron_po.logprobs import segment_sums
from megatron_po.models.vlm import VLMModel
from megatron_po.objectives import OBJECTIVES, objective_needs_reference
from megatron_po.objectives.common import ObjectiveContext, PairLogps
from megatron_po.parallel.groups import ParallelGroups
from megatron_po.train.p2_inputs import p2_logps
from megatron_po.train.rows import encode, row_token_logps


@dataclass
class PreferenceStep:
    """Everything `forward_step` needs besides the policy, passed explicitly (no globals)."""

    objective_name: str
    objective_cfg: Any
    groups: ParallelGroups
    reference: Optional[VLMModel]
    share_image_embeds: bool = False
    """Encode images once for policy and reference (both towers frozen and identical, see `same_vision`)."""
    use_global_stats: bool = False
    """Run the statistics pass of train/batch_stats.py: the objective takes statistics across pairs with this
    config and objective.batch_stat_scope=global_batch (decided once, at build time)."""
    total_steps: int = 1
    iteration: int = 0
    """The optimizer step being computed (0-based); set by the loop before each step."""
    global_stats: Optional[dict] = None
    """This step's gathered per-pair statistics (None unless use_global_stats and the objective has any)."""
    objective_state: Optional[dict] = None
    """State an objective carries across optimizer steps (beta-DPO's EMA); JSON floats, saved in checkpoints."""

    def __post_init__(self):
        self.objective = OBJECTIVES[self.objective_name]
        self.needs_reference = objective_needs_reference(self.objective_name, self.objective_cfg)
        if self.needs_reference and self.reference is None:
            raise ValueError(f"objective {self.objective_name!r} needs a reference model")

    def context(self, batch: dict) -> ObjectiveContext:
        return ObjectiveContext(step=self.iteration, total_steps=self.total_steps, global_stats=self.global_stats,
                                pair_index=batch.get("_pair_index"), state=self.objective_state)

    def commit_state(self) -> None:
        """After an optimizer step: fold this step's global statistics into the objective's state (once)."""
        next_state = self.objective.next_state
        if next_state is not None and self.global_stats is not None:
            self.objective_state = next_state(self.objective_cfg, self.objective_state, self.global_stats)


def same_vision(policy: VLMModel, reference: Optional[VLMModel]) -> bool:
    """True when the policy's vision tower + projector are frozen and bit-identical to the reference's."""
    if reference is None or not policy.vision_frozen:
        return False
    mine = dict(policy.vision.named_parameters()) | {f"p.{n}": p for n, p in policy.projector.named_parameters()}
    theirs = dict(reference.vision.named_parameters()) | {
        f"p.{n}": p for n, p in reference.projector.named_parameters()
    }
    return mine.keys() == theirs.keys() and all(torch.equal(mine[k], theirs[k]) for k in mine)


@dataclass
class Logps:
    """Per-sequence sums [R] and, when the batch carries sentence segments, chosen-row segment sums [B, K]."""

    seq: torch.Tensor
    segments: Optional[torch.Tensor] = None


def _logps(per_token: torch.Tensor, batch: dict) -> Logps:
    seg = None
    if "chosen_segment_ids" in batch:
        b = batch["num_pairs"]
        seg = segment_sums(per_token[:b], batch["chosen_segment_ids"], int(batch["num_segments"].max()))
    return Logps(per_token.sum(-1), seg)


def row_logps(
    step: PreferenceStep, batch: dict, model, with_reference: bool
) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
    """Per-token log-probs [R, S] of the batch's rows under the policy (with grad unless under no_grad) and, if
    asked, of its reference rows (``batch["ref_rows"]``, else the same rows) under the reference (no grad).

    The images are encoded once per model (once in all when both towers are frozen copies), and every row takes
    its images from that one encoding: one policy forward and one reference forward per micro-batch.
    """
    images = batch["images"]
    if step.share_image_embeds:
        # tower and projector are frozen copies of the same weights in policy and reference: encode once
        with torch.no_grad():
            embeds = encode(model, images)
        ref_embeds = embeds
    else:
        embeds = encode(model, images)
        ref_embeds = None
    policy = row_token_logps(model, batch, embeds, images, step.groups.tp)
    if not with_reference:
        return policy, None
    with torch.no_grad():
        if ref_embeds is None:
            ref_embeds = encode(step.reference, images)
        # the reference sees the policy's very tensors (images, noise included): only P2-DPO's calibration rows
        # may differ, in their response (calib_reference="rejected")
        ref = row_token_logps(step.reference, batch.get("ref_rows", batch), ref_embeds, images, step.groups.tp)
    return policy, ref


def policy_and_reference_logps(
    step: PreferenceStep, batch: dict, model, with_reference: Optional[bool] = None
) -> tuple[Logps, Optional[Logps]]:
    """Runs the policy (with grad unless under no_grad) and the reference (no grad) on one micro-batch of pairs.

    Returns:
        (policy, reference or None): per-sequence sums of response-token log-probs (fp32, TP-reduced).
    """
    needs_ref = step.needs_reference if with_reference is None else with_reference
    cached_ref = batch.get("_ref_logps")  # from the global-statistics pass of this step
    policy, ref = row_logps(step, batch, model, needs_ref and cached_ref is None)
    ref_logps = cached_ref if needs_ref and cached_ref is not None else None
    if ref is not None:
        ref_logps = _logps(ref, batch)
    return _logps(policy, batch), ref_logps


def split_pairs(batch: dict, policy: Logps, ref: Optional[Logps]) -> PairLogps:
    b = batch["num_pairs"]
    dtype = policy.seq.dtype
    seg_lengths = None
    if policy.segments is not None:
        ids = batch["chosen_segment_ids"]
        seg_lengths = segment_sums((ids >= 0).to(dtype), ids, policy.segments.shape[1])
    return PairLogps(
        policy_chosen_logps=policy.seq[:b],
        policy_rejected_logps=policy.seq[b:],
        ref_chosen_logps=None if ref is None else ref.seq[:b],
        ref_rejected_logps=None if ref is None else ref.seq[b:],
        chosen_lengths=batch["chosen_lengths"].to(dtype),
        rejected_lengths=batch["rejected_lengths"].to(dtype),
        policy_chosen_segment_logps=policy.segments,
        ref_chosen_segment_logps=None if ref is None else ref.segments,
        chosen_segment_lengths=seg_lengths,
        chosen_segment_similarity=batch.get("segment_similarity"),
    )


def loss_func(step: PreferenceStep, batch: dict, inputs, output: torch.Tensor):
    """The objective on this micro-batch's inputs (``PairLogps`` or ``P2Logps``): (Σ loss, sample count, metrics)."""
    per_pair, samples = step.objective.loss_fn(inputs, step.objective_cfg, group=step.groups.dp,
                                               ctx=step.context(batch))
    samples = {k: v.detach() for k, v in samples.items()}
    # objectives that drop pairs (beta-DPO filtering) or samples (P2-DPO without a branch) weight them 0: the
    # step normalises by the global weighted count
    weight = samples.get("pair_weight")
    count = batch["num_pairs"] if weight is None else int(weight.sum().round())
    samples["loss"] = per_pair.detach()
    return per_pair.sum(), torch.tensor(count, dtype=torch.int), {"samples": samples}


def run_schedule(step: PreferenceStep, model, batches: list[dict], forward_step_func, forward_only: bool) -> list:
    """This rank's micro-batches through megatron's forward/backward schedule; returns the loss_func outputs."""
    return get_forward_backward_func()(
        forward_step_func=forward_step_func,
        data_iterator=iter(batches),
        model=model,
        num_microbatches=len(batches),
        seq_length=max(b["tokens"].shape[1] for b in batches),
        micro_batch_size=batches[0]["tokens"].shape[0],  # rows (pairs: chosen + rejected of each)
        forward_only=forward_only,
        pg_collection=step.groups.pg_collection,
    )


def forward_step(step: PreferenceStep, data_iterator: Iterator[dict], model):
    batch = next(data_iterator)
    if "p2_rows" in batch:  # P2-DPO: every row of every term in one policy and one reference forward
        policy, ref = row_logps(step, batch, model, with_reference=True)
        output = policy.sum(-1)
        inputs = p2_logps(batch, output, ref.sum(-1))
    else:
        policy_logps, ref_logps = policy_and_reference_logps(step, batch, model)
        inputs = split_pairs(batch, policy_logps, ref_logps)
        output = policy_logps.seq
    # megatron's schedule hands `output` back to loss_func; the structured log-probs travel in the closure
    return output, partial(loss_func, step, batch, inputs)
