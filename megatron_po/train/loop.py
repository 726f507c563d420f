"""The training loop: megatron DDP + optimizer + schedule around the preference step."""

from __future__ import annotations

import contextlib
import dataclasses
import gc
import logging
import math
import time
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Optional

import torch
import torch.distributed as dist
from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig, finalize_model_grads
from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer
from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler

from megatron_po.config import Config, ConfigError, config_to_dict
from megatron_po.models.base import VLMBase
from megatron_po.models.family import FamilySpec
from megatron_po.objectives import Objective
from megatron_po.parallel.groups import ParallelGroups
from megatron_po.parallel.reduce import broadcast_from_last_stage
from megatron_po.train import checkpoint as ckpt
from megatron_po.train.batch import MicroBatch
from megatron_po.train.batch_stats import gather_global_stats
from megatron_po.train.costs import NO_CLOCK, CostMeter, StepClock, step_passes
from megatron_po.train.data import (batch_layout, build_eval_datasets, build_sampler, build_tokenizer,
                                    build_train_dataset, prepare_data)
from megatron_po.train.evaluate import build_eval_sets, maybe_evaluate
from megatron_po.train.guards import StepVerdict, guarded_optimizer_step, step_verdict
from megatron_po.train.loader import step_batches
from megatron_po.train.jobcontrol import NonFiniteStep, Requeue, StopRequests
from megatron_po.train.metrics import MetricsWriter, global_batch_metrics
from megatron_po.train.models import base_identity, build_models, live_reference, policy_tower
from megatron_po.train.ref_cache import open_cache
from megatron_po.train.reference import CachedReference, ReferenceSource
from megatron_po.train.step import PreferenceStep, run_schedule, train_forward_step

logger = logging.getLogger(__name__)


@dataclass
class TrainState:
    policy: DistributedDataParallel
    reference: Optional[ReferenceSource]
    """Where each step's reference log-probs come from (None: the objective reads none)."""
    optimizer: object
    scheduler: OptimizerParamScheduler
    step: PreferenceStep
    groups: ParallelGroups
    skip_nonfinite: bool = False
    """train.skip_nonfinite_steps: skip a non-finite step instead of raising NonFiniteStep."""
    skipped_steps: int = 0
    """Steps skipped so far for a NaN/Inf (train/skipped_steps; carried across resumes)."""


def build_scheduler(cfg: Config, optimizer) -> OptimizerParamScheduler:
    """megatron's LR (and weight-decay) schedule: `optim.lr_schedule` cosine (the default), linear (TRL's and
    transformers' default: from `optim.lr` after warm-up to `optim.min_lr` at the last step) or constant, after a
    linear warm-up of `optim.warmup_steps` steps (or `warmup_fraction` of the run)."""
    o, steps = cfg.optim, cfg.train.train_steps
    warmup = o.warmup_steps if o.warmup_steps >= 0 else int(o.warmup_fraction * steps)
    return OptimizerParamScheduler(
        optimizer,
        init_lr=0.0,
        max_lr=o.lr,
        min_lr=o.min_lr,
        lr_warmup_steps=warmup,
        lr_decay_steps=steps,
        lr_decay_style=o.lr_schedule,
        start_wd=o.weight_decay,
        end_wd=o.weight_decay,
        wd_incr_steps=steps,
        wd_incr_style="constant",
    )


