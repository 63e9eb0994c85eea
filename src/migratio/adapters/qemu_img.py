"""Adapter for ``qemu-img``: always told the input format, never left to probe it.

Glance and qemu-img name some disk formats differently (Glance's ``vhd`` is qemu's ``vpc``,
``ploop`` is ``parallels``); :data:`QEMU_DRIVERS` is the one mapping between them, and every
call of qemu-img takes Glance's names and goes through it.
"""

from __future__ import annotations

import threading
from pathlib import Path

from migratio.adapters import processes
from migratio.errors import ConversionError

QEMU_IMG = "qemu-img"

#: Glance ``disk_format`` → the qemu-img driver that reads it (an ISO is read as raw bytes)
QEMU_DRIVERS = {
    "raw": "raw",
    "qcow2": "qcow2",
    "vhd": "vpc",
    "vhdx": "vhdx",
    "vmdk": "vmdk",
    "vdi": "vdi",
    "ploop": "parallels",
    "iso": "raw",
}
#: the Glance formats qemu-img can write (an ISO is not made by converting a disk)
WRITABLE = frozenset(QEMU_DRIVERS) - {"iso"}


def check_convertible(source_format: str | None, target_format: str) -> None:
    """Refuse, before any work, a conversion that qemu-img cannot do."""
    if source_format not in QEMU_DRIVERS:
        raise ConversionError(
            f"cannot convert a {source_format!r} image: qemu-img reads only "
            f"{', '.join(sorted(QEMU_DRIVERS))}",
            retryable=False,
        )
    if target_format not in WRITABLE:
        raise ConversionError(
            f"cannot convert to {target_format!r}: qemu-img writes only "
            f"{', '.join(sorted(WRITABLE))}",
            retryable=False,
        )


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

    Both formats are Glance's names. ``-W`` lets qemu-img write out of order (several times
    faster); raw output stays sparse.
    """
    check_convertible(source_format, target_format)
    part = target.with_name(target.name + ".part")
    part.unlink(missing_ok=True)
    argv = [QEMU_IMG, "convert", "-q", "-W"]
    argv += ["-f", QEMU_DRIVERS[source_format], "-O", QEMU_DRIVERS[target_format]]
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
