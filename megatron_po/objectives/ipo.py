"""IPO: Azar et al., "A General Theoretical Paradigm to Understand Learning from Human Preferences", AISTATS 2024,
Eq. 17 (OBJECTIVES.md §2).

A squared error that pulls the log-ratio margin h to 1/(2τ) from either side, so unlike DPO its loss at step 0
(policy == reference, h = 0) is (1/(2τ))², not ln 2, and its gradient never vanishes.
"""

from dataclasses import dataclass
from typing import Optional

from torch import Tensor
from torch.distributed import ProcessGroup

from megatron_po.objectives.common import (
    ObjectiveContext,
    PairLogps,
    check_pair_logps,
    log_ratios,
    per_token_mean,
    preference_metrics,
)

REDUCTIONS = ("mean", "sum")


@dataclass(frozen=True)
class IPOConfig:
    tau: float = 0.1
    """Regularisation strength τ; the target margin is 1/(2τ) (TRL passes it as ``beta``; ACPO's shared β = 0.1)."""
    reduction: str = "mean"
    """How the log-ratios entering h are formed (§12 IPO-1): "mean" (TRL: per-token means Δ/len, so the target is
    1/(2τ) nats *per token*) or "sum" (the paper: sequence sums, 1/(2τ) nats per sequence). At τ = 0.1 the two
    differ completely (§13.1: loss 23.33 vs 1.0); the config dump records which one a run used."""

    def __post_init__(self):
        if not self.tau > 0:
            raise ValueError(f"ipo.tau must be > 0, got {self.tau}")
        if self.reduction not in REDUCTIONS:
            raise ValueError(f"ipo.reduction must be one of {list(REDUCTIONS)}, got {self.reduction!r}")


def loss_fn(
    logps: PairLogps,
    cfg: IPOConfig,
    group: Optional[ProcessGroup] = None,
    ctx: Optional[ObjectiveContext] = None,
) -> tuple[Tensor, dict[str, Tensor]]:
    """Per-pair IPO loss ``L = (h − 1/(2τ))²`` [Azar et al. 2024, Eq. 17].

    ``h = Δ_w − Δ_l`` with Δ = pol − ref as sequence sums (``reduction="sum"``) or as per-token means
    ``Δ/max(len, 1)`` (``"mean"``, TRL). Gradients w.r.t. the policy sums: ``∂L/∂pol_w = 2(h − 1/(2τ))/n_w``,
    ``∂L/∂pol_l = −2(h − 1/(2τ))/n_l`` with n = len ("mean") or 1 ("sum").

    Metrics: the TRL names with rewards ``r = τ·Δ`` in the units that enter h, as TRL computes them for IPO (τ plays
    β, and TRL divides policy and reference log-probs by the length before forming the rewards). So
    ``rewards/margins = τ·h`` sits at 1/2 at the IPO optimum in either reduction. ``ipo/h`` is h itself.

    Args:
        logps: the batch; reference log-probs are required.
        cfg: hyper-parameters.
        group: unused (IPO has no batch statistics); accepted so every objective has one signature.
        ctx: only ``inputs_checked`` is read (no schedule).

    Returns:
        ``(per_pair_loss [B] with grad, per-pair metric samples: name -> detached [B])``.
    """
    check_pair_logps(logps, "ipo", ctx=ctx)
    delta_w, delta_l = log_ratios(logps)
    if cfg.reduction == "mean":
        delta_w = per_token_mean(delta_w, logps.chosen_lengths)
        delta_l = per_token_mean(delta_l, logps.rejected_lengths)
    h = delta_w - delta_l
    loss = (h - 1 / (2 * cfg.tau)) ** 2
    metrics = preference_metrics(logps, cfg.tau * delta_w, cfg.tau * delta_l)
    metrics["ipo/h"] = h.detach()
    return loss, metrics
