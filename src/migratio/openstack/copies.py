"""Which image at an OpenStack destination is migratio's copy of a source image.

Anyone who can create images at the destination can set any property, so a property alone
proves nothing. An existing image is taken as the copy only when all of this holds:

- it belongs to the project migratio registers into there (its ``owner``, which Glance sets
  and no user can);
- it says it is this site's copy of this image (``source_cs`` = this site, ``source_uuid`` =
  the image) and it is ``active`` in the destination's disk format;
- its bytes are the bytes migratio would send, by Glance's own size and hashes (which no user
  can set): the source's, or, for a converted copy, the converted bytes whose size and hashes
  migratio recorded on it (``converted_hash``) and Glance confirmed when it was registered.

Images of other projects are never taken, changed or deleted; they are only logged.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Callable
from pathlib import Path

from migratio.files import write_json_atomically
from migratio.hashing import Digests
from migratio.images import CONVERTED_HASH, SOURCE_HASH, ImageRecord

log = logging.getLogger(__name__)

#: the image record made (and deleted at once) to learn which project images are made in
PROBE_FIELDS = {"name": "migratio-owner-probe", "disk_format": "raw", "container_format": "bare"}


def why_not_ours(
    copy: ImageRecord, image: ImageRecord, *, me: str, owner: str | None, target_format: str
) -> str | None:
    """Why ``copy`` is not proven to be our copy of ``image`` (None: it is)."""
    if copy.owner != owner:
        return f"it belongs to project {copy.owner}, not to {owner} (migratio's project there)"
    if copy.properties.get("source_cs") != me or copy.properties.get("source_uuid") != image.id:
        return f"it is not marked as {me}'s copy of {image.id}"
    if copy.status != "active" or copy.disk_format != target_format:
        return f"it is {copy.status} {copy.disk_format}, not active {target_format}"
    if target_format == image.disk_format:
        same = copy.digests.matches(image.digests)
        return None if same else "Glance's size and hashes of it are not the source image's"
    return _why_not_converted(copy, image)


def _why_not_converted(copy: ImageRecord, image: ImageRecord) -> str | None:
    if copy.properties.get(SOURCE_HASH) != image.source_hash:
        return "it was converted from other bytes than the source image's"
    recorded = Digests.from_text(copy.properties.get(CONVERTED_HASH))
    if recorded is None or not recorded.matches(copy.digests):
        return "Glance's size and hashes of it are not those of the bytes migratio converted"
    return None


class Owners:
    """The project each destination registers into, remembered across jobs in ``directory``
    (the staging directory, ``.owner-<site>.json``, beside :mod:`migratio.openstack.compression`'s).

    An entry is tied to the site file's contents: a changed file (other credentials, another
    host) is learned again. Every image migratio registers refreshes the entry.
    """

    def __init__(self, directory: Path) -> None:
        self.directory = directory

    def _path(self, site_id: str) -> Path:
        return self.directory / f".owner-{site_id}.json"

    @staticmethod
    def _key(site_file: Path) -> str:
        try:
            return hashlib.sha256(site_file.read_bytes()).hexdigest()
        except OSError:
            return ""

    def get(self, site_id: str, site_file: Path, learn: Callable[[], str | None]) -> str | None:
        """The remembered owner, else ``learn()``'s answer (remembered from now on)."""
        try:
            entry = json.loads(self._path(site_id).read_text())
            if entry.get("key") == self._key(site_file):
                owner = entry.get("owner")
                return owner if isinstance(owner, str) else None
        except (OSError, ValueError, AttributeError):
            pass
        owner = learn()
        log.info("images registered at %s belong to project %s", site_id, owner)
        self.remember(site_id, site_file, owner)
        return owner

    def remember(self, site_id: str, site_file: Path, owner: str | None) -> None:
        """Record ``owner`` for the site (written atomically; a failure is only logged)."""
        path = self._path(site_id)
        try:
            write_json_atomically(path, {"key": self._key(site_file), "owner": owner})
        except OSError as exc:
            log.warning("cannot remember the project of %s in %s: %s", site_id, path, exc)
