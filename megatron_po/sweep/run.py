"""Running a sweep: screen each point, launch those that fit (one `megatron-po train` under torchrun each),
collect their metrics, and keep one result.json per point so that a rerun goes on where the last one stopped.

A point is done once its result.json says `ok`; everything else (skipped, invalid, failed, planned by a dry run)
is screened, and launched if it fits, again on the next run: screening is cheap and a changed memory budget or a
fixed bug should count. result.json is written atomically, so a sweep killed at any moment never leaves a point
that looks finished but is not.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from megatron_po.sweep.collect import error_line, memory_comparison, read_steps, summarize_steps, write_atomic
from megatron_po.sweep.screen import Screen, describe, screen
from megatron_po.sweep.spec import OWN_CACHE, Point, SweepSpec, expand_points, forced_overrides, override_args


@dataclass
class Launch:
    """One command of a point: `megatron_po.cli <argv>` on `point.nproc` processes."""

    point: Point
    argv: list[str]
    output_dir: Path
    log_dir: Path
    """stdout.log and stderr.log of the launch go here."""
    env: dict[str, str] = field(default_factory=dict)


Launcher = Callable[[Launch], int]
"""Runs a launch to its end; returns its exit code."""


def _wait(cmd: list[str], launch: Launch, tag: str) -> int:
    """Runs `cmd` with its output in log_dir/<tag>{stdout,stderr}.log. The child has a session of its own: an
    interrupted sweep (Ctrl-C, SIGTERM) passes SIGTERM on, which megatron_po.torchrun hands to its workers, waits
    for them briefly, then kills what is left."""
    launch.log_dir.mkdir(parents=True, exist_ok=True)
    with open(launch.log_dir / f"{tag}stdout.log", "w") as out, open(launch.log_dir / f"{tag}stderr.log", "w") as err:
        proc = subprocess.Popen(cmd, stdout=out, stderr=err, env=launch.env, start_new_session=True)
        try:
            return proc.wait()
        except BaseException:
            proc.terminate()
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
            raise


def local_launcher(launch: Launch) -> int:
    """torchrun on this machine (its standalone rendezvous: no port is chosen here)."""
    cmd = [sys.executable, "-m", "megatron_po.torchrun", "--standalone", "--nproc_per_node", str(launch.point.nproc),
           "-m", "megatron_po.cli", *launch.argv]
    return _wait(cmd, launch, launch.argv[0] + "-" if launch.argv[0] != "train" else "")


def srun_launcher(nproc_per_node: int) -> Launcher:
    """Inside a SLURM allocation: one megatron_po.torchrun per node under srun, c10d rendezvous on the first node
    (as launch/slurm/train.sbatch does), over ceil(nproc / nproc_per_node) nodes."""
    def launch_(launch: Launch) -> int:
        n = launch.point.nproc
        nodes, per_node = -(-n // nproc_per_node), min(n, nproc_per_node)
        head = subprocess.run(["scontrol", "show", "hostnames", os.environ["SLURM_JOB_NODELIST"]],
                              capture_output=True, text=True, check=True).stdout.split()[0]
        job = f"{os.environ.get('SLURM_ARRAY_JOB_ID', os.environ.get('SLURM_JOB_ID', 'sweep'))}-{launch.point.index}"
        cmd = ["srun", f"--nodes={nodes}", "--ntasks-per-node=1", "--kill-on-bad-exit=1",
               f"--cpus-per-task={os.environ.get('SLURM_CPUS_ON_NODE', '1')}", *os.environ.get("SRUN_ARGS", "").split(),
               sys.executable, "-m", "megatron_po.torchrun", "--nnodes", str(nodes), "--nproc_per_node", str(per_node),
               "--rdzv_backend", "c10d", "--rdzv_endpoint", f"{head}:{os.environ.get('RDZV_PORT', '29500')}",
               "--rdzv_id", job, "--max_restarts", "0", "-m", "megatron_po.cli", *launch.argv]
        return _wait(cmd, launch, launch.argv[0] + "-" if launch.argv[0] != "train" else "")
    return launch_


def launch_env(spec: SweepSpec) -> dict[str, str]:
    env = dict(os.environ, PYTHONWARNINGS="ignore")
    if spec.device == "cpu":  # gloo and the CPU path even on a GPU host; ranks share the cores one thread each
        env.update(OMP_NUM_THREADS="1", CUDA_VISIBLE_DEVICES="")
    else:  # sequence parallel overlaps TP comms with compute only with kernels issued in order on one queue
        env.setdefault("CUDA_DEVICE_MAX_CONNECTIONS", "1")
    return env


# ---- results ----------------------------------------------------------------------------------------------------

def point_dir(out: Path, point: Point) -> Path:
    return out / "points" / point.dirname


def read_result(out: Path, point: Point) -> dict | None:
    path = point_dir(out, point) / "result.json"
    try:
        return json.loads(path.read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return None


def result_row(spec: SweepSpec, point: Point, s: Screen | None, status: str, error: str = "",
               metrics: dict | None = None) -> dict[str, Any]:
    """One row of results.jsonl (and a point's result.json)."""
    row = {"id": point.id, "index": point.index, "label": point.label, "axes": point.axes, "config": point.config,
           "overrides": point.overrides, "nproc": point.nproc, "device": spec.device, "status": status,
           "error": error, "layout": s.layout if s else {}, "plan": s.plan if s else {},
           "settings": describe(s.cfg) if s and s.cfg else {}, "metrics": metrics or {}}
    row["memory"] = memory_comparison(row["metrics"], spec.device, row["plan"].get("peak_gib"))
    return row


def run_point(spec: SweepSpec, point: Point, s: Screen, out: Path, launcher: Launcher) -> dict[str, Any]:
    """Writes the point's data (once per distinct data set), precomputes the reference cache for a cache point,
    launches the training and summarises its timed steps."""
    from megatron_po.sweep.data import ensure_data

    d = point_dir(out, point)
    d.mkdir(parents=True, exist_ok=True)
    (d / "metrics.jsonl").unlink(missing_ok=True)  # a killed earlier attempt's steps are no measurement
    extra = ensure_data(point.data, s.cfg, s.family, out / "data")
    args = override_args({**point.overrides, **forced_overrides(spec, point, d), **extra})
    config = ["--config", point.config] if point.config else []
    env = launch_env(spec)
    if (s.cfg.reference.source == "cache" and s.needs_reference
            and Path(s.cfg.reference.cache_path) == d / OWN_CACHE):
        # computed with the point's own data, model and layout: whatever the cache key holds matches (the
        # trainer checks it); untimed, and again on a retry (precompute-ref invalidates the old one first)
        rc = launcher(Launch(point, ["precompute-ref", *config, *args], d, d, env))
        if rc:
            err = d / "precompute-ref-stderr.log"
            return result_row(spec, point, s, "failed", "precompute-ref: " + error_line(
                err.read_text() if err.is_file() else ""))
    rc = launcher(Launch(point, ["train", *config, *args], d, d, env))
    metrics = summarize_steps(read_steps(d / "metrics.jsonl"), spec.warmup_steps, point.nproc)
    if rc:
        err = d / "stderr.log"
        return result_row(spec, point, s, "failed", error_line(err.read_text() if err.is_file() else "")
                          or f"exit code {rc}", metrics)
    if not metrics.get("timed_steps"):
        return result_row(spec, point, s, "failed", "no timed steps in metrics.jsonl", metrics)
    return result_row(spec, point, s, "ok", "", metrics)


def _sigterm_as_interrupt() -> Callable[[], None]:
    """SIGTERM (kill, a scheduler's stop) unwinds the sweep like Ctrl-C: the running launch is stopped, the
    finished points' results stay, the report is written. Returns the undo."""
    def handler(signum, frame):
        raise KeyboardInterrupt(f"signal {signum}")
    try:
        old = signal.signal(signal.SIGTERM, handler)
    except ValueError:  # not the main thread: leave signals alone
        return lambda: None
    return lambda: signal.signal(signal.SIGTERM, old)


def describe_row(row: dict) -> str:
    m, mem = row["metrics"], row["memory"]
    if row["status"] != "ok":
        plan = row["plan"]
        peak = f" (plan {plan['peak_gib']:.1f} GiB)" if plan.get("available") else ""
        return f"{row['status']}{peak}{': ' + row['error'] if row['error'] else ''}"
    parts = [f"{1e3 * m['time/step']:.0f} ms/step" if "time/step" in m else "",
             f"{m['throughput/tokens_per_s_per_device']:.0f} tok/s/device"
             if "throughput/tokens_per_s_per_device" in m else "",
             f"memory {mem['measured_gib']:.2f} / plan {mem['planned_gib']:.2f} GiB"
             if mem["measured_gib"] is not None and mem["planned_gib"] else ""]
    return "ok: " + ", ".join(p for p in parts if p)


def run_sweep(spec: SweepSpec, out: Path, *, dry_run: bool = False, only: int | None = None,
              launcher: Launcher = local_launcher, log: Callable[[str], None] = print) -> list[dict]:
    """Runs the sweep's points that are not done (or point `only`), then rewrites results.jsonl, results.md and
    the plots from every result.json (not for `only`: SLURM array tasks would race; `--report` does it).

    Returns:
        The results rows of every point of the sweep (those not yet run: status pending).
    """
    from megatron_po.sweep.report import write_outputs

    points = expand_points(spec)
    if only is not None and not 0 <= only < len(points):
        raise IndexError(f"--point {only}: the sweep has points 0..{len(points) - 1}")
    chosen = points if only is None else [points[only]]
    todo = [p for p in chosen if (read_result(out, p) or {}).get("status") != "ok"]
    log(f"sweep {spec.name}: {len(chosen)} points, {len(chosen) - len(todo)} points already done"
        + (" (dry run: planning only)" if dry_run else ""))
    undo = _sigterm_as_interrupt()
    try:
        for k, p in enumerate(todo):
            s = screen(spec, p, point_dir(out, p))
            if s.status != "planned" or dry_run:
                row = result_row(spec, p, s, s.status, s.error)
            else:
                log(f"[{k + 1}/{len(todo)}] {p.label}: launching on {p.nproc} process(es)")
                t0 = time.perf_counter()
                row = run_point(spec, p, s, out, launcher)
                row["wall_s"] = time.perf_counter() - t0
            write_atomic(point_dir(out, p) / "result.json", json.dumps(row, indent=1) + "\n")
            log(f"[{k + 1}/{len(todo)}] {p.label} ({p.id}): {describe_row(row)}")
    finally:
        undo()
        if only is None:
            rows = write_outputs(spec, out, points, [read_result(out, p) for p in points])
            log(f"wrote {out / 'results.jsonl'}, {out / 'results.md'}, {out / 'sweep.png'}")
    return rows if only is None else [read_result(out, p) for p in chosen]
