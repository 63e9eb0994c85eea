"""A raw disk straight into an EBS snapshot with the EBS direct APIs (as awslabs' coldsnap).

``start_snapshot`` of the disk's size in GiB, then every block that holds data goes up with
``put_snapshot_block`` — 512 KiB each, with its SHA-256, several at once — and
``complete_snapshot`` with the count and the LINEAR aggregate of the block checksums, so
that EBS itself checks that it has exactly what was sent. Holes and all-zero blocks are
never sent: a snapshot reads them as zeros.
"""

from __future__ import annotations

import base64
import hashlib
import logging
import threading
from collections import deque
from collections.abc import Callable, Iterable, Mapping
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from migratio.adapters.aws import aws_errors, tags
from migratio.amazon.raw_blocks import BLOCK_SIZE, Block, nonzero_blocks
from migratio.errors import Cancelled, NotUploadedError
from migratio.waiting import wait_until

if TYPE_CHECKING:
    from mypy_boto3_ebs import EBSClient
    from mypy_boto3_ec2 import EC2Client

log = logging.getLogger(__name__)

GIB = 1024**3
#: how long EBS keeps a started snapshot open for blocks (its maximum is 4320 minutes)
OPEN_MINUTES = 4320


@dataclass(frozen=True)
class UploadedSnapshot:
    """A completed snapshot and what it took."""

    snapshot_id: str
    blocks: int
    volume_size_gib: int

    @property
    def bytes_sent(self) -> int:
        return self.blocks * BLOCK_SIZE


def volume_size_gib(size: int) -> int:
    """The snapshot size (whole GiB, at least 1) for a disk of ``size`` bytes."""
    return max(1, -(-size // GIB))


class SnapshotWriter:
    """Puts blocks of one open snapshot, ``concurrency`` at a time, in index order.

    ``aggregate`` is the LINEAR checksum EBS checks at completion: the SHA-256 of the block
    digests in index order, folded in as blocks complete (memory does not grow with the disk).
    """

    def __init__(
        self,
        ebs: EBSClient,
        snapshot_id: str,
        *,
        concurrency: int,
        cancel: threading.Event,
        on_progress: Callable[[int], None] = lambda _n: None,
    ) -> None:
        self.ebs = ebs
        self.snapshot_id = snapshot_id
        self.concurrency = concurrency
        self.cancel = cancel
        self.on_progress = on_progress
        self.whole = hashlib.sha256()
        self.blocks = 0

    @property
    def aggregate(self) -> str:
        return base64.b64encode(self.whole.digest()).decode()

    def put(self, block: Block) -> bytes:
        """Send one block with its checksum (runs on a pool thread); return the digest."""
        digest = hashlib.sha256(block.data).digest()
        with aws_errors(f"uploading block {block.index} of {self.snapshot_id}", NotUploadedError):
            answer = self.ebs.put_snapshot_block(
                SnapshotId=self.snapshot_id,
                BlockIndex=block.index,
                BlockData=block.data,
                DataLength=len(block.data),
                Checksum=base64.b64encode(digest).decode(),
                ChecksumAlgorithm="SHA256",
            )
        echoed = answer.get("Checksum")
        if echoed and base64.b64decode(echoed) != digest:
            raise NotUploadedError(
                f"EBS stored block {block.index} of {self.snapshot_id} with checksum {echoed}, "
                "not the one sent",
                retryable=True,
            )
        return digest

    def write_all(self, blocks: Iterable[Block]) -> int:
        """Send every block, at most twice ``concurrency`` read ahead; return how many."""
        pending: deque[tuple[Block, Future[bytes]]] = deque()
        with ThreadPoolExecutor(self.concurrency, thread_name_prefix="ebs-put") as pool:
            try:
                for block in blocks:
                    if self.cancel.is_set():
                        raise Cancelled("the upload to EBS was stopped")
                    if len(pending) >= 2 * self.concurrency:
                        self._finish(*pending.popleft())
                    pending.append((block, pool.submit(self.put, block)))
                while pending:
                    self._finish(*pending.popleft())
            except BaseException:
                for _, future in pending:
                    future.cancel()
                raise
        return self.blocks

    def _finish(self, block: Block, future: Future[bytes]) -> None:
        self.whole.update(future.result())  # raises the block's error
        self.blocks += 1
        self.on_progress(block.scanned * BLOCK_SIZE)


def upload_snapshot(
    ebs: EBSClient,
    ec2: EC2Client,
    raw: Path,
    *,
    tag_values: Mapping[str, str],
    description: str,
    concurrency: int,
    timeout: float,
    poll_interval: float,
    cancel: threading.Event,
    on_started: Callable[[str], None] = lambda _id: None,
    on_progress: Callable[[int], None] = lambda _n: None,
) -> UploadedSnapshot:
    """Upload the raw disk ``raw`` into a new, completed snapshot; return it.

    ``on_started`` gets the snapshot id as soon as it exists (so a failure can delete it).
    ``timeout`` bounds the wait for the snapshot to complete once every block is sent.
    """
    size_gib = volume_size_gib(raw.stat().st_size)
    with aws_errors("starting an EBS snapshot", NotUploadedError):
        started = ebs.start_snapshot(
            VolumeSize=size_gib,
            Tags=tags(tag_values),  # type: ignore[arg-type]
            Description=description[:255],
            Timeout=OPEN_MINUTES,
        )
    snapshot_id = started["SnapshotId"]
    on_started(snapshot_id)
    if started.get("BlockSize") not in (None, BLOCK_SIZE):
        log.debug("EBS reports block size %s; sending %d", started.get("BlockSize"), BLOCK_SIZE)
    writer = SnapshotWriter(
        ebs, snapshot_id, concurrency=concurrency, cancel=cancel, on_progress=on_progress
    )
    count = writer.write_all(nonzero_blocks(raw, cancel=cancel))
    with aws_errors(f"completing snapshot {snapshot_id}", NotUploadedError):
        ebs.complete_snapshot(
            SnapshotId=snapshot_id,
            ChangedBlocksCount=count,
            Checksum=writer.aggregate,
            ChecksumAlgorithm="SHA256",
            ChecksumAggregationMethod="LINEAR",
        )
    wait_for_snapshot(ec2, snapshot_id, timeout=timeout, poll=poll_interval, cancel=cancel)
    return UploadedSnapshot(snapshot_id, count, size_gib)


def wait_for_snapshot(
    ec2: EC2Client, snapshot_id: str, *, timeout: float, poll: float, cancel: threading.Event
) -> None:
    """Wait until EC2 reports ``snapshot_id`` completed; raise if it errs or takes too long."""
    state = "unknown"

    def completed() -> bool | None:
        nonlocal state
        with aws_errors(f"reading the state of {snapshot_id}"):
            found = ec2.describe_snapshots(SnapshotIds=[snapshot_id])["Snapshots"]
        state = found[0].get("State", "unknown") if found else "missing"
        if state in {"error", "missing", "recoverable"}:
            message = found[0].get("StateMessage", "") if found else ""
            raise NotUploadedError(
                f"snapshot {snapshot_id} is {state}" + (f": {message}" if message else ""),
                retryable=True,
            )
        return True if state == "completed" else None

    wait_until(
        completed,
        timeout=timeout,
        interval=poll,
        cancel=cancel,
        what=f"snapshot {snapshot_id}",
        expired=lambda: NotUploadedError(
            f"snapshot {snapshot_id} was still {state} after SNAPSHOT_TIMEOUT ({timeout:g} s)"
        ),
    )
