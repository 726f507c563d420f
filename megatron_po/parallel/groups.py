"""Process groups: initialised once by the driver, then passed explicitly.

Model, log-prob and reduction code never call `parallel_state.get_*` themselves (STYLE.md §3): they receive a
`ParallelGroups`. Megatron's `ProcessGroupCollection` rides along for the megatron modules that take one.
"""

from __future__ import annotations

import os
import warnings
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist
from megatron.core import parallel_state, tensor_parallel
from megatron.core.process_groups_config import ProcessGroupCollection

from megatron_po.config import ParallelConfig
from megatron_po.parallel.cpu import cpu_backend_enabled, cuda_present, enable_cpu_backend


@dataclass
class ParallelGroups:
    tp: dist.ProcessGroup
    dp: dist.ProcessGroup
    pp: dist.ProcessGroup
    cp: dist.ProcessGroup
    pg_collection: ProcessGroupCollection
    device: torch.device

    @property
    def tp_size(self) -> int:
        return dist.get_world_size(self.tp)

    @property
    def tp_rank(self) -> int:
        return dist.get_rank(self.tp)

    @property
    def dp_size(self) -> int:
        return dist.get_world_size(self.dp)

    @property
    def dp_rank(self) -> int:
        return dist.get_rank(self.dp)

    @property
    def cp_size(self) -> int:
        return dist.get_world_size(self.cp)

    @property
    def cp_rank(self) -> int:
        return dist.get_rank(self.cp)

    @property
    def pp_size(self) -> int:
        return dist.get_world_size(self.pp)

    @property
    def pp_rank(self) -> int:
        return dist.get_rank(self.pp)

    @property
    def is_first_stage(self) -> bool:
        """Holds the embedding and the vision tower (every rank without pipeline parallelism)."""
        return self.pp_rank == 0

    @property
    def is_last_stage(self) -> bool:
        """Holds the output layer: logits, log-probs, the objective and its metrics exist only here."""
        return self.pp_rank == self.pp_size - 1

    @property
    def is_logging_rank(self) -> bool:
        return dist.get_rank() == 0


def resolve_backend(cfg: ParallelConfig) -> str:
    """The torch.distributed backend of `cfg`: `auto` is NCCL wherever the machine has CUDA (also in a process
    that hid its devices for an explicit CPU request), gloo only without it."""
    if cfg.backend != "auto":
        return cfg.backend
    return "nccl" if cuda_present() else "gloo"


def init_process_group(cfg: ParallelConfig) -> str:
    """Starts torch.distributed from torchrun's env (a 1-process group when run without torchrun)."""
    backend = resolve_backend(cfg)
    # megatron-core 0.16.1 calls collectives torch 2.13 has renamed; the message repeats every step
    warnings.filterwarnings("ignore", message=r".*(all_gather_into_tensor|reduce_scatter_tensor).*deprecated")
    if backend == "gloo":
        # CUDA_DEVICE_MAX_CONNECTIONS tunes CUDA streams: meaningless on the CPU
        warnings.filterwarnings("ignore", message=r".*CUDA_DEVICE_MAX_CONNECTIONS.*")
        # only a backend named `gloo` may run on the CPU where CUDA exists (the converter, in-process CPU tests);
        # `auto` resolved to gloo only because there is no CUDA
        enable_cpu_backend(requested=cfg.backend == "gloo")
    else:
        if cpu_backend_enabled():
            # CUDA's device, RNG and stream calls are redirected to the CPU in this process: NCCL would half-work
            raise RuntimeError(f"backend {backend!r} in a process that already runs on the CPU (an explicit "
                               "parallel.backend=gloo earlier): run it in a process of its own")
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
    if not dist.is_initialized():
        if "RANK" not in os.environ:
            # plain `python -m megatron_po.train`: a single-process group on a private file store
            import tempfile

            store = dist.FileStore(os.path.join(tempfile.mkdtemp(prefix="megatron_po_"), "store"), 1)
            dist.init_process_group(backend, store=store, rank=0, world_size=1)
        else:
            dist.init_process_group(backend, timeout=timedelta(minutes=30))
    return backend


def init_parallel(cfg: ParallelConfig, seed: int) -> ParallelGroups:
    """Initialises megatron's parallel state for `cfg` inside an existing process group.

    May be called again after `destroy_parallel()` with another layout in the same process (tests do this).
    """
    backend = init_process_group(cfg)
    if backend == "gloo" and cfg.cp > 1:
        raise ValueError("parallel.cp > 1 needs Transformer-Engine attention on GPUs; the CPU backend has none")
    parallel_state.initialize_model_parallel(
        tensor_model_parallel_size=cfg.tp,
        pipeline_model_parallel_size=cfg.pp,
        context_parallel_size=cfg.cp,
        # megatron-core 0.16.1 would add a gloo twin of each data-parallel group (DP, DP×CP, expert DP; one per
        # DP group of the world, built collectively by every rank). Only the distributed optimizer reads them, for
        # its dp-zero / memory-efficient checkpoint formats; ours gets use_gloo_process_groups=False and its
        # checkpoints use the default fully_sharded_model_space format (no communication), while DDP, the
        # schedules and dist_checkpointing never touch them. On NCCL clusters they cost start-up time and, with
        # several NICs, gloo's interface choice can hang the job; on the CPU the default groups are gloo already.
        create_gloo_process_groups=False,
    )
    # seeds the default generator (same on every rank, so replicated weights agree) and the TP-rank RNG tracker
    tensor_parallel.model_parallel_cuda_manual_seed(seed)
    torch.manual_seed(seed)
    device = torch.device("cuda", torch.cuda.current_device()) if backend == "nccl" else torch.device("cpu")
    return current_groups(device)


def current_groups(device: torch.device) -> ParallelGroups:
    """The groups of megatron's initialised parallel state (the one place that reads parallel_state)."""
    return ParallelGroups(
        tp=parallel_state.get_tensor_model_parallel_group(),
        dp=parallel_state.get_data_parallel_group(),
        pp=parallel_state.get_pipeline_model_parallel_group(),
        cp=parallel_state.get_context_parallel_group(),
        pg_collection=ProcessGroupCollection.use_mpu_process_groups(),
        device=device,
    )


def destroy_parallel() -> None:
    parallel_state.destroy_model_parallel()


def teardown() -> None:
    destroy_parallel()
    if dist.is_initialized():
        dist.destroy_process_group()
