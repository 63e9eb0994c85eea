"""Adapter for ``qemu-img``: always told the input format, never left to probe it."""

from __future__ import annotations

import threading
from pathlib import Path

from migratio import processes
from migratio.errors import ConversionError

QEMU_IMG = "qemu-img"


def convert(
    source: Path,
    source_format: str,
    target: Path,
    target_format: str,
    *,
    timeout: float,
    cancel: threading.Event | None = None,
) -> None:
    """Convert ``source`` into ``target`` (written as ``target.part``, renamed when complete).

    ``-W`` lets qemu-img write out of order (several times faster); raw output stays sparse.
    """
    part = target.with_name(target.name + ".part")
    part.unlink(missing_ok=True)
    argv = [QEMU_IMG, "convert", "-q", "-W", "-f", source_format, "-O", target_format]
    if target_format == "vmdk":
        argv += ["-o", "subformat=streamOptimized"]
    argv += ["--", str(source), str(part)]
    try:
        processes.run(
            argv, what="qemu-img convert", timeout=timeout, cancel=cancel, error=ConversionError
        )
    except BaseException:
        part.unlink(missing_ok=True)
        raise
    part.rename(target)
