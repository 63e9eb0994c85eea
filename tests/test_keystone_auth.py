"""Source Glance reached through a real Keystone: password auth, token, service catalog.

The sandbox's Glance accepts any token, so what is under test here is migratio's side:
getting a token from Keystone with the operator's ``OS_*`` variables and finding the
``image`` endpoint in the catalog Keystone returns with it -- by keystoneauth1 here, and by
the upload helper's own standard-library client at a destination (``REMOTE_UPLOAD=auto``).
"""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from glanceclient.exc import CommunicationError, HTTPNotFound
from tests.sandbox.images import make_qcow2
from tests.sandbox.keystone_server import KeystoneServer
from tests.sandbox.old_python import oldest_python
from tests.sandbox.ports import free_port
from tests.sandbox.site import Sandbox
from tests.support import run_upload_helper

from migratio.adapters.glance_api import GlanceApi
from migratio.adapters.glance_cli import follow_upload_source
from migratio.cli import main
from migratio.config import OpenStackCredentials
from migratio.errors import GlanceError

MiB = 1024 * 1024
IMAGE_NAME = "keystone-auth-probe"
MEMBER = ("demo", "demo-pw-7f3a", "demo")  # user, password, project: a plain member


@pytest.fixture(scope="module")
def keystone(
    sandbox: Sandbox, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[KeystoneServer]:
    """A running Keystone whose catalog sends ``image`` to the sandbox's source Glance."""
    with KeystoneServer(tmp_path_factory.mktemp("keystone")) as ks:
        ks.register_image_service(sandbox.source.endpoint)
        ks.create_user(*MEMBER)
        yield ks


@pytest.fixture(scope="module")
def image_id(sandbox: Sandbox, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """One small qcow2 image on the source Glance, deleted afterwards."""
    path = make_qcow2(
        tmp_path_factory.mktemp("keystone-image") / "probe.qcow2",
        virtual_size=16 * MiB,
        data_bytes=256 * 1024,
    )
    uploaded = sandbox.source.upload_image(path, name=IMAGE_NAME, disk_format="qcow2")
    yield uploaded
    with contextlib.suppress(HTTPNotFound):  # a reset of the sandbox may have beaten us to it
        sandbox.source.client().images.delete(uploaded)


def admin_vars(ks: KeystoneServer, **overrides: str) -> dict[str, str]:
    values = {
        "OS_AUTH_URL": ks.auth_url,
        "OS_USERNAME": "admin",
        "OS_PASSWORD": ks.admin_password,
        "OS_PROJECT_NAME": "admin",
        "OS_USER_DOMAIN_NAME": "Default",
        "OS_PROJECT_DOMAIN_NAME": "Default",
        "OS_REGION_NAME": "RegionOne",
        "OS_INTERFACE": "public",
    }
    values.update(overrides)
    return {k: v for k, v in values.items() if v}


def assert_reads_image(api: GlanceApi, image_id: str) -> None:
    record = api.get(image_id)
    assert record is not None
    assert record.id == image_id
    assert record.name == IMAGE_NAME
    assert api.ping() == 1


def test_v3_password_with_project_and_domain_names(
    keystone: KeystoneServer, sandbox: Sandbox, image_id: str
) -> None:
    creds = OpenStackCredentials.from_vars(admin_vars(keystone), "test")
    assert not creds.uses_token
    api = GlanceApi(creds)

    assert_reads_image(api, image_id)
    # the Glance URL came from Keystone's catalog: migratio was only given the auth URL
    assert api.client.http_client.get_endpoint().rstrip("/") == sandbox.source.endpoint


def test_member_of_another_project(keystone: KeystoneServer, image_id: str) -> None:
    user, password, project = MEMBER
    values = admin_vars(keystone, OS_USERNAME=user, OS_PASSWORD=password, OS_PROJECT_NAME=project)
    api = GlanceApi(OpenStackCredentials.from_vars(values, "test"))

    assert_reads_image(api, image_id)
    session = api.client.http_client.session
    access = session.auth.get_access(session)
    assert (access.username, access.project_name) == (user, project)
    assert "member" in access.role_names
    assert "admin" not in access.role_names


def test_region_and_interface_pick_the_catalog_endpoint(
    keystone: KeystoneServer, sandbox: Sandbox, image_id: str
) -> None:
    # in region "Split" only the internal endpoint leads to Glance; public is a dead port
    dead = f"http://127.0.0.1:{free_port()}"
    keystone.register_image_service(dead, "Split", internal_url=sandbox.source.endpoint)

    def api(interface: str) -> GlanceApi:
        values = admin_vars(keystone, OS_REGION_NAME="Split", OS_INTERFACE=interface)
        return GlanceApi(OpenStackCredentials.from_vars(values, "test"), timeout=10)

    assert_reads_image(api("internal"), image_id)
    # the public one is tried, and fails. (GlanceApi lets glanceclient's CommunicationError
    # for an unreachable Glance escape instead of turning it into a GlanceError.)
    with pytest.raises((GlanceError, CommunicationError)) as caught:
        api("public").ping()
    assert dead in str(caught.value)


@pytest.mark.parametrize("versioned", [True, False], ids=["v3-url", "unversioned-url"])
def test_original_v2_style_variables(
    keystone: KeystoneServer, image_id: str, versioned: bool
) -> None:
    values = {  # what the Ruby tool's ~/.creds had: a tenant, no domains, no region
        "OS_AUTH_URL": keystone.auth_url if versioned else keystone.endpoint,
        "OS_USERNAME": "admin",
        "OS_PASSWORD": keystone.admin_password,
        "OS_TENANT_NAME": "admin",
    }
    api = GlanceApi(OpenStackCredentials.from_vars(values, "test"))
    assert_reads_image(api, image_id)


def test_wrong_password_is_a_clear_401(keystone: KeystoneServer, image_id: str) -> None:
    wrong = "not-the-Password-42"
    api = GlanceApi(OpenStackCredentials.from_vars(admin_vars(keystone, OS_PASSWORD=wrong), "t"))

    with pytest.raises(GlanceError) as caught:
        api.get(image_id)

    message = caught.value.message
    assert f"reading image {image_id} failed" in message
    assert "401" in message
    assert wrong not in message
    assert keystone.admin_password not in message
    assert caught.value.retryable is False


def test_domain_ids_as_horizon_openrc_files_give_them(
    keystone: KeystoneServer, image_id: str
) -> None:
    domain = keystone._request("POST", "domains", {"domain": {"name": "other-domain"}})
    domain_id = domain["domain"]["id"]
    project = keystone._request(
        "POST", "projects", {"project": {"name": "p-other", "domain_id": domain_id}}
    )["project"]["id"]
    user = keystone._request(
        "POST",
        "users",
        {"user": {"name": "u-other", "password": "pw-other", "domain_id": domain_id}},
    )["user"]["id"]
    role = keystone._find("roles", name="member")[0]["id"]
    keystone._request("PUT", f"projects/{project}/users/{user}/roles/{role}")
    values = {
        "OS_AUTH_URL": keystone.auth_url,
        "OS_USERNAME": "u-other",
        "OS_PASSWORD": "pw-other",
        "OS_PROJECT_NAME": "p-other",
        "OS_USER_DOMAIN_ID": domain_id,
        "OS_PROJECT_DOMAIN_ID": domain_id,
    }
    assert_reads_image(GlanceApi(OpenStackCredentials.from_vars(values, "test")), image_id)


def test_unknown_region_names_the_missing_endpoint(keystone: KeystoneServer, image_id: str) -> None:
    api = GlanceApi(
        OpenStackCredentials.from_vars(admin_vars(keystone, OS_REGION_NAME="Nowhere"), "t")
    )

    with pytest.raises(GlanceError) as caught:
        api.ping()

    assert "endpoint" in caught.value.message.lower()
    assert keystone.admin_password not in caught.value.message


def test_check_reports_source_glance_ok_with_keystone(
    keystone: KeystoneServer,
    sandbox: Sandbox,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    creds = tmp_path / "creds"
    creds.write_text(
        f"export OS_AUTH_URL={keystone.auth_url}\n"
        "export OS_USERNAME=admin\n"
        f"export OS_PASSWORD='{keystone.admin_password}'\n"
        "export OS_PROJECT_NAME=admin\n"
        "export OS_USER_DOMAIN_NAME=Default\n"
        "export OS_PROJECT_DOMAIN_NAME=Default\n"
        "export OS_REGION_NAME=RegionOne\n"
        f"export IMAGES_DIR={sandbox.source.images_dir}\n"
        f"export SOURCE_CS={sandbox.source_site}\n"
    )
    creds.chmod(0o600)
    sites = tmp_path / "sites"
    sites.mkdir()
    config = tmp_path / "config.yml"
    config.write_text(
        sandbox.config_path.read_text()
        + f"\ncredentials_file: {creds}\nsites_dir: {sites}\n"
        + f"staging_dir: {tmp_path / 'staging'}\nlog_dir: {tmp_path / 'log'}\n"
    )

    code = main(["check", "--config", str(config)])

    out = capsys.readouterr().out
    [line] = [x for x in out.splitlines() if "source Glance" in x]
    assert line.split()[0] == "ok", out
    assert keystone.auth_url in line
    assert keystone.admin_password not in out
    assert code == 0, out


# --- the upload helper at a destination, with a Keystone password in its ~/.creds ---------------


@pytest.fixture(scope="module", params=["python3", "oldest"])
def helper_python(request: pytest.FixtureRequest) -> str:
    return sys.executable if request.param == "python3" else str(oldest_python())


@pytest.mark.parametrize(
    "variables",
    [
        {},  # names, with their domains
        {"OS_USER_DOMAIN_NAME": "", "OS_PROJECT_DOMAIN_NAME": "", "OS_REGION_NAME": ""},
        {
            "OS_PROJECT_NAME": "",
            "OS_TENANT_NAME": "admin",
            "OS_INTERFACE": "",
            "OS_ENDPOINT_TYPE": "publicURL",
        },  # the original's v2-style names
    ],
    ids=["v3-names", "no-domains", "tenant"],
)
def test_the_upload_helper_gets_its_token_from_keystone(
    keystone: KeystoneServer,
    sandbox: Sandbox,
    tmp_path: Path,
    helper_python: str,
    variables: dict[str, str],
) -> None:
    """With a Keystone password in the creds, the helper finds Glance in the catalog and
    uploads through its API itself: the image is active with the bytes; the CLI got nothing."""
    data = os.urandom(3 * MiB + 5)
    name = f"helper-{uuid.uuid4()}"
    done, given = run_upload_helper(
        helper_python, admin_vars(keystone, **variables), data, tmp_path, name=name
    )
    assert done.returncode == 0, done.stderr
    assert "upload via http" in done.stdout.splitlines()
    assert given == b""
    [record] = [json.loads(line[6:]) for line in done.stdout.splitlines() if line[:6] == "image "]
    assert record["name"] == name and record["status"] == "active"
    assert record["size"] == len(data)
    got = sandbox.source.download_to(record["id"], tmp_path / "got")
    assert got.read_bytes() == data
    assert not (tmp_path / "arrived.part").exists()  # it is in Glance now
    sandbox.source.client().images.delete(record["id"])
    assert keystone.admin_password not in done.stdout + done.stderr


def test_the_helper_looks_images_up_through_glances_api(
    keystone: KeystoneServer, sandbox: Sandbox, helper_python: str
) -> None:
    """``--find``: what ``glance image-list --property-filter`` lists, as whole records, with a
    token from Keystone; credentials it cannot use give ``unsupported`` (the CLI then asks)."""
    marker = str(uuid.uuid4())
    client = sandbox.source.client()
    fields = {"disk_format": "raw", "container_format": "bare"}
    made = [client.images.create(name=f"find-{n}", source_uuid=marker, **fields) for n in (1, 2)]
    other = client.images.create(name="find-other", source_uuid=str(uuid.uuid4()), **fields)

    def find(env: dict[str, str]) -> list[str]:
        done = subprocess.run(
            [helper_python, "-c", follow_upload_source(), "--find", f"source_uuid={marker}"],
            env={"PATH": os.environ["PATH"], "LANG": "C", **env},
            capture_output=True, text=True, timeout=60, check=True,
        )  # fmt: skip
        assert keystone.admin_password not in done.stdout + done.stderr
        return done.stdout.splitlines()

    try:
        [line] = find(admin_vars(keystone))
        assert line.startswith("images [")
        records = json.loads(line[len("images ") :])
        assert sorted(r["id"] for r in records) == sorted(image["id"] for image in made)
        assert {(r["source_uuid"], r["status"]) for r in records} == {(marker, "queued")}
        [line] = find(admin_vars(keystone, OS_PASSWORD="not-the-Password-42"))
        assert line.startswith("unsupported Keystone at ") and "HTTP 401" in line
    finally:
        for image in [*made, other]:
            client.images.delete(image["id"])


@pytest.mark.parametrize(
    ("variables", "why"),
    [
        ({"OS_PASSWORD": "not-the-Password-42"}, "answered HTTP 401"),
        ({"https_proxy": "http://127.0.0.1:9"}, "a proxy is set in https_proxy"),
        ({"OS_AUTH_TYPE": "v3applicationcredential"}, "OS_AUTH_TYPE is v3applicationcredential"),
        ({"OS_REGION_NAME": "Nowhere"}, "no public image endpoint in region Nowhere"),
    ],
    ids=["refused", "proxy", "other-plugin", "no-endpoint"],
)
def test_credentials_the_helper_cannot_use_go_to_the_glance_cli(
    keystone: KeystoneServer, tmp_path: Path, variables: dict[str, str], why: str
) -> None:
    """Before anything is made, the helper hands the upload to the CLI, and says why."""
    data = os.urandom(MiB)
    done, given = run_upload_helper(
        sys.executable, admin_vars(keystone, **variables), data, tmp_path, name="to-the-cli"
    )
    assert done.returncode == 0, done.stderr
    [way] = [line for line in done.stdout.splitlines() if line.startswith("upload via")]
    assert way.startswith("upload via cli (") and why in way
    assert given == data
    for secret in (keystone.admin_password, "not-the-Password-42"):
        assert secret not in done.stdout + done.stderr
