"""Real disk images for the tests, built with ``qemu-img``.

Glance checks uploaded bytes against ``disk_format``, so test images are real
qcow2/raw files: sparse, with a few runs of incompressible pseudo-random data
(deterministic per ``seed``) spread across the virtual disk.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import shutil
import subprocess
from pathlib import Path
from typing import Any

MiB = 1 << 20
_ALIGN = 64 * 1024
_RUNS = 4


def _data_runs(virtual_size: int, data_bytes: int) -> list[tuple[int, int]]:
    """(offset, length) of up to ``_RUNS`` data runs spread evenly over the disk."""
    if virtual_size <= 0:
        raise ValueError("virtual_size must be > 0")
    if not 0 <= data_bytes <= virtual_size:
        raise ValueError(f"data_bytes={data_bytes} must be within 0..virtual_size={virtual_size}")
    if data_bytes == 0:
        return []
    runs = max(1, min(_RUNS, data_bytes // _ALIGN))
    base, extra = divmod(data_bytes, runs)
    gap = (virtual_size - data_bytes) // runs  # hole before each run
    if gap >= _ALIGN:
        gap -= gap % _ALIGN
    result = []
    pos = 0
    for i in range(runs):
        length = base + (1 if i < extra else 0)
        pos += gap
        result.append((pos, length))
        pos += length
    return result


def make_raw(path: Path, *, virtual_size: int, data_bytes: int, seed: int = 0) -> Path:
    """A sparse raw disk of ``virtual_size`` bytes holding ``data_bytes`` of random data."""
    path = Path(path)
    rng = random.Random(seed)
    with path.open("wb") as out:
        out.truncate(virtual_size)
        for offset, length in _data_runs(virtual_size, data_bytes):
            out.seek(offset)
            left = length
            while left:
                piece = min(MiB, left)
                out.write(rng.randbytes(piece))
                left -= piece
    return path


def make_qcow2(path: Path, *, virtual_size: int, data_bytes: int, seed: int = 0) -> Path:
    """A qcow2 (via sparse raw + ``qemu-img convert``) with ``data_bytes`` of random data."""
    path = Path(path)
    raw = path.with_name(path.name + ".raw.tmp")
    try:
        make_raw(raw, virtual_size=virtual_size, data_bytes=data_bytes, seed=seed)
        _qemu_img("convert", "-f", "raw", "-O", "qcow2", str(raw), str(path))
    finally:
        raw.unlink(missing_ok=True)
    return path


def make_os_like_qcow2(
    path: Path, *, virtual_size: int, data_bytes: int, source: Path = Path("/usr")
) -> Path:
    """A qcow2 holding an ext4 filesystem (``mkfs.ext4 -d``) of ~``data_bytes`` of real files.

    The files are this machine's own (from ``source``, in a stable order): data that
    compresses like an operating system's (zstd -1 to ~0.4 for /usr), unlike ``make_qcow2``.
    """
    path = Path(path)
    tree = path.with_name(path.name + ".tree.tmp")
    raw = path.with_name(path.name + ".raw.tmp")
    try:
        shutil.rmtree(tree, ignore_errors=True)
        tree.mkdir()
        copied = 0
        for directory, dirs, files in os.walk(source):
            dirs.sort()
            for name in sorted(files):
                file = Path(directory) / name
                if copied >= data_bytes:
                    break
                if file.is_symlink() or not file.is_file():
                    continue
                size = file.stat().st_size
                if size == 0 or copied + size > data_bytes:
                    continue
                target = tree / file.relative_to(source)
                target.parent.mkdir(parents=True, exist_ok=True)
                try:
                    shutil.copyfile(file, target)
                except OSError:
                    continue
                copied += size
            if copied >= data_bytes:
                break
        with raw.open("wb") as out:
            out.truncate(virtual_size)
        subprocess.run(
            ["mkfs.ext4", "-q", "-F", "-d", str(tree), str(raw)], check=True, capture_output=True
        )
        _qemu_img("convert", "-f", "raw", "-O", "qcow2", str(raw), str(path))
    finally:
        shutil.rmtree(tree, ignore_errors=True)
        raw.unlink(missing_ok=True)
    return path


def make_qcow2_with_backing(path: Path, backing: Path, backing_format: str = "raw") -> Path:
    """A qcow2 overlay on ``backing`` (``qemu-img create -f qcow2 -b backing -F raw``)."""
    path = Path(path)
    _qemu_img("create", "-f", "qcow2", "-b", str(Path(backing).resolve()),
              "-F", backing_format, str(path))  # fmt: skip
    return path


def qemu_img_info(path: Path) -> dict[str, Any]:
    """``qemu-img info --output=json`` as a dict (format, virtual-size, backing file...)."""
    out = _qemu_img("info", "--output=json", str(path))
    info: dict[str, Any] = json.loads(out)
    return info


def sha256_file(path: Path) -> str:
    """Hex SHA-256 of a file's bytes."""
    digest = hashlib.sha256()
    with Path(path).open("rb") as f:
        while chunk := f.read(4 * MiB):
            digest.update(chunk)
    return digest.hexdigest()


def _qemu_img(*args: str) -> str:
    result = subprocess.run(["qemu-img", *args], capture_output=True, text=True, check=False)
    if result.returncode != 0:
        raise RuntimeError(f"qemu-img {' '.join(args)} failed: {result.stderr.strip()}")
    return result.stdout
