"""The trainer's whole step waits for the device a fixed number of times, however many micro-batches it runs:
the reference pass, the policy's forward and backward through megatron's schedule and the loss make no host sync
per micro-batch (tests/host_syncs.py counts them on the CPU); the step's own reads (finiteness and stop flags,
gradient norm, metrics, token counts) happen once."""

from __future__ import annotations

import pytest

from host_syncs import count_host_syncs

pytestmark = pytest.mark.pure


def _step_syncs(groups, tmp_path, objective_name: str, micro_batch_size: int, packing: bool) -> tuple[list, list]:
    from megatron_po.config import load_config
    from megatron_po.families import family_spec
    from megatron_po.objectives import build_objective
    from megatron_po.train.data import build_sampler, build_tokenizer, build_train_dataset, prepare_data, \
        step_micro_batches
    from megatron_po.train.loop import build_reference, build_train_state, finish_step, forward_backward, \
        prepare_step
    from megatron_po.train.models import build_models

    cfg = load_config(None, [f"output_dir={tmp_path}", "parallel.backend=gloo", "data.num_train=16",
                             "train.global_batch_size=8", f"train.micro_batch_size={micro_batch_size}",
                             f"objective.name={objective_name}", f"data.packing={str(packing).lower()}"])
    objective = build_objective(cfg.objective.name, cfg.objective.params, cfg.objective.batch_stat_scope)
    family = family_spec(cfg.model.family)
    train_path, tok_path = prepare_data(cfg, objective, family)
    tokenizer = build_tokenizer(cfg, family, tok_path)
    ds = build_train_dataset(cfg, family, train_path, tokenizer, objective)
    policy, reference_model = build_models(cfg, family, groups, tokenizer.vocab_size, objective)
    reference = build_reference(cfg, groups, objective, family, policy, reference_model, {"train": ds})
    state = build_train_state(cfg, groups, objective, policy, reference)
    sampler = build_sampler(cfg, len(ds), groups.dp_rank, groups.dp_size)
    batches = step_micro_batches(cfg, ds, sampler, 0, groups)
    with count_host_syncs() as per_micro_batch:
        prepare_step(state, batches, 0)
        outputs = forward_backward(state, batches)
    with count_host_syncs() as per_step:
        finish_step(state, outputs)
    return per_micro_batch, per_step


@pytest.mark.parametrize("objective_name,packing", [("acpo", False), ("dpo", True), ("aspo", False)])
def test_no_host_sync_per_micro_batch(groups, tmp_path, objective_name, packing):
    two, fixed_two = _step_syncs(groups, tmp_path / "a", objective_name, 4, packing)
    four, fixed_four = _step_syncs(groups, tmp_path / "b", objective_name, 2, packing)
    # ours: none in the passes; megatron's finalize_model_grads reads the step's pair count once (`if num_tokens
    # > 0`), which is not per micro-batch either
    ours = [str(s) for s in two + four if "megatron_po" in s.where]
    assert ours == [], ours
    assert len(two) == len(four) <= 1, [str(s) for s in two + four]
    # the step's own reads do not grow with the micro-batches either
    assert len(fixed_two) == len(fixed_four), ([str(s) for s in fixed_two], [str(s) for s in fixed_four])
