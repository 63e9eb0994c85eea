"""OpenStack → Amazon against moto in server mode (EC2, EBS direct APIs, S3) on loopback.

moto does not implement VM Import (``import_image`` and friends answer HTTP 500), so those
calls — and only those — are answered by botocore's Stubber on the EC2 client; the VMDK
conversion and the S3 upload still run for real, against moto.
"""

from __future__ import annotations

import json
import multiprocessing
import os
import shutil
import subprocess
import sys
import threading
from pathlib import Path
from typing import Any

import pytest
from botocore.awsrequest import AWSResponse
from botocore.stub import ANY, Stubber
from tests.sandbox.images import make_qcow2, make_raw
from tests.sandbox.moto_server import MotoServer
from tests.sandbox.site import Sandbox
from tests.support import Lines, no_work_left, settings_for

from migratio.adapters.aws import AwsClients
from migratio.amazon.migration import ami_name, migrate_to_amazon, register_params
from migratio.amazon.raw_blocks import BLOCK_SIZE, allocated_bytes, nonzero_blocks
from migratio.atmosphere import status
from migratio.config import AmazonSite, Settings
from migratio.errors import AwsError, Cancelled, ConfigError, ImageRefusedError, MigratioError
from migratio.images import ImageRecord
from migratio.request import MigrationRequest, Outcome
from migratio.waiting import wait_until

MiB = 1024 * 1024
SITE = "aws-eu"
BUCKET = "migratio-imports"


def amazon_settings(
    sandbox: Sandbox, tmp_path: Path, moto: MotoServer, yaml: str = "", **extra: str
) -> Settings:
    return settings_for(sandbox, tmp_path, yaml=yaml, **{SITE: moto.site_conf(**extra)})


def upload_source(sandbox: Sandbox, tmp_path: Path, **kwargs: Any) -> tuple[str, Path]:
    image = make_qcow2(tmp_path / "source.qcow2", virtual_size=96 * MiB, data_bytes=12 * MiB)
    params: dict[str, Any] = {"name": "centos-template", "disk_format": "qcow2"}
    params.update(kwargs)
    return sandbox.source.upload_image(image, **params), image


def raw_of(image: Path, tmp_path: Path) -> bytes:
    raw = tmp_path / "expected.raw"
    subprocess.run(
        ["qemu-img", "convert", "-f", "qcow2", "-O", "raw", str(image), str(raw)], check=True
    )
    return raw.read_bytes()


def our_snapshots(moto: MotoServer, image_id: str) -> list[dict[str, Any]]:
    found: list[dict[str, Any]] = moto.client("ec2").describe_snapshots(
        OwnerIds=["self"], Filters=[{"Name": "tag:source_uuid", "Values": [image_id]}]
    )["Snapshots"]
    return found


def our_amis(moto: MotoServer, image_id: str) -> list[dict[str, Any]]:
    found: list[dict[str, Any]] = moto.client("ec2").describe_images(
        Owners=["self"], Filters=[{"Name": "tag:source_uuid", "Values": [image_id]}]
    )["Images"]
    return found


def tag_map(resource: dict[str, Any]) -> dict[str, str]:
    return {tag["Key"]: tag["Value"] for tag in resource.get("Tags", [])}


def step_texts(lines: list[str]) -> list[str]:
    """The original's step texts, in order, without detail or progress lines."""
    steps = (
        status.MIGRATION_STARTED,
        status.IMAGE_CONVERTED,
        status.IMAGE_TRANSFERED,
        status.IMAGE_IMPORTED,
        status.REGISTERED_IMAGE,
    )
    return [step for line in lines for step in steps if line.startswith(step)]


# --- the blocks of a raw disk -------------------------------------------------------------


def test_blocks_skip_holes_and_zeros_and_pad_the_tail(tmp_path: Path) -> None:
    path = tmp_path / "disk.raw"
    size = 10 * BLOCK_SIZE + 100  # the last block is short
    one, tail = os.urandom(BLOCK_SIZE), os.urandom(50)
    with path.open("wb") as out:
        out.truncate(size)
        out.seek(1 * BLOCK_SIZE)
        out.write(one)
        out.seek(3 * BLOCK_SIZE)
        out.write(bytes(BLOCK_SIZE))  # allocated, but zeros: not a block to send
        out.seek(5 * BLOCK_SIZE)
        out.write(b"x" * 4096)  # two data ranges inside one block: read once
        out.seek(5 * BLOCK_SIZE + 256 * 1024)
        out.write(b"y" * 4096)
        out.seek(10 * BLOCK_SIZE + 40)
        out.write(tail)
    blocks = list(nonzero_blocks(path))
    assert [b.index for b in blocks] == [1, 5, 10]
    assert blocks[0].data == one
    assert (
        blocks[1].data[:4096] == b"x" * 4096 and blocks[1].data[256 * 1024 :][:4096] == b"y" * 4096
    )
    assert blocks[2].data == bytes(40) + tail + bytes(BLOCK_SIZE - 90)
    assert all(len(b.data) == BLOCK_SIZE for b in blocks)
    assert allocated_bytes(path) < size // 2  # the holes are known, not read


