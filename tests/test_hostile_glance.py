"""A hostile environment: the destination's Glance answers 5xx, or nothing, while a copy is
made -- through a misbehaving proxy in front of the real sandbox Glance."""

from __future__ import annotations

import time
from pathlib import Path

import pytest
from tests.sandbox.faulty_proxy import FaultyProxy
from tests.sandbox.images import make_qcow2
from tests.sandbox.ports import free_port
from tests.sandbox.site import Sandbox, api_site_conf
from tests.support import Lines, no_work_left, settings_for
from tests.test_openstack_migration import copies_at_destination, site_b_with

from migratio.errors import GlanceError, MigratioError
from migratio.openstack.migration import migrate_to_openstack
from migratio.request import MigrationRequest, Outcome

MiB = 1024 * 1024
CREATE = ("POST", r"^/v2/images$")
DATA = ("PUT", r"^/v2/images/[0-9a-f-]+/file$")


def source_image(sb: Sandbox, tmp_path: Path) -> str:
    image = make_qcow2(tmp_path / "source.qcow2", virtual_size=16 * MiB, data_bytes=4 * MiB)
    return sb.source.upload_image(image, name="faulty", disk_format="qcow2")


@pytest.mark.parametrize(
    ("request_", "action", "doing"),
    [
        (CREATE, "503", "creating the image record"),
        (DATA, "500", "uploading the data of image"),
        (DATA, "after:502", "uploading the data of image"),
    ],
    ids=["create-503", "upload-500", "upload-stored-then-502"],
)
def test_a_glance_5xx_over_the_api_is_retryable_and_leaves_no_image(
    clean_sandbox: Sandbox, tmp_path: Path, request_: tuple[str, str], action: str, doing: str
) -> None:
    sb = clean_sandbox
    image_id = source_image(sb, tmp_path)
    with FaultyProxy(sb.destination.endpoint) as proxy:
        proxy.fail(*request_, action)
        settings = settings_for(sb, tmp_path, **{"site-lb": api_site_conf(proxy.endpoint)})
        lines = Lines()
        with pytest.raises(GlanceError) as failed:
            migrate_to_openstack(settings, MigrationRequest(image_id, "site-lb"), lines)
        assert any(a == action for _, _, a in proxy.seen)
    message = str(failed.value)
    code = action.removeprefix("after:")
    assert doing in message and code in message and proxy.endpoint in message, message
    assert failed.value.retryable
    assert lines[-1] == failed.value.status_line()
    assert copies_at_destination(sb, image_id) == []
    assert no_work_left(settings.staging_dir)
    # Glance is well again: the retry makes the one copy
    good = settings_for(sb, tmp_path)
    result = migrate_to_openstack(good, MigrationRequest(image_id, "site-b-api"), Lines())
    assert result.outcome == Outcome.MIGRATED
    assert len(copies_at_destination(sb, image_id)) == 1


@pytest.mark.slow
@pytest.mark.parametrize("request_", [CREATE, DATA], ids=["create", "upload"])
def test_a_glance_that_never_answers_is_given_up_on_in_bounded_time(
    clean_sandbox: Sandbox, tmp_path: Path, request_: tuple[str, str]
) -> None:
    sb = clean_sandbox
    image_id = source_image(sb, tmp_path)
    with FaultyProxy(sb.destination.endpoint) as proxy:
        proxy.fail(*request_, "hang")
        settings = settings_for(sb, tmp_path, **{"site-lb": api_site_conf(proxy.endpoint)})
        lines = Lines()
        begin = time.monotonic()
        with pytest.raises(GlanceError) as failed:
            migrate_to_openstack(settings, MigrationRequest(image_id, "site-lb"), lines)
        took = time.monotonic() - begin
    message = str(failed.value)
    assert took < 150, took
    # it connected: the operator is told Glance is not answering, not to check the URL
    assert f"no answer from {proxy.endpoint}/v2/images" in message, message
    assert "within 60 s" in message and "cannot connect" not in message
    assert failed.value.retryable
    assert lines[-1] == failed.value.status_line()
    assert copies_at_destination(sb, image_id) == []
    assert no_work_left(settings.staging_dir)


