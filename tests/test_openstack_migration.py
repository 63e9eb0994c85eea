"""OpenStack → OpenStack end to end: two real Glance servers, a real sshd, rsync and qemu-img."""

from __future__ import annotations

import http.server
import os
import subprocess
import threading
import time
from pathlib import Path
from typing import Any

import pytest
from tests.sandbox.images import make_qcow2, make_qcow2_with_backing, make_raw, sha256_file
from tests.sandbox.site import Sandbox, api_site_conf
from tests.support import Lines, descendants, settings_for

from migratio.adapters.glance_api import GlanceApi
from migratio.cli import main
from migratio.config import OpenStackSite
from migratio.errors import (
    Cancelled,
    GlanceError,
    ImageRefusedError,
    MigratioError,
    RemoteError,
    UnknownSiteError,
    VerificationError,
)
from migratio.hashing import Digests, file_digests
from migratio.openstack.migration import migrate_to_openstack
from migratio.request import MigrationRequest, Outcome

HOSTILE_NAME = 'x"; touch /tmp/pwned; "'
MiB = 1024 * 1024


def site_b_with(sandbox: Sandbox, *lines: str) -> str:
    return (sandbox.sites_dir / "site-b.conf").read_text() + "".join(f"{x}\n" for x in lines)


def upload_source(sandbox: Sandbox, tmp_path: Path, **kwargs: object) -> tuple[str, Path]:
    image = make_qcow2(tmp_path / "source.qcow2", virtual_size=64 * MiB, data_bytes=8 * MiB)
    params: dict[str, object] = {"name": "ubuntu-template", "disk_format": "qcow2"}
    params.update(kwargs)
    image_id = sandbox.source.upload_image(image, **params)  # type: ignore[arg-type]
    return image_id, image


def copies_at_destination(sandbox: Sandbox, image_id: str) -> list[dict[str, object]]:
    return sandbox.destination.find_by_property("source_uuid", image_id)


@pytest.mark.parametrize("site", ["site-b", "site-b-api"])
def test_happy_path_bytes_and_properties(clean_sandbox: Sandbox, tmp_path: Path, site: str) -> None:
    sb = clean_sandbox
    image_id, image = upload_source(
        sb,
        tmp_path,
        min_disk=3,
        min_ram=512,
        properties={"architecture": "x86_64", "os_distro": "ubuntu", "source_t": "stale"},
    )
    lines = Lines()
    result = migrate_to_openstack(
        settings_for(sb, tmp_path), MigrationRequest(image_id, site), lines
    )

    assert result.outcome is Outcome.MIGRATED
    [copy] = copies_at_destination(sb, image_id)
    assert copy["id"] == result.destination_image_id
    assert copy["status"] == "active"
    assert copy["name"] == "ubuntu-template"
    assert (copy["disk_format"], copy["container_format"]) == ("qcow2", "bare")
    assert (copy["min_disk"], copy["min_ram"]) == (3, 512)
    assert copy["architecture"] == "x86_64"
    assert copy["os_distro"] == "ubuntu"
    assert (copy["source_uuid"], copy["source_cs"], copy["source_t"]) == (
        image_id,
        "site-a",
        "site-a",
    )
    download = tmp_path / "arrived"
    sb.destination.download_to(str(copy["id"]), download)
    assert sha256_file(download) == sha256_file(image)
    assert lines[0].startswith("Migration started")
    texts = [line.split(" ")[0].rstrip(":") for line in lines]
    assert texts.index("Transfered") < texts.index("Registered")
    assert lines[-1].startswith("Registered")
    # staging is cleaned up here and there
    assert not any((tmp_path / "staging").glob("*/*"))
    if site == "site-b":
        staging = sb.ssh.home / ".migratio-staging"
        assert staging.is_dir()
        assert list(staging.iterdir()) == []


def test_already_migrated_is_skipped(clean_sandbox: Sandbox, tmp_path: Path) -> None:
    sb = clean_sandbox
    image_id, _ = upload_source(sb, tmp_path)
    settings = settings_for(sb, tmp_path)
    migrate_to_openstack(settings, MigrationRequest(image_id, "site-b"), Lines())
    lines = Lines()
    result = migrate_to_openstack(settings, MigrationRequest(image_id, "site-b-api"), lines)
    assert result.outcome is Outcome.ALREADY_THERE
    assert lines[-1].startswith("Requested image was uploaded.")
    assert len(copies_at_destination(sb, image_id)) == 1


