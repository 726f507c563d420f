"""Where each training step's time, tokens, FLOPs and memory go: the `time/*`, `tokens/*`, `throughput/*`,
`flops/*`, `mfu` and `memory/*` metrics (README "Metrics").

Time: the step's phases (reference, statistics, policy forward + backward, optimizer) are marked with CUDA events on
a GPU, which record on the stream without waiting for it, and read once at a logged step after waiting for the
last one; on the CPU the work is synchronous and `time.perf_counter` marks them. The data wait is the host's wait
for the loader. The times are the slowest rank's (its step and its phases), memory the fullest rank's: one
all-gather over the world at a logged step.

Tokens and FLOPs: each micro-batch carries what its passes process (`BatchWork`, counted on the host when it is
made); a step sums them over the DP group in the one all-reduce the step already had, and `flops.step_flops` turns
them into model FLOPs.

Memory: on CUDA the caching allocator's peaks (reset at each step's start); on the CPU the kernel's high-water mark
of resident memory, reset through /proc/self/clear_refs at each step's start, beside the resident size before the
models were built (`memory/baseline_rss_gib`: interpreter, libraries, data; what the plan does not count). The
memory plan (memory_plan.py) of the rows the step really had is `memory/planned_gib`.
"""

from __future__ import annotations

import logging
import math
import re
import time
from typing import Optional

import psutil
import torch
import torch.distributed as dist

from megatron_po.config import Config
from megatron_po.flops import StepPasses, device_peak_tflops, step_flops
from megatron_po.memory_plan import GiB, build_plan
from megatron_po.models.family import FamilySpec
from megatron_po.models.specs import use_te_spec
from megatron_po.parallel.groups import ParallelGroups
from megatron_po.train.batch import BatchWork, MicroBatch

logger = logging.getLogger(__name__)

PHASES = ("reference", "statistics", "policy", "optimizer")
"""The marked phases of a step after its data wait, in order (`StepClock.mark`)."""


class StepClock:
    """Marks the end of each phase of one step; `seconds()` reads them (at a logged step)."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"
        self.marks: list = []

    def _now(self):
        if self.cuda:
            event = torch.cuda.Event(enable_timing=True)
            event.record()
            return event
        return time.perf_counter()

    def start(self) -> None:
        self.marks = [("start", self._now())]

    def mark(self, phase: str) -> None:
        if self.marks:
            self.marks.append((phase, self._now()))

    def seconds(self) -> dict[str, float]:
        """Seconds of each marked phase (0 for a phase the step did not run); waits for the last CUDA event."""
        out = dict.fromkeys(PHASES, 0.0)
        if len(self.marks) < 2:
            return out
        if self.cuda:
            self.marks[-1][1].synchronize()
        for (_, a), (phase, b) in zip(self.marks, self.marks[1:]):
            out[phase] += a.elapsed_time(b) / 1e3 if self.cuda else b - a
        return out


class NoClock(StepClock):
    """The clock of a step nobody times (tests, benchmarks that time themselves, the steps between logged ones)."""

    def __init__(self):
        super().__init__(torch.device("cpu"))

    def mark(self, phase: str) -> None:
        pass


NO_CLOCK = NoClock()


_HWM = re.compile(r"VmHWM:\s+(\d+) kB")


class MemoryMeter:
    """Peak device memory of a step (CUDA), or the process's peak resident memory (CPU)."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"
        self.baseline = psutil.Process().memory_info().rss  # before the models are built
        self.resettable = not self.cuda and self._reset_hwm()

    @staticmethod
    def _reset_hwm() -> bool:
        try:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")  # VmHWM := current RSS (Linux >= 4.0)
            return True
        except OSError:
            return False

    def start(self) -> None:
        if self.cuda:
            torch.cuda.reset_peak_memory_stats()
        elif self.resettable:
            self._reset_hwm()

    def peaks(self) -> dict[str, float]:
        if self.cuda:
            return {"memory/peak_allocated_gib": torch.cuda.max_memory_allocated() / GiB,
                    "memory/peak_reserved_gib": torch.cuda.max_memory_reserved() / GiB}
        peak = 0
        try:
            with open("/proc/self/status") as f:
                peak = int(_HWM.search(f.read()).group(1)) * 1024
        except (OSError, AttributeError):  # no /proc: the lifetime peak is all there is
            import resource

            peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
        return {"memory/peak_rss_gib": peak / GiB, "memory/baseline_rss_gib": self.baseline / GiB}


def step_passes(cfg: Config, objective, reference, policy_tower, shape) -> StepPasses:
    """The passes of this run's steps, for the FLOP count (`reference`: the step's ReferenceSource or None; a
    LiveReference is a reference model or, `adapters_off`, the policy's base: one forward of the base either way;
    `shape`: the family's ModelShape of this config, where the adapters sit)."""
    from megatron_po.flops import lora_adapters
    from megatron_po.train.reference import LiveReference

    m = cfg.model
    live = isinstance(reference, LiveReference)
    adapters = lora_adapters(m.lora, shape)
    return StepPasses(live_reference=live, statistics_pass=objective.global_batch_stats,
                      shared_encoding=policy_tower.frozen, vit_trained=not m.freeze_vit,
                      projector_trained=not m.freeze_aligner,
                      reference_own_tower=live and reference.tower.key != policy_tower.key,
                      frozen_base=m.decoder_frozen, adapters=adapters,
                      # the embedding is part of the base; the tower and projector feed the decoder's input, and
                      # under recompute models/lora.py makes it take a gradient (megatron's checkpoints need one)
                      decoder_input_grad=(not m.decoder_frozen or not policy_tower.frozen
                                          or (m.lora.enabled and m.recompute != "none")))