def test_waits_end_at_their_deadline_or_on_a_stop() -> None:
    now = [0.0]
    answers = iter([None, None, "done"])
    assert (
        wait_until(
            lambda: next(answers),
            timeout=10,
            interval=0.001,
            cancel=threading.Event(),
            expired=lambda: AwsError("late"),
            what="x",
            clock=lambda: now[0],
        )
        == "done"
    )
    polls = []

    def never() -> None:
        polls.append(now[0])
        now[0] += 4  # each look costs four (fake) seconds

    with pytest.raises(AwsError, match="late"):
        wait_until(never, timeout=10, interval=0.001, cancel=threading.Event(),
                   expired=lambda: AwsError("late"), what="x", clock=lambda: now[0])  # fmt: skip
    assert len(polls) == 3  # at 0, 4 and 8 (+ the deadline passed during the third)
    stop = threading.Event()
    stop.set()
    with pytest.raises(Cancelled, match="stopped while waiting for snapshot snap-1"):
        wait_until(lambda: None, timeout=10, interval=5, cancel=stop,
                   expired=lambda: AwsError("late"), what="snapshot snap-1")  # fmt: skip


def test_endpoints_of_amazon_and_of_a_private_cloud() -> None:
    amazon = AmazonSite(
        SITE, Path("a.conf"), region="eu-west-1", ec2_url="https://ec2.eu-west-1.amazonaws.com"
    )
    clients = AwsClients(amazon)
    assert clients.ec2.meta.endpoint_url == "https://ec2.eu-west-1.amazonaws.com"
    assert clients.ebs.meta.endpoint_url == "https://ebs.eu-west-1.amazonaws.com"
    assert clients.sts.meta.endpoint_url == "https://sts.eu-west-1.amazonaws.com"
    private = "http://127.0.0.1:9"
    mine = AmazonSite(SITE, Path("p.conf"), region="eu-west-1", ec2_url=private, sts_url=private,
                      ebs_url=private, s3_url=private)  # fmt: skip
    both = AwsClients(mine)
    assert {both.ec2.meta.endpoint_url, both.sts.meta.endpoint_url} == {private}


# --- EBS direct APIs, end to end ----------------------------------------------------------


def test_ebs_upload_end_to_end_then_skipped(
    clean_sandbox: Sandbox, moto: MotoServer, tmp_path: Path
) -> None:
    sb = clean_sandbox
    image_id, image = upload_source(sb, tmp_path, properties={"os_distro": "centos"})
    settings = amazon_settings(sb, tmp_path, moto, UPLOAD_CONCURRENCY="4")
    lines = Lines()
    result = migrate_to_amazon(settings, MigrationRequest(image_id, SITE), lines)

    assert result.outcome is Outcome.MIGRATED
    assert step_texts(lines) == [
        "Migration started",
        "Image converted",
        "Image transfered",
        "Image imported",
        "Registered image",
    ]
    # every block of the snapshot is the raw disk's block; zero blocks were never sent
    [snapshot] = our_snapshots(moto, image_id)
    ebs = moto.client("ebs")
    listed = ebs.list_snapshot_blocks(SnapshotId=snapshot["SnapshotId"])["Blocks"]
    raw = raw_of(image, tmp_path)
    expected = {
        i // BLOCK_SIZE
        for i in range(0, len(raw), BLOCK_SIZE)
        if raw[i : i + BLOCK_SIZE].strip(b"\0")
    }
    assert {b["BlockIndex"] for b in listed} == expected
    assert 0 < len(expected) < len(raw) // BLOCK_SIZE // 2
    for block in listed:
        got = ebs.get_snapshot_block(
            SnapshotId=snapshot["SnapshotId"],
            BlockIndex=block["BlockIndex"],
            BlockToken=block["BlockToken"],
        )["BlockData"].read()
        start = block["BlockIndex"] * BLOCK_SIZE
        assert got == raw[start : start + BLOCK_SIZE]
    assert result.bytes_sent == len(expected) * BLOCK_SIZE
    # the AMI and the snapshot carry the link tags
    [ami] = our_amis(moto, image_id)
    assert ami["ImageId"] == result.destination_image_id
    assert ami["State"] == "available"
    assert ami["Name"] == ami_name(image_id, "site-a")
    link = {"Name": "centos-template", "source_uuid": image_id, "source_cs": "site-a"}
    link["source_t"] = "site-a"
    assert tag_map(ami) == link
    assert tag_map(snapshot) == link
    assert no_work_left(settings.staging_dir)

    again = Lines()
    second = migrate_to_amazon(settings, MigrationRequest(image_id, SITE), again)
    assert second.outcome is Outcome.ALREADY_THERE
    assert second.destination_image_id == ami["ImageId"]
    assert again[-1] == f"Requested image was uploaded. {SITE} has it as {ami['ImageId']}"
    assert len(our_amis(moto, image_id)) == 1
    assert len(our_snapshots(moto, image_id)) == 1


