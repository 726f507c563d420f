"""Global-batch metrics and their sinks (metrics.jsonl, TensorBoard, Weights & Biases, a progress bar), rank 0
only."""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path
from typing import Callable

import torch

from megatron_po.objectives import summarize_metrics
from megatron_po.parallel.reduce import all_gather_cat


def global_batch_metrics(micro_outputs: list[dict], dp_group,
                         summarize: Callable[[dict], dict[str, float]] = summarize_metrics) -> dict[str, float]:
    """Per-pair samples of all micro-batches of all DP ranks -> global means (never per rank); on the last
    pipeline stage, where the loss and its samples are.

    Every DP rank holds the same number of pairs per step (the sampler guarantees it), so an all-gather of the
    concatenated samples is exact. `summarize` is the objective's own (``Objective.summarize``).
    """
    keys = sorted(micro_outputs[0]["samples"])
    out = {}
    for k in keys:
        local = torch.cat([m["samples"][k].double().reshape(-1) for m in micro_outputs])
        out[k] = all_gather_cat(local, dp_group)
    summary = summarize(out)
    if "pair_weight" in out:
        # objectives that drop pairs (beta-DPO): the loss is the mean over the kept ones, as in the gradient
        summary["loss"] = float(out["loss"].sum() / out["pair_weight"].sum().clamp_min(1))
    return summary


def start_wandb(output_dir: Path, project: str, run_name: str, config: dict):
    """A W&B run for this output_dir: its id is kept in output_dir/wandb_run_id, so a resumed job continues it."""
    try:
        import wandb
    except ImportError:
        raise RuntimeError("train.wandb_project needs the wandb package: pip install -e '.[wandb]'") from None
    id_file = output_dir / "wandb_run_id"
    run_id = id_file.read_text().strip() if id_file.is_file() else wandb.util.generate_id()
    id_file.write_text(run_id)
    return wandb.init(project=project, name=run_name or output_dir.name, id=run_id, resume="allow",
                      dir=str(output_dir), config=config)


class MetricsWriter:
    """Writes one JSON object per optimizer step; TensorBoard scalars, W&B (when configured) and a tqdm bar
    alongside."""

    def __init__(self, output_dir: Path, total_steps: int, start_step: int, enabled: bool, progress_bar: bool,
                 wandb: dict | None = None):
        self.enabled = enabled
        self.tb = None
        self.bar = None
        self.wandb = None
        if not enabled:
            return
        output_dir.mkdir(parents=True, exist_ok=True)
        # append: a resumed run continues the same file (steps after the checkpoint are rewritten, see truncate)
        self.path = output_dir / "metrics.jsonl"
        self._truncate_after(start_step)
        self.file = open(self.path, "a")
        try:
            from torch.utils.tensorboard import SummaryWriter

            self.tb = SummaryWriter(log_dir=str(output_dir / "tensorboard"), purge_step=start_step + 1)
        except ImportError:  # tensorboard is a pinned dependency; tolerate its absence in stripped envs
            self.tb = None
        if wandb and wandb.get("project"):
            self.wandb = start_wandb(output_dir, wandb["project"], wandb.get("run_name", ""), wandb.get("config", {}))
        self.total = total_steps
        # a redrawn bar only on a terminal; under SLURM / CI logs, one plain line every ~10% of the run
        self.line_every = max(1, total_steps // 10)
        if progress_bar and sys.stderr.isatty():
            from tqdm import tqdm

            self.bar = tqdm(total=total_steps, initial=start_step, desc="train", dynamic_ncols=True)

    def _truncate_after(self, step: int) -> None:
        # steps logged after the checkpoint we resume from were lost with the crash; they will be redone
        if not self.path.exists():
            return
        keep = [l for l in self.path.read_text().splitlines() if l.strip() and json.loads(l)["step"] <= step]
        self.path.write_text("".join(l + "\n" for l in keep))

    def log(self, record: dict) -> None:
        if not self.enabled:
            return
        clean = {k: (v if not isinstance(v, float) or math.isfinite(v) else str(v)) for k, v in record.items()}
        self.file.write(json.dumps(clean) + "\n")
        self.file.flush()
        scalars = {k: v for k, v in record.items() if isinstance(v, (int, float)) and k != "step"}
        if self.tb is not None:
            for k, v in scalars.items():
                self.tb.add_scalar(k, v, record["step"])
        if self.wandb is not None:
            self.wandb.log(scalars, step=record["step"])
        shown = {k: f"{record[key]:.4f}" for k, key in (("loss", "loss"), ("margin", "rewards/margins"),
                                                         ("hallucination", "probe/hallucination_rate"))
                 if key in record}
        if "loss" not in record:  # an evaluation-only record (step 0)
            return
        if self.bar is not None:
            self.bar.update(1)
            self.bar.set_postfix(shown)
        elif record["step"] % self.line_every == 0 or record["step"] == self.total:
            items = " ".join(f"{k}={v}" for k, v in shown.items())
            print(f"step {record['step']}/{self.total} {items} lr={record.get('lr', 0):.2e}", flush=True)

    def close(self) -> None:
        if not self.enabled:
            return
        self.file.close()
        if self.tb is not None:
            self.tb.close()
        if self.wandb is not None:
            self.wandb.finish()
        if self.bar is not None:
            self.bar.close()
