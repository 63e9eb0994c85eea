"""OpenStack → Amazon EC2: turn one Glance image into an AMI of an Amazon site.

Steps, each safe to run again after any failure:

1. find the image in the source Glance;
2. skip it when the site already has an ``available`` AMI of ours for it (tagged
   ``source_uuid`` and ``source_t``, or named after it); wait for a ``pending`` one; remove
   failed AMIs and unfinished snapshots that an earlier attempt left;
3. get the bytes and inspect them (:mod:`migratio.source_site`, as for OpenStack);
4. by default (``UPLOAD_METHOD=ebs``): qemu-img to a sparse raw file, its data blocks into an
   EBS snapshot (:mod:`migratio.amazon.ebs_snapshot`), ``register_image`` from it;
   with ``UPLOAD_METHOD=vmimport``: a stream-optimized VMDK, S3, ``import_image``
   (:mod:`migratio.amazon.vm_import`), the S3 object deleted;
5. tag the AMI and its snapshots: ``Name``, ``source_uuid``, ``source_cs``, ``source_t``.

On failure, what this attempt made (snapshot, AMI, S3 object, import task) is removed.
"""

from __future__ import annotations

import logging
import shutil
import threading
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from migratio.adapters import qemu_img
from migratio.adapters.aws import AwsClients, aws_errors, tag_dict, tag_filters, tags
from migratio.adapters.glance_api import GlanceApi
from migratio.amazon.ebs_snapshot import upload_snapshot
from migratio.amazon.raw_blocks import BLOCK_SIZE, data_block_count
from migratio.amazon.vm_import import (
    ImportedImage,
    delete_object,
    start_import,
    tasks_tagged,
    upload_to_s3,
    wait_for_import,
)
from migratio.atmosphere import status
from migratio.atmosphere.status import StatusSink, human_bytes
from migratio.config import AmazonSite, Settings
from migratio.errors import (
    AwsError,
    ConfigError,
    ImageRefusedError,
    MigratioError,
    quietly,
)
from migratio.images import ImageRecord
from migratio.request import MigrationRequest, MigrationResult, MigrationRun, Outcome
from migratio.source_site import SourceSite
from migratio.waiting import wait_until

if TYPE_CHECKING:
    from mypy_boto3_ec2.type_defs import ImageTypeDef

log = logging.getLogger(__name__)

#: Glance's ``architecture`` values (uname -m / libosinfo) → EC2's
GLANCE_TO_EC2_ARCHITECTURE = {
    "x86_64": "x86_64",
    "amd64": "x86_64",
    "aarch64": "arm64",
    "arm64": "arm64",
    "i386": "i386",
    "i686": "i386",
    "x86": "i386",
}
#: Glance's ``hw_firmware_type`` → EC2's boot mode
FIRMWARE_TO_BOOT_MODE = {"uefi": "uefi", "bios": "legacy-bios"}
ROOT_DEVICE = "/dev/xvda"
#: AMI states an earlier, failed attempt leaves; such an AMI is removed and made again
BROKEN_STATES = frozenset({"failed", "error", "invalid"})


def ami_name(image_id: str, source_site: str) -> str:
    """The AMI's name: fixed for an image, so a second registration is refused by EC2 itself."""
    return f"{image_id} from {source_site}"


def architecture_of(image: ImageRecord, site: AmazonSite) -> str:
    """EC2's architecture for the image: its ``architecture`` property, else the site default."""
    declared = image.properties.get("architecture")
    if not declared:
        return site.default_architecture
    try:
        return GLANCE_TO_EC2_ARCHITECTURE[declared.lower()]
    except KeyError:
        raise ImageRefusedError(
            f"image {image.id} is for architecture {declared!r}, which EC2 does not run "
            f"(it runs {', '.join(sorted(set(GLANCE_TO_EC2_ARCHITECTURE.values())))})"
        ) from None


def boot_mode_of(image: ImageRecord, site: AmazonSite) -> str | None:
    """EC2's boot mode: from ``hw_firmware_type``, else the site default (None: EC2's own)."""
    firmware = (image.properties.get("hw_firmware_type") or "").lower()
    return FIRMWARE_TO_BOOT_MODE.get(firmware, site.default_boot_mode)