def test_register_request_follows_glance_properties() -> None:
    site = AmazonSite(SITE, Path("x.conf"), region="eu-west-1", default_boot_mode="uefi-preferred")
    image = ImageRecord(
        id="0b7d5a2e-58a4-4d49-9a3e-6e3f0b0a1c2d",
        name="arm",
        status="active",
        size=1,
        disk_format="qcow2",
        container_format="bare",
        min_disk=20,
        properties={"architecture": "aarch64", "hw_firmware_type": "uefi"},
    )
    params = register_params(image, site, "site-a", "snap-1", 8)
    assert params["Architecture"] == "arm64"
    assert params["BootMode"] == "uefi"
    assert (params["VirtualizationType"], params["EnaSupport"]) == ("hvm", True)
    [mapping] = params["BlockDeviceMappings"]
    assert mapping["DeviceName"] == params["RootDeviceName"]
    assert mapping["Ebs"]["SnapshotId"] == "snap-1"
    assert mapping["Ebs"]["VolumeSize"] == 20  # min_disk is larger than the disk
    plain = ImageRecord(id=image.id, name="x", status="active", size=1, disk_format="raw",
                        container_format="bare")  # fmt: skip
    defaults = register_params(plain, site, "site-a", "snap-1", 8)
    assert (defaults["Architecture"], defaults["BootMode"]) == ("x86_64", "uefi-preferred")
    power = ImageRecord(
        id=image.id,
        name="p",
        status="active",
        size=1,
        disk_format="raw",
        container_format="bare",
        properties={"architecture": "ppc64le"},
    )
    with pytest.raises(ImageRefusedError, match="ppc64le"):
        register_params(power, site, "site-a", "snap-1", 8)


def test_ami_of_another_site_or_disabled_is_not_done(
    clean_sandbox: Sandbox, moto: MotoServer, tmp_path: Path
) -> None:
    sb = clean_sandbox
    image_id, _ = upload_source(sb, tmp_path)
    settings = amazon_settings(sb, tmp_path, moto)
    ec2 = moto.client("ec2")
    other = ec2.register_image(Name="from another site")["ImageId"]
    ec2.create_tags(
        Resources=[other],
        Tags=[{"Key": "source_uuid", "Value": image_id}, {"Key": "source_t", "Value": "site-x"}],
    )
    result = migrate_to_amazon(settings, MigrationRequest(image_id, SITE), Lines())
    assert result.outcome is Outcome.MIGRATED and result.destination_image_id != other

    ec2.disable_image(ImageId=result.destination_image_id)
    lines = Lines()
    with pytest.raises(AwsError, match="disabled"):
        migrate_to_amazon(settings, MigrationRequest(image_id, SITE), lines)
    assert lines[-1].startswith(f"Error: AMI {result.destination_image_id} for image")


