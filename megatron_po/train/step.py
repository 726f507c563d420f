"""Megatron's step contract for preference micro-batches: `forward_step(data_iterator, model) -> (output, loss_func)`.

Every pass of an optimizer step goes through megatron's schedule (`run_schedule`: no pipelining, or 1F1B under
pipeline parallelism), and every log-prob is computed where megatron's contract puts it: `loss_func` receives the
output tensor on the last pipeline stage (the final hidden states, or logits) and takes the vocab-parallel
log-probs of the rows there (train/rows.token_logps). A step is

1. the reference's forward-only pass (`logps_forward_step` on the reference model), or the cache: each micro-batch's
   ``ref_logps`` (train/reference.py);
2. objectives with global-batch statistics: the policy's forward-only pass, gathered over DP
   (train/batch_stats.py);
3. the policy's forward + backward (`train_forward_step`): per-row sums -> the objective's inputs -> its per-pair
   loss. The loss handed to the schedule is the *sum* of per-pair losses with the pair count as "num_tokens":
   with `calculate_per_token_loss=True` megatron divides the gradients once by the global pair count
   (broadcast from the last stage, all-reduced over DP), so any micro-batch split equals one large batch.

Images are encoded on the first stage only, once per step and tower when the tower is frozen (`Tower`): the
reference pass, the statistics pass and the policy pass share one encoding when the towers are frozen copies.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial
from typing import Iterator, Optional

import torch
from megatron.core.pipeline_parallel import get_forward_backward_func
from megatron.core.pipeline_parallel.p2p_communication import P2PCommunicator
from megatron.core.utils import get_model_config

from megatron_po.logprobs import IGNORE_INDEX, segment_sums
from megatron_po.objectives import Objective
from megatron_po.objectives.common import ObjectiveContext
from megatron_po.parallel.context import counts_on_one_cp_rank, reduce_over_cp
from megatron_po.parallel.groups import ParallelGroups
from megatron_po.train.batch import MicroBatch, Rows, SeqLogps
from megatron_po.kinds import kind_of
from megatron_po.train.rows import encode, forward_rows, token_logps, unwrap


@dataclass(frozen=True)
class Tower:
    """The image embeddings a pass uses. A frozen tower encodes each micro-batch once per step, without grad, into
    ``MicroBatch.image_embeds[key]``; every later pass with the same key reuses that encoding (the reference's
    tower takes the policy's key when both are frozen copies, see `same_vision`). A trainable one encodes in its
    own pass, with grad."""

    key: str
    frozen: bool


@dataclass
class PreferenceStep:
    """What the policy's `forward_step` needs besides the model, passed explicitly (no globals)."""

    objective: Objective
    groups: ParallelGroups
    policy_tower: Tower
    total_steps: int = 1
    iteration: int = 0
    """The optimizer step being computed (0-based); set by the loop before each step."""
    global_stats: Optional[dict] = None
    """This step's gathered per-pair statistics (last stage; None unless the objective takes global-batch ones)."""
    objective_state: Optional[dict] = None
    """State an objective carries across optimizer steps (beta-DPO's EMA); JSON floats, saved in checkpoints."""

    measure_reference_gap: bool = False
    """Report the largest |policy − reference| sequence log-prob of this step (the run's first step, where they
    start equal: a cache from another checkpoint or dtype shows at once)."""

    def context(self, mb: MicroBatch) -> ObjectiveContext:
        # finiteness is checked once per step for every rank (`finite_flags`), not by each objective call
        return ObjectiveContext(step=self.iteration, total_steps=self.total_steps, global_stats=self.global_stats,
                                pair_index=mb.sample_index, state=self.objective_state, inputs_checked=True)

    def commit_state(self) -> None:
        """After an optimizer step, on the last stage: fold this step's statistics into the objective's state."""
        if self.global_stats is not None:
            self.objective_state = self.objective.next_state(self.objective_state, self.global_stats)


def same_vision(policy, reference, groups: ParallelGroups) -> bool:
    """True when the policy's vision tower + projector are frozen and bit-identical to the reference's on every
    rank of the TP group (a projector shard may differ on one rank only: all of them must take the same path, or
    the projector's TP collectives would not match)."""
    policy = unwrap(policy)
    same = reference is not None and policy.vision is not None and policy.vision_frozen
    if same:
        reference = unwrap(reference)
        mine = dict(policy.vision.named_parameters()) | {f"p.{n}": p for n, p in policy.projector.named_parameters()}
        theirs = dict(reference.vision.named_parameters()) | {
            f"p.{n}": p for n, p in reference.projector.named_parameters()
        }
        same = mine.keys() == theirs.keys() and all(torch.equal(mine[k], theirs[k]) for k in mine)
    flag = torch.tensor(int(same), device=groups.device)
    torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MIN, group=groups.tp)
    return bool(flag)


