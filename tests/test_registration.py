"""What is registered at the destination is exactly the source's name, properties and bytes.

Real Glance servers, the real ``glance`` CLI over a real sshd, real qemu-img and moto. The
Glance error-status test answers from a tiny HTTP server: a real Glance cannot be made to
answer 410, 429 or 504 on demand.
"""

from __future__ import annotations

import contextlib
import hashlib
import http.server
import io
import logging
import subprocess
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
from glanceclient.common import utils as glance_utils
from tests.sandbox.images import make_raw, sha256_file
from tests.sandbox.moto_server import MotoServer
from tests.sandbox.site import Sandbox
from tests.support import Lines, settings_for

from migratio.adapters.glance_api import GlanceApi
from migratio.adapters.glance_cli import RemoteGlance, parse_table
from migratio.adapters.qemu_img import QEMU_DRIVERS, WRITABLE, check_convertible
from migratio.amazon.migration import migrate_to_amazon
from migratio.atmosphere import status
from migratio.config import OpenStackCredentials, OpenStackSite
from migratio.errors import ConversionError, GlanceError, MetadataError
from migratio.hashing import Digests
from migratio.openstack.migration import Migration, destination_for, migrate_to_openstack
from migratio.request import MigrationRequest, Outcome
from migratio.source_site import SourceSite

MiB = 1024 * 1024
AMAZON = "aws-eu"

#: names and property values the glance CLI could take for options, or that its table
#: draws awkwardly; each must arrive exactly as it left
AWKWARD_NAME = "-centos7-base"
AWKWARD_PROPERTIES = {
    "-x": "1",
    "dashes": "--name=evil --property x=y",
    "-": "-",
    "pipe": "a | b |",
    "lines": "first line\nsecond line",
    "spaces": "  leading and  inner",
    "unicode": "Ünïcode ✓ 中文",
    "long": " ".join(["word"] * 60),
    "trailing": "spaces  ",
}


def site_b_with(sandbox: Sandbox, *lines: str) -> str:
    return (sandbox.sites_dir / "site-b.conf").read_text() + "".join(f"{x}\n" for x in lines)


def small_raw(sandbox: Sandbox, tmp_path: Path, **kwargs: object) -> str:
    raw = make_raw(tmp_path / "small.raw", virtual_size=4 * MiB, data_bytes=MiB)
    params: dict[str, object] = {"name": "small", "disk_format": "raw"}
    params.update(kwargs)
    return sandbox.source.upload_image(raw, **params)  # type: ignore[arg-type]


# --- names and properties -------------------------------------------------------------------


@pytest.mark.parametrize("site", ["site-b", "site-b-api"])
def test_awkward_names_and_properties_arrive_exactly(
    clean_sandbox: Sandbox, tmp_path: Path, site: str
) -> None:
    sb = clean_sandbox
    image_id = small_raw(sb, tmp_path, name=AWKWARD_NAME, properties=AWKWARD_PROPERTIES)
    result = migrate_to_openstack(
        settings_for(sb, tmp_path), MigrationRequest(image_id, site), Lines()
    )
    assert result.outcome is Outcome.MIGRATED
    copy = sb.destination.image(str(result.destination_image_id))  # read back over the API
    assert copy["name"] == AWKWARD_NAME
    for key, value in AWKWARD_PROPERTIES.items():
        assert copy[key] == value, key
    assert copy["status"] == "active"


def test_a_key_with_equals_is_refused_through_the_cli_before_anything_is_sent(
    clean_sandbox: Sandbox, tmp_path: Path
) -> None:
    sb = clean_sandbox
    image_id = small_raw(sb, tmp_path, properties={"a=b": "c", "ok": "1"})
    settings = settings_for(sb, tmp_path)
    lines = Lines()
    with pytest.raises(MetadataError) as caught:
        migrate_to_openstack(settings, MigrationRequest(image_id, "site-b"), lines)
    assert caught.value.retryable is False
    assert "'a=b'" in lines[-1] and lines[-1].startswith("Error: ")
    assert not any("Download" in line or "Transfer" in line for line in lines)
    assert sb.destination.images() == []
    assert not (sb.remote_staging.exists() and any(sb.remote_staging.iterdir()))

    # the API carries it exactly
    result = migrate_to_openstack(settings, MigrationRequest(image_id, "site-b-api"), Lines())
    copy = sb.destination.image(str(result.destination_image_id))
    assert (copy["a=b"], copy["ok"]) == ("c", "1")