def register_params(
    image: ImageRecord, site: AmazonSite, source_site: str, snapshot_id: str, size_gib: int
) -> dict[str, Any]:
    """The ``register_image`` request for an AMI booting from ``snapshot_id``."""
    params: dict[str, Any] = {
        "Name": ami_name(image.id, source_site),
        "Description": description_of(image, source_site),
        "Architecture": architecture_of(image, site),
        "VirtualizationType": "hvm",
        "EnaSupport": True,
        "RootDeviceName": ROOT_DEVICE,
        "BlockDeviceMappings": [
            {
                "DeviceName": ROOT_DEVICE,
                "Ebs": {
                    "SnapshotId": snapshot_id,
                    "VolumeSize": max(size_gib, image.min_disk),
                    "VolumeType": site.volume_type,
                    "DeleteOnTermination": True,
                },
            }
        ],
    }
    boot_mode = boot_mode_of(image, site)
    if boot_mode is not None:
        params["BootMode"] = boot_mode
    return params


def description_of(image: ImageRecord, source_site: str) -> str:
    """A one-line description (AWS allows 255 characters)."""
    return f"{image.name} - Glance image {image.id} of {source_site} (migratio)"[:255]


@dataclass(kw_only=True)
class AmazonMigration(MigrationRun):
    """One run of one OpenStack → Amazon migration, with everything its steps use."""

    site: AmazonSite
    aws: AwsClients
    #: what this attempt made, removed again if it fails
    made_snapshots: list[str] = field(default_factory=list)
    made_image: str | None = None

    def link(self, image_id: str) -> dict[str, str]:
        """The tags that say a resource is this site's copy of the image (what we look for)."""
        return {"source_uuid": image_id, "source_t": self.me}

    def tag_values(self, image: ImageRecord) -> dict[str, str]:
        return {"Name": image.name or image.id, **self.link(image.id), "source_cs": self.me}

    # 2
    def our_images(self, image_id: str) -> list[ImageTypeDef]:
        """AMIs of this account for the image: by tags, or by the name we give them."""
        ec2 = self.aws.ec2
        found: dict[str, ImageTypeDef] = {}
        with aws_errors(f"looking for AMIs of image {image_id} in {self.site.region}"):
            for filters in (
                tag_filters(self.link(image_id)),
                [{"Name": "name", "Values": [ami_name(image_id, self.me)]}],
            ):
                for ami in ec2.describe_images(Owners=["self"], Filters=filters)["Images"]:  # type: ignore[arg-type]
                    found[ami["ImageId"]] = ami
        return list(found.values())

    def existing_image(self, image: ImageRecord) -> str | None:
        """The id of an available AMI for the image (waiting for a pending one), or None."""
        for ami in self.our_images(image.id):
            state, ami_id = ami.get("State", "unknown"), ami["ImageId"]
            if state == "pending":
                self.status(f"AMI {ami_id} for this image is pending; waiting for it")
                state = self.wait_for_image(ami_id)
            if state == "available":
                if "source_uuid" not in tag_dict(ami):
                    # found by name: a crash between registering and tagging left it bare
                    self.tag([ami_id, *_snapshots_of(ami)], image)
                return ami_id
            if state == "deregistered":
                continue  # gone while we waited
            if state in BROKEN_STATES:
                self.fence()
                log.info("removing AMI %s (%s) left by an earlier attempt", ami_id, state)
                self.remove_image(ami_id, _snapshots_of(ami))
                continue
            raise AwsError(
                f"AMI {ami_id} for image {image.id} is {state}: enable or deregister it, "
                "then run the migration again"
            )
        return None

    def remove_leftover_snapshots(self, image: ImageRecord) -> None:
        """Delete snapshots of ours for the image that no AMI uses (an interrupted upload's).

        Only while this attempt holds the pair's lease: every such snapshot is a dead attempt's.
        """
        self.fence()
        with aws_errors("looking for unfinished snapshots"):
            leftovers = self.aws.ec2.describe_snapshots(
                OwnerIds=["self"],
                Filters=tag_filters(self.link(image.id)),  # type: ignore[arg-type]
            )["Snapshots"]
        for snapshot in leftovers:
            log.info("deleting snapshot %s left by an earlier attempt", snapshot["SnapshotId"])
            quietly(self.delete_snapshot, snapshot["SnapshotId"])

    def wait_for_image(self, ami_id: str) -> str:
        """Wait (up to SNAPSHOT_TIMEOUT) while the AMI is pending; return its final state."""

        def settled() -> str | None:
            with aws_errors(f"reading the state of {ami_id}"):
                found = self.aws.ec2.describe_images(ImageIds=[ami_id])["Images"]
            state = found[0].get("State", "unknown") if found else "deregistered"
            return None if state == "pending" else state

        return wait_until(
            settled,
            timeout=self.site.snapshot_timeout,
            interval=self.site.poll_interval,
            cancel=self.cancel,
            what=f"AMI {ami_id}",
            expired=lambda: AwsError(
                f"AMI {ami_id} was still pending after SNAPSHOT_TIMEOUT "
                f"({self.site.snapshot_timeout:g} s)"
            ),
        )

    def tag(self, resources: Sequence[str], image: ImageRecord) -> None:
        with aws_errors(f"tagging {', '.join(resources)}"):
            self.aws.ec2.create_tags(
                Resources=list(resources),
                Tags=tags(self.tag_values(image)),  # type: ignore[arg-type]
            )

    def delete_snapshot(self, snapshot_id: str) -> None:
        with aws_errors(f"deleting snapshot {snapshot_id}"):
            self.aws.ec2.delete_snapshot(SnapshotId=snapshot_id)

    def remove_image(self, ami_id: str, snapshots: Sequence[str]) -> None:
        """Deregister an AMI and delete its snapshots."""
        with aws_errors(f"deregistering {ami_id}"):
            self.aws.ec2.deregister_image(ImageId=ami_id)
        for snapshot_id in snapshots:
            quietly(self.delete_snapshot, snapshot_id)

    def run(self) -> MigrationResult:
        """Run every step; raise a :class:`MigratioError` on failure (after cleaning up)."""
        self.status(
            f"{status.MIGRATION_STARTED}: image {self.request.image_id} to {self.site.site_id} "
            f"({self.site.region})"
        )
        image = self.source.find(self.request.image_id)
        target_format = "vmdk" if self.site.upload_method == "vmimport" else "raw"
        if not image.disk_format == target_format == "raw":
            qemu_img.check_convertible(image.disk_format, target_format)
        existing = self.existing_image(image)
        if existing is not None:
            shutil.rmtree(self.workdir, ignore_errors=True)  # a killed attempt's
            self.status(f"{status.ALREADY_UPLOADED} {self.site.site_id} has it as {existing}")
            return MigrationResult(Outcome.ALREADY_THERE, existing)
        self.remove_leftover_snapshots(image)
        self.workdir.mkdir(parents=True, exist_ok=True)
        try:
            local = self.staged.enter_context(self.source.inspected_bytes(image, self.cancel)).path
            if self.site.upload_method == "vmimport":
                ami_id, sent = self.by_vm_import(image, local)
            else:
                ami_id, sent = self.by_ebs_snapshot(image, local)
        except BaseException:
            self.clean_up()
            raise
        finally:
            self.staged.close()  # the cache entries this job used may go now
            shutil.rmtree(self.workdir, ignore_errors=True)
        self.status(f"{status.REGISTERED_IMAGE} {ami_id} in {self.site.region}")
        return MigrationResult(Outcome.MIGRATED, ami_id, sent)

    def clean_up(self) -> None:
        """Remove what this attempt made at Amazon (best effort: the error is what matters)."""
        if self.made_image is not None:
            quietly(self.remove_image, self.made_image, self.made_snapshots)
        else:
            for snapshot_id in self.made_snapshots:
                quietly(self.delete_snapshot, snapshot_id)

    def convert(self, image: ImageRecord, local: Path, target_format: str) -> Path:
        """``local`` as ``target_format`` (``local`` if already raw), from the staging cache.

        A VMDK is always written anew from the image: VM Import wants the stream-optimized kind.
        """
        if image.disk_format == target_format == "raw":
            return local
        entry = self.staged.enter_context(
            self.source.converted(image, local, target_format, self.cancel)
        )
        return entry.path

    # 4, EBS direct APIs
    def by_ebs_snapshot(self, image: ImageRecord, local: Path) -> tuple[str, int]:
        raw = self.convert(image, local, "raw")
        virtual, data = raw.stat().st_size, data_block_count(raw) * BLOCK_SIZE
        self.status(
            f"{status.IMAGE_CONVERTED}: {image.disk_format} to raw, {human_bytes(virtual)} "
            f"virtual, {human_bytes(data)} of data"
        )
        uploaded = upload_snapshot(
            self.aws.ebs,
            self.aws.ec2,
            raw,
            tag_values=self.tag_values(image),
            description=description_of(image, self.me),
            concurrency=self.site.upload_concurrency,
            timeout=self.site.snapshot_timeout,
            poll_interval=self.site.poll_interval,
            cancel=self.cancel,
            on_started=self.made_snapshots.append,
            on_progress=self.progress("Uploading", data),
        )
        self.status(
            f"{status.IMAGE_TRANSFERED}: {human_bytes(uploaded.bytes_sent)} in "
            f"{uploaded.blocks} blocks to EBS snapshot {uploaded.snapshot_id} "
            f"({human_bytes(virtual)} disk; zeros not sent)"
        )
        self.status(f"{status.IMAGE_IMPORTED}: snapshot {uploaded.snapshot_id} completed")
        params = register_params(
            image, self.site, self.me, uploaded.snapshot_id, uploaded.volume_size_gib
        )
        self.fence()
        with aws_errors(f"registering an AMI from {uploaded.snapshot_id}"):
            self.made_image = self.aws.ec2.register_image(**params)["ImageId"]
        self.tag([self.made_image, uploaded.snapshot_id], image)
        state = self.wait_for_image(self.made_image)
        if state != "available":
            raise AwsError(f"AMI {self.made_image} became {state}, not available", retryable=True)
        return self.made_image, uploaded.bytes_sent

    # 4, VM Import
    def earlier_import(self, image: ImageRecord) -> str | None:
        """An import task of an interrupted attempt that is still running, or that made an AMI
        which is still there: its id, to wait for it (or take its AMI) instead of a second one."""
        for task in reversed(tasks_tagged(self.aws.ec2, self.link(image.id))):
            task_id, state, made = task["ImportTaskId"], task.get("Status"), task.get("ImageId")
            if state == "active":
                return str(task_id)
            if state == "completed" and made:
                with aws_errors(f"reading {made}"):
                    amis = self.aws.ec2.describe_images(ImageIds=[made])["Images"]
                if amis and amis[0].get("State") in {"available", "pending"}:
                    return str(task_id)
        return None

    def wait_for_import(self, task_id: str) -> ImportedImage:
        last = [-1]

        def report(percent: int, message: str) -> None:
            if percent != last[0]:
                last[0] = percent
                self.status(f"{status.IMPORTING}: {percent}% ({message or 'active'})")

        return wait_for_import(
            self.aws.ec2,
            task_id,
            timeout=self.site.import_timeout,
            poll=self.site.poll_interval,
            cancel=self.cancel,
            on_progress=report,
        )

    def by_vm_import(self, image: ImageRecord, local: Path) -> tuple[str, int]:
        assert self.site.s3_bucket is not None
        bucket, key = self.site.s3_bucket, f"{self.site.s3_prefix}{self.me}/{image.id}.vmdk"
        earlier = self.earlier_import(image)
        if earlier is not None:
            self.status(
                f"{status.IMPORTING}: taking over VM Import task {earlier} of an earlier attempt"
            )
            try:
                imported = self.wait_for_import(earlier)
            finally:
                quietly(delete_object, self.aws.s3, bucket, key)
            return self.imported(imported, image), 0
        vmdk = self.convert(image, local, "vmdk")
        size = vmdk.stat().st_size
        self.status(
            f"{status.IMAGE_CONVERTED}: {image.disk_format} to stream-optimized VMDK "
            f"({human_bytes(size)})"
        )
        try:
            sent = upload_to_s3(
                self.aws.s3,
                vmdk,
                bucket,
                key,
                concurrency=self.site.upload_concurrency,
                cancel=self.cancel,
                on_progress=self.progress("Uploading", size),
            )
            self.status(f"{status.IMAGE_TRANSFERED}: {human_bytes(sent)} to s3://{bucket}/{key}")
            self.fence()
            task_id = start_import(
                self.aws.ec2,
                bucket=bucket,
                key=key,
                description=description_of(image, self.me),
                architecture=architecture_of(image, self.site),
                boot_mode=boot_mode_of(image, self.site),
                role=self.site.vmimport_role,
                tag_values=self.tag_values(image),
            )
            self.status(f"{status.IMPORTING}: VM Import task {task_id} started")
            imported = self.wait_for_import(task_id)
        finally:
            quietly(delete_object, self.aws.s3, bucket, key)
        return self.imported(imported, image), sent

    def imported(self, imported: ImportedImage, image: ImageRecord) -> str:
        """Tag what a finished import task made; return the AMI's id."""
        self.made_image = imported.image_id
        self.made_snapshots.extend(imported.snapshot_ids)
        self.status(f"{status.IMAGE_IMPORTED}: task {imported.task_id} made {imported.image_id}")
        self.tag([imported.image_id, *imported.snapshot_ids], image)
        return imported.image_id


