"""The data of a raw disk image in fixed-size blocks, skipping holes and all-zero blocks.

A sparse raw file (``qemu-img convert -O raw`` writes one) says where its data is through
``SEEK_DATA``/``SEEK_HOLE``: the holes are never read. Of the blocks that hold data, those
that are all zeros anyway are skipped too. The last block is padded with zeros to full size.
"""

from __future__ import annotations

import errno
import os
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from migratio.errors import Cancelled

#: the EBS direct APIs' block size
BLOCK_SIZE = 512 * 1024


@dataclass(frozen=True)
class Block:
    """Block ``index`` (offset ``index * size``) and its bytes; ``scanned`` blocks of data
    ranges (this one included, zero blocks too) have been read so far."""

    index: int
    data: bytes
    scanned: int


def data_ranges(fd: int, size: int) -> Iterator[tuple[int, int]]:
    """``(start, end)`` of each range that holds data; all of it where holes are unknown."""
    offset = 0
    while offset < size:
        try:
            start = os.lseek(fd, offset, os.SEEK_DATA)
        except OSError as exc:
            if exc.errno == errno.ENXIO:  # no data after offset
                return
            if exc.errno in {errno.EINVAL, errno.EOPNOTSUPP}:  # no hole support: all data
                yield offset, size
                return
            raise
        end = min(os.lseek(fd, start, os.SEEK_HOLE), size)
        yield start, end
        offset = end


def allocated_bytes(path: Path) -> int:
    """How many bytes of ``path`` lie in data ranges."""
    with path.open("rb") as stream:
        size = os.fstat(stream.fileno()).st_size
        return sum(end - start for start, end in data_ranges(stream.fileno(), size))


def data_block_indexes(fd: int, size: int, block_size: int = BLOCK_SIZE) -> Iterator[int]:
    """The index of every block that touches a data range, each once, in order."""
    next_index = 0  # data ranges can share a block
    for start, end in data_ranges(fd, size):
        first, last = max(start // block_size, next_index), (end - 1) // block_size
        yield from range(first, last + 1)
        next_index = max(next_index, last + 1)


def data_block_count(path: Path, block_size: int = BLOCK_SIZE) -> int:
    """How many blocks :func:`nonzero_blocks` will read (those touching a data range)."""
    with path.open("rb") as stream:
        size = os.fstat(stream.fileno()).st_size
        return sum(1 for _ in data_block_indexes(stream.fileno(), size, block_size))


def nonzero_blocks(
    path: Path, block_size: int = BLOCK_SIZE, *, cancel: threading.Event | None = None
) -> Iterator[Block]:
    """Every block of ``path`` that holds a non-zero byte, in order; holes are not read.

    With ``cancel``, a long run of zeros is not read to its end once it is set.
    """
    zero = bytes(block_size)
    with path.open("rb", buffering=0) as stream:
        fd = stream.fileno()
        size = os.fstat(fd).st_size
        for scanned, index in enumerate(data_block_indexes(fd, size, block_size), start=1):
            if cancel is not None and scanned % 256 == 0 and cancel.is_set():
                raise Cancelled("stopped while reading the disk")
            data = os.pread(fd, block_size, index * block_size)
            if len(data) < block_size:
                data += bytes(block_size - len(data))
            if data != zero:
                yield Block(index, data, scanned)
