"""Trains through the CLI's entry point in this process and records the learning rate of every step the inner torch
optimizer takes: the rate the update really used, whatever the trainer logs or when it steps its scheduler.

Usage: python applied_lr.py OUT_JSON [train overrides...] (one process; under torchrun each rank would write).
OUT_JSON: ``applied`` (per optimizer step, the sorted distinct learning rates of its param groups) and ``logged``
(the ``lr`` of each metrics.jsonl row).
"""

import json
import sys
from pathlib import Path

from torch.optim.optimizer import register_optimizer_step_pre_hook

from megatron_po.cli import train_main
from megatron_po.config import load_config


def main(out: str, *overrides: str) -> None:
    applied: list[list[float]] = []
    # a global pre-hook runs inside every torch optimizer's step(), before the update: megatron's optimizer wraps a
    # torch one, and whoever calls it (and however the scheduler is stepped around it), this is the rate applied
    register_optimizer_step_pre_hook(lambda opt, args, kwargs: applied.append(sorted({g["lr"] for g in
                                                                                      opt.param_groups})))
    rc = train_main(list(overrides))
    if rc:
        raise SystemExit(f"training exited {rc}")
    run_dir = Path(load_config(None, list(overrides)).output_dir)
    logged = [json.loads(line).get("lr") for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    Path(out).write_text(json.dumps({"applied": applied, "logged": logged}))


if __name__ == "__main__":  # dist_checkpointing's async writer re-imports __main__
    main(*sys.argv[1:])