def unused_snapshots(ec2: Any, source_site: str) -> list[tuple[str, str]]:
    """(image id, snapshot id) of this site's snapshots that no AMI of the account uses, for
    images that have no AMI of ours at all: what interrupted uploads left (for the sweep)."""
    with aws_errors("looking for unfinished snapshots"):
        snapshots = ec2.describe_snapshots(
            OwnerIds=["self"], Filters=tag_filters({"source_t": source_site})
        )["Snapshots"]
        amis = ec2.describe_images(Owners=["self"])["Images"]
    used = {snapshot for ami in amis for snapshot in _snapshots_of(ami)}
    has_ami = {tag_dict(ami).get("source_uuid") for ami in amis} | {
        str(ami.get("Name", "")).split(" ")[0] for ami in amis
    }
    found = []
    for snapshot in snapshots:
        image_id = tag_dict(snapshot).get("source_uuid")
        if image_id and snapshot["SnapshotId"] not in used and image_id not in has_ami:
            found.append((image_id, str(snapshot["SnapshotId"])))
    return found


def _snapshots_of(ami: Mapping[str, Any]) -> list[str]:
    return [
        str(mapping["Ebs"]["SnapshotId"])
        for mapping in ami.get("BlockDeviceMappings", [])
        if mapping.get("Ebs", {}).get("SnapshotId")
    ]


def migrate_to_amazon(
    settings: Settings,
    request: MigrationRequest,
    sink: StatusSink,
    *,
    cancel: threading.Event | None = None,
    clients: AwsClients | None = None,
    fence: Callable[[], None] | None = None,
) -> MigrationResult:
    """Migrate one image to an Amazon site, reporting each step to ``sink``.

    ``clients`` replaces the site's boto3 clients (tests pass stubbed ones). A failure is
    reported to ``sink`` with the original's text where it had one, then raised.
    """
    try:
        site = settings.site(request.destination)
        if not isinstance(site, AmazonSite):
            raise ConfigError(f"site {site.site_id} is an OpenStack site, not an Amazon one")
        migration = AmazonMigration(
            settings=settings,
            request=request,
            site=site,
            status=sink,
            source=SourceSite(settings, GlanceApi(settings.source), sink),
            aws=clients or AwsClients(site, settings.aws),
            workdir=settings.staging_dir / f"{request.image_id}-{site.site_id}",
            cancel=cancel or threading.Event(),
        )
        if fence is not None:
            migration.fence = fence
        return migration.run()
    except MigratioError as exc:
        sink(exc.status_line())
        raise
