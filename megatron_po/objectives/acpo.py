"""ACPO: "Asymmetric Constrained Preference Optimization", arXiv 2603.22165, Eqs. 6-14 (OBJECTIVES.md §7).

DPO with a per-pair, stop-gradient weight α̂ on the rejected reward: α̂ solves ``r_w − α·r_l = τ`` for a
length-adaptive target margin τ and is clipped to a window, so ACPO is a per-sample DPO-Shift with λ = α̂.
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
    preference_metrics,
)
from megatron_po.parallel.reduce import all_reduce_sum

ALPHA_SCOPES = ("pair", "batch", "hybrid")
DELTA_UNITS = ("reward", "logratio")
TAU_MODES = ("adaptive", "static")


METRICS = MetricReductions(
    means={"acpo/at_lo": "acpo/frac_at_lo", "acpo/at_hi": "acpo/frac_at_hi", "acpo/rl_pos": "acpo/frac_rl_pos",
           "acpo/rl_below_eps": "acpo/frac_rl_below_eps", "acpo/tau": "acpo/tau_mean"},
    spread=("acpo/alpha_hat",),
    # raw α* reaches ±τ/ε ≈ ±1e5 near r_l = 0, which swamps any mean
    medians=("acpo/alpha_raw",),
)


@dataclass(frozen=True)
class ACPOConfig:
    beta: float = 0.1
    """β scaling the implicit rewards r = β·(pol − ref) (Eq. 6; Sec. 5.1)."""
    delta: float = 0.1
    """δ, target margin per response token: τ_i = δ·(len_w + len_l) (Eq. 8; Sec. 5.1)."""
    eps: float = 1e-5
    """ε, minimum magnitude of the denominator r_l of α* (sign kept) (Sec. 5.1; §7.3-C)."""
    clip_lo: float = 0.3
    """Lower end of the α̂ clip window (Eq. 12): [0.3, 0.95] was used for the reported results, [0, 1] is formal."""
    clip_hi: float = 0.95
    """Upper end of the α̂ clip window."""
    alpha_scope: str = "pair"
    """Where α is computed (§7.3-A): "pair" (A1, Eq. 12 literally, layout-invariant), "batch" (A2: one α from the
    ratio of global micro-batch means of r_w, r_l and lengths; all-reduce over the DP group), or "hybrid" (A3:
    per-pair α with τ from the global micro-batch mean length)."""
    delta_units: str = "reward"
    """Units of δ (§7.3-B): "reward" (U1, τ = δ·len, Eq. 12) or "logratio" (U2, τ = β·δ·len, the Sec. 4.1
    gloss)."""
    sign_zero: int = -1
    """sgn(r_l) for |r_l| < ε in the ε clamp (§7.3-C): −1 treats r_l ≈ 0 as negative, so step 0 starts at α̂ =
    clip_hi whatever the sign of the rounding noise between policy and reference."""
    tau: str = "adaptive"
    """"adaptive" (Eq. 8) or "static": the Table 2 ablation "τ → static β" replacing τ_i by ``static_tau``."""
    static_tau: float = 0.1
    """The constant τ (reward units) used when ``tau == "static"``."""
    alpha_one: bool = False
    """Table 2 ablation α ≡ 1, i.e. plain DPO; α* is still computed and logged."""

    def __post_init__(self):
        for name in ("beta", "eps"):
            if not getattr(self, name) > 0:
                raise ValueError(f"acpo.{name} must be > 0, got {getattr(self, name)}")
        for name in ("delta", "static_tau"):
            if not getattr(self, name) >= 0:
                raise ValueError(f"acpo.{name} must be >= 0, got {getattr(self, name)}")
        if not 0 <= self.clip_lo <= 1 or not 0 <= self.clip_hi <= 1:
            raise ValueError(f"acpo.clip_lo/clip_hi must lie in [0, 1] (Eq. 12), got [{self.clip_lo}, {self.clip_hi}]")
        if self.clip_lo > self.clip_hi:
            raise ValueError(f"acpo.clip_lo/clip_hi: empty clip window [{self.clip_lo}, {self.clip_hi}]")
        for name, allowed in (("alpha_scope", ALPHA_SCOPES), ("delta_units", DELTA_UNITS), ("tau", TAU_MODES)):
            if getattr(self, name) not in allowed:
                raise ValueError(f"acpo.{name} must be one of {list(allowed)}, got {getattr(self, name)!r}")
        if self.sign_zero not in (-1, 1) or isinstance(self.sign_zero, bool):
            raise ValueError(f"acpo.sign_zero must be -1 or +1, got {self.sign_zero!r}")
        if self.alpha_scope == "hybrid" and self.tau == "static":
            # hybrid only changes how τ is formed, which the static ablation replaces: the pair is a contradiction
            raise ValueError("acpo.alpha_scope='hybrid' has no effect with acpo.tau='static'; use alpha_scope='pair'")


def takes_global_stats(cfg: ACPOConfig) -> bool:
    """The batch and hybrid α scopes average over pairs; the per-pair default takes no batch statistic."""
    return cfg.alpha_scope != "pair"


@torch.no_grad()
def global_stats(logps: PairLogps, cfg: ACPOConfig) -> Optional[dict[str, Tensor]]:
    """Per-pair quantities the batch / hybrid α scopes average over the optimizer step's global batch.

    The trainer gathers them over all DP ranks and micro-batches and passes them back as ``ctx.global_stats``, so
    the batch reading does not change with the micro-batch split (None for the per-pair default: nothing to do).
    """
    if cfg.alpha_scope == "pair":
        return None
    r_w, r_l = implicit_rewards(logps, cfg.beta)
    return {"r_w": r_w.detach().double(), "r_l": r_l.detach().double(),
            "lengths": (logps.chosen_lengths + logps.rejected_lengths).double()}


def _alpha(
    r_w: Tensor, r_l: Tensor, lengths: Tensor, cfg: ACPOConfig, group: Optional[ProcessGroup],
    stats: Optional[dict[str, Tensor]] = None,
) -> tuple[Tensor, Tensor, Tensor]:
    """α* (Eq. 11), α̂ (Eq. 12) and τ (Eq. 8) per pair, in fp64 and detached (the sg[·] of Eq. 12).

    Args:
        r_w, r_l: [B] implicit rewards (detached).
        lengths: [B] len_w + len_l.

    Returns:
        ``(alpha_hat, alpha_raw, tau)``, each [B] fp64.
    """
    shape = r_w.shape  # batch-scope statistics are 0-d and broadcast back to every pair
    r_w, r_l, lengths = r_w.double(), r_l.double(), lengths.double()
    delta = cfg.delta * (cfg.beta if cfg.delta_units == "logratio" else 1.0)
    n = r_w.new_tensor(float(r_w.numel()))
    if stats is not None and cfg.alpha_scope != "pair":
        # the optimizer step's whole global batch, gathered by the trainer (layout-invariant)
        if cfg.alpha_scope == "batch":
            r_w, r_l = stats["r_w"].mean(), stats["r_l"].mean()
        lengths = stats["lengths"].mean()
    elif cfg.alpha_scope == "batch":
        # A2: ratio of global means; the trainer passes only real pairs, so n counts exactly those
        sums = all_reduce_sum(torch.stack([r_w.sum(), r_l.sum(), lengths.sum(), n]), group)
        r_w, r_l, lengths = sums[0] / sums[3], sums[1] / sums[3], sums[2] / sums[3]
    elif cfg.alpha_scope == "hybrid":
        sums = all_reduce_sum(torch.stack([lengths.sum(), n]), group)
        lengths = sums[0] / sums[1]
    tau = torch.full_like(r_w, cfg.static_tau) if cfg.tau == "static" else delta * lengths
    # torch.sign(0) = 0 would make den = 0 and α* = ±inf/NaN at step 0; sgn(0) is a config choice (§7.3-C). Below ε
    # the sign is rounding noise (a reference cached in another layout leaves |r_l| ~ 1e-6 of random sign at step
    # 0, which would flip α̂ between the window's ends per pair): |r_l| < ε counts as r_l = 0 (§7.3-C, 2026-12-07)
    sgn = torch.where(r_l.abs() < cfg.eps, float(cfg.sign_zero), torch.where(r_l > 0, 1.0, -1.0))
    den = sgn * r_l.abs().clamp_min(cfg.eps)
    alpha_raw = (r_w - tau) / den
    alpha_hat = torch.ones_like(alpha_raw) if cfg.alpha_one else alpha_raw.clamp(cfg.clip_lo, cfg.clip_hi)
    return tuple(x.expand(shape) for x in (alpha_hat, alpha_raw, tau))


def loss_fn(
    logps: PairLogps,
    cfg: ACPOConfig,
    group: Optional[ProcessGroup] = None,
    ctx: Optional[ObjectiveContext] = None,
) -> tuple[Tensor, dict[str, Tensor]]:
    """Per-pair ACPO loss ``L = −log σ(r_w − α̂·r_l)`` [arXiv 2603.22165, Eq. 13].

    ``α̂ = clamp(sg[(r_w − τ)/den], lo, hi)`` (Eqs. 11-12) with ``τ = δ·(len_w + len_l)`` (Eq. 8) and
    ``den = sgn(r_l)·max(|r_l|, ε)``. Because α̂ is detached the gradient is exactly Eq. 14:
    ``∂L/∂pol_w = −β(1−σ(u))``, ``∂L/∂pol_l = β·α̂·(1−σ(u))``, u = r_w − α̂·r_l.

    Args:
        logps: the batch; reference log-probs are required.
        cfg: hyper-parameters.
        group: data-parallel group for ``alpha_scope`` "batch"/"hybrid" (one all-reduce of a 4- or 2-vector per
            call); ignored for "pair". None means this batch is the whole global micro-batch.
        ctx: ``ctx.global_stats`` (from ``global_stats`` over the optimizer step's global batch, gathered by the
            trainer) replaces the per-call all-reduce for the batch / hybrid scopes.

    Returns:
        ``(per_pair_loss [B] with grad, per-pair metric samples: name -> detached [B])``.
    """
    check_pair_logps(logps, "acpo", ctx=ctx)
    r_w, r_l = implicit_rewards(logps, cfg.beta)
    lengths = logps.chosen_lengths + logps.rejected_lengths
    stats = ctx.global_stats if ctx is not None else None
    alpha_hat, alpha_raw, tau = _alpha(r_w.detach(), r_l.detach(), lengths, cfg, group, stats)
    u = r_w - alpha_hat.to(r_w.dtype) * r_l
    loss = -F.logsigmoid(u)

    metrics = preference_metrics(logps, r_w, r_l)
    r_w, r_l = r_w.detach().double(), r_l.detach().double()
    acpo = {
        "alpha_hat": alpha_hat,
        "alpha_raw": alpha_raw,
        "at_lo": alpha_raw <= cfg.clip_lo,
        "at_hi": alpha_raw >= cfg.clip_hi,
        "rl_pos": r_l > 0,
        "rl_below_eps": r_l.abs() < cfg.eps,
        "tau": tau,
        "effective_margin": u.detach(),
        "target_gap": r_w - r_l - tau,
    }
    dtype = metrics["rewards/chosen"].dtype
    metrics.update({f"acpo/{k}": v.to(dtype) for k, v in acpo.items()})
    return loss, metrics