def build_train_state(cfg: Config, groups: ParallelGroups, objective: Objective, policy: VLMBase,
                      reference: Optional[ReferenceSource]) -> TrainState:
    """DDP, optimizer and LR schedule around the policy, and the preference step; `reference` provides the
    reference log-probs (`live_reference`, or a `CachedReference`) when the objective reads any."""
    if objective.needs_reference and reference is None:
        raise ValueError(f"objective {objective.name!r} needs reference log-probs: a reference model or cache")
    if cfg.parallel.use_distributed_optimizer and groups.device.type == "cpu" and cfg.checkpoint.save:
        # measured: every sharding type fails or silently resumes with a wrong Adam step (MEGATRON_ON_CPU.md §8)
        raise ValueError("parallel.use_distributed_optimizer: its checkpoints do not work on the CPU backend; "
                         "set checkpoint.save=false or use the plain optimizer on CPU")
    lm_cfg = policy.config
    # sum-of-pair-losses / global pair count: megatron divides grads by the all-reduced count once per step
    lm_cfg.calculate_per_token_loss = True
    par = cfg.parallel
    ddp = DistributedDataParallel(
        config=lm_cfg,
        ddp_config=DistributedDataParallelConfig(
            grad_reduce_in_fp32=True,
            # the DP reduction runs bucket by bucket during the last micro-batch's backward; with the distributed
            # optimizer the updated shards' all-gather runs during the next forward (forward pre-hooks)
            overlap_grad_reduce=par.overlap_grad_reduce,
            overlap_param_gather=par.overlap_param_gather and par.use_distributed_optimizer,
            use_distributed_optimizer=par.use_distributed_optimizer,
            # NaN/Inf are checked once per step over all ranks (train/guards.py), naming the step and the term
            check_for_nan_in_grad=False,
        ),
        module=policy,
        pg_collection=groups.pg_collection,
    )
    o = cfg.optim
    optimizer = get_megatron_optimizer(
        OptimizerConfig(
            optimizer="adam",
            lr=o.lr,
            min_lr=o.min_lr,
            weight_decay=o.weight_decay,
            adam_beta1=o.adam_beta1,
            adam_beta2=o.adam_beta2,
            adam_eps=o.adam_eps,
            clip_grad=o.clip_grad,
            bf16=cfg.model.params_dtype == "bf16",
            use_distributed_optimizer=cfg.parallel.use_distributed_optimizer,
        ),
        [ddp],
        # gloo groups serve only the distributed optimizer's dp_zero / fully_reshardable checkpoint formats; ours is
        # megatron's default fully_sharded_model_space, and no gloo groups exist (parallel/groups.py)
        use_gloo_process_groups=False,
        pg_collection=groups.pg_collection,
    )
    scheduler = build_scheduler(cfg, optimizer)
    lm_cfg.finalize_model_grads_func = finalize_model_grads
    lm_cfg.no_sync_func = ddp.no_sync
    lm_cfg.grad_scale_func = optimizer.scale_loss
    step = PreferenceStep(objective, groups, policy_tower(policy), total_steps=cfg.train.train_steps)
    return TrainState(ddp, reference, optimizer, scheduler, step, groups, cfg.train.skip_nonfinite_steps)


def build_run_state(cfg: Config, objective: Objective, family: FamilySpec, groups: ParallelGroups,
                    vocab_size: int, datasets: dict) -> TrainState:
    """The policy (LoRA adapters on its base where configured), the reference source (a reference model, the
    policy with its adapters off, or the cache checked against `datasets`) and the train state around them, as a
    run builds them; the unwrapped policy is ``state.policy.module``."""
    policy, reference_model = build_models(cfg, family, groups, vocab_size, objective)
    reference = build_reference(cfg, groups, objective, family, policy, reference_model, datasets)
    return build_train_state(cfg, groups, objective, policy, reference)


def prepare_step(state: TrainState, batches: list[MicroBatch], iteration: int, clock: StepClock = NO_CLOCK) -> None:
    """What the policy step takes as inputs besides the micro-batches (which carry their samples' global
    positions, `step_micro_batches`): the step counter, the reference log-probs of every micro-batch, and (if the
    objective takes them) the step's global-batch statistics."""
    state.step.iteration = iteration
    if state.reference is not None:
        state.reference.fill(batches)
    clock.mark("reference")
    state.step.global_stats = gather_global_stats(state.step, state.policy, batches)
    clock.mark("statistics")


def forward_backward(state: TrainState, batches: list[MicroBatch]) -> list[dict]:
    """Forward + backward of this rank's micro-batches through megatron's schedule.

    On return the DDP grad buffers hold the gradient of the global-batch mean loss (reduced over DP, divided by
    the global pair count). Returns the per-micro-batch outputs of `loss_func` (last pipeline stage only).
    """
    ddp = state.policy
    ddp.zero_grad_buffer()
    state.optimizer.zero_grad()
    return run_schedule(state.groups, ddp, batches, partial(train_forward_step, state.step), forward_only=False)


def train_step(state: TrainState, batches: list[MicroBatch], iteration: int = 0,
               stops: Optional[StopRequests] = None, clock: StepClock = NO_CLOCK) -> dict:
    """One optimizer step over this rank's micro-batches; returns global-batch metrics (same on every rank), with
    "stop" listing why the run should stop after it (a signal, the time limit; see `finish_step`). `clock` marks
    the end of each phase (train/costs.py)."""
    prepare_step(state, batches, iteration, clock)
    outputs = forward_backward(state, batches)
    clock.mark("policy")
    metrics = finish_step(state, outputs, stops)
    clock.mark("optimizer")
    return metrics


