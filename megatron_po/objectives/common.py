"""Pieces shared by every objective: the per-pair inputs, implicit rewards, TRL metrics and their summary.

Notation follows OBJECTIVES.md §0.1: ``pol_w``/``pol_l`` are the policy's summed response log-probs of the chosen /
rejected response, ``ref_*`` the frozen reference's, ``Δ = pol − ref`` the log-ratios and ``r = β·Δ`` the implicit
rewards.
"""

import math
from dataclasses import dataclass, field
from typing import Optional, Sequence

import torch
import torch.distributed as dist
from torch import Tensor

LOGP_FIELDS = ("policy_chosen_logps", "policy_rejected_logps", "ref_chosen_logps", "ref_rejected_logps")
LENGTH_FIELDS = ("chosen_lengths", "rejected_lengths")
SEGMENT_FIELDS = ("policy_chosen_segment_logps", "ref_chosen_segment_logps", "chosen_segment_lengths")


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
    policy_chosen_segment_logps: Optional[Tensor] = None
    """[B, K] policy log-prob sums per sentence of the chosen response (ASPO); sums over k equal the chosen sum."""
    ref_chosen_segment_logps: Optional[Tensor] = None
    """[B, K] same under the reference."""
    chosen_segment_lengths: Optional[Tensor] = None
    """[B, K] tokens per sentence (0 for padding slots k >= the row's sentence count)."""
    chosen_segment_similarity: Optional[Tensor] = None
    """[B, K] precomputed image-text similarity per sentence (NaN where unknown)."""


@dataclass(frozen=True)
class ObjectiveContext:
    """Where in the run a loss is computed, for objectives with schedules (DPO-Shift's λ(t)); the trainer passes
    ``ObjectiveContext(step, total_steps)`` and every ``loss_fn`` treats None as ``ObjectiveContext()``."""

    step: int = 0
    """0-based optimizer step being computed (every micro-batch of that step sees the same value)."""
    total_steps: int = 1
    """Planned optimizer steps of the run (``train.train_steps``), the T of a schedule t/T."""
    global_stats: Optional[dict] = field(default=None, compare=False)
    """Per-pair statistics [N] of the optimizer step's whole global batch (all DP ranks and micro-batches), from the
    objective's own ``global_stats`` hook; None: take batch statistics over this micro-step and ``group``."""
    pair_index: Optional[Tensor] = field(default=None, compare=False)
    """[B] positions of this micro-batch's pairs in ``global_stats`` (set together with it)."""
    state: Optional[dict] = field(default=None, compare=False)
    """Objective state carried across optimizer steps (JSON-serialisable floats, saved in checkpoints), as committed
    by the registry entry's ``next_state`` after the previous step; None = the objective's initial state. Every
    micro-batch of a step sees the same pre-step state (β-DPO's EMA of the margin statistics)."""
    inputs_checked: bool = False
    """The caller checks the inputs' finiteness itself (the trainer: once per optimizer step for all micro-batches
    and ranks, so a NaN stops every rank at the same step instead of one rank raising mid-schedule, and without
    one host sync per micro-batch); the objectives then skip their own finiteness check."""

    def __post_init__(self):
        if self.step < 0:
            raise ValueError(f"ObjectiveContext.step must be >= 0, got {self.step}")
        if self.total_steps < 1:
            raise ValueError(f"ObjectiveContext.total_steps must be >= 1, got {self.total_steps}")

    @property
    def progress(self) -> float:
        """``t/T`` clamped to [0, 1]: a run resumed past its planned length keeps the schedule's end value."""
        return min(self.step / self.total_steps, 1.0)


def local_pair_index(num_pairs: int, group: Optional[dist.ProcessGroup], device=None) -> Tensor:
    """[B] positions of this rank's pairs in a rank-major ``all_gather_cat`` of ``[B]`` per-pair values.

    Only a rank lookup, no collective: for objectives that take a batch statistic over ``group`` themselves (no
    ``ctx.global_stats``) and need their own rows of the gathered tensor.
    """
    rank = 0 if group is None or dist.get_world_size(group) == 1 else dist.get_rank(group)
    return torch.arange(rank * num_pairs, (rank + 1) * num_pairs, device=device)


