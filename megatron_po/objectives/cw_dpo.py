"""CW-DPO: "Dynamics-Aware Preference Optimization" (cooling-weighted DPO), CVPR 2026 (OBJECTIVES.md §8).

Two stages, two registry entries:

* ``cw_sftc`` — stage 1, constrained smooth SFT (SFT-C, §8.1):
  ``L = E[NLL(y+)] + λ·ReLU(C − E[NLL(y−)])``, the soft form of ``min NLL(y+) s.t. E[NLL(y−)] ≥ C``. Reference-free.
  After T1 steps the run continues with stage 2 and π_ref ← π_θ (a frozen copy of the stage-1 model).
* ``cw_dpo`` — stage 2, cooling-weighted DPO (§8.2): ``L = −log σ(β(Δ_w − w_c·Δ_l))`` with the cooling weight
  ``w_c = sg[σ((ℓ̄_θ(y_l) − ℓ_floor)/τ)]`` on the rejected log-ratio: easy negatives (already unlikely) are not
  pushed further.

Provenance: the formulas come from a third-party summary [S]; the authors' code is not retrievable, so λ, C, β, τ
and ℓ_floor are *unknown* and every default here is a recommendation [R] of §8 (§12 CW-4), not the authors' value.
The Δlog p probe (§8.3) belongs to the trainer's held-out evaluation, not to these losses.
"""

from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.distributed import ProcessGroup

from megatron_po.objectives.common import (
    MetricReductions,
    ObjectiveContext,
    PairLogps,
    check_pair_logps,
    implicit_rewards,
    per_token_mean,
    preference_metrics,
)
from megatron_po.parallel.reduce import all_reduce_sum

GATES = ("batch", "per_sample")
REDUCTIONS = ("mean", "sum")


# ------------------------------------------------------------------------------------------------ stage 1: SFT-C
@dataclass(frozen=True)
class SFTCConfig:
    lam: float = 0.5
    """λ, weight of the negative hinge ([R] λ ∈ [0.1, 1]; 0 is plain SFT, the "w/o Negative Sampling" ablation)."""
    c: float = 1.0
    """C, the floor on the expected NLL of the negatives, in the units of ``reduction`` (nats/token by default).
    Unknown [S]; 1.0 is only a placeholder (the §13.4 test value): [R] measure C0 = the mean per-token NLL of the
    stage-1 negatives under the initial model and set C = C0, so the penalty activates only once SFT has made the
    negatives more likely than at the start."""
    gate: str = "batch"
    """Where the expectation sits (§12 CW-2): "batch" (S1, the written constraint: one gate on the mean NLL(y−) of
    the optimizer step's global batch) or "per_sample" (S2: mean of per-pair hinges, stricter, no communication)."""
    reduction: str = "mean"
    """NLL of a response (§12 CW-1): "mean" per token (length-invariant; C in nats/token) or "sum" over tokens."""

    def __post_init__(self):
        if not self.lam >= 0:
            raise ValueError(f"cw_sftc.lam must be >= 0, got {self.lam}")
        if not self.c >= 0:  # an NLL is >= 0: a negative C could never activate the hinge
            raise ValueError(f"cw_sftc.c must be >= 0, got {self.c}")
        if self.gate not in GATES:
            raise ValueError(f"cw_sftc.gate must be one of {list(GATES)}, got {self.gate!r}")
        if self.reduction not in REDUCTIONS:
            raise ValueError(f"cw_sftc.reduction must be one of {list(REDUCTIONS)}, got {self.reduction!r}")


METRICS = MetricReductions(
    means={"sftc/nll_neg": "sftc/nll_neg_mean", "cw/lbar_l": "cw/lbar_l_mean", "cw/lbar_w": "cw/lbar_w_mean",
           "cw/wc_below_0.1": "cw/frac_wc_below_0.1", "cw/wc_above_0.9": "cw/frac_wc_above_0.9"},
    spread=("cw/w_c",),
)


def _nll(logps: Tensor, lengths: Tensor, reduction: str) -> Tensor:
    return -(per_token_mean(logps, lengths) if reduction == "mean" else logps)


def sftc_takes_global_stats(cfg: SFTCConfig) -> bool:
    """S1's batch-mean gate is a statistic of the batch; S2's per-sample hinge is not."""
    return cfg.gate == "batch"


@torch.no_grad()
def sftc_global_stats(logps: PairLogps, cfg: SFTCConfig) -> Optional[dict[str, Tensor]]:
    """``{"nll_neg": [B] fp64}``, the negatives' NLL whose global-batch mean gates S1; None for the per-sample S2."""
    if cfg.gate != "batch":
        return None
    return {"nll_neg": _nll(logps.policy_rejected_logps, logps.rejected_lengths, cfg.reduction).detach().double()}


