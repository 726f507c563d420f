"""SimPO: Meng, Xia & Chen, "SimPO: Simple Preference Optimization with a Reference-Free Reward", NeurIPS 2024,
Eq. 6 (OBJECTIVES.md §3). Reference-free: the implicit reward is the policy's β-scaled mean token log-prob.
"""

from dataclasses import dataclass
from typing import Optional

import torch.nn.functional as F
from torch import Tensor
from torch.distributed import ProcessGroup

from megatron_po.objectives.common import (
    ObjectiveContext,
    PairLogps,
    check_pair_logps,
    per_token_mean,
    preference_metrics,
)


@dataclass(frozen=True)
class SimPOConfig:
    beta: float = 2.5
    """Reward scale β on the mean token log-probs. SimPO-scale (2–10), not DPO-scale: TRL's default β = 0.1 is a
    DPO value. Default 2.5 with ``gamma_beta_ratio`` 0.55 = the released Llama3-Instruct config (§12 SimPO-1, for
    instruct-tuned VLM starting points); the base-model configs use 2.0 with 0.5."""
    gamma_beta_ratio: float = 0.55
    """γ/β, the target reward margin in mean-log-prob units (the SimPO code's parameterisation; README: start 0.5,
    grid 0–1). TRL CPO's ``simpo_gamma`` is the absolute γ = β·gamma_beta_ratio."""
    sft_weight: float = 0.0
    """Weight of an NLL term on the chosen response (per-token mean per pair, as in ``sft``). 0 is pure SimPO.
    Trap: TRL ``CPOTrainer(loss_type="simpo")`` keeps ``cpo_alpha = 1.0`` by default, i.e. "CPO-SimPO" with this
    weight at 1; set it here explicitly to reproduce such runs."""
    label_smoothing: float = 0.0
    """Probability ε that a label is flipped: ``L = −(1−ε)·log σ(z) − ε·log σ(−z)`` (SimPO code). 0 is off."""

    def __post_init__(self):
        if not self.beta > 0:
            raise ValueError(f"simpo.beta must be > 0, got {self.beta}")
        for name in ("gamma_beta_ratio", "sft_weight"):
            if not getattr(self, name) >= 0:
                raise ValueError(f"simpo.{name} must be >= 0, got {getattr(self, name)}")
        if not 0 <= self.label_smoothing < 0.5:
            raise ValueError(f"simpo.label_smoothing must be in [0, 0.5), got {self.label_smoothing}")


def loss_fn(
    logps: PairLogps,
    cfg: SimPOConfig,
    group: Optional[ProcessGroup] = None,
    ctx: Optional[ObjectiveContext] = None,
) -> tuple[Tensor, dict[str, Tensor]]:
    """Per-pair SimPO loss ``L = −log σ(β·(ℓ̄_w − ℓ̄_l − γ/β))`` with ``ℓ̄ = pol/max(len, 1)`` [Meng et al. 2024, Eq. 6].

    Gradients: ``∂L/∂pol_w = −β(1−σ(z))/len_w``, ``∂L/∂pol_l = +β(1−σ(z))/len_l``, plus
    ``−sft_weight/len_w`` on ``pol_w`` when the NLL term is on.

    Metrics: the TRL names with rewards ``β·ℓ̄`` (SimPO code), on a different scale from DPO rewards; ``logps/*``
    stay sequence sums like every other objective's (the SimPO code logs the means there), so a combo of SimPO
    with a DPO-family term logs one meaning per name.

    Args:
        logps: the batch; ``ref_*`` are not read and may be None.
        cfg: hyper-parameters.
        group: unused (no batch statistics); accepted so every objective has one signature.
        ctx: only ``inputs_checked`` is read (no schedule).

    Returns:
        ``(per_pair_loss [B] with grad, per-pair metric samples: name -> detached [B])``.
    """
    check_pair_logps(logps, "simpo", logp_fields=("policy_chosen_logps", "policy_rejected_logps"), ctx=ctx)
    mean_w = per_token_mean(logps.policy_chosen_logps, logps.chosen_lengths)
    mean_l = per_token_mean(logps.policy_rejected_logps, logps.rejected_lengths)
    r_w, r_l = cfg.beta * mean_w, cfg.beta * mean_l
    z = r_w - r_l - cfg.beta * cfg.gamma_beta_ratio
    loss = -F.logsigmoid(z)
    if cfg.label_smoothing:
        loss = (1 - cfg.label_smoothing) * loss - cfg.label_smoothing * F.logsigmoid(-z)
    if cfg.sft_weight:
        loss = loss - cfg.sft_weight * mean_w
    metrics = preference_metrics(logps, r_w, r_l)
    metrics["simpo/logits"] = z.detach()
    return loss, metrics