def image_embeds(model, mb: MicroBatch, tower: Tower) -> torch.Tensor:
    """Per-image embeddings of the micro-batch for `model`'s pass (first pipeline stage)."""
    if not tower.frozen:
        return encode(model, mb.images)
    cached = mb.image_embeds.get(tower.key)
    if cached is None:
        with torch.no_grad():
            cached = mb.image_embeds[tower.key] = encode(model, mb.images)
    return cached


def stage_output(model, mb: MicroBatch, rows: Rows, tower: Tower) -> torch.Tensor:
    """This stage's output for `rows`: on the last stage the final hidden states (model.logprobs=fused) or the
    logits, elsewhere the hidden states for the next stage."""
    embeds = image_embeds(model, mb, tower) if unwrap(model).pre_process else None
    return forward_rows(model, rows, embeds, mb.images)


def sequence_logps(model, output: torch.Tensor, rows: Rows, mb: MicroBatch, groups: ParallelGroups) -> SeqLogps:
    """Per-row sums of response log-probs and, for pair batches, per-sentence sums of the chosen rows (fp64),
    summed over the CP group (each CP rank holds part of every row: parallel/context.py)."""
    return sum_over_cp(token_logps_sums(token_logps(model, output, rows, groups.tp), rows, mb), groups.cp)


def sum_over_cp(logps: SeqLogps, cp_group) -> SeqLogps:
    """Each CP rank's partial sums summed over the CP group (parallel/context.reduce_over_cp)."""
    return SeqLogps(reduce_over_cp(logps.seq, cp_group),
                    None if logps.segments is None else reduce_over_cp(logps.segments, cp_group))


def token_logps_sums(per_token: torch.Tensor, rows: Rows, mb: MicroBatch) -> SeqLogps:
    """Per-row (per packed sequence) and per-sentence sums of per-token log-probs [R, S] of `rows` (this rank's
    positions of them under CP), in fp64."""
    # summed in fp64: a sum of ~100 log-probs near -300 has an fp32 ulp of 3e-5, and every reward, margin and loss
    # is a β-scaled difference of such sums; fp32 sums put the layout-to-layout loss error at ~2e-6, fp64 at ~1e-7
    per_token = per_token.double()
    if rows.packed:  # sums per sequence, in collated order: what follows sees the unpacked layout
        seq = segment_sums(per_token.reshape(1, -1), rows.sequence_ids.reshape(1, -1), rows.num_sequences)[0]
        segments = None
        if mb.chosen_segment_slots is not None:
            b, k = mb.num_samples, mb.num_segment_slots
            slots = mb.chosen_segment_slots.reshape(1, -1)
            segments = segment_sums(per_token.reshape(1, -1), slots, b * k)[0].view(b, k)
        return SeqLogps(seq, segments)
    segments = None
    if mb.chosen_segment_ids is not None:
        b = mb.num_samples
        segments = segment_sums(per_token[:b], mb.chosen_segment_ids, mb.num_segment_slots)
    return SeqLogps(per_token.sum(-1), segments)


def logps_forward_step(groups: ParallelGroups, tower: Tower, reference_rows: bool,
                       data_iterator: Iterator[MicroBatch], model):
    """A forward-only pass (reference, statistics, evaluation): each micro-batch's `SeqLogps` on the last stage."""
    mb = next(data_iterator)
    rows = mb.reference_rows if reference_rows else mb.rows
    output = stage_output(model, mb, rows, tower)

    def loss_func(last_output: torch.Tensor):
        logps = sequence_logps(model, last_output, rows, mb, groups)
        return last_output.new_zeros(()), torch.tensor(mb.num_samples, dtype=torch.int), {"logps": logps.detach()}

    return output, loss_func


FINITE_TERMS = ("policy log-probs", "reference log-probs", "policy loss")
"""What `train_loss_func` checks for NaN/Inf, in the order of its ``finite`` flags."""


