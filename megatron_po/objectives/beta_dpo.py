"""β-DPO: Wu et al., "β-DPO: Direct Preference Optimization with Dynamic β", NeurIPS 2024 (OBJECTIVES.md §4;
code ``junkangwu/beta-DPO`` ``trainers.py``, ``preference_loss`` with ``mode_loss == "beta_DPO"``).

DPO with one β per global batch and margin-based data filtering. Per optimizer step, over the N pairs of the
global batch:

* ``M_i = Δ_w,i − Δ_l,i``, the *unscaled* log-ratio margin (the code's ``A_gap``; §12 βDPO-1);
* EMA of the batch mean and unbiased std of M, ``μ ← m·μ + (1−m)·mean(M)``, ``s ← m·s + (1−m)·std(M)``, updated
  with the current batch *before* use (code: ``update_and_sync_tensor_mean`` runs before ``preference_loss``);
* weights ``w_i = exp(−½((M_i − μ)/s)²)`` and a selection S of ``K = int(N·(1−ρ))`` pairs drawn by
  ``multinomial(w, K, replacement=False)``;
* ``β_used = max(β0·(1 + a·(mean_{i∈S} M_i − μ)), 10⁻³)`` (the paper's ``β = [1 + α(E[M] − M_0)]·β0`` with the
  expectation over the kept pairs and M_0 = μ), detached;
* ``ℓ_i = −log σ(β_used·M_i)`` for i ∈ S, 0 otherwise.

Deviations from the reference code, all [R] in OBJECTIVES.md: the statistics cover the optimizer step's global
batch once (the code updates the EMA every micro-step); the selection uses a generator seeded from
``(selection_seed, step)`` on every rank instead of each rank's global RNG (§12 βDPO-3); the loss is the exact
global masked mean, i.e. the per-pair losses are multiplied by the mask, reported as ``pair_weight``, and the
trainer divides by the global kept count (§12 βDPO-2; the code's local masked mean weights pairs on ranks with
fewer kept pairs more, §13.2: 0.6901889 instead of 0.6986889); and the two step-0 guards of §4 (``s ≥ 1e-6``,
uniform weights when they are not finite or all underflow) replace a NaN / ``multinomial`` error.

The EMA is objective state: ``ctx.state = {"gap_mean": μ, "gap_std": s}`` before the step, committed by
``next_state`` after it. The initial state is μ = s = 0 as in the code (the EMA is biased toward 0 early on;
reproduced as is, §4).
"""

from dataclasses import dataclass
from typing import NamedTuple, Optional

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.distributed import ProcessGroup

from megatron_po.objectives.common import (
    MetricReductions,
    ObjectiveContext,
    PairLogps,
    check_pair_logps,
    local_pair_index,
    log_ratios,
    preference_metrics,
)
from megatron_po.parallel.reduce import all_gather_cat

STATE_KEYS = ("gap_mean", "gap_std")
# odd 64-bit multiplier (golden ratio): distinct (seed, step) pairs map to distinct generator seeds
_SEED_MIX = 0x9E3779B97F4A7C15


METRICS = MetricReductions(means={"beta_dpo/kept": "beta_dpo/frac_kept"})


@dataclass(frozen=True)
class BetaDPOConfig:
    beta0: float = 0.1
    """Base β0 (code ``loss.beta``)."""
    a: float = 0.6
    """Sensitivity of β to the kept batch's mean margin, in units of *unscaled* margins M (README example; §12
    βDPO-1: not transferable to the paper's β-scaled reading)."""
    ema_momentum: float = 0.9
    """m of the EMAs of mean(M) and std(M) (code: hard-coded ``gamma=0.9``)."""
    rho: float = 0.2
    """Fraction of the global batch filtered out (code ``mode_weight``): K = int(N·(1−ρ)) pairs are kept; 0 keeps
    every pair (no sampling, no randomness consumed)."""
    selection_seed: int = 0
    """Seed of the selection: the generator is seeded from (selection_seed, ctx.step), identically on every rank."""
    beta_min: float = 1e-3
    """Lower clamp of β_used (code ``beta_used.clamp(min=1e-3)``)."""
    std_floor: float = 1e-6
    """Floor of the EMA std inside the filter weights: s = 0 at step 0 (policy == reference) would give 0/0 (§4)."""

    def __post_init__(self):
        for name in ("beta0", "beta_min", "std_floor"):
            if not getattr(self, name) > 0:
                raise ValueError(f"beta_dpo.{name} must be > 0, got {getattr(self, name)}")
        if not self.a >= 0:
            raise ValueError(f"beta_dpo.a must be >= 0, got {self.a}")
        if not 0 <= self.ema_momentum < 1:
            raise ValueError(f"beta_dpo.ema_momentum must be in [0, 1), got {self.ema_momentum}")
        if not 0 <= self.rho < 1:
            raise ValueError(f"beta_dpo.rho must be in [0, 1), got {self.rho}")
        if isinstance(self.selection_seed, bool) or not isinstance(self.selection_seed, int) \
                or self.selection_seed < 0:
            raise ValueError(f"beta_dpo.selection_seed must be an int >= 0, got {self.selection_seed!r}")


