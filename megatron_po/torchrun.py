"""`python -m megatron_po.torchrun [torchrun args]`: torchrun whose agent passes SIGUSR1 and SIGTERM on to its
workers, waits for them, and exits with EXIT_REQUEUE (75) when every worker that failed exited with it.

Why torchrun itself is not enough (torch 2.13's torch/distributed/elastic, checked with a worker that saves and
exits 75 on either signal):
- SIGUSR1, SLURM's warning before the time limit, is not among the signals the agent handles by default: it kills
  the agent (exit 138), and the workers, each started in a session of its own, never see it and run on orphaned;
- on SIGTERM (or a SIGUSR1 listed in `--signals-to-handle`) the agent sends the signal to the workers but then
  gives them `shutdown_timeout` (30 s) before SIGKILL, too short to save a large checkpoint, and exits 1;
- any worker exit code other than 0, 75 included, becomes torchrun's exit code 1.
Here the two signals are only passed on: torchrun keeps monitoring the workers, which save at their next step
boundary and exit 75 (megatron_po.train.jobcontrol), and that code comes out of torchrun for the SLURM script to
requeue the job. Before any worker runs, SIGTERM stops torchrun as usual and SIGUSR1 is ignored. SIGINT, SIGHUP and
SIGQUIT keep torchrun's handling (Ctrl-C stops the job at once).
"""

from __future__ import annotations

import os
import signal
import sys

import psutil
from torch.distributed import run as torch_run
from torch.distributed.elastic.multiprocessing import api as elastic_api
from torch.distributed.elastic.multiprocessing.errors import ChildFailedError

from megatron_po.train.jobcontrol import EXIT_REQUEUE

FORWARDED = (signal.SIGTERM, signal.SIGUSR1)
_torch_handler = elastic_api._terminate_process_handler  # raises SignalException: the agent stops the workers


def _workers() -> list[psutil.Process]:
    """The running workers of this agent: its children that torchrun started (they carry TORCHELASTIC_RUN_ID)."""
    found = []
    for child in psutil.Process().children():
        try:
            if "TORCHELASTIC_RUN_ID" not in child.environ():
                continue
        except psutil.NoSuchProcess:  # exited meanwhile
            continue
        except psutil.AccessDenied:  # cannot tell: the children of torchrun's agent are its workers
            pass
        found.append(child)
    return found


def _forward(signum: int, frame) -> None:
    workers = _workers() if signum in FORWARDED else []
    for worker in workers:
        try:
            worker.send_signal(signum)
        except psutil.NoSuchProcess:
            pass
    if workers:  # os.write: a print here could re-enter a print the signal interrupted
        os.write(2, f"megatron_po.torchrun: {signal.Signals(signum).name} passed on to workers "
                    f"{sorted(w.pid for w in workers)}\n".encode())
    elif signum != signal.SIGUSR1:
        _torch_handler(signum, frame)


def main(argv: list[str] | None = None) -> int:
    # the agent installs its handler when it starts the workers, looking the function up in its module then
    elastic_api._terminate_process_handler = _forward
    signal.signal(signal.SIGUSR1, _forward)
    try:
        torch_run.main(sys.argv[1:] if argv is None else argv)
    except ChildFailedError as e:
        # As soon as one worker exits, the agent stops the others with SIGTERM; one already in its Python
        # finalisation has no handler left and dies of it, though it saved like the rest: it counts as a requeue.
        codes = {f.exitcode for f in e.failures.values()}
        if EXIT_REQUEUE not in codes or codes - {EXIT_REQUEUE, -signal.SIGTERM}:
            raise  # torchrun's own report of the failure, exit code 1
        print(f"megatron_po.torchrun: workers {sorted(e.failures)} exited {EXIT_REQUEUE} (saved; relaunch to resume)",
              file=sys.stderr, flush=True)
        return EXIT_REQUEUE
    return 0


if __name__ == "__main__":
    sys.exit(main())