def test_stopped_halfway_leaves_nothing_and_the_retry_finishes(
    clean_sandbox: Sandbox, moto: MotoServer, tmp_path: Path
) -> None:
    sb = clean_sandbox
    image = make_qcow2(tmp_path / "big.qcow2", virtual_size=128 * MiB, data_bytes=48 * MiB)
    image_id = sb.source.upload_image(image, name="big", disk_format="qcow2")
    settings = amazon_settings(
        sb, tmp_path, moto, yaml="progress_interval: 0.001\n", UPLOAD_CONCURRENCY="1"
    )
    cancel = threading.Event()
    lines = Lines()

    def sink(text: str) -> None:
        lines(text)
        if text.startswith("Uploading:"):  # blocks are going up: stop, as SIGTERM does
            cancel.set()

    with pytest.raises(Cancelled):
        migrate_to_amazon(settings, MigrationRequest(image_id, SITE), sink, cancel=cancel)
    assert any(line.startswith("Uploading:") for line in lines)
    assert our_snapshots(moto, image_id) == []
    assert our_amis(moto, image_id) == []
    assert no_work_left(settings.staging_dir)

    result = migrate_to_amazon(settings, MigrationRequest(image_id, SITE), Lines())
    assert result.outcome is Outcome.MIGRATED
    assert len(our_amis(moto, image_id)) == len(our_snapshots(moto, image_id)) == 1


def test_failed_registration_removes_the_snapshot(
    clean_sandbox: Sandbox, moto: MotoServer, tmp_path: Path
) -> None:
    sb = clean_sandbox
    image_id, _ = upload_source(sb, tmp_path)
    settings = amazon_settings(sb, tmp_path, moto)
    site = settings.site(SITE)
    assert isinstance(site, AmazonSite)
    clients = AwsClients(site, settings.aws)

    def refuse(**_: Any) -> tuple[AWSResponse, dict[str, Any]]:
        # fault injection (moto's register_image never fails): EC2 answers 400
        error = {"Code": "InvalidBlockDeviceMapping", "Message": "injected by the test"}
        return AWSResponse(moto.url, 400, {}, None), {
            "Error": error,
            "ResponseMetadata": {"HTTPStatusCode": 400},
        }

    clients.ec2.meta.events.register("before-call.ec2.RegisterImage", refuse)
    lines = Lines()
    with pytest.raises(AwsError, match="InvalidBlockDeviceMapping") as caught:
        migrate_to_amazon(settings, MigrationRequest(image_id, SITE), lines, clients=clients)
    assert not caught.value.retryable
    assert "Image transfered" in " ".join(lines)
    assert lines[-1].startswith("Error: registering an AMI from snap-")
    assert our_snapshots(moto, image_id) == []
    assert our_amis(moto, image_id) == []


def test_bad_credentials(clean_sandbox: Sandbox, tmp_path: Path) -> None:
    sb = clean_sandbox
    image_id, _ = upload_source(sb, tmp_path)
    with MotoServer(tmp_path / "moto-auth", authenticate=True) as strict:
        settings = amazon_settings(sb, tmp_path, strict)
        lines = Lines()
        with pytest.raises(AwsError) as caught:
            migrate_to_amazon(settings, MigrationRequest(image_id, SITE), lines)
    assert not caught.value.retryable
    assert "AuthFailure" in lines[-1]
    assert "check the AWS keys (AWS_ACCESS_KEY and AWS_SECRET_KEY" in lines[-1]
    assert "migratio-test-secret-key" not in " ".join(lines)


def test_unknown_region(clean_sandbox: Sandbox, moto: MotoServer, tmp_path: Path) -> None:
    sb = clean_sandbox
    image_id, _ = upload_source(sb, tmp_path)
    settings = settings_for(sb, tmp_path, **{SITE: moto.site_conf(region="mars-north-1")})
    lines = Lines()
    with pytest.raises(AwsError):
        migrate_to_amazon(settings, MigrationRequest(image_id, SITE), lines)
    assert "did not answer like AWS" in lines[-1]
    assert "AWS_REGION" in lines[-1]


def test_site_file_mistakes_are_named(tmp_path: Path, clean_sandbox: Sandbox) -> None:
    for text, message in (
        (
            "export AWS_REGION=us-east-1\nexport EC2_URL=https://ec2.eu-west-1.amazonaws.com\n",
            "endpoint of eu-west-1, but AWS_REGION is us-east-1",
        ),
        ("export AWS_REGION=eu-west-1\nUPLOAD_METHOD=vmimport\n", "needs S3_BUCKET"),
        ("export AWS_REGION='eu west'\n", "not a region name"),
    ):
        settings = settings_for(clean_sandbox, tmp_path, aws=text)  # only that site is broken
        with pytest.raises(ConfigError, match=message):
            settings.site("aws")


