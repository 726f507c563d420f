"""Objective registry: a plain dict from name to (config class, per-pair loss function, needs a reference).

Every ``loss_fn(logps: PairLogps, cfg, group=None) -> (per_pair_loss [B], metric samples name -> [B])`` is a pure
function of per-pair sequence quantities (STYLE.md §4); the trainer owns reductions over pairs and ranks.
"""

import dataclasses
from typing import Any, Callable, NamedTuple, Optional

from torch import Tensor
from torch.distributed import ProcessGroup

from megatron_po.objectives import acpo, dpo, sft
from megatron_po.objectives.common import PairLogps, summarize_metrics


class Objective(NamedTuple):
    config_cls: type
    loss_fn: Callable
    needs_reference: bool


OBJECTIVES: dict[str, Objective] = {
    "dpo": Objective(dpo.DPOConfig, dpo.loss_fn, needs_reference=True),
    "acpo": Objective(acpo.ACPOConfig, acpo.loss_fn, needs_reference=True),
    "sft": Objective(sft.SFTConfig, sft.loss_fn, needs_reference=False),
}


def build_objective_config(name: str, params: dict) -> Any:
    """Builds the config of objective ``name`` from ``params``; unknown names and keys are errors, never ignored.

    Raises:
        ValueError: unknown objective, unknown hyper-parameter, or an invalid value (from the config's checks).
    """
    if name not in OBJECTIVES:
        raise ValueError(f"unknown objective {name!r}; known: {sorted(OBJECTIVES)}")
    config_cls = OBJECTIVES[name].config_cls
    known = [f.name for f in dataclasses.fields(config_cls)]
    for key in params:
        if key not in known:
            raise ValueError(f"objective {name!r} has no hyper-parameter {key!r}; known: {known}")
    return config_cls(**params)


def pair_loss(
    name: str,
    policy_chosen_logps: Tensor,
    policy_rejected_logps: Tensor,
    ref_chosen_logps: Optional[Tensor],
    ref_rejected_logps: Optional[Tensor],
    chosen_lengths: Tensor,
    rejected_lengths: Tensor,
    group: Optional[ProcessGroup] = None,
    **hparams,
) -> tuple[Tensor, dict[str, float]]:
    """Functional entry point: one objective on one batch of pairs, no model or process group needed.

    Args:
        name: registry key, e.g. "acpo".
        policy_chosen_logps ... rejected_lengths: ``[B]`` tensors, see ``PairLogps``.
        group: data-parallel group for batch statistics (ACPO batch/hybrid scope only).
        **hparams: the objective's config fields, e.g. ``beta=0.1``.

    Returns:
        ``(per_pair_loss [B] with grad, summary)``; the summary is ``summarize_metrics`` of this batch's samples
        (Python floats, local to this rank), for scripts and notebooks. The trainer calls ``loss_fn`` instead and
        summarises samples gathered over the global batch.
    """
    cfg = build_objective_config(name, hparams)
    logps = PairLogps(
        policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps,
        chosen_lengths, rejected_lengths,
    )
    per_pair_loss, samples = OBJECTIVES[name].loss_fn(logps, cfg, group)
    return per_pair_loss, summarize_metrics(samples)


__all__ = ["OBJECTIVES", "Objective", "PairLogps", "build_objective_config", "pair_loss", "summarize_metrics"]
