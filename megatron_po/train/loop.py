"""The training loop: megatron DDP + optimizer + schedule around the preference step."""

from __future__ import annotations

import dataclasses
import logging
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

from megatron_po.config import Config, config_to_dict
from megatron_po.families import FAMILIES, family_spec
from megatron_po.models.base import VLMBase
from megatron_po.objectives import Objective
from megatron_po.parallel.groups import ParallelGroups
from megatron_po.parallel.reduce import broadcast_from_last_stage
from megatron_po.train import checkpoint as ckpt
from megatron_po.train.batch import MicroBatch
from megatron_po.train.batch_stats import gather_global_stats
from megatron_po.train.data import (build_eval_datasets, build_eval_sets, build_sampler, build_tokenizer,
                                    build_train_dataset, prepare_data, step_micro_batches)
from megatron_po.train.evaluate import maybe_evaluate
from megatron_po.train.metrics import MetricsWriter, global_batch_metrics
from megatron_po.train.ref_cache import open_cache
from megatron_po.train.reference import CachedReference, LiveReference, ReferenceSource
from megatron_po.train.step import PreferenceStep, Tower, run_schedule, same_vision, train_forward_step

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


def build_model(cfg: Config, groups: ParallelGroups, vocab_size: int):
    """One VLM of `model.family` (this rank's pipeline stage of it), as the family's spec builds it (tiny_vlm from
    the config's shapes, an HF family from model.hf_path/config.json).

    Weights depend only on train.seed (then on checkpoint.init_from), never on the layout.
    """
    return family_spec(cfg.model.family).build_model(cfg, groups, vocab_size)


def build_models(cfg: Config, groups: ParallelGroups, vocab_size: int,
                 objective: Objective) -> tuple[VLMBase, Optional[VLMBase]]:
    """Policy and, when the objective reads a reference and no cache provides it, a frozen reference model from
    the same builder and weights."""
    policy = build_initial_model(cfg, groups, vocab_size)
    reference = None
    if objective.needs_reference and cfg.reference.source == "model":
        reference = build_initial_model(cfg, groups, vocab_size)
        reference.requires_grad_(False)
        reference.eval()
    return policy, reference


def build_initial_model(cfg: Config, groups: ParallelGroups, vocab_size: int) -> VLMBase:
    """`build_model` with checkpoint.init_from's weights loaded when given (a stage's starting point)."""
    model = build_model(cfg, groups, vocab_size)
    if cfg.checkpoint.init_from:
        ckpt.load_model_weights(Path(cfg.checkpoint.init_from), model)
    return model


def policy_tower(policy) -> Tower:
    return Tower("policy", frozen=policy.vision_frozen)


