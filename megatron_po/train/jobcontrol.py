"""Job control: stop at a step boundary on a signal or a time limit, save, and tell the launcher to requeue.

SLURM warns a job before its time limit (`#SBATCH --signal=B:USR1@300`), and a preempting scheduler sends
SIGTERM. Either signal only sets a flag here; the loop reads every rank's flags once per optimizer step with one
all-reduce (train/guards.py), so all ranks stop after the same step, save the same checkpoint and exit with
`EXIT_REQUEUE`. launch/slurm/train.sbatch turns that code into `scontrol requeue`; the next launch resumes from
the checkpoint exactly as after a crash. Megatron-LM's `--exit-signal-handler` and `--exit-duration-in-mins`
work the same way.
"""

from __future__ import annotations

import logging
import signal
import time

import psutil

EXIT_REQUEUE = 75
"""Exit code of a run that saved and stopped early on purpose (signal or train.exit_duration_minutes) and wants
to be relaunched (EX_TEMPFAIL). megatron_po.torchrun passes it on when every worker exits with it."""
STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1)
logger = logging.getLogger(__name__)


class Requeue(Exception):
    """The run saved and stopped after a step on purpose; the driver exits with EXIT_REQUEUE."""


class NonFiniteStep(FloatingPointError):
    """A NaN/Inf in a step's loss, log-probs or gradient norm (train/guards.py); raised on every rank alike."""


class StopRequests:
    """This rank's reasons to stop early: a stop signal received, or the job's time budget spent.

    The handlers only set a flag: saving needs every rank, so the decision is taken at the next step boundary
    from `local_flags` of all ranks together.
    """

    def __init__(self, exit_duration_minutes: float = 0.0):
        self.received: int | None = None
        # the job's time counts from the process start (model building and data preparation included), as SLURM's
        self.deadline = (psutil.Process().create_time() + 60 * exit_duration_minutes
                         if exit_duration_minutes > 0 else None)
        self._previous = {}
        for sig in STOP_SIGNALS:
            try:
                self._previous[sig] = signal.signal(sig, self._handle)
            except ValueError:  # not the main thread (an embedding application): signals stay its business
                logger.warning("job control: cannot handle %s outside the main thread", sig.name)

    def _handle(self, signum, frame) -> None:
        if self.received is None:
            logger.warning("received %s: saving and stopping after the current step", signal.Signals(signum).name)
        self.received = signum

    def local_flags(self) -> list[float]:
        """[signal received, time budget spent] on this rank."""
        return [float(self.received is not None),
                float(self.deadline is not None and time.time() >= self.deadline)]

    def close(self, ignore: bool = False) -> None:
        """Puts back the handlers that were there before; `ignore`: ignores the stop signals instead, for a rank
        that has saved and is about to exit with EXIT_REQUEUE (torchrun's SIGTERM to the remaining workers must not
        turn their exit code into a kill)."""
        for sig, previous in self._previous.items():
            signal.signal(sig, signal.SIG_IGN if ignore else previous)
        self._previous = {}