# --- VM Import: real conversion and S3 upload, stubbed import calls -----------------------


def vmimport_site(
    sandbox: Sandbox, moto: MotoServer, tmp_path: Path, **extra: str
) -> tuple[Settings, AwsClients, Stubber, str]:
    """An UPLOAD_METHOD=vmimport site, its clients with EC2 stubbed, and a source image id."""
    moto.client("s3").create_bucket(
        Bucket=BUCKET, CreateBucketConfiguration={"LocationConstraint": "eu-west-1"}
    )
    image_id, _ = upload_source(sandbox, tmp_path)
    settings = amazon_settings(
        sandbox, tmp_path, moto, UPLOAD_METHOD="vmimport", S3_BUCKET=BUCKET, **extra
    )
    site = settings.site(SITE)
    assert isinstance(site, AmazonSite)
    clients = AwsClients(site, settings.aws)
    stub = Stubber(clients.ec2)
    # nothing there yet: no AMI by tags or by name, no leftover snapshots
    stub.add_response("describe_images", {"Images": []})
    stub.add_response("describe_images", {"Images": []})
    stub.add_response("describe_snapshots", {"Snapshots": []})
    stub.add_response("describe_import_image_tasks", {"ImportImageTasks": []})  # none running
    return settings, clients, stub, image_id


@pytest.fixture
def vmimport(
    clean_sandbox: Sandbox, moto: MotoServer, tmp_path: Path
) -> tuple[Settings, AwsClients, Stubber, str]:
    return vmimport_site(clean_sandbox, moto, tmp_path, POLL_INTERVAL="0.01")


def s3_keys(moto: MotoServer) -> list[str]:
    listed = moto.client("s3").list_objects_v2(Bucket=BUCKET)
    return [item["Key"] for item in listed.get("Contents", [])]


def test_vm_import_end_to_end(
    vmimport: tuple[Settings, AwsClients, Stubber, str], moto: MotoServer, tmp_path: Path
) -> None:
    settings, clients, stub, image_id = vmimport
    key = f"migratio/site-a/{image_id}.vmdk"
    seen: dict[str, Any] = {}

    def look_at_s3(**_: Any) -> None:
        # when import_image is called, the VMDK is in S3: keep it to check it below
        body = moto.client("s3").get_object(Bucket=BUCKET, Key=key)["Body"].read()
        seen["vmdk"] = tmp_path / "uploaded.vmdk"
        seen["vmdk"].write_bytes(body)

    clients.ec2.meta.events.register("provide-client-params.ec2.ImportImage", look_at_s3)
    stub.add_response(
        "import_image",
        {"ImportTaskId": "import-ami-0123456789abcdef0"},
        {
            "Description": ANY,
            "DiskContainers": [
                {
                    "Description": ANY,
                    "Format": "vmdk",
                    "UserBucket": {"S3Bucket": BUCKET, "S3Key": key},
                }
            ],
            "Architecture": "x86_64",
            "TagSpecifications": ANY,
        },
    )
    task = {"ImportTaskId": "import-ami-0123456789abcdef0"}
    for progress, message in (("10", "pending"), ("45", "converting"), ("80", "updating")):
        stub.add_response(
            "describe_import_image_tasks",
            {"ImportImageTasks": [{**task, "Status": "active", "Progress": progress,
                                   "StatusMessage": message}]},
        )  # fmt: skip
    stub.add_response(
        "describe_import_image_tasks",
        {
            "ImportImageTasks": [
                {
                    **task,
                    "Status": "completed",
                    "ImageId": "ami-0aaaabbbbccccdddd",
                    "SnapshotDetails": [{"SnapshotId": "snap-0aaaabbbbccccdddd"}],
                }
            ]
        },
    )
    stub.add_response(
        "create_tags",
        {},
        {"Resources": ["ami-0aaaabbbbccccdddd", "snap-0aaaabbbbccccdddd"], "Tags": ANY},
    )
    lines = Lines()
    with stub:
        result = migrate_to_amazon(
            settings, MigrationRequest(image_id, SITE), lines, clients=clients
        )
    stub.assert_no_pending_responses()
    assert result.destination_image_id == "ami-0aaaabbbbccccdddd"
    assert step_texts(lines) == [
        "Migration started",
        "Image converted",
        "Image transfered",
        "Image imported",
        "Registered image",
    ]
    assert "Importing: 45% (converting)" in lines
    # what went to S3 was a stream-optimized VMDK of exactly the source disk
    info = json.loads(
        subprocess.run(
            ["qemu-img", "info", "--output=json", str(seen["vmdk"])],
            check=True, capture_output=True, text=True,
        ).stdout
    )  # fmt: skip
    assert info["format"] == "vmdk"
    assert info["format-specific"]["data"]["create-type"] == "streamOptimized"
    source = tmp_path / "source.qcow2"
    compared = subprocess.run(
        ["qemu-img", "compare", "-f", "qcow2", "-F", "vmdk", str(source), str(seen["vmdk"])],
        capture_output=True, check=False,
    )  # fmt: skip
    assert compared.returncode == 0, compared.stdout
    assert s3_keys(moto) == []  # deleted after the import
    assert no_work_left(settings.staging_dir)


