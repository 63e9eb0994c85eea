"""VM Import: a stream-optimized VMDK in S3 becomes an AMI, with AWS fixing the guest's drivers.

The slower way (the VMDK conversion is single-threaded deflate), for guests that need it,
chosen per site with ``UPLOAD_METHOD=vmimport``: the VMDK goes to S3 with boto3's managed
multipart transfer, ``import_image`` starts a task, and ``describe_import_image_tasks`` is
polled until the task completes, fails, or runs out of ``IMPORT_TIMEOUT`` (then the task
is cancelled).
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from boto3.exceptions import S3UploadFailedError
from boto3.s3.transfer import TransferConfig

from migratio.adapters.aws import aws_errors, describe, tag_dict, tags
from migratio.errors import AwsError, Cancelled, NotUploadedError
from migratio.waiting import wait_until

if TYPE_CHECKING:
    from mypy_boto3_ec2 import EC2Client
    from mypy_boto3_s3 import S3Client

log = logging.getLogger(__name__)

MIB = 1024**2
#: states of an import task that will not change any more without us
FAILED_STATES = frozenset({"deleting", "deleted"})


@dataclass(frozen=True)
class ImportedImage:
    """What a finished import task made."""

    task_id: str
    image_id: str
    snapshot_ids: tuple[str, ...]


def upload_to_s3(
    s3: S3Client,
    path: Path,
    bucket: str,
    key: str,
    *,
    concurrency: int,
    cancel: threading.Event,
    on_progress: Callable[[int], None] = lambda _n: None,
) -> int:
    """Upload ``path`` to ``s3://bucket/key`` in parallel parts; return the bytes sent."""
    sent = 0
    lock = threading.Lock()

    def count(chunk: int) -> None:
        nonlocal sent
        if cancel.is_set():
            raise Cancelled("the upload to S3 was stopped")  # s3transfer aborts the upload
        with lock:
            sent += chunk
            on_progress(sent)

    config = TransferConfig(
        multipart_threshold=64 * MIB,
        multipart_chunksize=64 * MIB,
        max_concurrency=concurrency,
        use_threads=True,
    )
    where = f"uploading {path.name} to s3://{bucket}/{key}"
    try:
        with aws_errors(where, NotUploadedError):
            s3.upload_file(str(path), bucket, key, Config=config, Callback=count)
    except S3UploadFailedError as exc:
        cause = exc.__context__
        if isinstance(cause, Exception):
            described = describe(cause, where)
            raise NotUploadedError(described.message, retryable=described.retryable) from exc
        raise NotUploadedError(f"{where}: {exc}", retryable=True) from exc
    return sent


def delete_object(s3: S3Client, bucket: str, key: str) -> None:
    """Remove ``s3://bucket/key`` (nothing happens if it is not there)."""
    with aws_errors(f"deleting s3://{bucket}/{key}"):
        s3.delete_object(Bucket=bucket, Key=key)


def start_import(
    ec2: EC2Client,
    *,
    bucket: str,
    key: str,
    description: str,
    architecture: str,
    boot_mode: str | None,
    role: str | None,
    tag_values: Mapping[str, str],
) -> str:
    """Start an import task for the VMDK at ``s3://bucket/key``; return its id."""
    params: dict[str, Any] = {
        "Description": description[:255],
        "DiskContainers": [
            {
                "Description": description[:255],
                "Format": "vmdk",
                "UserBucket": {"S3Bucket": bucket, "S3Key": key},
            }
        ],
        "Architecture": architecture,
        "TagSpecifications": [{"ResourceType": "import-image-task", "Tags": tags(tag_values)}],
    }
    if boot_mode is not None:
        params["BootMode"] = boot_mode
    if role is not None:
        params["RoleName"] = role
    with aws_errors("starting the VM Import task", NotUploadedError):
        answer = ec2.import_image(**params)
    return str(answer["ImportTaskId"])


class ImportFailedError(NotUploadedError):
    """The VM Import service ended the task without an image."""


def wait_for_import(
    ec2: EC2Client,
    task_id: str,
    *,
    timeout: float,
    poll: float,
    cancel: threading.Event,
    on_progress: Callable[[int, str], None] = lambda _p, _m: None,
) -> ImportedImage:
    """Poll the task until it completes. When it fails, raise; when the deadline passes, the
    job stops or anything else goes wrong here, cancel the task too."""
    last = {"Status": "unknown", "StatusMessage": ""}

    def finished() -> ImportedImage | None:
        task = describe_task(ec2, task_id)
        last.update(
            Status=task.get("Status", "unknown"), StatusMessage=task.get("StatusMessage", "")
        )
        status, message = last["Status"], last["StatusMessage"]
        if status == "completed" and task.get("ImageId"):
            snapshots = tuple(
                str(detail["SnapshotId"])
                for detail in task.get("SnapshotDetails", [])
                if detail.get("SnapshotId")
            )
            return ImportedImage(task_id, str(task["ImageId"]), snapshots)
        if status in FAILED_STATES or status == "completed":
            raise ImportFailedError(
                f"VM Import task {task_id} failed: {message or status}{_import_hint(message)}",
                retryable="ServerError" in message,
            )
        on_progress(int(task.get("Progress") or 0), message)
        return None

    try:
        return wait_until(
            finished,
            timeout=timeout,
            interval=poll,
            cancel=cancel,
            what=f"VM Import task {task_id}",
            expired=lambda: NotUploadedError(
                f"VM Import task {task_id} was still {last['Status']} ({last['StatusMessage']}) "
                f"after IMPORT_TIMEOUT ({timeout:g} s); it was cancelled"
            ),
        )
    except ImportFailedError:
        raise
    except BaseException as exc:  # a deadline, a stop, RQ's job timeout: do not leave it running
        cancel_task(ec2, task_id, reason=str(exc) or type(exc).__name__)
        raise


def describe_task(ec2: EC2Client, task_id: str) -> Mapping[str, Any]:
    """The import task's description (Status, StatusMessage, Progress, ImageId …)."""
    with aws_errors(f"reading VM Import task {task_id}"):
        found = ec2.describe_import_image_tasks(ImportTaskIds=[task_id])["ImportImageTasks"]
    if not found:
        raise NotUploadedError(f"VM Import task {task_id} has disappeared", retryable=True)
    return found[0]


def tasks_tagged(ec2: EC2Client, tag_values: Mapping[str, str]) -> list[Mapping[str, Any]]:
    """Import tasks (AWS keeps them a week) carrying all of ``tag_values``, newest last."""
    found: list[Mapping[str, Any]] = []
    with aws_errors("looking for VM Import tasks of an earlier attempt"):
        for page in ec2.get_paginator("describe_import_image_tasks").paginate():
            for task in page.get("ImportImageTasks", []):
                tagged = tag_dict(task)
                if all(tagged.get(key) == value for key, value in tag_values.items()):
                    found.append(task)
    return found


def cancel_task(ec2: EC2Client, task_id: str, *, reason: str) -> None:
    """Cancel an import task (best effort: it may have ended meanwhile)."""
    try:
        with aws_errors(f"cancelling VM Import task {task_id}"):
            ec2.cancel_import_task(ImportTaskId=task_id, CancelReason=reason[:255])
    except AwsError as exc:
        log.warning("%s", exc.message)


def _import_hint(message: str) -> str:
    lowered = message.lower()
    if "unknown os" in lowered or "missing os files" in lowered:
        return " (VM Import did not recognise the guest OS: use UPLOAD_METHOD=ebs for it)"
    if "vmimport" in lowered or "role" in lowered:
        return " (check the 'vmimport' service role and its access to S3_BUCKET)"
    return ""
