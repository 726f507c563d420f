"""Held-out evaluation through megatron's schedule (forward only): objective metrics and the yes/no probe.

Every `eval.interval` steps (and at step 0 and at the end) the trainer scores held-out pairs:
- `eval/*`: the objective's metrics on the eval split (rewards, margins, accuracies, ...);
- `eval/chosen_logp_per_token` and `eval/delta_logp`: mean per-token log-prob of the held-out chosen responses
  and its change since step 0 (CW-DPO's Δlog p probe: negative = likelihood displacement);
- `probe/*` on yes/no questions about held-out images: the policy "answers yes" when it gives the yes-answer the
  higher log-prob; hallucination rate = share of absent-object questions answered yes; with a POPE probe
  (data/pope.py), `probe/<split>/{accuracy,precision,recall,f1,yes_ratio}` per sampling split and `probe/f1`,
  their mean F1.

Log-probs exist on the last pipeline stage only: the numbers are computed there and broadcast to every stage.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Optional

import torch

from megatron_po.data.dataset import PreferenceDataset
from megatron_po.data.pope import pope_metrics
from megatron_po.models.family import FamilySpec
from megatron_po.objectives import Objective
from megatron_po.objectives.common import ObjectiveContext
from megatron_po.parallel.groups import ParallelGroups
from megatron_po.parallel.reduce import all_gather_cat, broadcast_from_last_stage
from megatron_po.train.data import build_eval_datasets, build_tokenizer, micro_batches, prepare_data
from megatron_po.kinds import INPUT_KINDS, kind_of
from megatron_po.train.models import build_initial_model, policy_tower
from megatron_po.train.step import PreferenceStep, run_logps_pass


@dataclass
class EvalSet:
    name: str
    dataset: PreferenceDataset
    indices: list[list[int]]
    """This DP rank's micro-batches of dataset indices (equal count on every rank)."""
    baseline: dict = field(default_factory=dict)


def build_eval_set(name: str, ds: PreferenceDataset, micro_batch_size: int, dp_rank: int, dp_size: int) -> EvalSet:
    """Splits the held-out pairs evenly over DP ranks (the remainder that does not fill a micro-batch on every
    rank is left out, so all ranks run the same number of forwards)."""
    per_rank = len(ds) // dp_size // micro_batch_size * micro_batch_size
    if per_rank == 0:
        raise ValueError(f"eval set {name!r}: {len(ds)} pairs cannot give every one of {dp_size} DP ranks a "
                         f"micro-batch of {micro_batch_size}")
    mine = list(range(dp_rank * per_rank, (dp_rank + 1) * per_rank))
    return EvalSet(name, ds, [mine[i:i + micro_batch_size] for i in range(0, per_rank, micro_batch_size)])


def build_eval_sets(cfg, datasets: dict[str, PreferenceDataset], groups: ParallelGroups
                    ) -> tuple[list[EvalSet], list[EvalSet]]:
    """The held-out sets split over DP ranks: (pairs scored with the objective, yes/no probes)."""
    mbs = cfg.train.micro_batch_size
    sets = [build_eval_set(name, ds, mbs, groups.dp_rank, groups.dp_size) for name, ds in datasets.items()]
    return [e for e in sets if e.name == "eval"], [e for e in sets if e.name == "probe"]


def score_pairs(step: PreferenceStep, model, ev: EvalSet, reference=None) -> Optional[dict[str, torch.Tensor]]:
    """Per-pair samples over the whole eval set (all DP ranks), in eval order, on the last pipeline stage (None
    elsewhere). With a reference source, the objective's own per-pair view is included."""
    batches = list(micro_batches(ev.dataset, ev.indices, step.groups))
    if reference is not None:
        reference.fill(batches, split=ev.name)
    was_training = model.training
    model.eval()
    try:
        policy = run_logps_pass(step.groups, model, batches, step.policy_tower)
    finally:
        model.train(was_training)
    if policy is None:
        return None
    per_mb = []
    for mb, logps in zip(batches, policy):
        pairs = INPUT_KINDS["pairs"].loss_inputs(mb, logps, mb.ref_logps)
        samples = {"logps/chosen": pairs.policy_chosen_logps, "logps/rejected": pairs.policy_rejected_logps,
                   "lengths/chosen": pairs.chosen_lengths}
        if reference is not None:
            # per-pair view of the objective on held-out pairs (batch statistics, if any, over this micro-batch)
            ctx = ObjectiveContext(step.iteration, step.total_steps, state=step.objective_state)
            samples.update(step.objective.loss(pairs, group=None, ctx=ctx)[1])
        per_mb.append({k: v.detach() for k, v in samples.items()})
    return {k: all_gather_cat(torch.cat([m[k] for m in per_mb]).double(), step.groups.dp) for k in per_mb[0]}


