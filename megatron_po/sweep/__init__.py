"""`megatron-po sweep SWEEP.yaml --output DIR [--dry-run] [--slurm] [--point K] [--report]`: a grid of training
launches for scaling experiments (launch/sweeps/README.md).

Each point is its own `megatron-po train` launch of warm-up and timed steps on synthetic pairs of the configured
lengths, without checkpoints; the sweep keeps the medians of the per-step metrics the trainer writes to
metrics.jsonl, screens every point with the memory plan first, and resumes where a previous run stopped.
Imports neither torch nor megatron until a point is screened.
"""

from __future__ import annotations

import argparse
import sys
import warnings
from pathlib import Path


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="megatron-po sweep", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("sweep", type=Path, help="the sweep's YAML (launch/sweeps/)")
    p.add_argument("--output", type=Path, required=True, help="where points, results and the report go")
    p.add_argument("--dry-run", action="store_true", help="plan and screen every point; launch nothing")
    p.add_argument("--slurm", action="store_true",
                   help="write sbatch array scripts and submit.sh under OUTPUT/slurm instead of running")
    p.add_argument("--nproc-per-node", type=int, default=8, help="with --slurm / --launcher srun: GPUs per node")
    p.add_argument("--point", type=int, default=None, help="run only point K (what a SLURM array task runs)")
    p.add_argument("--launcher", choices=("local", "srun"), default="local",
                   help="local: torchrun --standalone here; srun: over the nodes of this SLURM allocation")
    p.add_argument("--report", action="store_true", help="only rebuild results.jsonl, results.md and sweep.png")
    args = p.parse_args(sys.argv[1:] if argv is None else argv)
    # megatron's notes that TE and Apex are absent come at import of the memory plan: expected here
    warnings.filterwarnings("ignore", category=UserWarning, module=r"megatron\.")

    from megatron_po.config import ConfigError
    from megatron_po.sweep.spec import SweepError, expand_points, load_sweep

    try:
        spec = load_sweep(args.sweep)
        points = expand_points(spec)
    except (SweepError, ConfigError, FileNotFoundError) as e:
        print(f"sweep error: {e}", file=sys.stderr)
        return 2
    out = args.output
    from megatron_po.sweep.run import read_result, run_sweep, srun_launcher

    if args.report:
        from megatron_po.sweep.report import write_outputs

        rows = write_outputs(spec, out, points, [read_result(out, p) for p in points])
        print(f"{sum(r['status'] == 'ok' for r in rows)} of {len(rows)} points ok; wrote {out / 'results.md'}")
        return 0
    if args.slurm:
        return _slurm(spec, out, points, args.nproc_per_node)
    launcher = srun_launcher(args.nproc_per_node) if args.launcher == "srun" else None
    try:
        rows = run_sweep(spec, out, dry_run=args.dry_run, only=args.point,
                         **({"launcher": launcher} if launcher else {}))
    except IndexError as e:
        print(f"sweep error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("sweep interrupted: finished points are kept; rerun to go on", file=sys.stderr)
        return 130
    bad = {"failed"} if not args.dry_run else set()
    return 1 if any(r and r["status"] in bad for r in rows) else 0


def _slurm(spec, out: Path, points, nproc_per_node: int) -> int:
    from megatron_po.sweep.run import point_dir, read_result
    from megatron_po.sweep.screen import screen
    from megatron_po.sweep.slurm import write_slurm

    todo = []
    for p in points:  # only points that would launch: a skipped or invalid one would hold nodes for nothing
        if (read_result(out, p) or {}).get("status") == "ok":
            continue
        s = screen(spec, p, point_dir(out, p))
        if s.status == "planned":
            todo.append(p)
        else:
            print(f"{p.label}: {s.status}: {s.error} (not submitted)")
    if not todo:
        print("nothing to submit")
        return 0
    try:
        files = write_slurm(spec, out.resolve(), todo, nproc_per_node)
    except ValueError as e:
        print(f"sweep error: {e}", file=sys.stderr)
        return 2
    print(f"{len(todo)} points in {len(files) - 1} array(s): " + ", ".join(str(f) for f in files))
    print(f"submit from the repository root: bash {files[-1]}")
    return 0