class BatchFilter(NamedTuple):
    """β-DPO's statistics of one global batch of N pairs (all detached, fp64)."""

    gap_mean: Tensor
    """0-d μ after this batch's EMA update (M_0)."""
    gap_std: Tensor
    """0-d s after the update."""
    weights: Tensor
    """[N] filter weights w_i (after the non-finite / underflow fallback)."""
    mask: Tensor
    """[N] 1 for the kept pairs S, 0 for the filtered ones."""
    beta_used: Tensor
    """0-d β of this batch."""


def initial_state() -> dict:
    """The EMA state before the first step: μ = s = 0, as the reference code initialises it."""
    return {key: 0.0 for key in STATE_KEYS}


def _checked_state(state: Optional[dict]) -> dict:
    if state is None:
        return initial_state()
    missing = [key for key in STATE_KEYS if key not in state]
    if missing:
        raise ValueError(f"beta_dpo state must hold {list(STATE_KEYS)}, missing {missing} (got {state!r})")
    return state


def update_ema(cfg: BetaDPOConfig, state: Optional[dict], margins: Tensor) -> tuple[Tensor, Tensor]:
    """``(μ, s)`` after one EMA step on the global batch's margins (mean and *unbiased* std, code ``.std()``).

    Args:
        state: ``{"gap_mean", "gap_std"}`` before the step; None = ``initial_state()``.
        margins: [N] unscaled margins M of the global batch.

    Returns:
        0-d fp64 tensors on ``margins``' device.

    Raises:
        ValueError: N < 2 (the unbiased std of one value is NaN; §4 requires N ≥ 2).
    """
    if margins.numel() < 2:
        raise ValueError(
            f"beta_dpo needs at least 2 pairs in the global batch (unbiased std of M), got {margins.numel()}"
        )
    state = _checked_state(state)
    m = margins.detach().double().reshape(-1)
    keep = cfg.ema_momentum
    mu = keep * float(state["gap_mean"]) + (1 - keep) * m.mean()
    s = keep * float(state["gap_std"]) + (1 - keep) * m.std()
    return mu, s


def filter_weights(margins: Tensor, gap_mean: Tensor, gap_std: Tensor, cfg: BetaDPOConfig) -> Tensor:
    """``w_i = exp(−½((M_i − μ)/max(s, std_floor))²)`` [N] fp64; uniform if any is non-finite or all underflow."""
    m = margins.detach().double().reshape(-1)
    w = torch.exp(-0.5 * ((m - gap_mean) / gap_std.clamp_min(cfg.std_floor)) ** 2)
    ok = torch.isfinite(w).all() & (w.sum() > 0)
    return torch.where(ok, w, torch.ones_like(w))


def num_kept(n: int, cfg: BetaDPOConfig) -> int:
    """K = int(N·(1−ρ)) as in the code, at least 1 (§4 edge cases)."""
    return max(1, int(n * (1 - cfg.rho)))


def selection_seed(cfg: BetaDPOConfig, step: int) -> int:
    """The generator seed of step ``step``: the same on every rank, different from step to step."""
    return (cfg.selection_seed * _SEED_MIX + step) % (1 << 63)


def selection_mask(weights: Tensor, cfg: BetaDPOConfig, step: int) -> Tensor:
    """The kept set S as a 0/1 mask: ``multinomial(w, K, replacement=False)`` (code), seeded per step.

    Sampling runs on the CPU with its own ``torch.Generator`` seeded by ``selection_seed(cfg, step)``, so every DP
    rank (which holds the same gathered weights) draws the same S whatever its device and global RNG state, and a
    resumed run draws what the original run drew. With K = N (ρ = 0) every pair is kept without sampling.

    Args:
        weights: [N] filter weights w_i of the global batch.
        cfg: hyper-parameters (ρ, seed).
        step: the optimizer step (``ctx.step``).

    Returns:
        [N] fp64 mask on ``weights``' device.
    """
    n = weights.numel()
    k = num_kept(n, cfg)
    if k >= n:
        return torch.ones(n, dtype=torch.float64, device=weights.device)
    gen = torch.Generator(device="cpu").manual_seed(selection_seed(cfg, step))
    # a floor instead of 0: multinomial without replacement refuses fewer positive weights than K (the code would
    # crash); floored pairs are drawn only after every pair of positive weight
    w = weights.detach().double().cpu().clamp_min(torch.finfo(torch.float64).tiny)
    index = torch.multinomial(w, k, replacement=False, generator=gen)
    mask = torch.zeros(n, dtype=torch.float64)
    mask[index] = 1.0
    return mask.to(weights.device)


