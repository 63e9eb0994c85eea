"""Adapter for the destination host's ``glance`` CLI, run over SSH as the original did.

Every argument is quoted by :mod:`migratio.ssh`; the CLI's tables are parsed here.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from importlib import resources
from typing import Any

from migratio import processes
from migratio.config import OpenStackSite
from migratio.errors import RemoteError
from migratio.images import ImageRecord
from migratio.ssh import SshClient

_UUID = re.compile(r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}")
_ROW = re.compile(r"^\|\s?(.*?)\s*\|\s?(.*?)\s*\|$")


def parse_table(text: str) -> dict[str, str]:
    """Parse the CLI's two-column ``| Property | Value |`` table.

    Long values are wrapped onto continuation rows with an empty first column; they are
    joined back (hashes and ids have no spaces, so nothing is lost for what we compare).
    """
    values: dict[str, str] = {}
    last: str | None = None
    for line in text.splitlines():
        match = _ROW.match(line.strip())
        if not match:
            continue
        key, value = match.group(1), match.group(2)
        if key == "Property" and value == "Value":
            continue
        if key:
            values[key] = value
            last = key
        elif last is not None:
            values[last] += value
    return values


def parse_ids(text: str) -> list[str]:
    """Image ids from the first column of ``glance image-list``."""
    ids = []
    for line in text.splitlines():
        cells = line.strip().strip("|").split("|")
        if cells and _UUID.fullmatch(cells[0].strip()):
            ids.append(cells[0].strip())
    return ids


def follow_upload_source() -> str:
    """The Python source of the remote helper that feeds the growing file to glance."""
    return resources.files("migratio.remote").joinpath("follow_upload.py").read_text("utf-8")


class RemoteGlance:
    """The ``glance`` CLI on a destination host, with that host's ``~/.creds``."""

    def __init__(self, site: OpenStackSite, *, timeout: float = 600) -> None:
        assert site.ssh is not None
        self.site = site
        self.ssh = SshClient(site.ssh, creds=site.remote_creds)
        self.timeout = timeout

    def _glance(self, *args: str) -> list[str]:
        return [self.site.remote_glance, "--os-image-api-version", "2", *args]

    def _run(self, what: str, *args: str) -> processes.Completed:
        return self.ssh.run(self._glance(*args), what=f"glance {what}", timeout=self.timeout)

    def get(self, image_id: str) -> ImageRecord | None:
        """The image, or None when the destination has no such image."""
        done = self.ssh.run(
            self._glance("image-show", image_id),
            what="glance image-show",
            timeout=self.timeout,
            check=False,
        )
        if done.returncode != 0:
            if "No image with" in done.stderr or "404" in done.stderr:
                return None
            raise RemoteError(f"glance image-show {image_id} failed: {done.tail()}")
        return ImageRecord.from_glance(parse_table(done.stdout))

    def find(self, **filters: str) -> list[ImageRecord]:
        """Images whose properties equal ``filters``."""
        args = ["image-list"]
        for key, value in filters.items():
            args += ["--property-filter", f"{key}={value}"]
        ids = parse_ids(self._run("image-list", *args).stdout)
        return [image for image in (self.get(i) for i in ids) if image is not None]

    def create_args(self, fields: Mapping[str, Any]) -> list[str]:
        """``glance image-create`` arguments for an image with ``fields``."""
        args = ["image-create"]
        properties: dict[str, Any] = dict(fields)
        for core in ("name", "disk_format", "container_format", "min_disk", "min_ram"):
            if core in properties:
                value = properties.pop(core)
                args += [f"--{core.replace('_', '-')}", str(value)]
        for key, value in properties.items():
            args += ["--property", f"{key}={value}"]
        return args

    def start_follow_create(
        self,
        fields: Mapping[str, Any],
        remote_path: str,
        size: int,
        algo: str,
        digest: str,
        idle: float,
    ) -> processes.Child:
        """Start creating the image there from ``remote_path`` while rsync still writes it.

        The helper feeds the growing file to ``glance image-create`` (which reads its data
        from stdin) and only lets it finish on exactly ``size`` bytes with the right digest;
        the CLI then prints the final image record, which :func:`parse_table` reads.
        """
        helper = [self.site.remote_python, "-c", follow_upload_source()]
        args = [remote_path, str(size), algo, digest, str(int(idle)), "--"]
        command = self._glance(*self.create_args(fields))
        return self.ssh.start([*helper, *args, *command], what="remote glance upload")

    def make_dir(self, remote_dir: str) -> None:
        """Create the remote staging directory."""
        self.ssh.run(["mkdir", "-p", "--", remote_dir], what="create remote directory", creds=False)

    def delete(self, image_id: str) -> None:
        """Delete an image there; one that is already gone is fine."""
        done = self.ssh.run(
            self._glance("image-delete", image_id),
            what="glance image-delete",
            timeout=self.timeout,
            check=False,
        )
        if done.returncode != 0 and "No image with" not in done.stderr + done.stdout:
            raise RemoteError(f"glance image-delete {image_id} failed: {done.tail()}")

    def list_parts(self, remote_dir: str, *, older_than_minutes: int = 0) -> list[str]:
        """Names of the staging files there (last written more than the minutes given ago)."""
        age = ["-mmin", f"+{older_than_minutes}"] if older_than_minutes > 0 else []
        done = self.ssh.run(
            ["find", remote_dir, "-maxdepth", "1", "-type", "f", "-name", "*.part", *age,
             "-printf", "%f\\n"],
            what="list remote staging files",
            creds=False,
            check=False,
        )  # fmt: skip
        if done.returncode != 0 and "No such file" in done.stderr:
            return []
        if done.returncode != 0:
            raise RemoteError(f"listing {remote_dir} at {self.site.site_id} failed: {done.tail()}")
        return [name for name in done.stdout.splitlines() if _UUID.match(name)]

    def remove_parts(self, remote_dir: str, image_id: str) -> None:
        """Remove the staging files of ``image_id`` there (any attempt's, any format)."""
        self.ssh.run(
            ["find", remote_dir, "-maxdepth", "1", "-name", f"{image_id}-*.part", "-delete"],
            what="remove remote staging files",
            creds=False,
        )

    def remove_file(self, remote_path: str) -> None:
        """Remove a staging file there."""
        self.ssh.run(["rm", "-f", "--", remote_path], what="remove remote file", creds=False)