def evaluate(step: PreferenceStep, model, ev: EvalSet, reference=None) -> dict[str, float]:
    # the objective's own view of held-out pairs, when it takes pairs (else log-probs only)
    reference = reference if kind_of(step.objective).evaluates else None
    samples = score_pairs(step, model, ev, reference)
    out = None
    if samples is not None:
        out = {f"{ev.name}/{k}": v for k, v in step.objective.summarize(samples).items()}
        out[f"{ev.name}/chosen_logp_per_token"] = float(samples["logps/chosen"].sum()
                                                         / samples["lengths/chosen"].sum().clamp_min(1))
    out = broadcast_from_last_stage(out, step.groups.pp)
    per_token = out[f"{ev.name}/chosen_logp_per_token"]
    ev.baseline.setdefault("chosen_logp_per_token", per_token)
    out[f"{ev.name}/delta_logp"] = per_token - ev.baseline["chosen_logp_per_token"]
    return out


def probe(step: PreferenceStep, model, ev: EvalSet) -> dict[str, float]:
    """Yes/no probe: each record's chosen is the correct answer, rejected the opposite one."""
    samples = score_pairs(step, model, ev)
    out = None
    if samples is not None:
        records = _ordered_records(ev, step)
        present, says_yes = probe_answers(samples["logps/chosen"], samples["logps/rejected"],
                                          [bool(r.meta.get("present")) for r in records])
        correct = says_yes == present
        absent = ~present
        out = {
            f"{ev.name}/accuracy": float(correct.double().mean()),
            f"{ev.name}/hallucination_rate": float(says_yes[absent].double().mean()) if absent.any() else float("nan"),
            f"{ev.name}/yes_rate_present": float(says_yes[present].double().mean()) if present.any() else float("nan"),
        }
        out.update(_pope(ev.name, records, says_yes.tolist(), present.tolist()))
    return broadcast_from_last_stage(out, step.groups.pp)


def probe_answers(chosen: torch.Tensor, rejected: torch.Tensor, present: list[bool]
                  ) -> tuple[torch.Tensor, torch.Tensor]:
    """Which yes/no questions the model answers "yes", from the log-probs of each record's two answers.

    Args:
        chosen, rejected: [N] log-probs of each record's correct and opposite answer, on any device (the last
            stage's: CUDA on a GPU job).
        present: per record, whether the object asked about is in the image.
    Returns:
        ``(present, says_yes)``, [N] bool on the log-probs' device.
    """
    present_t = torch.tensor(present, dtype=torch.bool, device=chosen.device)
    # the yes-answer is the chosen one for present objects, the rejected one for absent ones; a tie is "no"
    return present_t, torch.where(present_t, chosen > rejected, rejected > chosen)


def _pope(name: str, records: list, says_yes: list[bool], present: list[bool]) -> dict[str, float]:
    """POPE's metrics per sampling split of the records that carry one (meta.pope: data/pope.py)."""
    out = {}
    splits = sorted({r.meta["pope"] for r in records if "pope" in r.meta})
    for split in splits:
        mine = [i for i, r in enumerate(records) if r.meta.get("pope") == split]
        metrics = pope_metrics([says_yes[i] for i in mine], [present[i] for i in mine])
        out.update({f"{name}/{split}/{k}": v for k, v in metrics.items()})
    if splits:  # POPE's headline number: the F1 averaged over its sampling splits
        out[f"{name}/f1"] = sum(out[f"{name}/{s}/f1"] for s in splits) / len(splits)
    return out


def _ordered_records(ev: EvalSet, step: PreferenceStep) -> list:
    # the gathered order is rank-major; ranks hold contiguous equal shares starting at 0
    n = len(ev.indices) * len(ev.indices[0]) * step.groups.dp_size
    return [ev.dataset.records[i] for i in range(n)]


def run_evaluation(cfg, objective: Objective, family: FamilySpec, groups: ParallelGroups) -> dict[str, float]:
    """`megatron-po eval`: the held-out pairs and the probe of a config scored by `checkpoint.init_from`'s policy
    (random weights without one), forward only, in the config's layout; no optimizer or reference is built."""
    cfg = dataclasses.replace(cfg, eval=dataclasses.replace(cfg.eval, interval=max(cfg.eval.interval, 1)))
    _, tok_path = prepare_data(cfg, objective, family)
    tokenizer = build_tokenizer(cfg, family, tok_path)
    model = build_initial_model(cfg, family, groups, tokenizer.vocab_size, adapters_ok=True)  # a LoRA run's too
    model.eval()
    sets, probes = build_eval_sets(cfg, build_eval_datasets(cfg, family, tokenizer), groups)
    return maybe_evaluate(PreferenceStep(objective, groups, policy_tower(model)), model, sets, probes)


def maybe_evaluate(step: PreferenceStep, model, sets: list[EvalSet], probes: list[EvalSet],
                   reference=None) -> dict[str, float]:
    out: dict[str, float] = {}
    for ev in sets:
        out.update(evaluate(step, model, ev, reference))
    for ev in probes:
        out.update(probe(step, model, ev))
    return out
