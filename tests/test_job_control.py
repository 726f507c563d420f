"""Job control: stop on a signal or a time limit and resume exactly, keep_last, asynchronous saves that move
`latest` only when complete, and runs that diverge."""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

from conftest import REPO, assert_metrics_equal, read_metrics, subprocess_env
from megatron_po.train import checkpoint as ckpt
from megatron_po.train.jobcontrol import EXIT_REQUEUE

COMMON = ["train.progress_bar=false", "data.num_train=64", "train.global_batch_size=4", "train.micro_batch_size=2",
          "optim.lr=5e-3", "optim.adam_eps=1e-3", "objective.name=acpo"]


def _launch(out: Path, *overrides: str, nproc: int = 2) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
           "-m", "megatron_po.train", f"output_dir={out}", *COMMON, *overrides]
    return subprocess.Popen(cmd, cwd=REPO, env=subprocess_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True)


def _run(out: Path, *overrides: str, timeout: int = 600) -> tuple[int, str]:
    proc = _launch(out, *overrides)
    text, _ = proc.communicate(timeout=timeout)
    return proc.returncode, text


# ------------------------------------------------------------------------------------------------ keep_last


def _fake_ckpt(root: Path, step: int, complete: bool = True) -> Path:
    p = root / f"iter_{step:07d}"
    p.mkdir(parents=True)
    (p / "shard").write_text("x")
    if complete:
        (p / ckpt.STATE_FILE).write_text("{}")
    return p


@pytest.mark.pure
def test_prune_keeps_the_newest_complete_checkpoints_up_to_latest(tmp_path):
    for step in (1, 2, 3, 5):
        _fake_ckpt(tmp_path, step)
    _fake_ckpt(tmp_path, 4, complete=False)  # a save that crashed before finishing, older than latest
    _fake_ckpt(tmp_path, 6, complete=False)  # a save in flight, newer than latest: never touched
    ckpt.publish_latest(tmp_path, tmp_path / "iter_0000005")
    gone = ckpt.prune(tmp_path, keep_last=2)
    assert sorted(p.name for p in gone) == ["iter_0000001", "iter_0000002", "iter_0000004"]
    assert sorted(p.name for p in tmp_path.glob("iter_*")) == ["iter_0000003", "iter_0000005", "iter_0000006"]
    assert ckpt.latest_checkpoint(tmp_path).name == "iter_0000005"
    assert ckpt.prune(tmp_path, keep_last=1) == [tmp_path / "iter_0000003"]


# --------------------------------------------------------------- async saves, keep_last, a crash before `latest`


def _train_in_process(groups, out: Path, *overrides: str) -> dict:
    from megatron_po.config import load_config
    from megatron_po.families import family_spec
    from megatron_po.objectives import build_objective
    from megatron_po.train.loop import run_training

    cfg = load_config(None, [f"output_dir={out}", "parallel.backend=gloo", *COMMON, *overrides])
    objective = build_objective(cfg.objective.name, cfg.objective.params, cfg.objective.batch_stat_scope)
    return run_training(cfg, objective, family_spec(cfg.model.family), groups)


@pytest.mark.pure
@pytest.mark.parametrize("async_save", [True, pytest.param(False, marks=pytest.mark.slow)])
def test_crash_before_latest_moves_resumes_from_the_previous_checkpoint(groups, tmp_path, monkeypatch, async_save):
    """Saves every 2 steps, keep_last=2. A crash injected after step 6's shards are written (every rank done) but
    before `latest` moves leaves `latest` at step 4; the relaunch resumes there and its steps equal an
    uninterrupted run's. keep_last keeps the two newest complete checkpoints."""
    opts = ["train.train_steps=8", "checkpoint.save_interval=2", "checkpoint.keep_last=2",
            f"checkpoint.async_save={str(async_save).lower()}"]
    straight, crashed = tmp_path / "straight", tmp_path / "crashed"
    _train_in_process(groups, straight, *opts)
    assert sorted(p.name for p in (straight / "checkpoints").glob("iter_*")) == ["iter_0000006", "iter_0000008"]

    real = ckpt.dist_checkpointing.save

    def crash(*args, **kwargs):
        raise RuntimeError("injected crash before latest moves")

    def save_then_crash(sd, path, **kwargs):
        """Step 6's shards are written on every rank (synchronously, or by the background writer before its
        finalize functions run), then the job dies."""
        request = real(sd, path, **kwargs)
        if not path.endswith("iter_0000006"):
            return request
        if request is None:
            crash()
        request.finalize_fns.append(crash)  # after megatron's own finalize, before anything the trainer adds
        return request

    monkeypatch.setattr(ckpt.dist_checkpointing, "save", save_then_crash)
    with pytest.raises(RuntimeError, match="injected crash"):
        _train_in_process(groups, crashed, *opts)
    monkeypatch.setattr(ckpt.dist_checkpointing, "save", real)
    root = crashed / "checkpoints"
    assert ckpt.latest_checkpoint(root).name == "iter_0000004"
    assert (root / "iter_0000006").is_dir()  # its shards were written: only `latest` did not move
    _train_in_process(groups, crashed, *opts)
    assert_metrics_equal(read_metrics(straight), read_metrics(crashed))
    assert sorted(p.name for p in root.glob("iter_*")) == ["iter_0000006", "iter_0000008"]