def check_pair_logps(
    logps: PairLogps,
    objective: str,
    logp_fields: Sequence[str] = LOGP_FIELDS,
    length_fields: Sequence[str] = LENGTH_FIELDS,
    ctx: Optional[ObjectiveContext] = None,
) -> None:
    """Rejects missing, mis-shaped or non-finite inputs before a loss is computed (OBJECTIVES.md §0.4).

    Costs one host sync (a single ``isfinite().all()``), none when ``ctx.inputs_checked``; the per-field search
    runs only on failure.

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
    if ctx is not None and ctx.inputs_checked:
        return
    if not torch.isfinite(torch.cat([t.detach() for t in tensors.values()])).all():
        bad = [name for name, t in tensors.items() if not torch.isfinite(t).all()]
        raise ValueError(f"objective {objective!r}: non-finite log-probs in {bad}")


def check_segment_logps(
    logps: PairLogps,
    objective: str,
    fields: Sequence[str] = SEGMENT_FIELDS,
    optional: Sequence[str] = ("chosen_segment_similarity",),
    ctx: Optional[ObjectiveContext] = None,
) -> None:
    """Rejects missing, mis-shaped or non-finite per-sentence inputs (``[B, K]``, ASPO OBJECTIVES.md §10); the
    value checks (two host syncs) are the caller's when ``ctx.inputs_checked``.

    Call after ``check_pair_logps``, which fixes B. Log-prob segment fields must be finite; lengths must be >= 0;
    ``optional`` fields may be None and may hold NaN (unknown), but must have the common ``[B, K]`` shape.

    Raises:
        ValueError: a needed field is None, a field is not ``[B, K]``, a log-prob is NaN/inf or a length < 0.
    """
    missing = [name for name in fields if getattr(logps, name) is None]
    if missing:
        raise ValueError(
            f"objective {objective!r} needs per-sentence inputs {missing}, got None "
            "(does the dataset split chosen responses into sentences?)"
        )
    b = logps.policy_chosen_logps.shape[0]
    shape = getattr(logps, fields[0]).shape
    for name in (*fields, *optional):
        t = getattr(logps, name)
        if t is not None and (t.dim() != 2 or t.shape[0] != b or t.shape != shape):
            raise ValueError(
                f"objective {objective!r}: {name} must have shape [B, K] = [{b}, K] like {fields[0]} "
                f"{list(shape)}, got {list(t.shape)}"
            )
    if ctx is not None and ctx.inputs_checked:
        return
    logp_fields = [name for name in fields if "logps" in name]
    if not torch.isfinite(torch.cat([getattr(logps, n).detach().reshape(-1) for n in logp_fields])).all():
        bad = [name for name in logp_fields if not torch.isfinite(getattr(logps, name)).all()]
        raise ValueError(f"objective {objective!r}: non-finite log-probs in {bad}")
    for name in fields:
        if "lengths" in name and (getattr(logps, name) < 0).any():
            raise ValueError(f"objective {objective!r}: {name} must be >= 0")


def log_ratios(logps: PairLogps) -> tuple[Tensor, Tensor]:
    """Sequence log-ratios ``Δ_w = pol_w − sg[ref_w]``, ``Δ_l = pol_l − sg[ref_l]`` (OBJECTIVES.md §0.1).

    The reference terms are detached here (§0.3) so that no objective can send a gradient into reference
    log-probs, even when a caller hands in tensors that require grad.

    Returns:
        ``(Δ_w, Δ_l)``, each ``[B]``, carrying grad through the policy terms only.
    """
    delta_w = logps.policy_chosen_logps - logps.ref_chosen_logps.detach()
    delta_l = logps.policy_rejected_logps - logps.ref_rejected_logps.detach()
    return delta_w, delta_l


def implicit_rewards(logps: PairLogps, beta: float) -> tuple[Tensor, Tensor]:
    """β-scaled implicit rewards ``r_w = β·Δ_w``, ``r_l = β·Δ_l`` (DPO Eq. 5, ACPO Eq. 6); see ``log_ratios``.

    Returns:
        ``(r_w, r_l)``, each ``[B]``, carrying grad through the policy terms only.
    """
    delta_w, delta_l = log_ratios(logps)
    return beta * delta_w, beta * delta_l


def per_token_mean(logps: Tensor, lengths: Tensor) -> Tensor:
    """``ℓ̄ = logp / max(len, 1)`` in ``logps``' dtype: an empty response gives 0, not NaN (TRL; §0.4)."""
    return logps / lengths.clamp_min(1).to(logps.dtype)


