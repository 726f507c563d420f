"""Objective registry: a plain dict from name to an ``ObjectiveSpec`` that carries everything about the objective.

Every ``loss_fn(logps: PairLogps, cfg, group=None, ctx=None) -> (per_pair_loss [B], metric samples name -> [B])``
is a pure function of per-pair sequence quantities (STYLE.md §4) — P2-DPO's takes ``P2Logps`` instead (six
forwards per sample, ``inputs="p2"``); the trainer owns reductions over pairs and ranks
and passes ``ctx=ObjectiveContext(step, total_steps, ...)`` for objectives with schedules, global-batch statistics
(``global_stats``) or state carried across optimizer steps (``next_state``).

The driver turns a spec and its hyper-parameters into one ``Objective`` (``build_objective``), once; nothing below
the driver looks at objective names.
"""

import dataclasses
from dataclasses import dataclass
from typing import Any, Callable, Optional

from torch import Tensor
from torch.distributed import ProcessGroup

from megatron_po.objectives import acpo, aspo, beta_dpo, combo, cw_dpo, dpo, dpo_shift, ipo, p2_dpo, sft, simpo
from megatron_po.objectives.common import COMMON_METRICS, MetricReductions, ObjectiveContext, PairLogps
from megatron_po.objectives.common import summarize_metrics as _summarize


def _always(_cfg) -> bool:
    return True


def _never(_cfg) -> bool:
    return False


def _metrics(reductions: MetricReductions) -> Callable[[Any], MetricReductions]:
    return lambda _cfg: reductions


@dataclass(frozen=True)
class ObjectiveSpec:
    config_cls: type
    loss_fn: Callable
    needs_reference: Callable[[Any], bool] = _always
    """``cfg -> bool``: whether the objective reads reference log-probs with this config (a SimPO + SFT combo
    does not), i.e. whether the trainer needs a reference model or cache."""
    global_stats: Optional[Callable] = None
    """``(logps, cfg) -> dict[name, [B]]``: per-pair quantities of a batch statistic. The trainer gathers them
    over the optimizer step's global batch and passes them back as ``ctx.global_stats``."""
    takes_global_stats: Callable[[Any], bool] = _never
    """``cfg -> bool``: whether this config takes statistics across pairs (ACPO only with the batch / hybrid α
    scopes), decided from the config, never by probing ``global_stats``."""
    next_state: Optional[Callable] = None
    """``(cfg, state: dict | None, global_stats: dict) -> dict``: objective state after an optimizer step (β-DPO's
    EMA), from the state before it and the step's gathered ``global_stats``. The trainer calls it once per step and
    passes the result as the next step's ``ctx.state``; ``loss_fn`` computes the same update for its own step."""
    inputs: str = "pairs"
    """The input kind ``loss_fn`` takes (an entry of megatron_po/kinds: its records, dataset, collator, loss
    inputs and cached reference values): "pairs" (``PairLogps`` from the chosen/rejected rows of preference records)
    or "p2" (``P2Logps`` from P2-DPO records, data/p2_records.py)."""
    metrics: Callable[[Any], MetricReductions] = _metrics(MetricReductions())
    """``cfg -> MetricReductions``: how its metric samples are logged (the module's ``METRICS``)."""