def test_vm_import_failed_task(
    vmimport: tuple[Settings, AwsClients, Stubber, str], moto: MotoServer
) -> None:
    settings, clients, stub, image_id = vmimport
    stub.add_response("import_image", {"ImportTaskId": "import-ami-1"})
    stub.add_response(
        "describe_import_image_tasks",
        {"ImportImageTasks": [{"ImportTaskId": "import-ami-1", "Status": "deleted",
                               "StatusMessage": "ClientError: Unknown OS / Missing OS files."}]},
    )  # fmt: skip
    lines = Lines()
    with stub, pytest.raises(MigratioError) as caught:
        migrate_to_amazon(settings, MigrationRequest(image_id, SITE), lines, clients=clients)
    stub.assert_no_pending_responses()
    assert not caught.value.retryable
    assert lines[-1].startswith(
        "Image was not uploaded. VM Import task import-ami-1 failed: "
        "ClientError: Unknown OS / Missing OS files."
    )
    assert "UPLOAD_METHOD=ebs" in lines[-1]
    assert s3_keys(moto) == []


def test_vm_import_deadline_cancels_the_task(
    clean_sandbox: Sandbox, moto: MotoServer, tmp_path: Path
) -> None:
    settings, clients, stub, image_id = vmimport_site(
        clean_sandbox, moto, tmp_path, IMPORT_TIMEOUT="0.2", POLL_INTERVAL="60"
    )
    stub.add_response("import_image", {"ImportTaskId": "import-ami-2"})
    for _ in range(2):  # a look at once, and a last one at the deadline
        stub.add_response(
            "describe_import_image_tasks",
            {"ImportImageTasks": [{"ImportTaskId": "import-ami-2", "Status": "active",
                                   "Progress": "5", "StatusMessage": "pending"}]},
        )  # fmt: skip
    stub.add_response(
        "cancel_import_task", {}, {"ImportTaskId": "import-ami-2", "CancelReason": ANY}
    )
    lines = Lines()
    with stub, pytest.raises(AwsError, match="IMPORT_TIMEOUT"):
        migrate_to_amazon(settings, MigrationRequest(image_id, SITE), lines, clients=clients)
    stub.assert_no_pending_responses()
    assert "was still active" in lines[-1]
    assert s3_keys(moto) == []


def test_vm_import_without_the_role_says_what_to_do(
    vmimport: tuple[Settings, AwsClients, Stubber, str], moto: MotoServer
) -> None:
    settings, clients, stub, image_id = vmimport
    stub.add_client_error(
        "import_image",
        service_error_code="InvalidParameter",
        service_message="The service role vmimport provided does not exist or does not have "
        "sufficient permissions",
        http_status_code=400,
    )
    lines = Lines()
    with stub, pytest.raises(AwsError):
        migrate_to_amazon(settings, MigrationRequest(image_id, SITE), lines, clients=clients)
    assert lines[-1].startswith("Image was not uploaded. starting the VM Import task")
    assert "Required service role" in lines[-1]
    assert s3_keys(moto) == []


