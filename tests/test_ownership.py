"""A copy is ours only if we can prove it: another tenant of the destination cannot plant one.

The destination here is a real Glance that checks tokens with a real Keystone, with two
projects: ``migratio`` (where migratio registers, in both register ways) and ``other`` (a
hostile tenant, who plants images that look like the copy in every way a user can control).
"""

from __future__ import annotations

import contextlib
import dataclasses
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from glanceclient import Client
from keystoneauth1 import session
from keystoneauth1.identity import v3
from tests.sandbox.glance_server import GlanceServer, KeystoneAuth, glance_venv
from tests.sandbox.images import make_qcow2, make_raw, sha256_file
from tests.sandbox.keystone_server import KeystoneServer
from tests.sandbox.site import Sandbox
from tests.support import Lines, settings_for

from migratio.config import Settings
from migratio.hashing import Digests, file_digests
from migratio.openstack.migration import migrate_to_openstack
from migratio.request import MigrationRequest, Outcome

MiB = 1024 * 1024
SERVICE = ("glance", "glance-service-pw-1", "service", "admin")
MIGRATIO = ("migratio", "migratio-pw-2", "migratio")
OTHER = ("mallory", "mallory-pw-3", "other")
REMOTE_CREDS = ".creds-keystone"


class Destination:
    """The Keystone-authed destination Glance and a client for each of its users."""

    def __init__(self, keystone: KeystoneServer, glance: GlanceServer) -> None:
        self.keystone = keystone
        self.glance = glance
        self._clients: dict[str, Any] = {}

    def client(self, user: str, password: str, project: str) -> Any:
        """A glanceclient for the user (kept: a token per call would be slow)."""
        if user not in self._clients:
            self._clients[user] = self._client(user, password, project)
        return self._clients[user]

    def _client(self, user: str, password: str, project: str) -> Any:
        auth = v3.Password(
            auth_url=self.keystone.auth_url,
            username=user,
            password=password,
            project_name=project,
            user_domain_name="Default",
            project_domain_name="Default",
        )
        return Client("2", session=session.Session(auth=auth), interface="public")

    def migratio(self) -> Any:
        return self.client(*MIGRATIO)

    def other(self) -> Any:
        return self.client(*OTHER)

    def admin(self) -> Any:
        return self.client("admin", self.keystone.admin_password, "admin")

    def project_id(self, name: str) -> str:
        [project] = self.keystone._find("projects", name=name)
        return str(project["id"])

    def plant(self, path: Path | None, **fields: Any) -> str:
        """An image of the other project (with ``path``'s bytes, or none: queued)."""
        glance = self.other()
        image = glance.images.create(container_format="bare", **fields)
        if path is not None:
            with path.open("rb") as data:
                glance.images.upload(image["id"], data, image_size=path.stat().st_size)
        return str(image["id"])

    def show(self, image_id: str) -> dict[str, Any]:
        return dict(self.admin().images.get(image_id))

    def all_images(self) -> list[dict[str, Any]]:
        return [dict(i) for i in self.admin().images.list(filters={"visibility": "all"})]

    def download(self, image_id: str, path: Path) -> Path:
        with path.open("wb") as out:
            for chunk in self.admin().images.data(image_id):
                out.write(chunk)
        return path

    def reset(self) -> None:
        admin = self.admin()
        for image in self.all_images():
            with contextlib.suppress(Exception):
                admin.images.delete(image["id"])


@pytest.fixture(scope="module")
def destination(
    sandbox: Sandbox, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Destination]:
    workdir = tmp_path_factory.mktemp("keystone-destination")
    keystone = KeystoneServer(workdir)
    auth = KeystoneAuth("", SERVICE[0], SERVICE[1], SERVICE[2])
    glance = GlanceServer(workdir, "site-k", keystone=auth)
    if sandbox.network is not None:  # reachable from here and from the destination host
        keystone.place(sandbox.network.host_address, [])
        glance.place(sandbox.network.host_address, [])
    with keystone:
        keystone.create_user(*SERVICE)
        keystone.create_user(*MIGRATIO)
        keystone.create_user(*OTHER)
        glance.keystone = dataclasses.replace(auth, auth_url=keystone.auth_url)
        with glance:
            keystone.register_image_service(glance.endpoint)
            sandbox.ssh.write_home_file(REMOTE_CREDS, remote_creds(keystone))
            yield Destination(keystone, glance)


@pytest.fixture
def dest(destination: Destination, clean_sandbox: Sandbox) -> Destination:
    destination.reset()
    return destination


def os_vars(keystone: KeystoneServer) -> str:
    user, password, project = MIGRATIO
    return (
        f"export OS_AUTH_URL={keystone.auth_url}\n"
        f"export OS_USERNAME={user}\nexport OS_PASSWORD={password}\n"
        f"export OS_PROJECT_NAME={project}\n"
        "export OS_USER_DOMAIN_NAME=Default\nexport OS_PROJECT_DOMAIN_NAME=Default\n"
        "export OS_REGION_NAME=RegionOne\n"
    )