@pytest.mark.parametrize(
    ("request_", "action"),
    [(CREATE, "503"), (DATA, "500"), (DATA, "after:502")],
    ids=["create-503", "upload-500", "upload-stored-then-502"],
)
def test_a_glance_5xx_through_the_remote_cli_is_retryable_and_leaves_no_image(
    clean_sandbox: Sandbox, tmp_path: Path, request_: tuple[str, str], action: str
) -> None:
    """REGISTER=ssh: the destination's glance CLI talks to its Glance through the proxy."""
    sb = clean_sandbox
    image_id = source_image(sb, tmp_path)
    listen = sb.network.host_address if sb.network is not None else "127.0.0.1"
    # HTML errors, as nginx words them: the destination's own glance CLI cannot read a JSON
    # {"message": ...} error (glanceclient's from_response; not ours to fix there)
    with FaultyProxy(sb.destination.endpoint, listen, html=True) as proxy:
        proxy.fail(*request_, action)
        creds = (sb.ssh.home / ".creds").read_text()
        sb.ssh.write_home_file("lb.creds", creds.replace(sb.destination.endpoint, proxy.endpoint))
        conf = site_b_with(sb, "export REMOTE_CREDS='~/lb.creds'")
        settings = settings_for(sb, tmp_path, **{"site-lb": conf})
        lines = Lines()
        try:
            with pytest.raises(MigratioError) as failed:
                migrate_to_openstack(settings, MigrationRequest(image_id, "site-lb"), lines)
        finally:
            sb.ssh.remove_home_path("lb.creds")
        assert any(a == action for _, _, a in proxy.seen)
    message = str(failed.value)
    assert action.removeprefix("after:") in message and "site-lb" in message, message
    assert failed.value.retryable
    assert lines[-1] == failed.value.status_line()
    assert copies_at_destination(sb, image_id) == []
    assert no_work_left(settings.staging_dir)
    result = migrate_to_openstack(settings, MigrationRequest(image_id, "site-b"), Lines())
    assert result.outcome == Outcome.MIGRATED
    assert len(copies_at_destination(sb, image_id)) == 1


# --- the source's Glance (or Keystone) down -------------------------------------------------


def source_creds(sb: Sandbox, tmp_path: Path, *lines: str) -> Path:
    """The source's credentials without its file store (the image is downloaded through the
    API), with ``lines`` ("KEY=value") instead of the sandbox's."""
    keys = {line.split("=", 1)[0] for line in lines}
    kept = [
        line
        for line in sb.creds_path.read_text().splitlines()
        if line.startswith("export ") and line[7:].split("=", 1)[0] not in keys | {"IMAGES_DIR"}
    ]
    creds = tmp_path / "source.creds"
    creds.write_text("".join(f"{x}\n" for x in [*kept, *(f"export {y}" for y in lines)]))
    creds.chmod(0o600)
    return creds


def test_a_source_that_is_down_at_the_start_is_named_and_retried(
    clean_sandbox: Sandbox, tmp_path: Path
) -> None:
    sb = clean_sandbox
    image_id = source_image(sb, tmp_path)
    dead = f"http://127.0.0.1:{free_port()}"  # connection refused
    creds = source_creds(sb, tmp_path, f"OS_IMAGE_URL={dead}")
    settings = settings_for(sb, tmp_path, yaml=f"credentials_file: {creds}\n")
    lines = Lines()
    with pytest.raises(GlanceError) as failed:
        migrate_to_openstack(settings, MigrationRequest(image_id, "site-b-api"), lines)
    message = str(failed.value)
    assert f"cannot connect to {dead}" in message and "Connection refused" in message, message
    assert f"check OS_IMAGE_URL in {creds}" in message
    assert failed.value.retryable
    assert lines[-1] == failed.value.status_line()
    assert not settings.staging_dir.exists() or no_work_left(settings.staging_dir)


@pytest.mark.parametrize(
    ("action", "expected"),
    [("cut", "Connection broken: IncompleteRead"),
     ("close", "no answer from {url} (Remote end closed connection without response)")],
    ids=["cut-midway", "closed-unanswered"],
)  # fmt: skip
def test_a_source_download_cut_is_retried_and_leaves_no_partial_entry(
    clean_sandbox: Sandbox, tmp_path: Path, action: str, expected: str
) -> None:
    sb = clean_sandbox
    image_id = source_image(sb, tmp_path)
    with FaultyProxy(sb.source.endpoint) as proxy:
        expected = expected.format(url=f"{proxy.endpoint}/v2/images/{image_id}/file")
        proxy.fail("GET", r"^/v2/images/[0-9a-f-]+/file$", action)
        creds = source_creds(sb, tmp_path, f"OS_IMAGE_URL={proxy.endpoint}")
        settings = settings_for(sb, tmp_path, yaml=f"credentials_file: {creds}\n")
        lines = Lines()
        with pytest.raises(MigratioError) as failed:
            migrate_to_openstack(settings, MigrationRequest(image_id, "site-b-api"), lines)
        assert any(a == action for _, _, a in proxy.seen)
        message = str(failed.value)
        assert proxy.endpoint in message and f"downloading image {image_id}" in message, message
        # it connected: the operator is not sent to check OS_IMAGE_URL
        assert "cannot connect" not in message and "OS_IMAGE_URL" not in message, message
        assert expected in message, message
        assert failed.value.retryable
        assert lines[-1] == failed.value.status_line()
        assert no_work_left(settings.staging_dir)
        assert copies_at_destination(sb, image_id) == []
        proxy.heal()
        result = migrate_to_openstack(settings, MigrationRequest(image_id, "site-b-api"), Lines())
    assert result.outcome == Outcome.MIGRATED
