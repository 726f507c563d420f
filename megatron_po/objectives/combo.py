"""A weighted sum of registered objectives, e.g. DPO + SFT: RPO (Pang et al., "Iterative Reasoning Preference
Optimization", NeurIPS 2024, Eq. 1) or the preference + generation part of InternVL's MPO (Wang et al.,
"Enhancing the Reasoning Ability of Multimodal Large Language Models via Mixed Preference Optimization", 2024).

Every term sees the same pairs, group and step context; the combination is per pair, so the trainer's reduction
over pairs and ranks is unchanged. The registry is imported inside functions: ``megatron_po.objectives`` imports
this module to register it.
"""

import math
from dataclasses import dataclass, field
from typing import Optional

from torch import Tensor
from torch.distributed import ProcessGroup

from megatron_po.objectives.common import MetricReductions, ObjectiveContext, PairLogps


@dataclass(frozen=True)
class ComboConfig:
    weights: dict = field(default_factory=lambda: {"dpo": 1.0})
    """Term objective name -> weight w_k > 0; the loss is Σ w_k·L_k. Order matters only for metric name clashes.
    The default (DPO alone) exists so the config is constructible like every other; real runs name the terms,
    e.g. ``{dpo: 1.0, sft: 1.0}`` for RPO."""
    params: dict = field(default_factory=dict)
    """Term name -> that term's hyper-parameters (e.g. ``{dpo: {beta: 0.1}}``); terms not listed use their
    defaults. Built with ``build_objective_config``, so unknown keys fail naming the term and the key."""
    term_configs: dict = field(default_factory=dict, init=False, repr=False, compare=False)
    """Term name -> built config, filled from ``weights``/``params`` at construction (not a hyper-parameter)."""

    def __post_init__(self):
        from megatron_po.objectives import OBJECTIVES, build_objective_config, uses_global_stats

        if not isinstance(self.weights, dict) or not self.weights:
            raise ValueError(f"combo.weights must map at least one objective to a weight, got {self.weights!r}")
        if not isinstance(self.params, dict):
            raise ValueError(f"combo.params must map term names to hyper-parameter dicts, got {self.params!r}")
        for term, weight in self.weights.items():
            if term == "combo":
                raise ValueError("combo.weights: 'combo' cannot be a term of a combo (nested combos are not supported)")
            if term not in OBJECTIVES:
                raise ValueError(f"combo.weights: unknown objective {term!r}; known: {sorted(OBJECTIVES)}")
            if OBJECTIVES[term].inputs != "pairs":
                raise ValueError(f"combo.weights: {term!r} does not take preference pairs; use it on its own")
            if isinstance(weight, bool) or not isinstance(weight, (int, float)) or not math.isfinite(weight) \
                    or weight <= 0:
                raise ValueError(f"combo.weights[{term!r}] must be a finite number > 0, got {weight!r}")
        for term, hparams in self.params.items():
            if term not in self.weights:
                raise ValueError(
                    f"combo.params[{term!r}]: {term!r} is not a term of combo.weights {sorted(self.weights)}"
                )
            if not isinstance(hparams, dict):
                raise ValueError(f"combo.params[{term!r}] must be a dict of hyper-parameters, got {hparams!r}")
        term_configs = {}
        for term in self.weights:
            try:
                term_configs[term] = build_objective_config(term, self.params.get(term, {}))
            except ValueError as e:
                raise ValueError(f"combo.params[{term!r}]: {e}") from e
        for term, term_cfg in term_configs.items():
            if OBJECTIVES[term].next_state is not None or uses_global_stats(term, term_cfg):
                # the trainer gathers batch statistics and pair masks for the top-level objective only
                raise ValueError(f"combo.weights: {term!r} (with these hyper-parameters) uses batch statistics "
                                 "across pairs, which a combo does not pass to its terms; use it on its own")
        # copies: a caller mutating its dicts afterwards must not desynchronise weights and the built configs
        object.__setattr__(self, "weights", {k: float(w) for k, w in self.weights.items()})
        object.__setattr__(self, "params", {k: dict(v) for k, v in self.params.items()})
        object.__setattr__(self, "term_configs", term_configs)


def needs_reference(cfg: ComboConfig) -> bool:
    """True when any term compares the policy with a reference (a SimPO + SFT combo does not)."""
    from megatron_po.objectives import OBJECTIVES

    return any(OBJECTIVES[term].needs_reference(cfg.term_configs[term]) for term in cfg.weights)


def metrics(cfg: ComboConfig) -> MetricReductions:
    """The union of the terms' metric reductions."""
    from megatron_po.objectives import OBJECTIVES

    out = MetricReductions()
    for term in cfg.weights:
        out = out | OBJECTIVES[term].metrics(cfg.term_configs[term])
    return out


def loss_fn(
    logps: PairLogps,
    cfg: ComboConfig,
    group: Optional[ProcessGroup] = None,
    ctx: Optional[ObjectiveContext] = None,
) -> tuple[Tensor, dict[str, Tensor]]:
    """Per-pair ``L = Σ_k w_k·L_k`` over the terms of ``cfg.weights``.

    Each term checks its own inputs, so a reference-free combo accepts ``ref_* = None``.

    Metrics: the union of the terms' samples. On a name clash the first *preference* term (one that logs
    ``rewards/chosen``) in ``cfg.weights`` order wins, then the other terms in order; e.g. ``logps/chosen`` of
    DPO and SFT are the same values anyway, but ``rewards/*`` of DPO and SimPO are not. Plus ``combo/<term>_loss``,
    each term's unweighted per-pair loss.

    Args:
        logps: the batch.
        cfg: terms, weights and their configs.
        group: passed to every term (batch statistics such as ACPO's batch scope).
        ctx: passed to every term (schedules such as DPO-Shift's λ(t)).

    Returns:
        ``(per_pair_loss [B] with grad, per-pair metric samples: name -> detached [B])``.
    """
    from megatron_po.objectives import OBJECTIVES

    loss, term_samples, term_losses = 0, [], {}
    for term, weight in cfg.weights.items():
        term_loss, samples = OBJECTIVES[term].loss_fn(logps, cfg.term_configs[term], group, ctx=ctx)
        loss = loss + weight * term_loss
        term_samples.append(samples)
        term_losses[f"combo/{term}_loss"] = term_loss.detach()
    metrics = {}
    # stable sort: preference terms first, each group in weights order
    for samples in sorted(term_samples, key=lambda s: "rewards/chosen" not in s):
        for key, value in samples.items():
            metrics.setdefault(key, value)
    metrics.update(term_losses)
    return loss, metrics
