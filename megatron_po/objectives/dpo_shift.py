"""DPO-Shift: Yang et al., "DPO-Shift: Shifting the Distribution of Direct Preference Optimization", 2025
(OBJECTIVES.md §5; code ``Meaquadddd/DPO-Shift`` ``dposhift_trainer.py``).

DPO with the rejected log-ratio scaled by λ ≤ 1: ``pi_logratios = chosen − λ·rejected`` and
``ref_logratios = ref_chosen − λ·ref_rejected`` in the code. The shift is multiplicative, i.e. a content-dependent
offset ``(1−λ)·Δ_l``, not the "static, content-agnostic offset" ACPO describes (§12 ACPO-6).
"""

from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.distributed import ProcessGroup

from megatron_po.objectives.common import (
    ObjectiveContext,
    PairLogps,
    check_pair_logps,
    implicit_rewards,
    preference_metrics,
)

SCHEDULES = ("fixed", "increase_linear", "decrease_linear")


@dataclass(frozen=True)
class DPOShiftConfig:
    beta: float = 0.1
    """β scaling the log-ratios (ACPO's shared baseline value; the DPO-Shift recipes use 0.01)."""
    lam: float = 0.95
    """λ for ``schedule="fixed"`` (ACPO's baseline runs use 0.95; the code's default 1.0 is plain DPO). Not read by
    the linear schedules, which use ``lam_min``/``lam_max``."""
    schedule: str = "fixed"
    """λ(t) with t = ctx.step, T = ctx.total_steps (optimizer steps; code: ``lr_scheduler._step_count − 1`` and
    ``max_steps``): "fixed" (λ), "increase_linear" (λ_min + (λ_max − λ_min)·t/T) or "decrease_linear"
    (λ_max − (λ_max − λ_min)·t/T). t/T is clamped to [0, 1]."""
    lam_min: float = 0.95
    """Start (increase) / end (decrease) of the linear schedules (code default 0.5)."""
    lam_max: float = 1.0
    """End (increase) / start (decrease) of the linear schedules (code default 1.0)."""

    def __post_init__(self):
        if not self.beta > 0:
            raise ValueError(f"dpo_shift.beta must be > 0, got {self.beta}")
        # λ ≤ 1 shifts towards the chosen response (the method's point; 1 is DPO); λ ≤ 0 would stop pushing the
        # rejected response down (0) or pull it up (< 0)
        for name in ("lam", "lam_min", "lam_max"):
            if not 0 < getattr(self, name) <= 1:
                raise ValueError(f"dpo_shift.{name} must be in (0, 1], got {getattr(self, name)}")
        if self.lam_min > self.lam_max:
            raise ValueError(f"dpo_shift.lam_min must be <= dpo_shift.lam_max, got {self.lam_min} > {self.lam_max}")
        if self.schedule not in SCHEDULES:
            raise ValueError(f"dpo_shift.schedule must be one of {list(SCHEDULES)}, got {self.schedule!r}")


def shift_lambda(cfg: DPOShiftConfig, ctx: Optional[ObjectiveContext] = None) -> float:
    """λ(t) of ``cfg.schedule`` at ``ctx`` (None = step 0 of a one-step run)."""
    if cfg.schedule == "fixed":
        return cfg.lam
    progress = (ctx or ObjectiveContext()).progress
    span = (cfg.lam_max - cfg.lam_min) * progress
    return cfg.lam_min + span if cfg.schedule == "increase_linear" else cfg.lam_max - span


def loss_fn(
    logps: PairLogps,
    cfg: DPOShiftConfig,
    group: Optional[ProcessGroup] = None,
    ctx: Optional[ObjectiveContext] = None,
) -> tuple[Tensor, dict[str, Tensor]]:
    """Per-pair DPO-Shift loss ``L = −log σ(β·(Δ_w − λ(t)·Δ_l))`` (``dposhift_trainer.py``).

    Gradients: ``∂L/∂pol_w = −β(1−σ(z))``, ``∂L/∂pol_l = +β·λ·(1−σ(z))``. At step 0 (policy == reference) z = 0,
    so the loss is ln 2 for any λ.

    Metrics: the TRL names with the unshifted rewards ``r = β·Δ`` (code), plus ``dpo_shift/lambda`` (λ(t), the
    same for every pair).

    Args:
        logps: the batch; reference log-probs are required.
        cfg: hyper-parameters.
        group: unused (no batch statistics); accepted so every objective has one signature.
        ctx: step and planned steps for the linear schedules; None = ``ObjectiveContext()`` (step 0).

    Returns:
        ``(per_pair_loss [B] with grad, per-pair metric samples: name -> detached [B])``.
    """
    check_pair_logps(logps, "dpo_shift", ctx=ctx)
    lam = shift_lambda(cfg, ctx)
    r_w, r_l = implicit_rewards(logps, cfg.beta)
    loss = -F.logsigmoid(r_w - lam * r_l)
    metrics = preference_metrics(logps, r_w, r_l)
    metrics["dpo_shift/lambda"] = torch.full_like(metrics["rewards/chosen"], lam)
    return loss, metrics