def test_vm_import_takes_over_the_task_of_an_interrupted_attempt(
    vmimport: tuple[Settings, AwsClients, Stubber, str], moto: MotoServer
) -> None:
    settings, clients, _, image_id = vmimport
    # an attempt killed while its task ran: the task, tagged with the image, is still active
    stub = Stubber(clients.ec2)  # answers of its own, instead of the fixture's
    for _ in range(2):
        stub.add_response("describe_images", {"Images": []})
    stub.add_response("describe_snapshots", {"Snapshots": []})
    link = [{"Key": "source_uuid", "Value": image_id}, {"Key": "source_t", "Value": "site-a"}]
    stub.add_response(
        "describe_import_image_tasks",
        {"ImportImageTasks": [
            {"ImportTaskId": "import-ami-old", "Status": "deleted", "Tags": link},
            {"ImportTaskId": "import-ami-other", "Status": "active",
             "Tags": [{"Key": "source_uuid", "Value": "another"}]},
            {"ImportTaskId": "import-ami-3", "Status": "active", "Tags": link},
        ]},
    )  # fmt: skip
    stub.add_response(
        "describe_import_image_tasks",
        {"ImportImageTasks": [{"ImportTaskId": "import-ami-3", "Status": "completed",
                               "ImageId": "ami-0333",
                               "SnapshotDetails": [{"SnapshotId": "snap-3"}]}]},
        {"ImportTaskIds": ["import-ami-3"]},
    )  # fmt: skip
    stub.add_response("create_tags", {}, {"Resources": ["ami-0333", "snap-3"], "Tags": ANY})
    key = f"migratio/site-a/{image_id}.vmdk"
    moto.client("s3").put_object(Bucket=BUCKET, Key=key, Body=b"left by the killed attempt")
    lines = Lines()
    with stub:
        result = migrate_to_amazon(
            settings, MigrationRequest(image_id, SITE), lines, clients=clients
        )
    stub.assert_no_pending_responses()  # no second import_image
    assert result.destination_image_id == "ami-0333"
    assert "Importing: taking over VM Import task import-ami-3 of an earlier attempt" in lines
    assert lines[-1] == "Registered image ami-0333 in eu-west-1"
    assert s3_keys(moto) == []


def _vm_import_job(
    settings: Settings, site_id: str, image_id: str, moto: MotoServer, out: Path, tools: Path
) -> None:
    """One job to a VM Import site (run in a process of its own), its import calls stubbed;
    what it uploaded to S3 is kept in ``out``."""
    os.environ["PATH"] = f"{tools}{os.pathsep}{os.environ['PATH']}"  # the counting qemu-img
    site = settings.site(site_id)
    assert isinstance(site, AmazonSite) and site.s3_bucket is not None
    clients = AwsClients(site, settings.aws)
    bucket, key = site.s3_bucket, f"migratio/site-a/{image_id}.vmdk"
    task, ami, snapshot = f"import-ami-{site_id}", f"ami-{site_id}", f"snap-{site_id}"
    stub = Stubber(clients.ec2)
    stub.add_response("describe_images", {"Images": []})
    stub.add_response("describe_images", {"Images": []})
    stub.add_response("describe_snapshots", {"Snapshots": []})
    stub.add_response("describe_import_image_tasks", {"ImportImageTasks": []})

    def look_at_s3(**_: Any) -> None:
        out.write_bytes(moto.client("s3").get_object(Bucket=bucket, Key=key)["Body"].read())

    clients.ec2.meta.events.register("provide-client-params.ec2.ImportImage", look_at_s3)
    container = {"Description": ANY, "Format": "vmdk",
                 "UserBucket": {"S3Bucket": bucket, "S3Key": key}}  # fmt: skip
    stub.add_response(
        "import_image",
        {"ImportTaskId": task},
        {"Description": ANY, "DiskContainers": [container], "Architecture": "x86_64",
         "TagSpecifications": ANY},
    )  # fmt: skip
    stub.add_response(
        "describe_import_image_tasks",
        {"ImportImageTasks": [{"ImportTaskId": task, "Status": "completed", "ImageId": ami,
                               "SnapshotDetails": [{"SnapshotId": snapshot}]}]},
    )  # fmt: skip
    stub.add_response("create_tags", {}, {"Resources": [ami, snapshot], "Tags": ANY})
    with stub:
        result = migrate_to_amazon(
            settings, MigrationRequest(image_id, site_id), Lines(), clients=clients
        )
    stub.assert_no_pending_responses()
    assert result.destination_image_id == ami


