"""Quick checks that the sandbox's real services work (no migratio involved)."""

from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from tests.sandbox.glance_server import GlanceServer
from tests.sandbox.images import make_qcow2, qemu_img_info, sha256_file
from tests.sandbox.site import Sandbox
from tests.sandbox.ssh_server import SshServer, SshServerError


def test_qcow2_round_trips_through_source_glance(clean_sandbox: Sandbox, tmp_path: Path) -> None:
    image = make_qcow2(tmp_path / "disk.qcow2", virtual_size=64 << 20, data_bytes=3 << 20, seed=7)
    assert qemu_img_info(image)["format"] == "qcow2"
    source = clean_sandbox.source

    image_id = source.upload_image(
        image, name="round-trip", disk_format="qcow2", properties={"sandbox_tag": "rt"}
    )

    meta = source.image(image_id)
    assert meta["status"] == "active"
    assert meta["size"] == image.stat().st_size
    assert source.image_bytes(image_id) == image.read_bytes()
    assert sha256_file(source.images_dir / image_id) == sha256_file(image)
    assert [m["id"] for m in source.find_by_property("sandbox_tag", "rt")] == [image_id]
    assert source.find_by_property("sandbox_tag", "other") == []
    assert sha256_file(source.download_to(image_id, tmp_path / "back")) == sha256_file(image)


def test_uploads_at_once_all_succeed(clean_sandbox: Sandbox, tmp_path: Path) -> None:
    """Glance's sqlite takes uploads at once without "database is locked" 500s."""
    image = make_qcow2(tmp_path / "d.qcow2", virtual_size=8 << 20, data_bytes=1 << 20)
    for glance in (clean_sandbox.source, clean_sandbox.destination):

        def upload(n: int, glance: GlanceServer = glance) -> str:
            return glance.upload_image(image, name=f"at-once-{n}", disk_format="qcow2")

        with ThreadPoolExecutor(8) as pool:
            ids = list(pool.map(upload, range(24)))
        assert len(set(ids)) == 24
        assert {m["status"] for m in glance.images()} == {"active"}
        assert "database is locked" not in glance.log_path.read_text(errors="replace")


def test_remote_user_can_run_glance_cli(clean_sandbox: Sandbox, tmp_path: Path) -> None:
    image = make_qcow2(tmp_path / "d.qcow2", virtual_size=8 << 20, data_bytes=1 << 20)
    clean_sandbox.destination.upload_image(image, name="visible-remotely", disk_format="qcow2")

    result = clean_sandbox.ssh.run_as_user(". ~/.creds && glance image-list")

    assert result.returncode == 0, result.stderr
    assert "visible-remotely" in result.stdout


def test_remote_user_can_register_with_glance_cli(clean_sandbox: Sandbox, tmp_path: Path) -> None:
    ssh = clean_sandbox.ssh
    image = make_qcow2(tmp_path / "r.qcow2", virtual_size=8 << 20, data_bytes=1 << 20, seed=3)
    remote = ssh.home / ".migratio-staging" / "r.qcow2"
    ssh.write_home_file(".migratio-staging/.keep", "")
    result = ssh.run_as_user(["test", "-d", str(remote.parent)])
    assert result.returncode == 0, result.stderr
    upload = [
        "rsync", "-e", " ".join(ssh.ssh_argv()), str(image), f"{ssh.destination}:{remote}",
    ]  # fmt: skip
    import subprocess  # noqa: PLC0415

    subprocess.run(upload, check=True, capture_output=True)

    result = ssh.run_as_user(
        ". ~/.creds && glance image-create --name via-cli --disk-format qcow2"
        f" --container-format bare --property k=v --file {remote}"
    )

    assert result.returncode == 0, result.stderr
    [found] = clean_sandbox.destination.find_by_property("k", "v")
    assert found["name"] == "via-cli"
    assert clean_sandbox.destination.image_bytes(found["id"]) == image.read_bytes()


def test_changed_host_key_is_refused(sandbox: Sandbox, tmp_path: Path) -> None:
    wrong = sandbox.ssh.wrong_known_hosts(tmp_path / "known_hosts")

    refused = sandbox.ssh.run_as_user(["true"], known_hosts=wrong)
    accepted = sandbox.ssh.run_as_user(["true"])

    assert refused.returncode == 255
    assert "Host key verification failed" in refused.stderr
    assert accepted.returncode == 0, accepted.stderr


def test_config_files_point_at_the_sandbox(sandbox: Sandbox) -> None:
    config = sandbox.config_path.read_text()
    assert "name: site-a\n" in config
    assert f"sites_dir: {sandbox.sites_dir}\n" in config
    creds = sandbox.creds_path.read_text()
    assert f"export OS_IMAGE_URL={sandbox.source.endpoint}\n" in creds
    assert f"export IMAGES_DIR={sandbox.source.images_dir}\n" in creds
    site = (sandbox.sites_dir / "site-b.conf").read_text()
    assert f"export SSH_PORT={sandbox.ssh.port}\n" in site
    api = (sandbox.sites_dir / "site-b-api.conf").read_text()
    assert f"export OS_IMAGE_URL={sandbox.destination.endpoint}\n" in api


def test_waiting_for_the_sandbox_lock_names_the_holder(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    user = f"migratio-locktest-{os.getpid()}"
    lock_path = Path(f"/tmp/migratio-sandbox-{user}.lock")
    holder = SshServer(tmp_path / "first")
    holder.user = user
    holder._take_lock()  # as a running sandbox would
    try:
        # another process waits for it: the message names this pid and the wait
        waiter = SshServer(tmp_path / "second")
        waiter.user = user
        waiter.LOCK_TIMEOUT = 1.0
        with pytest.raises(SshServerError, match=rf"pid {os.getpid()} \(.*\) still holds"):
            waiter._take_lock()
        err = capsys.readouterr().err
        assert f"waiting up to 1 s for pid {os.getpid()} (" in err
        assert str(lock_path) in err and "MIGRATIO_SANDBOX_USER" in err
    finally:
        holder.stop()
        lock_path.unlink(missing_ok=True)