def logins(sandbox: Sandbox) -> int:
    """SSH logins the destination's sshd has accepted so far."""
    return sandbox.ssh.log_path.read_text(errors="replace").count("Accepted publickey")


def test_over_ssh_lookups_share_one_login_and_a_found_copy_stops_the_transfer(
    clean_sandbox: Sandbox, tmp_path: Path
) -> None:
    sb = clean_sandbox
    image_id, _ = upload_source(sb, tmp_path)
    settings = settings_for(sb, tmp_path)
    before = logins(sb)
    migrate_to_openstack(settings, MigrationRequest(image_id, "site-b"), Lines())
    # every glance command (lookup, owner probe, upload, read-back) and the rsync through
    # one master connection (without the master: one login per command)
    assert logins(sb) - before == 1

    # once more: the transfer starts at once, the lookup finds the copy, the transfer stops
    lines = Lines()
    result = migrate_to_openstack(settings, MigrationRequest(image_id, "site-b"), lines)
    assert result.outcome is Outcome.ALREADY_THERE
    assert len(copies_at_destination(sb, image_id)) == 1
    assert not list((sb.ssh.home / ".migratio-staging").glob(f"{image_id}-*")), "parts left"
    assert not list((tmp_path / "staging").glob(f"{image_id}-*")), "local work left"


def command_of(pid: int) -> list[str]:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().decode().split("\0")
    except OSError:
        return [""]


