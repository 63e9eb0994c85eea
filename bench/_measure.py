"""What the benchmarks share: run a command while watching its peak RSS, and PASS/FAIL."""

from __future__ import annotations

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
    peak = 0

    def watch() -> None:
        nonlocal peak
        status = Path(f"/proc/{proc.pid}/status")
        while proc.poll() is None:
            try:
                for line in status.read_text().splitlines():
                    if line.startswith("VmHWM:"):
                        peak = max(peak, int(line.split()[1]) * 1024)
            except OSError:
                break
            time.sleep(0.02)

    watcher = threading.Thread(target=watch)
    watcher.start()
    assert proc.stdout is not None
    lines = [(time.perf_counter() - started, line.rstrip("\n")) for line in proc.stdout]
    proc.wait()
    elapsed = time.perf_counter() - started
    watcher.join()
    if proc.returncode != 0:
        raise SystemExit(f"{argv[0]} failed:\n" + "\n".join(text for _, text in lines))
    return elapsed, peak, lines


def verdict(ok: bool) -> str:
    return "PASS" if ok else "FAIL"