OBJECTIVES: dict[str, ObjectiveSpec] = {
    "dpo": ObjectiveSpec(dpo.DPOConfig, dpo.loss_fn),
    "acpo": ObjectiveSpec(acpo.ACPOConfig, acpo.loss_fn, global_stats=acpo.global_stats,
                          takes_global_stats=acpo.takes_global_stats, metrics=_metrics(acpo.METRICS)),
    "sft": ObjectiveSpec(sft.SFTConfig, sft.loss_fn, needs_reference=_never),
    "ipo": ObjectiveSpec(ipo.IPOConfig, ipo.loss_fn),
    "simpo": ObjectiveSpec(simpo.SimPOConfig, simpo.loss_fn, needs_reference=_never),
    "dpo_shift": ObjectiveSpec(dpo_shift.DPOShiftConfig, dpo_shift.loss_fn),
    "combo": ObjectiveSpec(combo.ComboConfig, combo.loss_fn, needs_reference=combo.needs_reference,
                           metrics=combo.metrics),
    "beta_dpo": ObjectiveSpec(beta_dpo.BetaDPOConfig, beta_dpo.loss_fn, global_stats=beta_dpo.global_stats,
                              takes_global_stats=_always, next_state=beta_dpo.next_state,
                              metrics=_metrics(beta_dpo.METRICS)),
    "cw_sftc": ObjectiveSpec(cw_dpo.SFTCConfig, cw_dpo.sftc_loss_fn, needs_reference=_never,
                             global_stats=cw_dpo.sftc_global_stats, takes_global_stats=cw_dpo.sftc_takes_global_stats,
                             metrics=_metrics(cw_dpo.METRICS)),
    "cw_dpo": ObjectiveSpec(cw_dpo.CWDPOConfig, cw_dpo.loss_fn, metrics=_metrics(cw_dpo.METRICS)),
    "aspo": ObjectiveSpec(aspo.ASPOConfig, aspo.loss_fn, metrics=_metrics(aspo.METRICS)),
    "p2_dpo": ObjectiveSpec(p2_dpo.P2DPOConfig, p2_dpo.loss_fn, inputs="p2", metrics=_metrics(p2_dpo.METRICS)),
}


def build_objective_config(name: str, params: dict) -> Any:
    """Builds the config of objective ``name`` from ``params``; unknown names and keys are errors, never ignored.

    Raises:
        ValueError: unknown objective, unknown hyper-parameter, or an invalid value (from the config's checks).
    """
    if name not in OBJECTIVES:
        raise ValueError(f"unknown objective {name!r}; known: {sorted(OBJECTIVES)}")
    config_cls = OBJECTIVES[name].config_cls
    known = [f.name for f in dataclasses.fields(config_cls) if f.init]
    for key in params:
        if key not in known:
            raise ValueError(f"objective {name!r} has no hyper-parameter {key!r}; known: {known}")
    return config_cls(**params)


def objective_needs_reference(name: str, cfg: Any) -> bool:
    """Whether objective ``name`` with config ``cfg`` reads reference log-probs, i.e. needs a reference.

    Raises:
        ValueError: unknown objective.
    """
    if name not in OBJECTIVES:
        raise ValueError(f"unknown objective {name!r}; known: {sorted(OBJECTIVES)}")
    return OBJECTIVES[name].needs_reference(cfg)


def uses_global_stats(name: str, cfg: Any) -> bool:
    """Whether objective ``name`` with ``cfg`` takes statistics across pairs (e.g. ACPO only with the batch /
    hybrid α scopes)."""
    return OBJECTIVES[name].takes_global_stats(cfg)


@dataclass(frozen=True)
class Objective:
    """One objective as the trainer runs it: built once by the driver (``build_objective``) and passed down."""

    name: str
    cfg: Any
    spec: ObjectiveSpec
    needs_reference: bool
    """Reads reference log-probs (from a reference model or the cache)."""
    global_batch_stats: bool
    """Takes statistics over the optimizer step's whole global batch: the trainer runs the statistics pass and
    hands them over as ``ctx.global_stats`` (objective.batch_stat_scope=global_batch and the config takes any)."""
    metrics: MetricReductions
    """How its metric samples become logged scalars."""

    @property
    def inputs(self) -> str:
        return self.spec.inputs

    @property
    def stateful(self) -> bool:
        """Carries state across optimizer steps (``next_state``), saved in checkpoints."""
        return self.spec.next_state is not None

    def loss(self, inputs, group: Optional[ProcessGroup], ctx: ObjectiveContext) -> tuple[Tensor, dict[str, Tensor]]:
        """``(per_pair_loss [B] with grad, metric samples name -> [B])`` of one micro-batch's inputs."""
        return self.spec.loss_fn(inputs, self.cfg, group=group, ctx=ctx)

    def stats(self, inputs) -> dict[str, Tensor]:
        """The per-pair quantities [B] of the objective's batch statistics (only when ``global_batch_stats``)."""
        return self.spec.global_stats(inputs, self.cfg)

    def next_state(self, state: Optional[dict], global_stats: dict) -> Optional[dict]:
        return self.spec.next_state(self.cfg, state, global_stats) if self.stateful else state

    def summarize(self, samples: dict[str, Tensor]) -> dict[str, float]:
        return _summarize(samples, self.metrics)


