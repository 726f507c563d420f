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
from megatron_po.parallel.cpu import enable_cpu_backend


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


def _backend(cfg: ParallelConfig) -> str:
    if cfg.backend != "auto":
        return cfg.backend
    return "nccl" if torch.cuda.is_available() else "gloo"


def init_process_group(cfg: ParallelConfig) -> str:
    """Starts torch.distributed from torchrun's env (a 1-process group when run without torchrun)."""
    backend = _backend(cfg)
    # megatron-core 0.16.1 calls collectives torch 2.13 has renamed; the message repeats every step
    warnings.filterwarnings("ignore", message=r".*(all_gather_into_tensor|reduce_scatter_tensor).*deprecated")
    if backend == "gloo":
        # CUDA_DEVICE_MAX_CONNECTIONS tunes CUDA streams: meaningless on the CPU
        warnings.filterwarnings("ignore", message=r".*CUDA_DEVICE_MAX_CONNECTIONS.*")
        enable_cpu_backend()
    else:
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
