"""megatron_po.torchrun: SIGUSR1 / SIGTERM reach every worker, the agent waits for them, and exit code 75 (the
trainer's "saved, requeue me") comes out of torchrun only when every failed worker exited with it."""

import os
import signal
import subprocess
import sys
import time

import pytest

from conftest import REPO

pytestmark = pytest.mark.multirank  # torchrun launches of 2 processes

WORKER = REPO / "tests" / "dist" / "signal_worker.py"


def launch(out, codes: str, send: signal.Signals | None) -> tuple[int, str]:
    """Runs the wrapper over 2 signal workers, sends `send` to the wrapper once both are ready; its exit code, log."""
    cmd = [sys.executable, "-m", "megatron_po.torchrun", "--standalone", "--nproc_per_node", "2", str(WORKER),
           str(out), codes, "60" if send else "0"]
    proc = subprocess.Popen(cmd, cwd=REPO, env=dict(os.environ, OMP_NUM_THREADS="1"), stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    try:
        if send is not None:
            deadline = time.monotonic() + 60
            while not all((out / f"ready{r}").exists() for r in (0, 1)):
                assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()[0]
                time.sleep(0.05)
            proc.send_signal(send)
        log = proc.communicate(timeout=60)[0]
    finally:
        if proc.poll() is None:
            proc.kill()
    return proc.returncode, log


@pytest.mark.parametrize("send", [signal.SIGUSR1, signal.SIGTERM], ids=["usr1", "term"])
def test_signal_reaches_workers_and_75_comes_out(tmp_path, send):
    rc, log = launch(tmp_path, "75,75", send)
    assert rc == 75, log
    assert [(tmp_path / f"got{r}").read_text() for r in (0, 1)] == [send.name] * 2, log


def test_a_worker_exiting_1_is_a_failure(tmp_path):
    rc, log = launch(tmp_path, "75,1", signal.SIGUSR1)
    assert rc not in (0, 75), log
    assert [(tmp_path / f"got{r}").read_text() for r in (0, 1)] == ["SIGUSR1"] * 2, log


def test_clean_exit_and_75_without_a_signal(tmp_path):
    """75 from a worker's own decision (train.exit_duration_minutes), 0 beside it: still a requeue."""
    assert launch(tmp_path, "0,0", None)[0] == 0
    assert launch(tmp_path, "75,0", None)[0] == 75
