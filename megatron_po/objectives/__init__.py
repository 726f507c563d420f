"""Objective registry: a plain dict from name to (config class, per-pair loss function, needs a reference).

Every ``loss_fn(logps: PairLogps, cfg, group=None, ctx=None) -> (per_pair_loss [B], metric samples name -> [B])``
is a pure function of per-pair sequence quantities (STYLE.md §4) — P2-DPO's takes ``P2Logps`` instead (six
forwards per sample, ``inputs="p2"``); the trainer owns reductions over pairs and ranks
and passes ``ctx=ObjectiveContext(step, total_steps, ...)`` for objectives with schedules, global-batch statistics
(``global_stats``) or state carried across optimizer steps (``next_state``).
"""

import dataclasses
from typing import Any, Callable, NamedTuple, Optional

import torch
from torch import Tensor
from torch.distributed import ProcessGroup

from megatron_po.objectives import acpo, aspo, beta_dpo, combo, cw_dpo, dpo, dpo_shift, ipo, p2_dpo, sft, simpo
from megatron_po.objectives.common import ObjectiveContext, PairLogps, summarize_metrics


class Objective(NamedTuple):
    config_cls: type
    loss_fn: Callable
    needs_reference: bool
    global_stats: Optional[Callable] = None
    """``(logps, cfg) -> dict[name, [B]] | None``: per-pair quantities of a batch statistic. The trainer gathers
    them over the optimizer step's global batch and passes them back as ``ctx.global_stats``."""
    next_state: Optional[Callable] = None
    """``(cfg, state: dict | None, global_stats: dict) -> dict``: objective state after an optimizer step (β-DPO's
    EMA), from the state before it and the step's gathered ``global_stats``. The trainer calls it once per step and
    passes the result as the next step's ``ctx.state``; ``loss_fn`` computes the same update for its own step."""
    inputs: str = "pairs"
    """What ``loss_fn`` takes, and so which records and batches the trainer builds: "pairs" (``PairLogps`` from
    the chosen/rejected rows of preference records) or "p2" (``P2Logps`` from P2-DPO records, data/p2_records.py)."""


OBJECTIVES: dict[str, Objective] = {
    "dpo": Objective(dpo.DPOConfig, dpo.loss_fn, needs_reference=True),
    "acpo": Objective(acpo.ACPOConfig, acpo.loss_fn, needs_reference=True, global_stats=acpo.global_stats),
    "sft": Objective(sft.SFTConfig, sft.loss_fn, needs_reference=False),
    "ipo": Objective(ipo.IPOConfig, ipo.loss_fn, needs_reference=True),
    "simpo": Objective(simpo.SimPOConfig, simpo.loss_fn, needs_reference=False),
    "dpo_shift": Objective(dpo_shift.DPOShiftConfig, dpo_shift.loss_fn, needs_reference=True),
    # True as the safe answer for any combo; objective_needs_reference() looks at its terms
    "combo": Objective(combo.ComboConfig, combo.loss_fn, needs_reference=True),
    "beta_dpo": Objective(beta_dpo.BetaDPOConfig, beta_dpo.loss_fn, needs_reference=True,
                          global_stats=beta_dpo.global_stats, next_state=beta_dpo.next_state),
    "cw_sftc": Objective(cw_dpo.SFTCConfig, cw_dpo.sftc_loss_fn, needs_reference=False,
                         global_stats=cw_dpo.sftc_global_stats),
    "cw_dpo": Objective(cw_dpo.CWDPOConfig, cw_dpo.loss_fn, needs_reference=True),
    "aspo": Objective(aspo.ASPOConfig, aspo.loss_fn, needs_reference=True),
    "p2_dpo": Objective(p2_dpo.P2DPOConfig, p2_dpo.loss_fn, needs_reference=True, inputs="p2"),
}