def finish_step(state: TrainState, outputs: list[dict], stops: Optional[StopRequests] = None) -> dict:
    """The optimizer and LR steps after `forward_backward`, the objective's state update, and the global-batch
    metrics of `outputs`; metrics and state are computed on the last stage and the same on every rank after.

    A NaN/Inf in the step's log-probs, loss or gradient norm (on any rank) leaves the weights as they were and
    raises NonFiniteStep on every rank, or with train.skip_nonfinite_steps skips the step (no update, no LR step,
    as megatron skips an overflowed step; counted in `train/skipped_steps`).
    """
    lr = state.optimizer.param_groups[0]["lr"]  # the rate this step uses (Megatron: 0 on the first warm-up step)
    step, groups = state.step, state.groups
    verdict = step_verdict(outputs, stops, groups, step.measure_reference_gap)
    updated, grad_norm = guarded_optimizer_step(state.optimizer, veto=bool(verdict.nonfinite))
    if not math.isfinite(grad_norm):
        verdict.nonfinite.append("grad norm")
    if verdict.nonfinite:
        if not state.skip_nonfinite:
            raise NonFiniteStep(f"step {step.iteration + 1}: non-finite {', '.join(verdict.nonfinite)}")
        state.skipped_steps += 1
        if groups.is_logging_rank:
            logger.warning("step %d: non-finite %s: skipped (train.skip_nonfinite_steps)", step.iteration + 1,
                           ", ".join(verdict.nonfinite))
    else:
        state.scheduler.step(increment=1)
    result = None
    if groups.is_last_stage:  # the loss, its samples and the objective's statistics exist only there
        if updated:
            step.commit_state()
        result = (global_batch_metrics(outputs, groups.dp, step.objective.summarize), step.objective_state)
    metrics, step.objective_state = broadcast_from_last_stage(result, groups.pp)
    metrics.update({"grad_norm": grad_norm, "lr": lr, "train/skipped_steps": state.skipped_steps,
                    "stop": verdict.stop})
    if verdict.reference_gap is not None:
        metrics.update(_reference_gap_metrics(verdict, groups))
    return metrics


def _reference_gap_metrics(verdict: StepVerdict, groups: ParallelGroups) -> dict:
    gap, ratio = verdict.reference_gap
    if ratio > 1 and groups.is_logging_rank:
        logger.warning("step 1: the reference log-probs differ from the policy's, which starts from the same "
                       "weights, by up to %.3g nats per sequence (%.3g x what rounding in the model's dtype "
                       "explains): was the reference cache computed from checkpoint.init_from, in this dtype?",
                       gap, ratio)
    return {"reference/step0_max_gap": gap, "reference/step0_gap_over_rounding": ratio}


def build_reference(cfg: Config, groups: ParallelGroups, objective: Objective, family: FamilySpec, policy,
                    reference_model, datasets: dict) -> Optional[ReferenceSource]:
    """The step's reference source: None (the objective reads no reference), the reference model, or the cache
    of `reference.cache_path`, checked against this run's data, tokenizer, reference weights and settings."""
    if not objective.needs_reference:
        if cfg.reference.source == "cache" and groups.is_logging_rank:
            logger.warning("objective %r reads no reference log-probs: reference.source=cache is not used",
                           objective.name)
        return None
    if cfg.reference.source == "cache":
        cache = open_cache(cfg, objective, family, datasets)
        if groups.is_logging_rank:
            logger.warning("reference log-probs: cache %s (%s; no reference model built)", cache.path,
                           ", ".join(f"{k} {len(v['ids'])} samples" for k, v in cache.manifest["splits"].items()))
        return CachedReference(cache, groups.device)
    return live_reference(policy, reference_model, groups)


def with_epochs(cfg: Config, num_samples: int) -> Config:
    """`cfg` with train.train_steps = train.epochs passes over the kept samples (when epochs > 0): the sampler's
    global batches per epoch times the epochs."""
    if not cfg.train.epochs:
        return cfg
    steps = cfg.train.epochs * build_sampler(cfg, num_samples, 0, 1).steps_per_epoch
    if cfg.optim.warmup_steps >= steps:
        raise ValueError(f"optim.warmup_steps={cfg.optim.warmup_steps} must be < the {steps} steps of "
                         f"train.epochs={cfg.train.epochs}")
    return dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, train_steps=steps))