# ------------------------------------------------------------------------------ signals, time limit, divergence


@pytest.mark.e2e
@pytest.mark.slow
def test_sigterm_at_a_random_step_then_relaunch_equals_a_straight_run(tmp_path):
    """SIGTERM to every worker at a random step (as SLURM signals a job step): they finish the step, save, exit
    with EXIT_REQUEUE; the relaunch resumes and every step's metrics equal an uninterrupted run's. The time limit
    (train.exit_duration_minutes) stops a run the same way without a signal."""
    steps = ["train.train_steps=8", "parallel.tp=2", "parallel.sp=true"]
    straight, killed, timed = tmp_path / "straight", tmp_path / "killed", tmp_path / "timed"
    rc, log = _run(straight, *steps)
    assert rc == 0, log[-3000:]

    at = random.Random(os.environ.get("PYTEST_SEED", "19")).randint(1, 5)
    proc = _launch(killed, *steps)
    deadline = time.time() + 300
    while time.time() < deadline and not (
            (killed / "metrics.jsonl").exists() and len(read_metrics(killed)) >= at):
        time.sleep(0.05)
    workers = psutil.Process(proc.pid).children(recursive=True)
    for w in workers:
        w.send_signal(signal.SIGTERM)
    log, _ = proc.communicate(timeout=300)
    stopped = ckpt.latest_checkpoint(killed / "checkpoints")
    assert stopped is not None and f"exit code {EXIT_REQUEUE}" in log and "stopped after step" in log, log[-3000:]
    assert int(stopped.name.removeprefix("iter_")) < 8, "the signal came too late to test anything"
    rc, log = _run(killed, *steps)
    assert rc == 0 and "resumed from" in log, log[-3000:]
    assert_metrics_equal(read_metrics(straight), read_metrics(killed))

    # a budget already spent when the first step ends: stop after step 1, saved, requeue
    rc, log = _run(timed, *steps, "train.exit_duration_minutes=0.001")
    assert rc != 0 and "stopped after step 1 (time limit)" in log, log[-3000:]
    assert ckpt.latest_checkpoint(timed / "checkpoints").name == "iter_0000001"
    rc, log = _run(timed, *steps)
    assert rc == 0, log[-3000:]
    assert_metrics_equal(read_metrics(straight), read_metrics(timed))


@pytest.mark.e2e
def test_a_diverging_run_stops_naming_the_step_and_keeps_a_finite_checkpoint(tmp_path):
    """optim.lr=1e30: step 1 is finite, step 2's log-probs are not. Every rank stops at step 2 with one message
    naming the step and the terms, exit code != 0, and `latest` still names step 1's checkpoint. With
    train.skip_nonfinite_steps the run skips those steps, counts them, and ends normally."""
    opts = ["train.train_steps=4", "optim.lr=1e30", "optim.warmup_steps=0", "checkpoint.save_interval=1",
            "parallel.tp=2", "parallel.sp=true"]
    stop, skip = tmp_path / "stop", tmp_path / "skip"
    rc, log = _run(stop, *opts)
    assert rc not in (0, EXIT_REQUEUE), log[-3000:]
    lines = [line for line in log.splitlines() if line.startswith("training error:")]
    assert len(lines) == 1 and "step 2: non-finite" in lines[0] and "policy log-probs" in lines[0], log[-3000:]
    assert "latest checkpoint: " in lines[0] and "iter_0000001" in lines[0], lines[0]
    assert f'File "{REPO / "megatron_po"}' not in log, log[-3000:]  # no traceback from the workers (torchrun has one)
    assert ckpt.latest_checkpoint(stop / "checkpoints").name == "iter_0000001"
    assert not (stop / "checkpoints" / "iter_0000002").exists()

    rc, log = _run(skip, *opts, "train.skip_nonfinite_steps=true")
    assert rc == 0, log[-3000:]
    rows = [m for m in read_metrics(skip) if "loss" in m]
    assert [m["train/skipped_steps"] for m in rows] == [0, 1, 2, 3]
    assert ckpt.latest_checkpoint(skip / "checkpoints").name == "iter_0000004"