def build_objective_config(name: str, params: dict) -> Any:
    """Builds the config of objective ``name`` from ``params``; unknown names and keys are errors, never ignored.

    Raises:
        ValueError: unknown objective, unknown hyper-parameter, or an invalid value (from the config's checks).
    """
    if name not in OBJECTIVES:
        raise ValueError(f"unknown objective {name!r}; known: {sorted(OBJECTIVES)}")
    config_cls = OBJECTIVES[name].config_cls
    known = [f.name for f in dataclasses.fields(config_cls) if f.init]
    for key in params:
        if key not in known:
            raise ValueError(f"objective {name!r} has no hyper-parameter {key!r}; known: {known}")
    return config_cls(**params)


def objective_needs_reference(name: str, cfg: Any) -> bool:
    """Whether objective ``name`` with config ``cfg`` reads reference log-probs, i.e. needs a reference model.

    The registry flag, except for "combo", which needs one only if one of its terms does.

    Raises:
        ValueError: unknown objective.
    """
    if name not in OBJECTIVES:
        raise ValueError(f"unknown objective {name!r}; known: {sorted(OBJECTIVES)}")
    if name == "combo":
        return combo.needs_reference(cfg)
    return OBJECTIVES[name].needs_reference


_EMPTY = PairLogps(*([torch.zeros(0)] * 6))


def uses_global_stats(name: str, cfg: Any) -> bool:
    """Whether objective ``name`` with ``cfg`` takes statistics across pairs (its ``global_stats`` hook returns
    something for this config, e.g. ACPO only with the batch / hybrid α scopes). Asked once, with an empty batch."""
    entry = OBJECTIVES[name]
    return entry.global_stats is not None and entry.global_stats(_EMPTY, cfg) is not None


def pair_loss(
    name: str,
    policy_chosen_logps: Tensor,
    policy_rejected_logps: Tensor,
    ref_chosen_logps: Optional[Tensor],
    ref_rejected_logps: Optional[Tensor],
    chosen_lengths: Tensor,
    rejected_lengths: Tensor,
    group: Optional[ProcessGroup] = None,
    ctx: Optional[ObjectiveContext] = None,
    policy_chosen_segment_logps: Optional[Tensor] = None,
    ref_chosen_segment_logps: Optional[Tensor] = None,
    chosen_segment_lengths: Optional[Tensor] = None,
    chosen_segment_similarity: Optional[Tensor] = None,
    **hparams,
) -> tuple[Tensor, dict[str, float]]:
    """Functional entry point: one objective on one batch of pairs, no model or process group needed.

    Args:
        name: registry key, e.g. "acpo".
        policy_chosen_logps ... rejected_lengths: ``[B]`` tensors, see ``PairLogps``.
        group: data-parallel group for batch statistics (ACPO batch/hybrid scope only).
        ctx: step context for schedules (DPO-Shift's λ(t)) and batch statistics / state (β-DPO); None = step 0.
        policy_chosen_segment_logps ... chosen_segment_similarity: ``[B, K]`` per-sentence inputs of the chosen
            response (ASPO), see ``PairLogps``; None for every other objective.
        **hparams: the objective's config fields, e.g. ``beta=0.1``.

    Returns:
        ``(per_pair_loss [B] with grad, summary)``; the summary is ``summarize_metrics`` of this batch's samples
        (Python floats, local to this rank), for scripts and notebooks. The trainer calls ``loss_fn`` instead and
        summarises samples gathered over the global batch.
    """
    cfg = build_objective_config(name, hparams)
    if OBJECTIVES[name].inputs != "pairs":
        raise ValueError(f"objective {name!r} takes {OBJECTIVES[name].inputs!r} inputs, not pairs: call its loss_fn")
    logps = PairLogps(
        policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps,
        chosen_lengths, rejected_lengths, policy_chosen_segment_logps, ref_chosen_segment_logps,
        chosen_segment_lengths, chosen_segment_similarity,
    )
    per_pair_loss, samples = OBJECTIVES[name].loss_fn(logps, cfg, group, ctx=ctx)
    return per_pair_loss, summarize_metrics(samples)


__all__ = [
    "OBJECTIVES",
    "Objective",
    "ObjectiveContext",
    "PairLogps",
    "build_objective_config",
    "objective_needs_reference",
    "pair_loss",
    "summarize_metrics",
]