def run_training(cfg: Config, objective: Objective, family: FamilySpec, groups: ParallelGroups) -> dict:
    """Trains `objective` on a model of `family` (both built from `cfg` by the driver) according to `cfg`; returns
    the last step's metrics.

    Raises:
        Requeue: a stop signal or train.exit_duration_minutes ended the run after a step, saved (exit code 75).
        NonFiniteStep: a step was not finite (without train.skip_nonfinite_steps); nothing of it was saved.
    """
    # handlers first: a signal while the models are built stops the run after its first step, saved
    stops = StopRequests(cfg.train.exit_duration_minutes)
    try:
        return _train(cfg, objective, family, groups, stops)
    finally:
        stops.close()


def _train(cfg: Config, objective: Objective, family: FamilySpec, groups: ParallelGroups,
           stops: StopRequests) -> dict:
    """`run_training` with its stop handlers installed: data, models, resume, the step loop, saves."""
    out = Path(cfg.output_dir)
    train_path, tok_path = prepare_data(cfg, objective, family)
    tokenizer = build_tokenizer(cfg, family, tok_path)
    ds = build_train_dataset(cfg, family, train_path, tokenizer, objective)
    cfg = with_epochs(cfg, len(ds))
    eval_datasets = build_eval_datasets(cfg, family, tokenizer)
    costs = CostMeter(cfg, family, objective, groups)  # before the models: the resident size they add is measured
    state = build_run_state(cfg, objective, family, groups, tokenizer.vocab_size, {"train": ds, **eval_datasets})
    policy, reference = state.policy.module, state.reference
    costs.set_passes(step_passes(cfg, objective, reference, state.step.policy_tower, costs.shape))
    sampler = build_sampler(cfg, len(ds), groups.dp_rank, groups.dp_size)

    ckpt_root = out / "checkpoints"
    lora_base = base_identity(cfg, family)
    start, eval_baselines = 0, {}
    latest = ckpt.latest_checkpoint(ckpt_root) if cfg.checkpoint.resume else None
    if latest is not None:
        try:
            ts = ckpt.load_checkpoint(latest, policy, state.optimizer, lora_base)
        except ValueError as e:  # another LoRA base, or adapters where this run has none (or the reverse)
            raise ConfigError(str(e)) from None
        try:
            sampler.load_state_dict(ts["sampler"])
        except ValueError as e:  # the data order would change: not a resume of this run
            raise ConfigError(f"cannot resume from {latest}: {e}") from None
        state.scheduler.load_state_dict(ts["scheduler"])
        state.step.objective_state = ts.get("objective_state")
        state.skipped_steps = ts.get("skipped_steps", 0)
        eval_baselines = ts.get("eval_baselines", {})
        start = ts["step"]
        if groups.is_logging_rank:
            logger.warning("resumed from %s at step %d", latest, start)

    writer = MetricsWriter(out, cfg.train.train_steps, start, groups.is_logging_rank, cfg.train.progress_bar,
                           wandb={"project": cfg.train.wandb_project, "run_name": cfg.train.wandb_run_name,
                                  "config": config_to_dict(cfg)})
    eval_sets, probe_sets = build_eval_sets(cfg, eval_datasets, groups)
    for ev in eval_sets:  # Δlog p is measured against step 0 even across a resume
        ev.baseline.update(eval_baselines.get(ev.name, {}))

    def run_eval(step_no: int) -> dict:
        if not (eval_sets or probe_sets):
            return {}
        if step_no not in (0, cfg.train.train_steps) and step_no % cfg.eval.interval:
            return {}
        return maybe_evaluate(state.step, state.policy, eval_sets, probe_sets, state.reference)

    def save(step_no: int) -> None:
        sampler.consumed_samples = step_no * cfg.train.global_batch_size
        trainer_state = {"step": step_no, "scheduler": state.scheduler.state_dict(), "sampler": sampler.state_dict(),
                         "objective": cfg.objective.name, "objective_state": state.step.objective_state,
                         "skipped_steps": state.skipped_steps,
                         "eval_baselines": {ev.name: ev.baseline for ev in eval_sets},
                         **({ckpt.BASE: lora_base} if lora_base else {})}
        with params_in_sync(state.policy):
            saver.save(step_no, policy, state.optimizer, trainer_state, _conversion(cfg, family))

    saver = ckpt.Checkpointer(ckpt_root, cfg.checkpoint)
    last: dict = {}
    failed = True
    loader = None
    try:
        if start == 0 and (baseline := run_eval(0)):
            writer.log({"step": 0, **baseline})
        # the ~400K long-lived objects of the set-up (modules, megatron's state, tokenizer) made each full collection
        # stall a random step by ~0.25 s (benchmarks/bench_data.py); frozen, collections scan only what steps make,
        # and forked loader workers share those pages instead of copying them when the collector touches them
        gc.collect()
        gc.freeze()
        loader = step_batches(ds, sampler, batch_layout(cfg, groups), groups.device, start, cfg.train.train_steps,
                              cfg.data.num_workers, cfg.data.prefetch_factor)
        for it in range(start, cfg.train.train_steps):
            logged = (it + 1) % cfg.train.log_interval == 0 or it + 1 == cfg.train.train_steps
            t0 = time.perf_counter()
            batches, data_wait = next(loader)
            costs.start()  # the phases after the data wait (the memory peak too: the batches are in memory already)
            # the run's first step, where the policy equals the reference: how far the reference is from it
            state.step.measure_reference_gap = it == 0 and state.reference is not None
            metrics = train_step(state, batches, it, stops, costs.clock if logged else NO_CLOCK)
            stop = metrics.pop("stop")
            # a logged step's phases; reading them waits for its last kernels (a GPU): the step's time is all of it
            phases = costs.clock.seconds() if logged else None
            step_seconds = time.perf_counter() - t0
            t_eval = time.perf_counter()
            evaluated = run_eval(it + 1)
            eval_seconds = time.perf_counter() - t_eval if evaluated else None
            last = {"step": it + 1, **metrics, **evaluated,
                    **costs.step_metrics(batches, data_wait, step_seconds, eval_seconds, phases)}
            if logged:
                writer.log(last)
            done = it + 1 == cfg.train.train_steps
            exiting = bool(cfg.train.exit_interval) and (it + 1) % cfg.train.exit_interval == 0
            interval = cfg.checkpoint.save_interval
            if cfg.checkpoint.save and (done or exiting or stop or (interval and (it + 1) % interval == 0)):
                save(it + 1)
            saver.poll()
            if stop and not done:
                saver.close()  # `latest` names this step's checkpoint before the job exits
                # every rank is past its save before any exits (srun's --kill-on-bad-exit ends the others' tasks)
                dist.barrier()
                stops.close(ignore=True)
                raise Requeue(f"stopped after step {it + 1} ({', '.join(stop)})"
                              + ("" if cfg.checkpoint.save else "; checkpoint.save=false: nothing was saved"))
            if exiting and not done:
                if groups.is_logging_rank:
                    logger.warning("exit_interval: stopping after step %d (resume by relaunching)", it + 1)
                break
        failed = False
    except NonFiniteStep as e:
        # raised on every rank alike: earlier saves may still finish; this step's weights are never saved
        failed = False
        saver.close()
        named = ckpt.latest_checkpoint(ckpt_root)
        raise NonFiniteStep(f"{e}. Stopped without saving; latest checkpoint: {named or 'none'} (set "
                            "train.skip_nonfinite_steps=true to skip such steps instead)") from None
    except Requeue:
        failed = False
        raise
    finally:
        if loader is not None:
            loader.close()  # its workers stop now, not when the generator is collected
        # after an error on some ranks only, a pending save is abandoned (no collective): `latest` stays
        saver.close(abort=failed)
        writer.close()
    return last


def _conversion(cfg: Config, family: FamilySpec) -> Optional[tuple[Path, dict]]:
    """HF families: each checkpoint carries hf/ and conversion.json (exportable as it is)."""
    if not family.from_hf:
        return None
    from megatron_po.convert.core import conversion_record

    return (Path(cfg.model.hf_path), conversion_record(
        Path(cfg.checkpoint.init_from), Path(cfg.model.hf_path), cfg.model.family,
        torch.bfloat16 if cfg.model.params_dtype == "bf16" else torch.float32))


@contextlib.contextmanager
def params_in_sync(ddp: DistributedDataParallel):
    """With overlapped parameter all-gathers (distributed optimizer), the updated shards reach the other ranks only
    at the next forward: gather them now, so a checkpoint holds the updated weights (as Megatron-LM does around
    its saves)."""
    overlapped = ddp.ddp_config.overlap_param_gather and ddp.ddp_config.use_distributed_optimizer
    if overlapped:
        ddp.disable_forward_pre_hook(param_sync=True)
    try:
        yield
    finally:
        if overlapped:
            ddp.enable_forward_pre_hook()