@pytest.mark.parametrize("site", ["site-b", "site-b-api"])
def test_a_copy_that_reads_back_different_is_deleted(
    clean_sandbox: Sandbox, tmp_path: Path, site: str
) -> None:
    sb = clean_sandbox
    raw = make_raw(tmp_path / "r.raw", virtual_size=MiB, data_bytes=MiB)
    copy_id = sb.destination.upload_image(raw, name="real-name", disk_format="raw")
    settings = settings_for(sb, tmp_path)
    destination_site = settings.site(site)
    assert isinstance(destination_site, OpenStackSite)
    migration = Migration(
        settings=settings,
        request=MigrationRequest(copy_id, site),
        site=destination_site,
        status=Lines(),
        source=SourceSite(settings, GlanceApi(settings.source), Lines()),
        destination=destination_for(destination_site, settings),
        workdir=tmp_path / "work",
        cancel=threading.Event(),
    )
    digests = Digests(size=MiB, md5=hashlib.md5(raw.read_bytes()).hexdigest())  # noqa: S324
    fields = {"name": "real-name", "disk_format": "raw"}
    assert migration.verify(copy_id, digests, fields).id == copy_id
    with pytest.raises(MetadataError, match="'name' reads back as 'real-name', not 'other'"):
        migration.verify(copy_id, digests, {**fields, "name": "other"})
    assert sb.destination.images() == []


@pytest.mark.parametrize(
    ("properties", "shows"),
    [
        ({"os_distro": "ubuntu", "note": "short"}, 0),
        ({"long": " ".join(["word"] * 30)}, 1),
        # a key over 80 columns wraps too, and its rest would read as the checksum's row
        ({"k" * 80 + "checksum": "0" * 32}, 1),
    ],
    ids=["short-values", "a-wrapped-value", "a-wrapped-key"],
)
def test_the_copy_is_checked_from_the_table_image_create_printed(
    clean_sandbox: Sandbox, tmp_path: Path, properties: dict[str, str], shows: int
) -> None:
    """``glance image-create`` reads the image back once its data are in, and prints it: the
    CLI is not started once more for ``image-show`` -- unless a value took more than one row
    of that 80-column table, which only a wide ``image-show`` shows exactly."""
    sb = clean_sandbox
    calls = "glance-calls.log"
    logged = sb.ssh.write_home_file(
        "logged-glance", f'#!/bin/sh\necho "$*" >> ~/{calls}\nexec glance "$@"\n', 0o755
    )
    sb.ssh.remove_home_path(calls)
    image_id = small_raw(sb, tmp_path, properties=properties)
    settings = settings_for(
        sb, tmp_path, **{"site-s": site_b_with(sb, f"REMOTE_GLANCE={logged}", "REMOTE_UPLOAD=cli")}
    )

    result = migrate_to_openstack(settings, MigrationRequest(image_id, "site-s"), Lines())

    copy = sb.destination.image(str(result.destination_image_id))
    assert all(copy[key] == value for key, value in properties.items())
    commands = (sb.ssh.home / calls).read_text().splitlines()
    creates = [c for c in commands if "image-create" in c and f"source_uuid={image_id}" in c]
    assert len(creates) == 1, commands
    after = commands[commands.index(creates[0]) + 1 :]
    assert [c for c in after if "image-show" in c] == [f"--os-image-api-version 2 image-show "
                                                       f"--max-column-width 1000000000 {copy['id']}"
                                                       ] * shows, commands  # fmt: skip