def sftc_loss_fn(
    logps: PairLogps,
    cfg: SFTCConfig,
    group: Optional[ProcessGroup] = None,
    ctx: Optional[ObjectiveContext] = None,
) -> tuple[Tensor, dict[str, Tensor]]:
    """Per-pair SFT-C loss whose global-batch mean is ``mean NLL(y+) + λ·ReLU(C − mean NLL(y−))`` (§8.1).

    S1 ("batch"): the gate ``g = 1[m < C]``, m = mean NLL(y−) over the global batch, is a no-grad indicator and the
    per-pair loss is the surrogate ``NLL_i(y+) + λ·g·(C − NLL_i(y−))``. Its mean over the N pairs of the global batch
    equals the batch objective in value *and* gradient (``∂/∂NLL_j(y−) = −λ·g/N``), so the trainer's division by
    the global pair count gives the exact global gradient for any DP / micro-batch split (§11). Single per-pair
    values are not hinges (they go negative for pairs above C while the gate is on): only the mean is meaningful.

    S2 ("per_sample"): ``NLL_i(y+) + λ·ReLU(C − NLL_i(y−))``.

    The NLLs are per-token means by default (``reduction``); reference log-probs are not read (may be None).

    Metrics: ``sftc/nll_pos``, ``sftc/nll_neg`` (logged as ``sftc/nll_neg_mean``), ``sftc/gate_active`` (S1: the
    batch gate on every pair; S2: the pair's hinge), ``sftc/penalty`` (the per-pair penalty term without λ), and
    ``logps/*``, ``lengths/*``.

    Args:
        logps: the batch; policy log-probs and lengths of both responses are read.
        cfg: hyper-parameters.
        group: data-parallel group for S1's all-reduce of ``[Σ NLL(y−), n]`` when ``ctx.global_stats`` is None;
            None means this batch is the whole global batch.
        ctx: ``ctx.global_stats["nll_neg"]`` (from ``sftc_global_stats`` over the optimizer step's global batch)
            replaces the all-reduce.

    Returns:
        ``(per_pair_loss [B] with grad, per-pair metric samples: name -> detached [B])``.
    """
    check_pair_logps(logps, "cw_sftc", logp_fields=("policy_chosen_logps", "policy_rejected_logps"),
                     ctx=ctx)
    pol_w, pol_l = logps.policy_chosen_logps, logps.policy_rejected_logps
    nll_pos = _nll(pol_w, logps.chosen_lengths, cfg.reduction)
    nll_neg = _nll(pol_l, logps.rejected_lengths, cfg.reduction)
    if cfg.gate == "per_sample":
        penalty = F.relu(cfg.c - nll_neg)
        active = (nll_neg.detach() < cfg.c).to(pol_w.dtype)
    else:
        stats = ctx.global_stats if ctx is not None else None
        if stats is not None:
            batch_nll_neg = stats["nll_neg"].mean()
        else:
            x = nll_neg.detach().double()
            sums = all_reduce_sum(torch.stack([x.sum(), x.new_tensor(float(x.numel()))]), group)
            batch_nll_neg = sums[0] / sums[1]
        gate = (batch_nll_neg < cfg.c).to(device=pol_w.device, dtype=pol_w.dtype)
        penalty = gate * (cfg.c - nll_neg)
        active = gate.expand_as(nll_neg).clone()
    loss = nll_pos + cfg.lam * penalty
    return loss, {
        "sftc/nll_pos": nll_pos.detach(),
        "sftc/nll_neg": nll_neg.detach(),
        "sftc/gate_active": active,
        "sftc/penalty": penalty.detach(),
        "logps/chosen": pol_w.detach(),
        "logps/rejected": pol_l.detach(),
        "lengths/chosen": logps.chosen_lengths.detach().to(pol_w.dtype),
        "lengths/rejected": logps.rejected_lengths.detach().to(pol_w.dtype),
    }