def build_objective(name: str, params: dict, batch_stat_scope: str = "global_batch") -> Objective:
    """The objective ``name`` with hyper-parameters ``params``, as the trainer runs it.

    Raises:
        ValueError: unknown objective or hyper-parameter, invalid value, or state across steps (β-DPO's EMA)
            with ``batch_stat_scope != "global_batch"``.
    """
    cfg = build_objective_config(name, params)
    spec = OBJECTIVES[name]
    if spec.next_state is not None and batch_stat_scope != "global_batch":
        raise ValueError(f"objective {name!r} keeps state across steps (an EMA of batch statistics): "
                         "it needs objective.batch_stat_scope=global_batch")
    return Objective(name, cfg, spec, spec.needs_reference(cfg),
                     batch_stat_scope == "global_batch" and spec.takes_global_stats(cfg),
                     COMMON_METRICS | spec.metrics(cfg))


ALL_METRICS = COMMON_METRICS
for _spec in OBJECTIVES.values():
    ALL_METRICS = ALL_METRICS | _spec.metrics(_spec.config_cls())


def summarize_metrics(samples: dict[str, Tensor], reductions: MetricReductions = ALL_METRICS) -> dict[str, float]:
    """``common.summarize_metrics`` with the reductions every registered objective declares (for scripts that
    summarise samples of any objective); the trainer uses ``Objective.summarize``."""
    return _summarize(samples, reductions)


def pair_loss(
    name: str,
    policy_chosen_logps: Tensor,
    policy_rejected_logps: Tensor,
    ref_chosen_logps: Optional[Tensor],
    ref_rejected_logps: Optional[Tensor],
    chosen_lengths: Tensor,
    rejected_lengths: Tensor,
    group: Optional[ProcessGroup] = None,
    ctx: Optional[ObjectiveContext] = None,
    policy_chosen_segment_logps: Optional[Tensor] = None,
    ref_chosen_segment_logps: Optional[Tensor] = None,
    chosen_segment_lengths: Optional[Tensor] = None,
    chosen_segment_similarity: Optional[Tensor] = None,
    **hparams,
) -> tuple[Tensor, dict[str, float]]:
    """Functional entry point: one objective on one batch of pairs, no model or process group needed.

    Args:
        name: registry key, e.g. "acpo".
        policy_chosen_logps ... rejected_lengths: ``[B]`` tensors, see ``PairLogps``.
        group: data-parallel group for batch statistics (ACPO batch/hybrid scope only).
        ctx: step context for schedules (DPO-Shift's λ(t)) and batch statistics / state (β-DPO); None = step 0.
        policy_chosen_segment_logps ... chosen_segment_similarity: ``[B, K]`` per-sentence inputs of the chosen
            response (ASPO), see ``PairLogps``; None for every other objective.
        **hparams: the objective's config fields, e.g. ``beta=0.1``.

    Returns:
        ``(per_pair_loss [B] with grad, summary)``; the summary is ``summarize_metrics`` of this batch's samples
        (Python floats, local to this rank), for scripts and notebooks. The trainer calls ``loss_fn`` instead and
        summarises samples gathered over the global batch.
    """
    cfg = build_objective_config(name, hparams)
    if OBJECTIVES[name].inputs != "pairs":
        raise ValueError(f"objective {name!r} takes {OBJECTIVES[name].inputs!r} inputs, not pairs: call its loss_fn")
    logps = PairLogps(
        policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps,
        chosen_lengths, rejected_lengths, policy_chosen_segment_logps, ref_chosen_segment_logps,
        chosen_segment_lengths, chosen_segment_similarity,
    )
    per_pair_loss, samples = OBJECTIVES[name].loss_fn(logps, cfg, group, ctx=ctx)
    return per_pair_loss, _summarize(samples, COMMON_METRICS | OBJECTIVES[name].metrics(cfg))


__all__ = [
    "OBJECTIVES",
    "Objective",
    "ObjectiveSpec",
    "build_objective",
    "ObjectiveContext",
    "PairLogps",
    "build_objective_config",
    "objective_needs_reference",
    "pair_loss",
    "summarize_metrics",
]