def live_reference(policy, reference, groups: ParallelGroups) -> LiveReference:
    """The reference model as a reference source; it shares the policy's image encoding when both towers are
    frozen copies (one encoding per pair and step)."""
    return LiveReference(reference, groups, Tower("policy" if same_vision(policy, reference, groups) else "reference",
                                                  frozen=True))


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
    ddp = DistributedDataParallel(
        config=lm_cfg,
        ddp_config=DistributedDataParallelConfig(
            grad_reduce_in_fp32=True,
            overlap_grad_reduce=False,
            use_distributed_optimizer=cfg.parallel.use_distributed_optimizer,
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
        # the optimizer's extra gloo groups are for distributed-optimizer checkpoints (broken on CPU anyway)
        use_gloo_process_groups=False,
        pg_collection=groups.pg_collection,
    )
    scheduler = build_scheduler(cfg, optimizer)
    lm_cfg.finalize_model_grads_func = finalize_model_grads
    lm_cfg.no_sync_func = ddp.no_sync
    lm_cfg.grad_scale_func = optimizer.scale_loss
    step = PreferenceStep(objective, groups, policy_tower(policy), total_steps=cfg.train.train_steps)
    return TrainState(ddp, reference, optimizer, scheduler, step, groups)


def prepare_step(state: TrainState, batches: list[MicroBatch], iteration: int) -> None:
    """What the policy step takes as inputs besides the micro-batches (which carry their samples' global
    positions, `step_micro_batches`): the step counter, the reference log-probs of every micro-batch, and (if the
    objective takes them) the step's global-batch statistics."""
    state.step.iteration = iteration
    if state.reference is not None:
        state.reference.fill(batches)
    state.step.global_stats = gather_global_stats(state.step, state.policy, batches)


def forward_backward(state: TrainState, batches: list[MicroBatch]) -> list[dict]:
    """Forward + backward of this rank's micro-batches through megatron's schedule.

    On return the DDP grad buffers hold the gradient of the global-batch mean loss (reduced over DP, divided by
    the global pair count). Returns the per-micro-batch outputs of `loss_func` (last pipeline stage only).
    """
    ddp = state.policy
    ddp.zero_grad_buffer()
    state.optimizer.zero_grad()
    return run_schedule(state.groups, ddp, batches, partial(train_forward_step, state.step), forward_only=False)


def train_step(state: TrainState, batches: list[MicroBatch], iteration: int = 0) -> dict:
    """One optimizer step over this rank's micro-batches; returns global-batch metrics (same on every rank)."""
    prepare_step(state, batches, iteration)
    return finish_step(state, forward_backward(state, batches))


def finish_step(state: TrainState, outputs: list[dict]) -> dict:
    """The optimizer and LR steps after `forward_backward`, the objective's state update, and the global-batch
    metrics of `outputs`; metrics and state are computed on the last stage and the same on every rank after."""
    lr = state.optimizer.param_groups[0]["lr"]  # the rate this step uses (Megatron: 0 on the first warm-up step)
    ok, grad_norm, _ = state.optimizer.step()
    if not ok:
        raise FloatingPointError("optimizer step skipped (non-finite gradients)")
    state.scheduler.step(increment=1)
    step, groups = state.step, state.groups
    result = None
    if groups.is_last_stage:  # the loss, its samples and the objective's statistics exist only there
        step.commit_state()
        result = (global_batch_metrics(outputs, groups.dp, step.objective.summarize), step.objective_state)
    metrics, step.objective_state = broadcast_from_last_stage(result, groups.pp)
    metrics["grad_norm"] = float(grad_norm) if grad_norm is not None else float("nan")
    metrics["lr"] = lr
    return metrics


def build_reference(cfg: Config, groups: ParallelGroups, objective: Objective, policy, reference_model,
                    datasets: dict) -> Optional[ReferenceSource]:
    """The step's reference source: None (the objective reads no reference), the reference model, or the cache
    of `reference.cache_path`, checked against this run's data, tokenizer, reference weights and settings."""
    if not objective.needs_reference:
        if cfg.reference.source == "cache" and groups.is_logging_rank:
            logger.warning("objective %r reads no reference log-probs: reference.source=cache is not used",
                           objective.name)
        return None
    if cfg.reference.source == "cache":
        cache = open_cache(cfg, objective, datasets)
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


def run_training(cfg: Config, objective: Objective, groups: ParallelGroups) -> dict:
    """Trains `objective` (built from cfg.objective by the driver) according to `cfg`; returns the last step's
    metrics."""
    out = Path(cfg.output_dir)
    train_path, tok_path = prepare_data(cfg, objective)
    tokenizer = build_tokenizer(cfg, tok_path)
    ds = build_train_dataset(cfg, train_path, tokenizer, objective)
    cfg = with_epochs(cfg, len(ds))
    eval_datasets = build_eval_datasets(cfg, tokenizer)
    policy, reference_model = build_models(cfg, groups, tokenizer.vocab_size, objective)
    reference = build_reference(cfg, groups, objective, policy, reference_model, {"train": ds, **eval_datasets})
    state = build_train_state(cfg, groups, objective, policy, reference)
    sampler = build_sampler(cfg, len(ds), groups.dp_rank, groups.dp_size)

    ckpt_root = out / "checkpoints"
    conversion = None  # HF families: each checkpoint carries hf/ and conversion.json (exportable as it is)
    if FAMILIES[cfg.model.family].from_hf:
        from megatron_po.convert.core import conversion_record

        conversion = (Path(cfg.model.hf_path), conversion_record(
            Path(cfg.checkpoint.init_from), Path(cfg.model.hf_path), cfg.model.family,
            torch.bfloat16 if cfg.model.params_dtype == "bf16" else torch.float32))
    start = 0
    eval_baselines: dict = {}
    latest = ckpt.latest_checkpoint(ckpt_root) if cfg.checkpoint.resume else None
    if latest is not None:
        ts = ckpt.load_checkpoint(latest, policy, state.optimizer)
        state.scheduler.load_state_dict(ts["scheduler"])
        sampler.load_state_dict(ts["sampler"])
        state.step.objective_state = ts.get("objective_state")
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

    last: dict = {}
    try:
        if start == 0 and (baseline := run_eval(0)):
            writer.log({"step": 0, **baseline})
        for it in range(start, cfg.train.train_steps):
            t0 = time.perf_counter()
            batches = step_micro_batches(cfg, ds, sampler, it, groups)
            metrics = train_step(state, batches, it)
            dt = time.perf_counter() - t0
            # real tokens (the policy's rows) and the positions processed for them, over the global batch
            counts = torch.tensor([sum(int(b.rows.lengths.sum()) for b in batches),
                                   sum(b.rows.tokens.numel() for b in batches)], dtype=torch.float64,
                                  device=groups.device)
            dist.all_reduce(counts, group=groups.dp)
            last = {"step": it + 1, **metrics, "tokens_per_s": counts[0].item() / dt, "step_time_s": dt,
                    "data/padding_efficiency": (counts[0] / counts[1]).item()}
            last.update(run_eval(it + 1))
            if (it + 1) % cfg.train.log_interval == 0 or it + 1 == cfg.train.train_steps:
                writer.log(last)
            done = it + 1 == cfg.train.train_steps
            exiting = bool(cfg.train.exit_interval) and (it + 1) % cfg.train.exit_interval == 0
            interval = cfg.checkpoint.save_interval
            if cfg.checkpoint.save and (done or exiting or (interval and (it + 1) % interval == 0)):
                sampler.consumed_samples = (it + 1) * cfg.train.global_batch_size
                trainer_state = {
                    "step": it + 1,
                    "scheduler": state.scheduler.state_dict(),
                    "sampler": sampler.state_dict(),
                    "objective": cfg.objective.name,
                    "objective_state": state.step.objective_state,
                    "eval_baselines": {ev.name: ev.baseline for ev in eval_sets},
                }
                ckpt.save_checkpoint(ckpt_root, it + 1, policy, state.optimizer, trainer_state, conversion)
            if exiting and not done:
                if groups.is_logging_rank:
                    logger.warning("exit_interval: stopping after step %d (resume by relaunching)", it + 1)
                break
    finally:
        writer.close()
    return last