def train_loss_func(step: PreferenceStep, model, mb: MicroBatch, last_output: torch.Tensor):
    """The objective on this micro-batch (last stage): (Σ per-pair loss, pair count, {"samples": metrics,
    "finite": [3] bool flags of FINITE_TERMS, and at the run's first step "reference_gap"}).

    Nothing here waits for the device: the finiteness flags and the pair count stay tensors, and the loop reads
    them once per step for all micro-batches and ranks (train/loop.py).
    """
    policy = sequence_logps(model, last_output, mb.rows, mb, step.groups)
    ref = mb.ref_logps
    inputs = kind_of(step.objective).loss_inputs(mb, policy, ref)
    per_pair, samples = step.objective.loss(inputs, group=step.groups.dp, ctx=step.context(mb))
    samples = {k: v.detach() for k, v in samples.items()}
    # objectives that drop pairs (beta-DPO filtering) or samples (P2-DPO without a branch) weight them 0: the
    # step normalises by the global weighted count
    weight = samples.get("pair_weight")
    count = per_pair.new_full((), mb.num_samples, dtype=torch.int) if weight is None else weight.sum().round().int()
    count = counts_on_one_cp_rank(count, step.groups.cp)
    samples["loss"] = per_pair.detach()
    finite = torch.stack([policy.seq.detach().isfinite().all(),
                          ref.seq.isfinite().all() if ref is not None else per_pair.new_ones((), dtype=torch.bool),
                          per_pair.detach().isfinite().all()])
    extra = {"samples": samples, "finite": finite}
    if step.measure_reference_gap and ref is not None and mb.ref_rows is None:
        tokens = sum_over_cp(token_logps_sums((mb.rows.labels != IGNORE_INDEX).double(), mb.rows, mb),
                             step.groups.cp).seq
        dtype = unwrap(model).language_model.config.params_dtype
        extra["reference_gap"] = reference_gap(policy.seq.detach(), ref.seq, tokens, dtype)
    return per_pair.sum(), count, extra


def reference_gap(policy: torch.Tensor, ref: torch.Tensor, tokens: torch.Tensor, dtype: torch.dtype
                  ) -> torch.Tensor:
    """[2]: the largest |policy − reference| sequence log-prob (nats), and the largest ratio of a sequence's gap to
    what rounding in `dtype` explains, 16 ulp per token of its log-prob and of its token count,
    ``16·eps·(|ref| + n)`` (fp32: ~2e-6 nats per token; bf16: ~0.13). A cache written in another TP/PP layout from
    the same checkpoint stays well below 1; one from other weights does not.

    Args:
        policy, ref: [R] sequence log-probs of the same rows.
        tokens: [R] supervised tokens of each row.
    """
    eps = torch.finfo(dtype).eps
    gap = (policy - ref).abs()
    allowed = 16 * eps * (ref.abs() + tokens)
    return torch.stack([gap.max(), (gap / allowed.clamp_min(16 * eps)).max()])


def train_forward_step(step: PreferenceStep, data_iterator: Iterator[MicroBatch], model):
    mb = next(data_iterator)
    return stage_output(model, mb, mb.rows, step.policy_tower), partial(train_loss_func, step, model, mb)


def run_schedule(groups: ParallelGroups, model, batches: list[MicroBatch], forward_step_func,
                 forward_only: bool) -> list:
    """This rank's micro-batches through megatron's forward/backward schedule (1F1B across pipeline stages);
    returns the `loss_func` outputs, on the last stage (an empty list elsewhere). Forward-only passes run without
    autograd."""
    kwargs = {}
    if groups.pp_size > 1:
        kwargs["p2p_communicator"] = P2PCommunicator(pp_group=groups.pp, config=get_model_config(model))
    with torch.set_grad_enabled(not forward_only):
        return get_forward_backward_func(pp_size=groups.pp_size)(
            forward_step_func=forward_step_func,
            data_iterator=iter(batches),
            model=model,
            num_microbatches=len(batches),
            # activation shapes are exchanged per message (variable_seq_lengths) under PP; unused otherwise
            seq_length=max(b.rows.shape[1] for b in batches),
            micro_batch_size=max(b.rows.shape[0] for b in batches),
            forward_only=forward_only,
            pg_collection=groups.pg_collection,
            **kwargs,
        )


def run_logps_pass(groups: ParallelGroups, model, batches: list[MicroBatch], tower: Tower,
                   reference_rows: bool = False) -> Optional[list[SeqLogps]]:
    """A forward-only pass of `model` over the micro-batches; their `SeqLogps` on the last stage, else None."""
    outputs = run_schedule(groups, model, batches, partial(logps_forward_step, groups, tower, reference_rows),
                           forward_only=True)
    return [o["logps"] for o in outputs] if groups.is_last_stage else None
