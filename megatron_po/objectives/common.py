"""Pieces shared by every objective: the per-pair inputs, implicit rewards, TRL metrics and their summary.

Notation follows OBJECTIVES.md §0.1: ``pol_w``/``pol_l`` are the policy's summed response log-probs of the chosen /
rejected response, ``ref_*`` the frozen reference's, ``r = β·(pol − ref)`` the implicit rewards.
"""

from dataclasses import dataclass
from typing import Optional, Sequence

import torch
from torch import Tensor

LOGP_FIELDS = ("policy_chosen_logps", "policy_rejected_logps", "ref_chosen_logps", "ref_rejected_logps")
LENGTH_FIELDS = ("chosen_lengths", "rejected_lengths")


@dataclass
class PairLogps:
    """Per-pair sequence quantities for a batch of B preference pairs (one DP rank, one micro-batch)."""

    policy_chosen_logps: Tensor
    """[B] fp32 sum of the policy's log-probs over the chosen response tokens; carries grad."""
    policy_rejected_logps: Tensor
    """[B] same for the rejected response."""
    ref_chosen_logps: Optional[Tensor]
    """[B] reference log-prob sum of the chosen response, no grad; None only for reference-free objectives."""
    ref_rejected_logps: Optional[Tensor]
    """[B] same for the rejected response."""
    chosen_lengths: Tensor
    """[B] response tokens that entered the chosen sum (labels != -100 after the shift), float or int."""
    rejected_lengths: Tensor
    """[B] same for the rejected response."""


def check_pair_logps(
    logps: PairLogps,
    objective: str,
    logp_fields: Sequence[str] = LOGP_FIELDS,
    length_fields: Sequence[str] = LENGTH_FIELDS,
) -> None:
    """Rejects missing, mis-shaped or non-finite inputs before a loss is computed (OBJECTIVES.md §0.4).

    Costs one host sync (a single ``isfinite().all()``); the per-field search runs only on failure.

    Args:
        logps: the batch.
        objective: registry name, used in the error messages.
        logp_fields: log-prob fields the objective reads; they must be present and finite.
        length_fields: length fields the objective reads; only their shape is checked.

    Raises:
        ValueError: a needed field is None, a field is not ``[B]``, or a log-prob is NaN/inf.
    """
    tensors = {}
    for name in logp_fields:
        t = getattr(logps, name)
        if t is None:
            raise ValueError(f"objective {objective!r} needs {name}, got None (is the reference model configured?)")
        tensors[name] = t
    # a [B, 1] tensor next to a [B] one would silently broadcast every per-pair quantity to [B, B]
    shape = tensors[logp_fields[0]].shape
    for name in (*logp_fields, *length_fields):
        t = getattr(logps, name)
        if t.dim() != 1 or t.shape != shape:
            raise ValueError(
                f"objective {objective!r}: {name} must have shape [B] = {list(shape)}, got {list(t.shape)}"
            )
    if not torch.isfinite(torch.cat([t.detach() for t in tensors.values()])).all():
        bad = [name for name, t in tensors.items() if not torch.isfinite(t).all()]
        raise ValueError(f"objective {objective!r}: non-finite log-probs in {bad}")


def implicit_rewards(logps: PairLogps, beta: float) -> tuple[Tensor, Tensor]:
    """β-scaled implicit rewards ``r_w = β(pol_w − ref_w)``, ``r_l = β(pol_l − ref_l)`` (DPO Eq. 5, ACPO Eq. 6).

    Returns:
        ``(r_w, r_l)``, each ``[B]``, carrying grad through the policy terms.
    """
    r_w = beta * (logps.policy_chosen_logps - logps.ref_chosen_logps)
    r_l = beta * (logps.policy_rejected_logps - logps.ref_rejected_logps)
    return r_w, r_l


def preference_metrics(logps: PairLogps, r_w: Tensor, r_l: Tensor) -> dict[str, Tensor]:
    """TRL's standard per-pair metric samples (OBJECTIVES.md §0.5), all detached ``[B]`` in ``r_w``'s dtype."""
    r_w, r_l = r_w.detach(), r_l.detach()
    return {
        "rewards/chosen": r_w,
        "rewards/rejected": r_l,
        "rewards/margins": r_w - r_l,
        "rewards/accuracies": (r_w > r_l).to(r_w.dtype),
        "logps/chosen": logps.policy_chosen_logps.detach(),
        "logps/rejected": logps.policy_rejected_logps.detach(),
        "lengths/chosen": logps.chosen_lengths.detach().to(r_w.dtype),
        "lengths/rejected": logps.rejected_lengths.detach().to(r_w.dtype),
    }


# per-pair sample name -> logged name, for samples whose mean reads better under another name
_MEAN_NAMES = {
    "acpo/at_lo": "acpo/frac_at_lo",
    "acpo/at_hi": "acpo/frac_at_hi",
    "acpo/rl_pos": "acpo/frac_rl_pos",
    "acpo/rl_below_eps": "acpo/frac_rl_below_eps",
    "acpo/tau": "acpo/tau_mean",
}


def summarize_metrics(samples: dict[str, Tensor]) -> dict[str, float]:
    """Reduces per-pair metric samples to the logged scalars.

    Every key becomes its mean (renamed per ``_MEAN_NAMES``), except
    ``acpo/alpha_hat`` -> ``acpo/alpha_hat_{mean,std,min,max}`` (population std, so one pair gives 0) and
    ``acpo/alpha_raw`` -> ``acpo/alpha_raw_median`` only: raw α* reaches ±τ/ε ≈ ±1e5 near r_l = 0, which swamps
    any mean; the median is torch's lower median, i.e. an observed value, never an average of two outliers.

    Args:
        samples: name -> per-pair values; pass them concatenated over the whole global batch (all DP ranks and
            micro-batches) to get global-batch statistics (OBJECTIVES.md §0.2 "Metrics").

    Returns:
        name -> Python float, computed in fp64 with one host sync for the whole dict.
    """
    names, values = [], []
    for key, x in samples.items():
        x = x.detach().reshape(-1).double()
        if key == "acpo/alpha_hat":
            stats = {"mean": x.mean(), "std": x.std(correction=0), "min": x.min(), "max": x.max()}
            names += [f"{key}_{stat}" for stat in stats]
            values += list(stats.values())
        elif key == "acpo/alpha_raw":
            names.append(f"{key}_median")
            values.append(x.median())
        else:
            names.append(_MEAN_NAMES.get(key, key))
            values.append(x.mean())
    if not names:
        return {}
    return dict(zip(names, torch.stack(values).tolist()))
