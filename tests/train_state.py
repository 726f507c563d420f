"""The trainer's state built in this process (one gloo rank), as `megatron_po.train.loop._train` builds it: for
tests that run a real step under an instrument (a host-sync counter, torch's FlopCounterMode)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path


@dataclass
class InProcessRun:
    cfg: object
    objective: object
    family: object
    reference: object
    state: object
    """`train.loop.TrainState` around the policy, its DDP, optimizer and reference source."""
    batches: list
    """This rank's micro-batches of step 0."""


def in_process_run(groups, out: Path, overrides: list[str]) -> InProcessRun:
    """Config (the embedded task; `overrides` last), data, models, reference source, train state and step 0's
    micro-batches under `groups`."""
    from megatron_po.config import load_config
    from megatron_po.families import family_spec
    from megatron_po.objectives import build_objective
    from megatron_po.train.data import build_sampler, build_tokenizer, build_train_dataset, prepare_data, \
        step_micro_batches
    from megatron_po.train.loop import build_run_state

    cfg = load_config(None, [f"output_dir={out}", "parallel.backend=gloo", *overrides])
    objective = build_objective(cfg.objective.name, cfg.objective.params, cfg.objective.batch_stat_scope)
    family = family_spec(cfg.model.family)
    train_path, tok_path = prepare_data(cfg, objective, family)
    tokenizer = build_tokenizer(cfg, family, tok_path)
    ds = build_train_dataset(cfg, family, train_path, tokenizer, objective)
    state = build_run_state(cfg, objective, family, groups, tokenizer.vocab_size, {"train": ds})
    reference = state.reference
    sampler = build_sampler(cfg, len(ds), groups.dp_rank, groups.dp_size)
    return InProcessRun(cfg, objective, family, reference, state, step_micro_batches(cfg, ds, sampler, 0, groups))
