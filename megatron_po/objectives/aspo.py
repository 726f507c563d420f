"""ASPO: "Adaptive Sentence-level Preference Optimization", ACL 2025, arXiv 2505.19100 (OBJECTIVES.md §10).

DPO whose chosen log-ratio is re-weighted per sentence of the chosen response y_c = s_1 … s_K:

    lr_i  = Σ_{t∈s_i} (log π_θ − log π_ref)                       (Σ_i lr_i = Δ_w)
    S'_i  = minmax_i(S_i),   S_i = cos(CLIP_text(s_i), CLIP_image(x))   (precomputed similarity)
    PPL_i = exp(−(1/n_i) Σ_{t∈s_i} log π_θ(y_t)),   PPL'_i = minmax_i(−PPL_i)   (low perplexity → high weight)
    w_i   = α_mix·S'_i + (1 − α_mix)·PPL'_i ∈ [0, 1]             (stop-gradient)
    M*    = (R_c / R_c*)·Σ_i β(1 + w_i)·lr_i − β·Δ_l,   L = −log σ(M*)

Provenance: structure from a third-party summary [S] only (no code). The normaliser R_c/R_c* was not recovered
(§12 ASPO-1); ``normalization`` selects the readings of §10: "count" (R1, default: R_c = K, R_c* = Σ(1+w_i),
weights redistributed to average 1 per sentence), "token" (R2: R_c = Σn_i, R_c* = Σ(1+w_i)·n_i) or "none". Every
reading gives DPO when K = 1 (min–max over one value is 0 ⇒ w = 0), and R1 gives DPO whenever all w_i are equal.

Choices where the sources are silent [R]: min–max is within one response over its real sentences (padding slots,
length 0, take no part in min–max, weights or sums) and is 0 when max = min; PPL comes from the *policy's*
detached segment log-probs of the same forward (§12 ASPO-2); a response whose similarity is unknown (NaN for any
of its sentences, or no similarity input at all) uses the perplexity term alone, w_i = PPL'_i, rather than mixing
in a made-up S'; a response with no real sentence has normaliser 1 (its chosen term is then 0).
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
    check_segment_logps,
    implicit_rewards,
    preference_metrics,
)

NORMALIZATIONS = ("count", "token", "none")
# exp(−ℓ̄) overflows fp64 past 709 nats/token; such a sentence has the highest PPL of its row either way
_MAX_NLL = 700.0


METRICS = MetricReductions(means={"aspo/K": "aspo/K_mean", "aspo/single_sentence": "aspo/frac_single_sentence",
                                  "aspo/norm_factor": "aspo/norm_factor_mean"})


@dataclass(frozen=True)
class ASPOConfig:
    beta: float = 0.1
    """β of the sentence-level and rejected rewards (not given [S]; [I] 0.1, the SeVa/LLaVA DPO default)."""
    alpha_mix: float = 0.5
    """Mix of image-text similarity and perplexity in w_i ([R] 0.5; the ablations ASPO-S / ASPO-P are 1 / 0)."""
    normalization: str = "count"
    """R_c/R_c* (§12 ASPO-1): "count" (R1, default), "token" (R2) or "none" (factor 1)."""

    def __post_init__(self):
        if not self.beta > 0:
            raise ValueError(f"aspo.beta must be > 0, got {self.beta}")
        if not 0 <= self.alpha_mix <= 1:
            raise ValueError(f"aspo.alpha_mix must be in [0, 1], got {self.alpha_mix}")
        if self.normalization not in NORMALIZATIONS:
            raise ValueError(f"aspo.normalization must be one of {list(NORMALIZATIONS)}, got {self.normalization!r}")


def min_max(x: Tensor, valid: Tensor) -> Tensor:
    """Row-wise ``(x − min)/(max − min)`` over the ``valid`` slots of ``x`` [B, K]; 0 where max = min or invalid."""
    inf = torch.tensor(float("inf"), dtype=x.dtype, device=x.device)
    lo = torch.where(valid, x, inf).amin(-1, keepdim=True)
    hi = torch.where(valid, x, -inf).amax(-1, keepdim=True)
    span = hi - lo
    spread = valid & (span > 0)  # false for rows without valid slots (span = −inf) and single-valued rows
    lo = torch.where(spread, lo, torch.zeros_like(lo))
    return torch.where(spread, (x - lo) / torch.where(spread, span, torch.ones_like(span)), torch.zeros_like(x))


def sentence_weights(
    policy_segment_logps: Tensor,
    segment_lengths: Tensor,
    similarity: Optional[Tensor],
    alpha_mix: float,
) -> tuple[Tensor, Tensor, Tensor]:
    """ASPO's sentence weights w_i (detached, fp64) for a batch of chosen responses.

    Args:
        policy_segment_logps: [B, K] policy log-prob sums per sentence (only used detached, for PPL).
        segment_lengths: [B, K] tokens per sentence; 0 marks a padding slot.
        similarity: [B, K] image-text similarity per sentence, NaN where unknown; None = unknown everywhere.
        alpha_mix: weight of the similarity term.

    Returns:
        ``(w [B, K], valid [B, K] bool, similarity_known [B] bool)``; w is 0 on padding slots.
    """
    n = segment_lengths.detach().double()
    valid = n > 0
    lbar = policy_segment_logps.detach().double() / n.clamp_min(1)
    ppl = torch.exp((-lbar).clamp(max=_MAX_NLL))
    ppl_term = min_max(-ppl, valid)
    if similarity is None:
        known = torch.zeros(n.shape[0], dtype=torch.bool, device=n.device)
        w = ppl_term
    else:
        sim = similarity.detach().double()
        known = (torch.isfinite(sim) | ~valid).all(-1) & valid.any(-1)
        sim_term = min_max(torch.where(torch.isfinite(sim), sim, torch.zeros_like(sim)), valid)
        w = torch.where(known[:, None], alpha_mix * sim_term + (1 - alpha_mix) * ppl_term, ppl_term)
    return torch.where(valid, w, torch.zeros_like(w)), valid, known


def normalization_factor(w: Tensor, valid: Tensor, segment_lengths: Tensor, normalization: str) -> Tensor:
    """R_c/R_c* [B] (fp64, detached): K/Σ(1+w_i) ("count"), Σn_i/Σ(1+w_i)n_i ("token") or 1 ("none")."""
    if normalization == "none":
        return torch.ones(w.shape[0], dtype=w.dtype, device=w.device)
    v = valid.to(w.dtype)
    size = segment_lengths.detach().double() * v if normalization == "token" else v
    num, den = size.sum(-1), ((1 + w) * size).sum(-1)
    return torch.where(den > 0, num / torch.where(den > 0, den, torch.ones_like(den)), torch.ones_like(den))


def loss_fn(
    logps: PairLogps,
    cfg: ASPOConfig,
    group: Optional[ProcessGroup] = None,
    ctx: Optional[ObjectiveContext] = None,
) -> tuple[Tensor, dict[str, Tensor]]:
    """Per-pair ASPO loss ``L = −log σ(M*)``, ``M* = (R_c/R_c*)·Σ_i β(1+w_i)·lr_i − β·Δ_l`` (§10).

    Weights and normaliser are detached, so ``∂L/∂logπ_θ(s_i) = −(1−σ(M*))·(R_c/R_c*)·β(1+w_i)`` and
    ``∂L/∂pol_l = β(1−σ(M*))``; the chosen sequence sum ``pol_w`` is not in the graph (its sentences are). At step 0
    (policy == reference) every lr_i and Δ_l is 0: loss ln 2.

    Metrics: the TRL names with the *unweighted* chosen reward r_w = β·Δ_w (comparable with DPO),
    ``rewards/chosen_weighted`` (the chosen term of M*), ``aspo/K`` (sentences, logged as ``aspo/K_mean``),
    ``aspo/single_sentence`` (logged as ``aspo/frac_single_sentence``), ``aspo/w_mean`` and ``aspo/w_std_within``
    (mean and population std of a response's weights), ``aspo/norm_factor`` (R_c/R_c*, logged as
    ``aspo/norm_factor_mean``), ``aspo/similarity_known`` and ``aspo/effective_margin`` (M*).

    Args:
        logps: the batch; reference log-probs and the chosen response's sentence fields
            (``policy_chosen_segment_logps``, ``ref_chosen_segment_logps``, ``chosen_segment_lengths``;
            ``chosen_segment_similarity`` optional) are required.
        cfg: hyper-parameters.
        group: unused (no batch statistics, §11); accepted so every objective has one signature.
        ctx: only ``inputs_checked`` is read.

    Returns:
        ``(per_pair_loss [B] with grad, per-pair metric samples: name -> detached [B])``.
    """
    check_pair_logps(logps, "aspo", ctx=ctx)
    check_segment_logps(logps, "aspo", ctx=ctx)
    seg_pol, seg_len = logps.policy_chosen_segment_logps, logps.chosen_segment_lengths
    w, valid, known = sentence_weights(seg_pol, seg_len, logps.chosen_segment_similarity, cfg.alpha_mix)
    factor = normalization_factor(w, valid, seg_len, cfg.normalization)
    dtype = seg_pol.dtype
    lr = torch.where(valid, seg_pol - logps.ref_chosen_segment_logps.detach(), torch.zeros_like(seg_pol))
    chosen = factor.to(dtype) * (cfg.beta * (1 + w.to(dtype)) * lr).sum(-1)
    r_w, r_l = implicit_rewards(logps, cfg.beta)
    m_star = chosen - r_l
    loss = -F.logsigmoid(m_star)

    metrics = preference_metrics(logps, r_w, r_l)
    k = valid.sum(-1).to(w.dtype)
    w_mean = w.sum(-1) / k.clamp_min(1)
    w_var = (torch.where(valid, w - w_mean[:, None], torch.zeros_like(w)) ** 2).sum(-1) / k.clamp_min(1)
    aspo = {
        "K": k,
        "single_sentence": (k == 1).to(w.dtype),
        "w_mean": w_mean,
        "w_std_within": w_var.sqrt(),
        "norm_factor": factor,
        "similarity_known": known.to(w.dtype),
    }
    metrics.update({f"aspo/{name}": value.to(dtype) for name, value in aspo.items()})
    metrics["aspo/effective_margin"] = m_star.detach()
    metrics["rewards/chosen_weighted"] = chosen.detach()
    return loss, metrics