def test_missing_image_fails_with_the_original_text(
    clean_sandbox: Sandbox, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    settings = settings_for(clean_sandbox, tmp_path)
    missing = "6f3c9a0e-1111-2222-3333-444455556666"
    code = main(["migrate", "--config", str(settings.config_path), missing, "site-b"])
    out = capsys.readouterr().out.splitlines()
    assert code == 1
    assert out[-1] == f"Requested image not exist. image {missing} is not on site site-a"
    code = main(["migrate", "--config", str(settings.config_path), "not-a-uuid", "site-b"])
    assert code == 1
    assert capsys.readouterr().out.startswith("Requested image not exist. 'not-a-uuid' is not")
    # the ssh master started while the source was asked is gone
    ssh = [pid for pid in descendants(os.getpid()) if Path(command_of(pid)[0]).name == "ssh"]
    assert ssh == []


def test_conversion_to_raw(clean_sandbox: Sandbox, tmp_path: Path) -> None:
    sb = clean_sandbox
    image_id, image = upload_source(sb, tmp_path)
    settings = settings_for(sb, tmp_path, **{"site-raw": site_b_with(sb, "export DISK_FORMAT=raw")})
    lines = Lines()
    migrate_to_openstack(settings, MigrationRequest(image_id, "site-raw"), lines)
    [copy] = copies_at_destination(sb, image_id)
    assert copy["disk_format"] == "raw"
    assert copy["size"] == 64 * MiB
    arrived = tmp_path / "arrived.raw"
    sb.destination.download_to(str(copy["id"]), arrived)
    same = subprocess.run(
        ["qemu-img", "compare", "-f", "qcow2", "-F", "raw", str(image), str(arrived)], check=False
    )
    assert same.returncode == 0
    assert any(line.startswith("Converted qcow2 to raw") for line in lines)
    # a second run recognises the converted copy
    again = migrate_to_openstack(settings, MigrationRequest(image_id, "site-raw"), Lines())
    assert again.outcome is Outcome.ALREADY_THERE


@pytest.mark.parametrize("staged", ["conversion", "download"])
def test_a_staged_file_goes_to_the_api_as_it_is(
    clean_sandbox: Sandbox, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, staged: str
) -> None:
    """REGISTER=api: the cache's conversion (DISK_FORMAT=raw), or its download (the file store
    not readable), goes unhashed (upload_file), and arrives intact."""
    sb = clean_sandbox
    image = make_qcow2(tmp_path / "source.qcow2", virtual_size=64 * MiB, data_bytes=24 * MiB)
    image_id = sb.source.upload_image(image, name="staged", disk_format="qcow2")
    creds = tmp_path / "creds"
    creds.write_text(
        sb.creds_path.read_text().replace(str(sb.source.images_dir), str(tmp_path / "no-store"))
    )
    creds.chmod(0o600)
    conf = sb.site_api_conf.read_text()
    if staged == "conversion":
        conf += "export DISK_FORMAT=raw\n"
    settings = settings_for(
        sb, tmp_path, yaml=f"credentials_file: {creds}\n", **{"site-staged": conf}
    )

    def hashed_upload(*_args: object, **_kwargs: object) -> None:
        raise AssertionError("the staged file was hashed again on the way")

    monkeypatch.setattr(GlanceApi, "upload", hashed_upload)
    result = migrate_to_openstack(settings, MigrationRequest(image_id, "site-staged"), Lines())

    assert result.outcome is Outcome.MIGRATED
    [copy] = copies_at_destination(sb, image_id)
    arrived = tmp_path / "arrived"
    sb.destination.download_to(str(copy["id"]), arrived)
    if staged == "conversion":
        assert (copy["status"], copy["disk_format"], copy["size"]) == ("active", "raw", 64 * MiB)
        same = subprocess.run(
            ["qemu-img", "compare", "-f", "qcow2", "-F", "raw", str(image), str(arrived)],
            check=False,
        )
        assert same.returncode == 0
        assert str(copy["converted_hash"]) == f"size:{64 * MiB} md5:{copy['checksum']}"
    else:
        assert (copy["status"], copy["disk_format"]) == ("active", "qcow2")
        assert sha256_file(arrived) == sha256_file(image)
    again = migrate_to_openstack(settings, MigrationRequest(image_id, "site-staged"), Lines())
    assert again.outcome is Outcome.ALREADY_THERE


@pytest.mark.parametrize("staged", [False, True])
def test_an_api_upload_stops_on_request_and_leaves_no_copy(
    clean_sandbox: Sandbox, tmp_path: Path, staged: bool
) -> None:
    """REGISTER=api, stopped mid-upload (SIGTERM to ``migratio migrate``: its cancel event):
    the rest is not sent, the unfinished record is deleted, and the next run makes the copy.
    Bytes from the file store go the hashed way; a conversion of the cache goes unhashed."""
    sb = clean_sandbox
    image = make_qcow2(tmp_path / "source.qcow2", virtual_size=96 * MiB, data_bytes=64 * MiB)
    image_id = sb.source.upload_image(image, name="stopped", disk_format="qcow2")
    conf = sb.site_api_conf.read_text() + ("export DISK_FORMAT=raw\n" if staged else "")
    yaml = "progress_interval: 0.001\n"
    settings = settings_for(sb, tmp_path, yaml=yaml, **{"site-staged": conf})
    cancel = threading.Event()
    lines = Lines()

    def sink(text: str) -> None:
        lines(text)
        if text.startswith("Uploading:"):
            cancel.set()

    request = MigrationRequest(image_id, "site-staged")
    with pytest.raises(Cancelled):
        migrate_to_openstack(settings, request, sink, cancel=cancel)

    uploading = [line for line in lines if line.startswith("Uploading:")]
    assert len(uploading) == 1, lines  # nothing after the stop
    assert not any(line.startswith("Transfered") for line in lines)
    assert copies_at_destination(sb, image_id) == []
    assert migrate_to_openstack(settings, request, Lines()).outcome is Outcome.MIGRATED
    [copy] = copies_at_destination(sb, image_id)
    assert copy["status"] == "active"


def test_a_staged_file_changed_behind_our_back_is_made_again(
    clean_sandbox: Sandbox, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A conversion in the cache rewritten after it was made (the same size, its modification
    time set back as ``touch -d`` would) is not sent unhashed: it is made again, and no copy
    of the wrong bytes is ever active at the destination, not even until the check after."""
    sb = clean_sandbox
    image = make_qcow2(tmp_path / "source.qcow2", virtual_size=32 * MiB, data_bytes=16 * MiB)
    image_id = sb.source.upload_image(image, name="rewritten", disk_format="qcow2")
    conf = sb.site_api_conf.read_text() + "export DISK_FORMAT=raw\n"
    settings = settings_for(sb, tmp_path, **{"site-staged": conf})
    request = MigrationRequest(image_id, "site-staged")
    assert migrate_to_openstack(settings, request, Lines()).outcome is Outcome.MIGRATED
    [first] = copies_at_destination(sb, image_id)
    sb.destination.delete_all()
    [staged] = (tmp_path / "staging" / "cache").glob("*.raw")
    made = staged.stat()
    with staged.open("r+b") as out:  # bit rot, or a hand: other bytes, the same size
        out.seek(8 * MiB)
        out.write(b"\xa5" * 4096)
    os.utime(staged, ns=(made.st_atime_ns, made.st_mtime_ns))
    seen: list[tuple[str, object]] = []
    get = GlanceApi.get

    def watched_get(api: GlanceApi, image_id: str) -> object:
        copy = get(api, image_id)
        if copy is not None and copy.id != request.image_id:  # the copy, not the source
            seen.append((copy.status, copy.checksum))
        return copy

    monkeypatch.setattr(GlanceApi, "get", watched_get)
    again = migrate_to_openstack(settings, request, Lines())

    assert [checksum for status, checksum in seen if status == "active"] == [first["checksum"]]
    assert again.outcome is Outcome.MIGRATED
    [copy] = copies_at_destination(sb, image_id)
    assert (copy["status"], copy["checksum"]) == ("active", first["checksum"])


def test_a_staged_file_rewritten_while_it_is_sent_is_cut_before_its_last_byte(
    clean_sandbox: Sandbox, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The conversion is rewritten in the cache while it goes to Glance unhashed: the upload
    is cut before its last byte (no copy of those bytes is ever active), the failure says why,
    and the next attempt makes the conversion again and succeeds."""
    sb = clean_sandbox
    image = make_qcow2(tmp_path / "source.qcow2", virtual_size=32 * MiB, data_bytes=16 * MiB)
    image_id = sb.source.upload_image(image, name="rewritten", disk_format="qcow2")
    conf = sb.site_api_conf.read_text() + "export DISK_FORMAT=raw\n"
    settings = settings_for(sb, tmp_path, **{"site-staged": conf})
    request = MigrationRequest(image_id, "site-staged")
    seen: list[tuple[str, object]] = []
    get, upload_file = GlanceApi.get, GlanceApi.upload_file

    def watched_get(api: GlanceApi, image_id: str) -> object:
        copy = get(api, image_id)
        if copy is not None and copy.id != request.image_id:  # the copy, not the source
            seen.append((copy.status, copy.checksum))
        return copy

    def rewritten_on_the_way(
        api: GlanceApi, image_id: str, path: Path, known: Digests, on_progress: Any, **kw: Any
    ) -> None:
        def progress(done: int) -> None:
            if done < 24 * MiB and not seen_rewrite:
                with path.open("r+b") as out:  # bytes not sent yet
                    out.seek(28 * MiB)
                    out.write(b"\xa5" * 4096)
                seen_rewrite.append(done)
            on_progress(done)

        upload_file(api, image_id, path, known, progress, **kw)

    seen_rewrite: list[int] = []
    monkeypatch.setattr(GlanceApi, "get", watched_get)
    monkeypatch.setattr(GlanceApi, "upload_file", rewritten_on_the_way)
    with pytest.raises(VerificationError, match="was changed while it was being sent"):
        migrate_to_openstack(settings, request, Lines())

    assert seen_rewrite and not [status for status, _ in seen if status == "active"]
    assert copies_at_destination(sb, image_id) == []
    monkeypatch.setattr(GlanceApi, "upload_file", upload_file)
    again = migrate_to_openstack(settings, request, Lines())
    assert again.outcome is Outcome.MIGRATED
    [copy] = copies_at_destination(sb, image_id)
    arrived = tmp_path / "arrived"
    sb.destination.download_to(str(copy["id"]), arrived)
    same = subprocess.run(
        ["qemu-img", "compare", "-f", "qcow2", "-F", "raw", str(image), str(arrived)], check=False
    )
    assert (copy["status"], same.returncode) == ("active", 0)


def test_a_staged_file_cut_short_or_of_the_wrong_size_never_becomes_active(
    clean_sandbox: Sandbox, tmp_path: Path
) -> None:
    sb = clean_sandbox
    raw = make_raw(tmp_path / "disk.raw", virtual_size=48 * MiB, data_bytes=48 * MiB)
    known = Digests(size=raw.stat().st_size, md5=file_digests(raw)["md5"])
    site = settings_for(sb, tmp_path).site("site-b-api")
    assert isinstance(site, OpenStackSite) and site.api is not None
    api = GlanceApi(site.api)
    fields = {"name": "cut", "disk_format": "raw", "container_format": "bare"}

    cut = api.create(fields)

    def stop_after_the_first_piece(done: int) -> None:
        if done < known.size:
            raise Cancelled("stopped mid-upload")

    with pytest.raises(Cancelled):
        api.upload_file(cut.id, raw, known, stop_after_the_first_piece)
    wrong = api.create(fields)
    with pytest.raises(VerificationError, match="not the 50331649 its digests were made of"):
        api.upload_file(wrong.id, raw, Digests(size=known.size + 1, md5=known.md5))

    deadline = time.monotonic() + 20
    while sb.destination.image(cut.id)["status"] == "saving" and time.monotonic() < deadline:
        time.sleep(0.2)  # Glance notices the cut connection when its read fails
    assert sb.destination.image(cut.id)["status"] == "queued"
    assert sb.destination.image(wrong.id)["status"] == "queued"
    whole = api.create(fields)  # the same file, not cut: active with Glance's own md5 equal
    api.upload_file(whole.id, raw, known)
    assert (sb.destination.image(whole.id)["status"], api.get(whole.id).checksum) == (  # type: ignore[union-attr]
        "active",
        known.md5,
    )


def test_upload_file_fails_with_glances_words(clean_sandbox: Sandbox, tmp_path: Path) -> None:
    """An error status reads as it does through glanceclient (the hashed upload's)."""
    sb = clean_sandbox
    raw = make_raw(tmp_path / "disk.raw", virtual_size=1 * MiB, data_bytes=1 * MiB)
    known = Digests(size=raw.stat().st_size, md5=file_digests(raw)["md5"])
    site = settings_for(sb, tmp_path).site("site-b-api")
    assert isinstance(site, OpenStackSite) and site.api is not None
    api = GlanceApi(site.api)
    missing = "00000000-0000-4000-8000-000000000000"
    with pytest.raises(GlanceError) as direct:
        api.upload_file(missing, raw, known)
    with pytest.raises(GlanceError) as hashed, raw.open("rb") as stream:
        api.upload(missing, stream, known)
    assert str(direct.value) == str(hashed.value)
    assert "HTTP 404" in str(direct.value) and not direct.value.retryable


def test_upload_file_refused_token_is_a_clear_401(clean_sandbox: Sandbox, tmp_path: Path) -> None:
    """A Glance (its auth middleware) that refuses the token of the unhashed upload: a fixed
    token cannot be renewed, so the upload fails with the 401, for good, and says so (before,
    it returned as if the upload had been made)."""
    sb = clean_sandbox
    raw = make_raw(tmp_path / "disk.raw", virtual_size=1 * MiB, data_bytes=1 * MiB)
    known = Digests(size=raw.stat().st_size, md5=file_digests(raw)["md5"])
    puts: list[str] = []

    class Refusing(http.server.BaseHTTPRequestHandler):
        def do_PUT(self) -> None:  # answered before the body, as keystonemiddleware does
            puts.append(self.path)
            body = b'{"error": {"code": 401, "title": "Unauthorized", "message": "The request '
            body += b'you have made requires authentication."}}'
            self.send_response(401)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.send_header("Connection", "close")
            self.end_headers()
            self.wfile.write(body)
            self.close_connection = True

        def log_message(self, *_args: object) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Refusing)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        url = f"http://127.0.0.1:{server.server_address[1]}"
        settings = settings_for(sb, tmp_path, **{"site-refusing": api_site_conf(url)})
        site = settings.site("site-refusing")
        assert isinstance(site, OpenStackSite) and site.api is not None
        with pytest.raises(GlanceError) as refused:
            GlanceApi(site.api).upload_file("0" * 8 + "-0000-4000-8000-" + "0" * 12, raw, known)
    finally:
        server.shutdown()
        server.server_close()
    message = str(refused.value)
    assert "HTTP 401" in message and "requires authentication" in message, message
    assert not refused.value.retryable and site.api.token not in message
    assert len(puts) == 1  # a fixed token is not sent twice


@pytest.mark.parametrize("site", ["site-b", "site-b-api"])
def test_hostile_name_is_registered_verbatim_and_nothing_runs(
    clean_sandbox: Sandbox, tmp_path: Path, site: str
) -> None:
    sb = clean_sandbox
    pwned = Path("/tmp/pwned")
    pwned.unlink(missing_ok=True)
    image_id, _ = upload_source(
        sb, tmp_path, name=HOSTILE_NAME, properties={"note": "$(touch /tmp/pwned) `id` ; rm -rf ~"}
    )
    migrate_to_openstack(settings_for(sb, tmp_path), MigrationRequest(image_id, site), Lines())
    [copy] = copies_at_destination(sb, image_id)
    assert copy["name"] == HOSTILE_NAME
    assert copy["note"] == "$(touch /tmp/pwned) `id` ; rm -rf ~"
    assert not pwned.exists()


def test_qcow2_with_backing_file_is_refused(clean_sandbox: Sandbox, tmp_path: Path) -> None:
    sb = clean_sandbox
    backing = make_raw(tmp_path / "backing.raw", virtual_size=MiB, data_bytes=MiB)
    evil = make_qcow2_with_backing(tmp_path / "evil.qcow2", backing)
    # a non-bare container skips Glance's own upload inspection, as older Glances did
    image_id = sb.source.upload_image(
        evil, name="evil", disk_format="qcow2", container_format="ovf"
    )
    lines = Lines()
    with pytest.raises(ImageRefusedError, match="backing_file: Image has a backing file"):
        migrate_to_openstack(
            settings_for(sb, tmp_path), MigrationRequest(image_id, "site-b"), lines
        )
    assert lines[-1].startswith("Requested image not exist.")
    assert copies_at_destination(sb, image_id) == []


def test_format_mismatch_is_refused(clean_sandbox: Sandbox, tmp_path: Path) -> None:
    sb = clean_sandbox
    raw = make_raw(tmp_path / "disk.raw", virtual_size=4 * MiB, data_bytes=MiB)
    image_id = sb.source.upload_image(raw, name="liar", disk_format="qcow2", container_format="ovf")
    with pytest.raises(ImageRefusedError, match="Glance says the image is 'qcow2' but its bytes"):
        migrate_to_openstack(
            settings_for(sb, tmp_path), MigrationRequest(image_id, "site-b"), Lines()
        )
    assert copies_at_destination(sb, image_id) == []


@pytest.mark.parametrize("site_id", ["../site-b", "..", "site-b/../site-b"])
def test_path_like_site_id_is_refused(
    clean_sandbox: Sandbox, tmp_path: Path, site_id: str, capsys: pytest.CaptureFixture[str]
) -> None:
    sb = clean_sandbox
    image_id, _ = upload_source(sb, tmp_path)
    settings = settings_for(sb, tmp_path)
    with pytest.raises(UnknownSiteError, match="not a plain site name"):
        migrate_to_openstack(settings, MigrationRequest(image_id, site_id), Lines())
    code = main(["migrate", "--config", str(settings.config_path), image_id, site_id])
    assert code == 78
    assert "not a plain site name" in capsys.readouterr().out


def test_interrupted_transfer_resumes(clean_sandbox: Sandbox, tmp_path: Path) -> None:
    sb = clean_sandbox
    image = make_qcow2(tmp_path / "big.qcow2", virtual_size=1024 * MiB, data_bytes=400 * MiB)
    image_id = sb.source.upload_image(image, name="big", disk_format="qcow2")
    # one file (STREAMS=auto may send pieces on a loaded machine: their resume is tested with
    # the killed transfers)
    settings = settings_for(sb, tmp_path, **{"site-one": site_b_with(sb, "export STREAMS=1")})
    staging = sb.ssh.home / ".migratio-staging"
    cancel = threading.Event()
    returned = threading.Event()

    def cancel_midway() -> None:  # however slow a loaded machine is to start the transfer
        while not (cancel.is_set() or returned.is_set()):
            parts = list(staging.glob(f"{image_id}-*.part")) if staging.exists() else []
            if parts and parts[0].stat().st_size > 100 * MiB:
                cancel.set()
            time.sleep(0.02)

    watcher = threading.Thread(target=cancel_midway)
    watcher.start()
    try:
        with pytest.raises(Cancelled):
            migrate_to_openstack(
                settings, MigrationRequest(image_id, "site-one"), Lines(), cancel=cancel
            )
    finally:
        returned.set()
        watcher.join()
    [part] = staging.glob(f"{image_id}-*.part")
    kept = part.stat().st_size
    assert 0 < kept < image.stat().st_size
    assert [c for c in copies_at_destination(sb, image_id) if c["status"] == "active"] == []

    result = migrate_to_openstack(settings, MigrationRequest(image_id, "site-one"), Lines())
    assert result.outcome is Outcome.MIGRATED
    # only what was missing crossed the wire the second time
    assert result.bytes_sent < image.stat().st_size - kept // 2
    [copy] = copies_at_destination(sb, image_id)
    arrived = tmp_path / "arrived"
    sb.destination.download_to(str(copy["id"]), arrived)
    assert sha256_file(arrived) == sha256_file(image)
    assert not part.exists()


def test_unknown_host_key_is_refused(clean_sandbox: Sandbox, tmp_path: Path) -> None:
    sb = clean_sandbox
    wrong = sb.ssh.wrong_known_hosts(tmp_path / "known_hosts")
    conf = site_b_with(sb, f"export SSH_KNOWN_HOSTS={wrong}")
    image_id, _ = upload_source(sb, tmp_path)
    settings = settings_for(sb, tmp_path, **{"site-evil": conf})
    lines = Lines()
    with pytest.raises(RemoteError, match=r"Host key verification failed"):
        migrate_to_openstack(settings, MigrationRequest(image_id, "site-evil"), lines)
    assert lines[-1].startswith("Error: ")
    assert copies_at_destination(sb, image_id) == []


def test_check_reports_a_broken_destination_precisely(
    clean_sandbox: Sandbox, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    sb = clean_sandbox
    settings = settings_for(
        sb,
        tmp_path,
        **{
            "site-noglance": site_b_with(sb, "export REMOTE_GLANCE=/nonexistent/glance"),
            "site-hostkey": site_b_with(
                sb, f"export SSH_KNOWN_HOSTS={sb.ssh.wrong_known_hosts(tmp_path / 'kh')}"
            ),
        },
    )
    config = str(settings.config_path)
    assert main(["check", "--config", config, "site-b", "site-b-api"]) == 0
    good = capsys.readouterr().out
    assert "FAILED" not in good
    assert f"site site-b SSH login: {sb.ssh.destination} port {sb.ssh.port}" in good
    assert main(["check", "--config", config, "site-noglance"]) == 1
    out = capsys.readouterr().out
    [line] = [x for x in out.splitlines() if x.startswith("FAILED")]
    assert "remote glance CLI" in line and "/nonexistent/glance" in line
    assert main(["check", "--config", config, "site-hostkey"]) == 1
    out = capsys.readouterr().out
    [line] = [x for x in out.splitlines() if x.startswith("FAILED")]
    assert "SSH login" in line and "Host key verification failed" in line


def test_every_failure_is_a_migratio_error_with_a_status_line(
    clean_sandbox: Sandbox, tmp_path: Path
) -> None:
    settings = settings_for(clean_sandbox, tmp_path)
    lines = Lines()
    with pytest.raises(MigratioError):
        migrate_to_openstack(
            settings, MigrationRequest("6f3c9a0e-1111-2222-3333-444455556666", "nowhere"), lines
        )
    assert lines == [
        "Error: unknown destination site 'nowhere': there is no "
        f"{settings.sites_dir / 'nowhere.conf'}"
    ]
