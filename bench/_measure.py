"""What the benchmarks share: run a command while watching its peak RSS, and PASS/FAIL."""

from __future__ import annotations

import os
import subprocess
import threading
import time
from pathlib import Path

MB = 1e6


def peak_rss_of(argv: list[str]) -> tuple[float, int, list[tuple[float, str]]]:
    """Run ``argv``; return wall seconds, its peak RSS in bytes (VmHWM), and its stdout lines,
    each with the second (since the start) it arrived."""
    started = time.perf_counter()
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, text=True)
    peak = PeakRss(proc)
    assert proc.stdout is not None
    lines = [(time.perf_counter() - started, line.rstrip("\n")) for line in proc.stdout]
    proc.wait()
    elapsed = time.perf_counter() - started
    peak.join()
    if proc.returncode != 0:
        raise SystemExit(f"{argv[0]} failed:\n" + "\n".join(text for _, text in lines))
    return elapsed, peak.bytes, lines


class PeakRss:
    """Watches a running process's peak RSS (VmHWM) from a thread until it exits."""

    def __init__(self, proc: subprocess.Popen[str], interval: float = 0.02) -> None:
        self.bytes = 0
        self._proc = proc
        self._interval = interval
        self._thread = threading.Thread(target=self._watch, daemon=True)
        self._thread.start()

    def _watch(self) -> None:
        status = Path(f"/proc/{self._proc.pid}/status")
        while self._running():
            try:
                for line in status.read_text().splitlines():
                    if line.startswith("VmHWM:"):
                        self.bytes = max(self.bytes, int(line.split()[1]) * 1024)
            except OSError:
                break
            time.sleep(self._interval)

    def _running(self) -> bool:
        """Asked without reaping it (WNOWAIT): the caller's ``wait4`` takes its usage."""
        try:
            flags = os.WEXITED | os.WNOHANG | os.WNOWAIT
            return os.waitid(os.P_PID, self._proc.pid, flags) is None
        except ChildProcessError:  # reaped already
            return False

    def join(self) -> None:
        """Wait for the watcher (call after the process has exited)."""
        self._thread.join()


def verdict(ok: bool) -> str:
    return "PASS" if ok else "FAIL"
