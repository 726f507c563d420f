"""launch/slurm/train.sbatch's job control, run by bash with stand-ins for srun and scontrol and a PYTHON that starts
megatron_po.torchrun over tests/dist/signal_worker.py instead of the trainer: SIGUSR1 to the batch shell reaches
every worker through srun and torchrun, exit code 75 becomes `scontrol requeue`, and both steps get SRUN_ARGS."""

import os
import signal
import subprocess
import sys
import time

import pytest

from conftest import REPO

pytestmark = pytest.mark.multirank  # torchrun launches of 2 processes

SRUN = r"""#!/bin/bash
# srun stand-in: logs its arguments, drops its options, runs the task, forwards signals to it as srun does
echo "srun $*" >> "$FAKE_LOG"
while [[ "$1" == -* ]]; do shift; done
"$@" & task=$!
trap 'hit=1; kill -USR1 $task' USR1
trap 'hit=1; kill -TERM $task' TERM
while :; do hit=0; rc=0; wait $task || rc=$?; (( hit && rc > 128 )) || break; done
exit $rc
"""
SCONTROL = r"""#!/bin/bash
if [[ "$1 $2" == "show hostnames" ]]; then echo localhost; else echo "scontrol $*" >> "$FAKE_LOG"; fi
"""
PYTHON = r"""#!/bin/bash
# the steps' interpreter: the dry run says where it ran; the run is megatron_po.torchrun over the signal workers
if [[ " $* " == *" --dry-run "* ]]; then echo "dry run in $PWD: $*" >> "$FAKE_LOG"; exit 0; fi
[[ " $* " == *" -m megatron_po.torchrun "* ]] || exit 3
exec "$REAL_PYTHON" -m megatron_po.torchrun --standalone --nproc_per_node 2 "$WORKER" "$FAKE_OUT" "$CODES" 60
"""


@pytest.mark.parametrize("codes,rc_want,requeued", [("75,75", 0, True), ("1,1", 1, False)], ids=["requeue", "fail"])
def test_usr1_reaches_workers_and_75_requeues(tmp_path, codes, rc_want, requeued):
    bin_dir, out, log = tmp_path / "bin", tmp_path / "out", tmp_path / "log"
    bin_dir.mkdir()
    out.mkdir()
    for name, text in (("srun", SRUN), ("scontrol", SCONTROL), ("python", PYTHON)):
        (bin_dir / name).write_text(text)
        (bin_dir / name).chmod(0o755)
    env = dict(os.environ, PATH=f"{bin_dir}:{os.environ['PATH']}", FAKE_LOG=str(log), FAKE_OUT=str(out),
               REAL_PYTHON=sys.executable, WORKER=str(REPO / "tests" / "dist" / "signal_worker.py"), CODES=codes,
               OMP_NUM_THREADS="1", SLURM_JOB_ID="42", SLURM_NNODES="1", SLURM_JOB_NODELIST="localhost",
               SLURM_CPUS_ON_NODE="2", SLURM_SUBMIT_DIR=str(tmp_path), REPO=str(REPO), NPROC="2",
               CONFIG="launch/configs/demo_acpo.yaml", PYTHON=str(bin_dir / "python"),
               SRUN_ARGS="--container-image=/img.sqsh --container-mounts=/data:/data")
    job = subprocess.Popen(["bash", str(REPO / "launch" / "slurm" / "train.sbatch"), "train.train_steps=3"],
                           cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.monotonic() + 60
        while not all((out / f"ready{r}").exists() for r in (0, 1)):
            assert job.poll() is None and time.monotonic() < deadline, job.communicate()[0]
            time.sleep(0.05)
        job.send_signal(signal.SIGUSR1)
        text = job.communicate(timeout=60)[0]
    finally:
        if job.poll() is None:
            job.kill()
    assert job.returncode == rc_want, text
    assert [(out / f"got{r}").read_text() for r in (0, 1)] == ["SIGUSR1"] * 2, text
    lines = log.read_text().splitlines()
    dry = next(l for l in lines if l.startswith("srun --nodes=1 --ntasks=1 "))
    run = next(l for l in lines if "megatron_po.torchrun" in l and l.startswith("srun "))
    for line in (dry, run):
        assert "--container-image=/img.sqsh --container-mounts=/data:/data" in line
    assert f"dry run in {REPO}: -m megatron_po.train --config launch/configs/demo_acpo.yaml --dry-run " \
           "--world-size 2 train.train_steps=3" in lines
    assert ("scontrol requeue 42" in lines) == requeued, (lines, text)