def test_the_helper_uploads_through_glances_api_and_reads_the_copy_back_itself(
    clean_sandbox: Sandbox, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """With ``REMOTE_UPLOAD=auto`` (the default) and the sandbox's token in ``~/.creds``, the
    helper creates the image and uploads its data through Glance's API: the CLI is started
    for neither, nor to read the copy back (the helper's JSON shows every value exactly)."""
    sb = clean_sandbox
    calls = "glance-calls.log"
    logged = sb.ssh.write_home_file(
        "logged-glance", f'#!/bin/sh\necho "$*" >> ~/{calls}\nexec glance "$@"\n', 0o755
    )
    sb.ssh.remove_home_path(calls)
    properties = {"long": " ".join(["word"] * 30), "k" * 80 + "checksum": "0" * 32}
    image_id = small_raw(sb, tmp_path, properties=properties)
    settings = settings_for(sb, tmp_path, **{"site-s": site_b_with(sb, f"REMOTE_GLANCE={logged}")})

    with caplog.at_level(logging.INFO, logger="migratio"):
        result = migrate_to_openstack(settings, MigrationRequest(image_id, "site-s"), Lines())

    copy = sb.destination.image(str(result.destination_image_id))
    assert copy["status"] == "active"
    assert all(copy[key] == value for key, value in properties.items())
    assert "the upload into Glance at site-s (via http) exited 0" in caplog.text
    log = sb.ssh.home / calls  # not there: the CLI was never started
    commands = log.read_text().splitlines() if log.exists() else []
    assert [c for c in commands if "image-create" in c and f"source_uuid={image_id}" in c] == []
    assert [c for c in commands if "image-show" in c] == [], commands
    # the lookups went through the helper too: the CLI never listed images
    assert [c for c in commands if "image-list" in c] == [], commands
    again = migrate_to_openstack(settings, MigrationRequest(image_id, "site-s"), Lines())
    assert again.outcome is Outcome.ALREADY_THERE
    assert again.destination_image_id == result.destination_image_id
    commands = log.read_text().splitlines() if log.exists() else []
    assert [c for c in commands if "image-list" in c or "image-show" in c] == [], commands


def created_table(**properties: str) -> tuple[str, dict[str, str]]:
    """What ``glance image-create`` prints for an image with ``properties`` (glanceclient's own
    table, 80 columns), and the fields migratio asked for."""
    fields = {"name": "n", "disk_format": "raw", "container_format": "bare", **properties}
    image = {
        **fields,
        "id": "0e2d1a8c-1d1f-4a5e-9a55-3c1e7a2b9f00",
        "status": "active",
        "size": 4194304,
        "checksum": "c3e7d1536aa7d81b256b589f3130c067",
        "os_hash_algo": "sha512",
        "os_hash_value": "d8" * 64,
        "min_disk": 0,
        "min_ram": 0,
        "owner": "4a1c0b6f2e7d4c3b9a8f1e2d3c4b5a69",
    }
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        glance_utils.print_image(image)
    return out.getvalue(), fields


def test_the_created_table_is_used_only_where_it_reads_back_exactly() -> None:
    """Values wrapped at 80 columns are joined back only when that gives them as they were."""
    cli = RemoteGlance.__new__(RemoteGlance)
    fine = {"source_hash": "sha512:" + "ab" * 64, "os_distro": "ubuntu", "a-b": "-".join("x" * 60)}
    printed, fields = created_table(**fine)
    record = cli.as_created(printed, fields)
    assert record is not None
    assert (record.checksum, record.size, record.status) == (
        "c3e7d1536aa7d81b256b589f3130c067",
        4194304,
        "active",
    )
    assert {key: record.properties[key] for key in fine} == fine

    for awkward in (
        " ".join(["word"] * 30),  # wrapping drops the spaces it breaks at
        "\x1b[31m" + "N" * 100,  # the wrapper repeats the escape sequence on each line
        "\x1b]8;;http://x\x07" + "L" * 120 + "\x1b]8;;\x07",
        "tab\tseparated" * 10,
    ):
        printed, fields = created_table(note=awkward)
        assert cli.as_created(printed, fields) is None, awkward
    printed, fields = created_table(**{"k" * 80 + "checksum": "0" * 32})
    assert cli.as_created(printed, fields) is None  # a wrapped key: its rest reads as a key


def test_keys_the_cli_table_cannot_show_are_refused_before_anything_is_sent() -> None:
    cli = RemoteGlance.__new__(RemoteGlance)
    cli.site = OpenStackSite(
        site_id="site-b", path=Path("site-b.conf"), register="ssh", ssh=None, api=None
    )
    cli.check_fields("img", {"name": "n", "pipe | key": "1", "中文": "2", "-x": "3"})
    for key, why in [
        ("k\x1b[15C", "control or escape character"),
        ("a\tb", "control or escape character"),
        ("中 | 文", "'|' and non-ASCII"),
        ("a=b", "contains '='"),
    ]:
        with pytest.raises(MetadataError, match=why) as caught:
            cli.check_fields("img", {key: "v"})
        assert "REGISTER=api" in str(caught.value)


def test_table_parsing_keeps_pipes_lines_and_wrapped_hashes() -> None:
    wide = (
        "+----------+-------------------+\n"
        "| Property | Value             |\n"
        "+----------+-------------------+\n"
        "| a | b    | x | y |           |\n"
        "| lines    | one               |\n"
        "|          | two               |\n"
        "| name     | -centos7-base     |\n"
        "+----------+-------------------+\n"
    )
    assert parse_table(wide, wrapped=False) == {
        "a | b": "x | y |",
        "lines": "one\ntwo",
        "name": "-centos7-base",
    }
    wrapped = (
        "+---------------+----------+\n"
        "| Property      | Value    |\n"
        "+---------------+----------+\n"
        "| os_hash_value | 0123abcd |\n"
        "|               | ef45     |\n"
        "+---------------+----------+\n"
    )
    assert parse_table(wrapped) == {"os_hash_value": "0123abcdef45"}


# --- formats --------------------------------------------------------------------------------


def make_vhd(tmp_path: Path) -> tuple[Path, Path]:
    """A vhd (qemu's vpc) image and what ``qemu-img convert`` makes of it as raw."""
    raw = make_raw(tmp_path / "disk.raw", virtual_size=48 * MiB, data_bytes=6 * MiB, seed=7)
    vhd = tmp_path / "disk.vhd"
    subprocess.run(
        ["qemu-img", "convert", "-f", "raw", "-O", "vpc", str(raw), str(vhd)], check=True
    )
    expected = tmp_path / "expected.raw"
    subprocess.run(
        ["qemu-img", "convert", "-f", "vpc", "-O", "raw", str(vhd), str(expected)], check=True
    )
    return vhd, expected


@pytest.mark.parametrize("site", ["site-raw", "site-raw-api"])
def test_vhd_is_converted_to_raw(clean_sandbox: Sandbox, tmp_path: Path, site: str) -> None:
    sb = clean_sandbox
    vhd, expected = make_vhd(tmp_path)
    image_id = sb.source.upload_image(vhd, name="windows-vhd", disk_format="vhd")
    api = (sb.sites_dir / "site-b-api.conf").read_text()
    settings = settings_for(
        sb,
        tmp_path,
        **{
            "site-raw": site_b_with(sb, "export DISK_FORMAT=raw"),
            "site-raw-api": api + "export DISK_FORMAT=raw\n",
        },
    )
    lines = Lines()
    result = migrate_to_openstack(settings, MigrationRequest(image_id, site), lines)
    assert any(line.startswith("Converted vhd to raw") for line in lines)
    arrived = sb.destination.download_to(str(result.destination_image_id), tmp_path / "got.raw")
    assert sha256_file(arrived) == sha256_file(expected)
    assert sb.destination.image(str(result.destination_image_id))["disk_format"] == "raw"


def test_vhd_to_amazon(clean_sandbox: Sandbox, moto: MotoServer, tmp_path: Path) -> None:
    sb = clean_sandbox
    vhd, expected = make_vhd(tmp_path)
    image_id = sb.source.upload_image(vhd, name="windows-vhd", disk_format="vhd")
    settings = settings_for(sb, tmp_path, **{AMAZON: moto.site_conf()})
    result = migrate_to_amazon(settings, MigrationRequest(image_id, AMAZON), Lines())
    assert result.outcome is Outcome.MIGRATED
    ec2, ebs = moto.client("ec2"), moto.client("ebs")
    [snapshot] = ec2.describe_snapshots(
        OwnerIds=["self"], Filters=[{"Name": "tag:source_uuid", "Values": [image_id]}]
    )["Snapshots"]
    snapshot_id = snapshot["SnapshotId"]
    raw = expected.read_bytes()
    listed = ebs.list_snapshot_blocks(SnapshotId=snapshot_id)["Blocks"]
    got = bytearray(len(raw))
    for block in listed:
        data = ebs.get_snapshot_block(
            SnapshotId=snapshot_id, BlockIndex=block["BlockIndex"], BlockToken=block["BlockToken"]
        )["BlockData"].read()
        start = block["BlockIndex"] * len(data)
        got[start : start + len(data)] = data[: max(0, len(raw) - start)]
    assert listed and bytes(got) == raw


def test_a_format_qemu_img_cannot_read_is_refused_before_any_work(
    clean_sandbox: Sandbox, tmp_path: Path
) -> None:
    sb = clean_sandbox
    image_id = small_raw(sb, tmp_path, disk_format="aki", container_format="aki")
    settings = settings_for(sb, tmp_path, **{"site-raw": site_b_with(sb, "export DISK_FORMAT=raw")})
    lines = Lines()
    with pytest.raises(ConversionError, match="cannot convert a 'aki' image"):
        migrate_to_openstack(settings, MigrationRequest(image_id, "site-raw"), lines)
    assert lines[-1].startswith(status.NOT_CONVERTED)
    assert len(lines) == 2  # started, refused: nothing downloaded, nothing sent
    assert sb.destination.images() == []


def test_the_format_mapping() -> None:
    assert QEMU_DRIVERS["vhd"] == "vpc"
    assert QEMU_DRIVERS["ploop"] == "parallels"
    assert QEMU_DRIVERS["iso"] == "raw"
    check_convertible("iso", "qcow2")
    with pytest.raises(ConversionError, match="cannot convert to 'iso'"):
        check_convertible("raw", "iso")
    assert "iso" not in WRITABLE


# --- Glance's HTTP errors -------------------------------------------------------------------


class _StatusHandler(http.server.BaseHTTPRequestHandler):
    """Answers every request with the status the test put in the server."""

    def do_GET(self) -> None:
        code = self.server.status  # type: ignore[attr-defined]
        body = f"<html><body><h1>{code} Whatever</h1>Try again later</body></html>".encode()
        self.send_response(code)
        self.send_header("Content-Type", "text/html")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *_args: object) -> None:
        pass


@pytest.fixture(scope="module")
def status_server() -> Iterator[http.server.HTTPServer]:
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _StatusHandler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield server
    server.shutdown()
    server.server_close()


@pytest.mark.parametrize(
    ("code", "retryable"),
    [
        (400, False), (401, False), (403, False), (404, False), (409, False), (410, False),
        (413, False), (418, False), (408, True), (429, True), (500, True), (502, True),
        (503, True), (504, True), (507, True),
    ],
)  # fmt: skip
def test_every_http_status_is_a_glance_error_with_the_right_retryability(
    status_server: http.server.HTTPServer, code: int, retryable: bool
) -> None:
    status_server.status = code  # type: ignore[attr-defined]
    url = f"http://127.0.0.1:{status_server.server_address[1]}"
    api = GlanceApi(
        OpenStackCredentials.from_vars({"OS_AUTH_TOKEN": "t", "OS_IMAGE_URL": url}, "test"),
        timeout=10,
    )
    with pytest.raises(GlanceError) as caught:
        api.ping()
    assert caught.value.retryable is retryable
    assert str(code) in caught.value.message