class CostMeter:
    """The cost metrics of each step, made on every rank (the same numbers everywhere)."""

    def __init__(self, cfg: Config, family: FamilySpec, objective, groups: ParallelGroups):
        self.cfg, self.family, self.objective, self.groups = cfg, family, objective, groups
        self.world = dist.get_world_size()
        self.clock = StepClock(groups.device)
        self.memory = MemoryMeter(groups.device)
        self.shape = family.model_shape(cfg)
        self.passes: Optional[StepPasses] = None  # set once the reference source exists (`set_passes`)
        self.peak_tflops = cfg.train.peak_tflops or (
            device_peak_tflops(torch.cuda.get_device_name(groups.device)) if groups.device.type == "cuda" else None)
        self._plans: dict[tuple[int, int], float] = {}

    def set_passes(self, passes: StepPasses) -> None:
        self.passes = passes

    def start(self) -> None:
        self.memory.start()
        self.clock.start()

    def planned_gib(self, rows: int, row_length: int) -> float:
        """The memory plan's peak per rank for micro-batches of `rows` rows of `row_length` positions."""
        key = (rows, row_length)
        if key not in self._plans:
            try:
                plan = build_plan(self.cfg, self.family, self.world, rows=rows, row_tokens=row_length,
                                  needs_reference=self.objective.needs_reference, te=use_te_spec(self.cfg.model),
                                  device_type=self.groups.device.type)
                self._plans[key] = plan.peak / GiB
            except ValueError as e:  # a metric must not stop the run: say why once, log NaN
                if self.groups.is_logging_rank and not self._plans:
                    logger.warning("memory/planned_gib: no memory plan for this run (%s)", e)
                self._plans[key] = math.nan
        return self._plans[key]

    def step_metrics(self, batches: list[MicroBatch], data_wait: float, step_seconds: float,
                     eval_seconds: Optional[float], phases: Optional[dict[str, float]]) -> dict:
        """The step's cost metrics. Every step: one all-reduce over DP of the tokens (the step's one host read
        after its optimizer); a logged step (`phases`: its `StepClock.seconds()`) adds the phases, FLOPs, memory
        and one all-gather over the world."""
        works = [mb.work or BatchWork.of(mb) for mb in batches]
        policy = [sum(v) for v in zip(*(w.policy.scalars() for w in works))]
        reference = [sum(v) for v in zip(*(w.reference.scalars() for w in works))]
        counts = torch.tensor(policy + reference, dtype=torch.float64, device=self.groups.device)
        dist.all_reduce(counts, group=self.groups.dp)
        counts = counts.tolist()
        policy, reference = counts[:7], counts[7:]
        real, processed = policy[0], policy[1]
        out = {"tokens/real": real, "tokens/processed": processed, "data/padding_efficiency": real / processed,
               "throughput/tokens_per_s": real / step_seconds, "time/step": step_seconds,
               "time/data_wait": data_wait}
        if phases is None:
            return out
        rows = max(w.rows for w in works)
        row_length = max(w.row_length for w in works)
        memory = self.memory.peaks()
        names = ["time/step", "time/data_wait", *(f"time/{p}" for p in PHASES), "time/eval", *memory,
                 "memory/planned_gib"]
        local = [step_seconds, data_wait, *phases.values(), eval_seconds or 0.0, *memory.values(),
                 self.planned_gib(rows, row_length)]
        mine = torch.tensor(local, dtype=torch.float64, device=self.groups.device)
        ranks = [torch.empty_like(mine) for _ in range(self.world)]
        dist.all_gather(ranks, mine)
        ranks = torch.stack(ranks)
        # the slowest rank's step and its phases (per-phase maxima of different ranks would not add up), the
        # fullest rank's memory
        slowest = ranks[int(ranks[:, 0].argmax())]
        timed = len(names) - len(memory) - 1
        out.update(zip(names, slowest[:timed].tolist() + ranks[:, timed:].max(0).values.tolist()))
        if eval_seconds is None:
            del out["time/eval"]
        step = out["time/step"]
        out["throughput/tokens_per_s"] = real / step
        out["throughput/tokens_per_s_per_device"] = real / step / self.world
        if self.passes is not None:
            flops = step_flops(self.shape, self.passes, policy, reference)
            out["flops/step_tflop"] = flops["total"] / 1e12
            out["flops/tflops_per_device"] = flops["total"] / step / self.world / 1e12
            if self.peak_tflops:
                out["mfu"] = out["flops/tflops_per_device"] / self.peak_tflops
        return out