def test_two_vm_import_jobs_convert_the_vmdk_once(
    clean_sandbox: Sandbox, moto: MotoServer, tmp_path: Path
) -> None:
    """Two jobs at once, to two VM Import sites, need the stream-optimized VMDK of one image:
    qemu-img makes it once (the staging cache), and both upload the same, right VMDK.

    moto cannot run VM Import (``import_image`` answers HTTP 500), so as in the tests above
    those calls are answered by botocore's Stubber; the conversion (real qemu-img, counted by
    a wrapper on the PATH) and the S3 uploads (to moto) are real. Each job runs in a process
    of its own, as two RQ work-horses would, sharing the host's staging cache.
    """
    sb = clean_sandbox
    s3 = moto.client("s3")
    sites = {"aws-one": "imports-one", "aws-two": "imports-two"}
    for bucket in sites.values():
        s3.create_bucket(
            Bucket=bucket, CreateBucketConfiguration={"LocationConstraint": "eu-west-1"}
        )
    settings = settings_for(
        sb,
        tmp_path,
        **{
            site: moto.site_conf(UPLOAD_METHOD="vmimport", S3_BUCKET=bucket, POLL_INTERVAL="0.01")
            for site, bucket in sites.items()
        },
    )
    image_id, source = upload_source(sb, tmp_path)
    tools, calls = tmp_path / "tools", tmp_path / "qemu-img-calls"
    tools.mkdir()
    (tools / "qemu-img").write_text(
        f'#!/bin/sh\nprintf "%s\\n" "$*" >> {calls}\nexec {shutil.which("qemu-img")} "$@"\n'
    )
    (tools / "qemu-img").chmod(0o755)
    fork = multiprocessing.get_context("fork")
    jobs = [
        fork.Process(
            target=_vm_import_job,
            args=(settings, site, image_id, moto, tmp_path / f"{site}.vmdk", tools),
        )
        for site in sites
    ]
    for job in jobs:
        job.start()
    for job in jobs:
        job.join(300)
        assert job.exitcode == 0
    conversions = [c for c in calls.read_text().splitlines() if c.startswith("convert")]
    assert len(conversions) == 1, conversions
    assert "-O vmdk" in conversions[0] and "subformat=streamOptimized" in conversions[0]
    one, two = (tmp_path / f"{site}.vmdk" for site in sites)
    assert one.read_bytes() == two.read_bytes()
    info = json.loads(
        subprocess.run(
            ["qemu-img", "info", "--output=json", str(one)],
            check=True, capture_output=True, text=True,
        ).stdout
    )  # fmt: skip
    assert info["format-specific"]["data"]["create-type"] == "streamOptimized"
    compared = subprocess.run(
        ["qemu-img", "compare", "-f", "qcow2", "-F", "vmdk", str(source), str(one)],
        capture_output=True, check=False,
    )  # fmt: skip
    assert compared.returncode == 0, compared.stdout
    for bucket in sites.values():  # deleted after each import
        assert s3.list_objects_v2(Bucket=bucket).get("KeyCount") == 0
    cache = settings.staging_dir / "cache"
    assert [p.name for p in cache.glob("*.vmdk.json")] == [
        f"{p.name}.json" for p in cache.glob("*.vmdk")
    ]
    assert len(list(cache.glob("*.vmdk"))) == 1
    assert no_work_left(settings.staging_dir)


# --- the command line ---------------------------------------------------------------------


def run_cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "migratio", *args],
        capture_output=True, text=True, timeout=300, check=False,
    )  # fmt: skip


def test_cli_migrate_and_check_an_amazon_site(
    clean_sandbox: Sandbox, moto: MotoServer, tmp_path: Path
) -> None:
    sb = clean_sandbox
    image = make_raw(tmp_path / "disk.raw", virtual_size=16 * MiB, data_bytes=2 * MiB)
    image_id = sb.source.upload_image(image, name="raw-template", disk_format="raw")
    moto.client("s3", region="us-east-1").create_bucket(Bucket="elsewhere")
    settings = settings_for(
        sb,
        tmp_path,
        **{
            SITE: moto.site_conf(),
            "aws-import": moto.site_conf(UPLOAD_METHOD="vmimport", S3_BUCKET="elsewhere"),
        },
    )
    config = str(settings.config_path)
    done = run_cli("migrate", image_id, SITE, "--config", config)
    assert done.returncode == 0, done.stdout + done.stderr
    assert done.stdout.splitlines()[-1].startswith("Registered image ami-")
    assert len(our_amis(moto, image_id)) == 1

    check = run_cli("check", SITE, "aws-import", "--config", config)
    report = check.stdout
    assert "ok       site aws-eu AWS credentials: account 123456789012" in report
    assert "ok       site aws-eu EC2 region: eu-west-1" in report
    assert (
        "FAILED   site aws-import S3 bucket for VM Import: bucket elsewhere is in us-east-1"
        in report
    )
    assert check.returncode == 1
