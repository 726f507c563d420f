"""DPO: Rafailov et al., "Direct Preference Optimization", NeurIPS 2023, Eq. 7 (OBJECTIVES.md §1)."""

from dataclasses import dataclass
from typing import Optional

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


@dataclass(frozen=True)
class DPOConfig:
    beta: float = 0.1
    """KL-penalty strength β; scales the implicit rewards (TRL default 0.1, shared by ACPO's baselines)."""
    label_smoothing: float = 0.0
    """Conservative DPO (cDPO, Mitchell 2023; TRL ``sigmoid`` with ``label_smoothing``): the probability ε that a
    label is flipped, giving ``L = −(1−ε)·log σ(z) − ε·log σ(−z)``. 0 is plain DPO."""

    def __post_init__(self):
        if not self.beta > 0:
            raise ValueError(f"dpo.beta must be > 0, got {self.beta}")
        if not 0 <= self.label_smoothing < 0.5:
            raise ValueError(f"dpo.label_smoothing must be in [0, 0.5), got {self.label_smoothing}")


def loss_fn(
    logps: PairLogps,
    cfg: DPOConfig,
    group: Optional[ProcessGroup] = None,
    ctx: Optional[ObjectiveContext] = None,
) -> tuple[Tensor, dict[str, Tensor]]:
    """Per-pair DPO loss ``L = −log σ(β·(Δ_w − Δ_l))`` with Δ = pol − ref [Rafailov et al. 2023, Eq. 7].

    Args:
        logps: the batch; reference log-probs are required.
        cfg: hyper-parameters.
        group: unused (DPO has no batch statistics); accepted so every objective has one signature.
        ctx: only ``inputs_checked`` is read (no schedule).

    Returns:
        ``(per_pair_loss [B] with grad, per-pair metric samples: name -> detached [B])``.
    """
    check_pair_logps(logps, "dpo", ctx=ctx)
    r_w, r_l = implicit_rewards(logps, cfg.beta)
    z = r_w - r_l
    loss = -F.logsigmoid(z)
    if cfg.label_smoothing:
        loss = (1 - cfg.label_smoothing) * loss - cfg.label_smoothing * F.logsigmoid(-z)
    return loss, preference_metrics(logps, r_w, r_l)