def remote_creds(keystone: KeystoneServer) -> str:
    return os_vars(keystone) + f"export PATH={glance_venv()}/bin:$PATH\n"


def settings_with_sites(sb: Sandbox, dest: Destination, tmp_path: Path) -> Settings:
    ssh = (sb.sites_dir / "site-b.conf").read_text()
    ssh += f"export REMOTE_CREDS={sb.ssh.home / REMOTE_CREDS}\n"  # a local ~ would be expanded
    api = "export REGISTER=api\n" + os_vars(dest.keystone)
    raw = "export DISK_FORMAT=raw\n"
    return settings_for(
        sb,
        tmp_path,
        **{"k-ssh": ssh, "k-api": api, "k-ssh-raw": ssh + raw, "k-api-raw": api + raw},
    )


def source_image(sb: Sandbox, tmp_path: Path) -> tuple[str, Path, dict[str, Any]]:
    path = make_qcow2(tmp_path / "source.qcow2", virtual_size=16 * MiB, data_bytes=2 * MiB)
    image_id = sb.source.upload_image(path, name="ubuntu-template", disk_format="qcow2")
    return image_id, path, sb.source.image(image_id)


def converted(path: Path, tmp_path: Path) -> Path:
    raw = tmp_path / "converted.raw"
    subprocess.run(
        ["qemu-img", "convert", "-f", "qcow2", "-O", "raw", str(path), str(raw)], check=True
    )
    return raw


def link(image_id: str, record: dict[str, Any]) -> dict[str, str]:
    return {
        "source_uuid": image_id,
        "source_cs": "site-a",
        "source_t": "site-a",
        "source_hash": f"{record['os_hash_algo']}:{record['os_hash_value']}",
    }


CASES = [
    ("link-properties", "k-ssh-raw"),
    ("link-properties", "k-api-raw"),
    ("same-bytes", "k-ssh"),
    ("same-bytes", "k-api"),
]


@pytest.mark.slow
@pytest.mark.parametrize(("kind", "site"), CASES)
def test_planted_images_are_never_taken_nor_touched(
    dest: Destination, clean_sandbox: Sandbox, tmp_path: Path, kind: str, site: str
) -> None:
    """link-properties: to a raw site, (a) random bytes with the link properties, a queued
    image with them, and (c) the converted bytes with every property migratio would set;
    same-bytes: (b) public and community images with the source's very bytes."""
    sb = clean_sandbox
    image_id, path, record = source_image(sb, tmp_path)
    expected = converted(path, tmp_path) if site.endswith("-raw") else path
    planted: list[str] = []
    if kind == "link-properties":
        noise = make_raw(tmp_path / "noise.raw", virtual_size=MiB, data_bytes=MiB, seed=99)
        fields = {"name": "totally-not-ubuntu", "disk_format": "raw", **link(image_id, record)}
        planted.append(dest.plant(noise, visibility="public", **fields))
        # what looks like an unfinished copy of ours: not ours, so never deleted
        planted.append(dest.plant(None, visibility="public", **fields))
        digests = file_digests(expected, ("md5", "sha512"))
        recorded = Digests(
            expected.stat().st_size, digests["md5"], "sha512", digests["sha512"]
        ).to_text()
        planted.append(
            dest.plant(
                expected,
                name="ubuntu-template",
                disk_format="raw",
                visibility="public",
                converted_hash=recorded,
                **link(image_id, record),
            )
        )
    else:
        for visibility in ("public", "community"):
            planted.append(
                dest.plant(
                    path,
                    name=f"windows-{visibility}",
                    disk_format="qcow2",
                    visibility=visibility,
                    os_distro="windows",
                )
            )
        hashes = {dest.show(i)["os_hash_value"] for i in planted}
        assert hashes == {record["os_hash_value"]}
    before = {i: dest.show(i) for i in planted}

    settings = settings_with_sites(sb, dest, tmp_path)
    lines = Lines()
    result = migrate_to_openstack(settings, MigrationRequest(image_id, site), lines)

    assert result.outcome is Outcome.MIGRATED, lines
    copy_id = str(result.destination_image_id)
    assert copy_id not in planted
    copy = dest.show(copy_id)
    assert copy["owner"] == dest.project_id("migratio")
    assert copy["status"] == "active"
    assert sha256_file(dest.download(copy_id, tmp_path / "arrived")) == sha256_file(expected)
    assert {i: dest.show(i) for i in planted} == before  # untouched, still there

    again = Lines()
    second = migrate_to_openstack(settings, MigrationRequest(image_id, site), again)
    assert second.outcome is Outcome.ALREADY_THERE
    assert second.destination_image_id == copy_id
    assert again[-1] == f"Requested image was uploaded. {site} has it as image {copy_id}"
    assert {i: dest.show(i) for i in planted} == before
    ours = [i for i in dest.all_images() if i["owner"] == dest.project_id("migratio")]
    assert [i["id"] for i in ours] == [copy_id]  # no probe image or second copy left behind