def batch_filter(margins: Tensor, cfg: BetaDPOConfig, state: Optional[dict], step: int) -> BatchFilter:
    """EMA update, filter weights, selection and β_used of one global batch (§4, in the code's order).

    Args:
        margins: [N] unscaled margins of the whole global batch, in global pair order.
        state: EMA state before the step (``ctx.state``); None = ``initial_state()``.
        step: the optimizer step, seeds the selection.
    """
    m = margins.detach().double().reshape(-1)
    mu, s = update_ema(cfg, state, m)
    weights = filter_weights(m, mu, s, cfg)
    mask = selection_mask(weights, cfg, step)
    kept_mean = (mask * m).sum() / mask.sum()
    beta_used = (cfg.beta0 * (1 + cfg.a * (kept_mean - mu))).clamp_min(cfg.beta_min)
    return BatchFilter(mu, s, weights, mask, beta_used)


@torch.no_grad()
def global_stats(logps: PairLogps, cfg: BetaDPOConfig) -> dict[str, Tensor]:
    """``{"margin": [B] fp64}``, the unscaled margins M the trainer gathers over the optimizer step's global batch."""
    delta_w, delta_l = log_ratios(logps)
    return {"margin": (delta_w - delta_l).detach().double()}


def next_state(cfg: BetaDPOConfig, state: Optional[dict], global_stats: dict[str, Tensor]) -> dict:
    """The EMA state after a step, from the state before it and the step's gathered ``global_stats``.

    ``loss_fn`` computes the same update from ``ctx.state`` for every micro-batch of the step; the trainer calls
    this once after the optimizer step, so the EMA advances once per step.

    Returns:
        ``{"gap_mean": float, "gap_std": float}``.
    """
    mu, s = update_ema(cfg, state, global_stats["margin"])
    return {"gap_mean": mu.item(), "gap_std": s.item()}


def loss_fn(
    logps: PairLogps,
    cfg: BetaDPOConfig,
    group: Optional[ProcessGroup] = None,
    ctx: Optional[ObjectiveContext] = None,
) -> tuple[Tensor, dict[str, Tensor]]:
    """Per-pair β-DPO loss ``L_i = m_i·(−log σ(β_used·M_i))`` with the global-batch selection mask m_i (§4).

    β_used and the mask are detached: ``∂L_i/∂pol_w = −m_i·β_used·(1−σ(β_used·M_i)) = −∂L_i/∂pol_l``. At step 0
    (policy == reference, initial state) M = 0, so s = 0 → uniform weights, β_used = β0 and every kept pair has
    loss ln 2.

    The batch statistics come from ``ctx.global_stats["margin"]`` (the optimizer step's whole global batch, from
    ``global_stats``) at positions ``ctx.pair_index``; without them the margins of this call are all-gathered over
    ``group`` (rank-major) and this rank's rows are its block.

    Metrics: the TRL names with rewards ``β_used·Δ`` (the code logs β0-scaled rewards), ``pair_weight`` (the mask:
    the trainer normalises by the global kept count, the exact global masked mean, §12 βDPO-2),
    ``beta_dpo/{beta_used, kept, weight, margin, gap_mean, gap_std}`` (gap_* = the EMA after this step's update).

    Args:
        logps: the batch; reference log-probs are required.
        cfg: hyper-parameters.
        group: data-parallel group for the all-gather of M when ``ctx.global_stats`` is None; None means this
            batch is the whole global batch.
        ctx: step (seeds the selection), EMA ``state`` before the step, and optionally ``global_stats`` +
            ``pair_index``; None = ``ObjectiveContext()`` (step 0, initial state).

    Returns:
        ``(per_pair_loss [B] with grad, per-pair metric samples: name -> detached [B])``.
    """
    check_pair_logps(logps, "beta_dpo", ctx=ctx)
    ctx = ctx or ObjectiveContext()
    delta_w, delta_l = log_ratios(logps)
    margin = delta_w - delta_l
    b = margin.shape[0]
    if ctx.global_stats is not None:
        if ctx.pair_index is None:
            raise ValueError("beta_dpo: ctx.global_stats was given without ctx.pair_index")
        margins, index = ctx.global_stats["margin"], ctx.pair_index
    else:
        margins = all_gather_cat(margin.detach().double(), group)
        index = local_pair_index(b, group, margin.device)
    stats = batch_filter(margins, cfg, ctx.state, ctx.step)
    index = index.to(stats.mask.device)
    dtype = margin.dtype
    mask = stats.mask[index].to(device=margin.device, dtype=dtype)
    beta = stats.beta_used.to(device=margin.device, dtype=dtype)
    loss = mask * -F.logsigmoid(beta * margin)

    metrics = preference_metrics(logps, beta * delta_w, beta * delta_l)
    # one scalar per global batch, repeated per pair so that every sample is [B]
    per_pair = {name: getattr(stats, name).to(device=margin.device, dtype=dtype).expand(b).clone()
                for name in ("beta_used", "gap_mean", "gap_std")}
    metrics.update({
        "pair_weight": mask,
        "beta_dpo/kept": mask.clone(),
        "beta_dpo/weight": stats.weights[index].to(device=margin.device, dtype=dtype),
        "beta_dpo/margin": margin.detach(),
    })
    metrics.update({f"beta_dpo/{name}": value for name, value in per_pair.items()})
    return loss, metrics
