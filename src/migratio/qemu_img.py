"""Adapter for ``qemu-img``: always told the input format, never left to probe it."""

from __future__ import annotations

import json
import threading
from dataclasses import dataclass
from pathlib import Path

from migratio import processes
from migratio.errors import ConversionError, ToolError

QEMU_IMG = "qemu-img"


@dataclass(frozen=True)
class ImageInfo:
    """What ``qemu-img info`` says about a file."""

    format: str
    virtual_size: int
    actual_size: int
    backing_file: str | None


def info(path: Path, fmt: str, *, timeout: float = 60) -> ImageInfo:
    """``qemu-img info`` of ``path`` read as ``fmt``."""
    done = processes.run(
        [QEMU_IMG, "info", "--output=json", "-f", fmt, "--", str(path)],
        what="qemu-img info",
        timeout=timeout,
    )
    try:
        data = json.loads(done.stdout)
        return ImageInfo(
            format=str(data["format"]),
            virtual_size=int(data["virtual-size"]),
            actual_size=int(data.get("actual-size", 0)),
            backing_file=data.get("backing-filename"),
        )
    except (ValueError, KeyError, TypeError) as exc:
        raise ToolError(f"qemu-img info gave output that cannot be read: {exc}") from exc


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
