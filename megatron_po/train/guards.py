"""What the loop decides once per optimizer step, the same on every rank: stop early, and is the step finite.

The last pipeline stage of each DP rank knows whether its log-probs and loss are finite (train/step.py keeps them
as device flags, no host sync per micro-batch); every rank knows whether it received a stop signal or ran out of
time (train/jobcontrol.py). One all-reduce (MAX) over all ranks of those flags gives every rank the same verdict,
so all of them skip, stop or go on together: a rank that raised alone would leave the others in a collective.
The gradient norm is megatron's own, already reduced over the ranks that share the model.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Optional

import torch
import torch.distributed as dist
from megatron.core.optimizer.clip_grads import clip_grad_by_total_norm_fp32

from megatron_po.parallel.groups import ParallelGroups
from megatron_po.train.jobcontrol import StopRequests
from megatron_po.train.step import FINITE_TERMS


@dataclass
class StepVerdict:
    stop: list[str] = field(default_factory=list)
    """Why the run should stop after this step: "signal", "time limit"."""
    nonfinite: list[str] = field(default_factory=list)
    """The terms that were NaN/Inf (FINITE_TERMS, then "grad norm" once the optimizer has looked)."""
    reference_gap: Optional[tuple[float, float]] = None
    """The step's largest |policy − reference| sequence log-prob and its ratio to the dtype's allowance
    (train/step.reference_gap), when measured."""


def step_verdict(outputs: list[dict], stops: Optional[StopRequests], groups: ParallelGroups,
                 measure_gap: bool) -> StepVerdict:
    """Every rank's flags of this step, reduced in one all-reduce; `outputs` are this rank's `loss_func` outputs
    (empty off the last stage); `stops` None: no stop requests (benchmarks, tests)."""
    bad = torch.zeros(len(FINITE_TERMS), device=groups.device)
    if outputs:
        bad = (~torch.stack([o["finite"] for o in outputs]).all(0)).float()
    gap = torch.zeros(2, device=groups.device)
    gaps = [o["reference_gap"] for o in outputs if "reference_gap" in o]
    if gaps:
        gap = torch.stack(gaps).max(0).values.float()
    local = stops.local_flags() if stops is not None else [0.0, 0.0]
    flags = torch.cat([torch.tensor(local, device=groups.device), bad, gap])
    dist.all_reduce(flags, op=dist.ReduceOp.MAX)
    f = flags.tolist()  # the one host read of the step's flags
    stop = [name for name, on in zip(("signal", "time limit"), f[:2]) if on]
    nonfinite = [term for term, on in zip(FINITE_TERMS, f[2:2 + len(FINITE_TERMS)]) if on]
    return StepVerdict(stop, nonfinite, (f[-2], f[-1]) if measure_gap else None)


def guarded_optimizer_step(optimizer, veto: bool = False) -> tuple[bool, float]:
    """megatron's optimizer step with a finiteness check between the gradient norm and the update.

    The order is that of megatron's own `step` (ChainedOptimizer's: prepare the main grads, one norm over all of
    them, clip each optimizer's parameters by it, update); a non-finite norm (megatron's found-inf under a loss
    scaler reads as one) or `veto` (the step's loss was not finite) leaves the weights untouched.

    Returns:
        (updated, grad norm); the norm is reported even when the update is vetoed.
    """
    found_inf = optimizer.prepare_grads()
    grad_norm = float(optimizer.get_grad_norm() or 0.0)
    if found_inf:
        grad_norm = math.inf
    if veto or not math.isfinite(grad_norm):
        return False, grad_norm
    for opt in getattr(optimizer, "chained_optimizers", [optimizer]):
        params = opt.get_parameters()
        if params and opt.config.clip_grad > 0:
            clip_grad_by_total_norm_fp32(params, opt.config.clip_grad, grad_norm,
                                         opt.config.use_precision_aware_optimizer_no_fp8_or_ds_fp8)
    return optimizer.step_with_ready_grads(), grad_norm