# ---------------------------------------------------------------------------------- stage 2: cooling-weighted DPO
@dataclass(frozen=True)
class CWDPOConfig:
    beta: float = 0.1
    """β scaling the log-ratios ([R] 0.1; unknown [S])."""
    l_floor: float = -1.0
    """ℓ_floor, the per-token log-prob (nats/token) at which w_c = ½. Unknown [S]; −1.0 is only a placeholder (the
    §13.4 test value): [R] set it to the 25th percentile of ℓ̄_ref(y_l) over the stage-2 negatives, computed once
    with π_ref."""
    tau: float = 0.5
    """τ, temperature of the cooling gate in nats/token ([R] 0.5: w_c spans ≈0.12–0.88 over ±1 nat around
    ℓ_floor; avoid τ < 0.05, a step-like gate)."""
    stop_gradient: bool = True
    """sg[w_c] ([R] §12 CW-3). Without it the extra term −β(1−σ)·Δ_l·∂w_c/∂θ opposes the DPO push whenever Δ_l < 0:
    the optimizer can lower the loss by making the negative *more* likely (§13.4: ∂L/∂pol_l 0.02924 vs 0.02707)."""
    min_weight: float = 0.0
    """Negative-filtering hook (§8.2 "w/o Negative Filtering"; the authors' rule is not described): pairs with
    w_c < min_weight get pair weight 0 and leave the step's average. 0 = off (every pair counts)."""

    def __post_init__(self):
        for name in ("beta", "tau"):
            if not getattr(self, name) > 0:
                raise ValueError(f"cw_dpo.{name} must be > 0, got {getattr(self, name)}")
        if not abs(self.l_floor) < float("inf"):
            raise ValueError(f"cw_dpo.l_floor must be finite, got {self.l_floor}")
        if not isinstance(self.stop_gradient, bool):
            raise ValueError(f"cw_dpo.stop_gradient must be a bool, got {self.stop_gradient!r}")
        if not 0 <= self.min_weight < 1:
            raise ValueError(f"cw_dpo.min_weight must be in [0, 1), got {self.min_weight}")


def cooling_weight(logps: PairLogps, cfg: CWDPOConfig) -> Tensor:
    """``w_c = σ((ℓ̄_θ(y_l) − ℓ_floor)/τ)`` [B] from the policy's rejected log-probs of the same forward, detached
    unless ``cfg.stop_gradient`` is False."""
    lbar_l = per_token_mean(logps.policy_rejected_logps, logps.rejected_lengths)
    w_c = torch.sigmoid((lbar_l - cfg.l_floor) / cfg.tau)
    return w_c.detach() if cfg.stop_gradient else w_c


def loss_fn(
    logps: PairLogps,
    cfg: CWDPOConfig,
    group: Optional[ProcessGroup] = None,
    ctx: Optional[ObjectiveContext] = None,
) -> tuple[Tensor, dict[str, Tensor]]:
    """Per-pair cooling-weighted DPO loss ``L = −log σ(β·(Δ_w − w_c·Δ_l))`` (§8.2).

    A per-sample DPO-Shift with λ = w_c. With sg[w_c]: ``∂L/∂pol_w = −β(1−σ(z))``, ``∂L/∂pol_l = β·w_c·(1−σ(z))``.
    At step 0 (policy == reference) Δ = 0, so the loss is ln 2 for any w_c, and the rejected response is pushed
    down with strength β·w_c/2: hard negatives (ℓ̄(y_l) ≳ ℓ_floor) as in DPO, easy ones barely.

    Metrics: the TRL names with the unweighted rewards r = β·Δ (comparable with DPO), ``cw/w_c`` (logged as
    mean/std/min/max), ``cw/lbar_l``, ``cw/lbar_w`` (per-token means, logged as ``*_mean``), ``cw/wc_below_0.1``,
    ``cw/wc_above_0.9`` (logged as ``cw/frac_*``), ``cw/effective_margin`` (z), and ``pair_weight`` when
    ``min_weight`` > 0.

    Args:
        logps: the batch; reference log-probs (of the stage-1 model) are required.
        cfg: hyper-parameters.
        group: unused (no batch statistics, §11); accepted so every objective has one signature.
        ctx: only ``inputs_checked`` is read.

    Returns:
        ``(per_pair_loss [B] with grad, per-pair metric samples: name -> detached [B])``.
    """
    check_pair_logps(logps, "cw_dpo", ctx=ctx)
    w_c = cooling_weight(logps, cfg)
    r_w, r_l = implicit_rewards(logps, cfg.beta)
    z = r_w - w_c * r_l
    loss = -F.logsigmoid(z)

    metrics = preference_metrics(logps, r_w, r_l)
    w = w_c.detach()
    metrics.update({
        "cw/w_c": w,
        "cw/lbar_l": per_token_mean(logps.policy_rejected_logps, logps.rejected_lengths).detach(),
        "cw/lbar_w": per_token_mean(logps.policy_chosen_logps, logps.chosen_lengths).detach(),
        "cw/wc_below_0.1": (w < 0.1).to(w.dtype),
        "cw/wc_above_0.9": (w > 0.9).to(w.dtype),
        "cw/effective_margin": z.detach(),
    })
    if cfg.min_weight > 0:
        keep = (w >= cfg.min_weight).to(loss.dtype)
        loss = keep * loss
        metrics["pair_weight"] = keep
    return loss, metrics
