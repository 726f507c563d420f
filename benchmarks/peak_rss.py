"""Peak resident memory of a process over a window, shared by the benchmarks.

On Linux the kernel's high-water mark (VmHWM) is reset through /proc/self/clear_refs, after handing freed heap
back to the OS, so a window measures its own peak; elsewhere psutil is sampled every 10 ms.
"""

from __future__ import annotations

import ctypes
import gc
import re
import threading

import psutil


class PeakRSS:
    """Peak resident set size of this process over a window (one configuration)."""

    _HWM = re.compile(r"VmHWM:\s+(\d+) kB")

    def __init__(self):
        self.proc = psutil.Process()
        self.kernel = self._kernel_hwm_resettable()
        self._peak = 0
        self._stop = threading.Event()
        self._thread = None

    @staticmethod
    def _kernel_hwm_resettable() -> bool:
        try:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")  # resets VmHWM to the current RSS (Linux >= 4.0)
            return True
        except OSError:
            return False

    def start(self) -> None:
        gc.collect()
        try:
            # the previous configuration's freed tensors stay in glibc's heap unless handed back to the OS
            ctypes.CDLL("libc.so.6").malloc_trim(0)
        except (OSError, AttributeError):
            pass
        if self.kernel:
            self._kernel_hwm_resettable()
            return
        self._peak = self.proc.memory_info().rss
        self._stop.clear()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()

    def _sample(self) -> None:
        while not self._stop.wait(0.01):
            self._peak = max(self._peak, self.proc.memory_info().rss)

    def stop(self) -> int:
        """Bytes."""
        if self.kernel:
            with open("/proc/self/status") as f:
                return int(self._HWM.search(f.read()).group(1)) * 1024
        self._stop.set()
        self._thread.join()
        return max(self._peak, self.proc.memory_info().rss)