def preference_metrics(logps: PairLogps, r_w: Tensor, r_l: Tensor) -> dict[str, Tensor]:
    """TRL's standard per-pair metric samples (OBJECTIVES.md §0.5), all detached ``[B]`` in ``r_w``'s dtype."""
    r_w, r_l = r_w.detach(), r_l.detach()
    return {
        "rewards/chosen": r_w,
        "rewards/rejected": r_l,
        "rewards/margins": r_w - r_l,
        "rewards/accuracies": (r_w > r_l).to(r_w.dtype),
        # likelihood displacement: the chosen response became less likely than under the reference
        "rewards/chosen_negative": (r_w < 0).to(r_w.dtype),
        "logps/chosen": logps.policy_chosen_logps.detach(),
        "logps/rejected": logps.policy_rejected_logps.detach(),
        "lengths/chosen": logps.chosen_lengths.detach().to(r_w.dtype),
        "lengths/rejected": logps.rejected_lengths.detach().to(r_w.dtype),
    }


@dataclass(frozen=True)
class MetricReductions:
    """How an objective's per-pair metric samples become logged scalars; each objective module declares its own
    (``METRICS``) and the registry merges them, so this module never lists objectives."""

    means: dict = field(default_factory=dict)
    """sample name -> logged name of its mean, for samples whose mean reads better under another name."""
    spread: tuple = ()
    """per-pair weights whose spread matters as much as their mean: logged as {mean, std, min, max}."""
    medians: tuple = ()
    """samples with outliers (ACPO's raw α*): logged as their lower median only, an observed value, never a mean."""
    masks: dict = field(default_factory=dict)
    """sample name -> 0/1 mask samples: defined only where their product is 1 (P2-DPO's branches); statistics
    cover those samples only and are left out (never NaN) when there is none."""

    def __or__(self, other: "MetricReductions") -> "MetricReductions":
        return MetricReductions({**self.means, **other.means}, tuple(dict.fromkeys(self.spread + other.spread)),
                                tuple(dict.fromkeys(self.medians + other.medians)), {**self.masks, **other.masks})


COMMON_METRICS = MetricReductions(means={"rewards/chosen_negative": "rewards/frac_chosen_negative"})
"""Reductions of the samples every preference objective logs (``preference_metrics``)."""


def _stats(key: str, x: Tensor, mask: Optional[Tensor], red: MetricReductions) -> dict[str, Tensor]:
    """Logged name -> 0-dim statistic of one sample ``x`` over the ``mask``ed entries (all when None)."""
    if key in red.medians:
        return {f"{key}_median": x.median()}
    if mask is None:
        if key in red.spread:
            return {f"{key}_mean": x.mean(), f"{key}_std": x.std(correction=0), f"{key}_min": x.min(),
                    f"{key}_max": x.max()}
        return {red.means.get(key, key): x.mean()}
    n = mask.sum().clamp_min(1)
    mean = (x * mask).sum() / n
    if key not in red.spread:
        return {red.means.get(key, key): mean}
    inf = torch.tensor(math.inf, dtype=x.dtype, device=x.device)
    chosen = mask > 0
    return {f"{key}_mean": mean, f"{key}_std": ((x - mean).square() * mask).sum().div(n).sqrt(),
            f"{key}_min": torch.where(chosen, x, inf).min(), f"{key}_max": torch.where(chosen, x, -inf).max()}


def summarize_metrics(samples: dict[str, Tensor], reductions: MetricReductions = COMMON_METRICS) -> dict[str, float]:
    """Reduces per-pair metric samples to the logged scalars.

    Every key becomes its mean (renamed per ``reductions.means``), except the keys of ``reductions.spread``
    -> ``<key>_{mean,std,min,max}`` (population std, so one pair gives 0) and of ``reductions.medians`` ->
    ``<key>_median`` only (torch's lower median: an observed value, never an average of two outliers). Samples
    listed in ``reductions.masks`` are reduced over the samples whose masks are all 1, and left out when none is.

    Args:
        samples: name -> per-pair values; pass them concatenated over the whole global batch (all DP ranks and
            micro-batches) to get global-batch statistics (OBJECTIVES.md §0.2 "Metrics").
        reductions: the objective's declared reductions (``Objective.metrics``); the default knows only the
            samples every objective shares.

    Returns:
        name -> Python float, computed in fp64 with one host sync for the whole dict.
    """
    s = {key: x.detach().reshape(-1).double() for key, x in samples.items()}
    stats, counts = {}, {}
    for key, x in s.items():
        mask = None
        if key in reductions.masks and all(m in s for m in reductions.masks[key]):
            mask = torch.stack([s[m] for m in reductions.masks[key]]).prod(0)
        for name, value in _stats(key, x, mask, reductions).items():
            stats[name] = value
            counts[name] = mask.sum() if mask is not None else torch.ones((), dtype=x.dtype, device=x.device)
    if not stats:
        return {}
    values = torch.stack([*stats.values(), *counts.values()]).tolist()
    return {name: v for name, v, n in zip(stats, values, values[len(stats):]) if n > 0}
