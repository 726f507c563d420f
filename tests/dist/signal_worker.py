"""A torchrun worker for tests/test_torchrun.py, without torch: it stands for a trainer that saves at its next step
boundary after SIGUSR1 or SIGTERM and exits.

    signal_worker.py OUT_DIR CODES WAIT_S    # CODES: exit code per rank, e.g. 75,1
Writes OUT_DIR/ready<rank>, waits up to WAIT_S for a signal, "saves" (1 s, during which the agent must not kill it)
if its code is 75 (else it "crashes" at once, first), writes OUT_DIR/got<rank> with the signal's name (or "none")
and exits with its code.
"""

import os
import signal
import sys
import time
from pathlib import Path

out, codes, wait_s = Path(sys.argv[1]), sys.argv[2].split(","), float(sys.argv[3])
rank = int(os.environ["RANK"])
got: list[int] = []
for sig in (signal.SIGUSR1, signal.SIGTERM):
    signal.signal(sig, lambda signum, frame: got.append(signum))
(out / f"ready{rank}").touch()
end = time.monotonic() + wait_s
while not got and time.monotonic() < end:
    time.sleep(0.05)
time.sleep(1.0 if codes[rank] == "75" else 0.0)
(out / f"got{rank}").write_text(signal.Signals(got[0]).name if got else "none")
sys.exit(int(codes[rank]))
