"""The sweep: remove what dead attempts left behind, for pairs whose lease is free.

An attempt removes its own leftovers when it fails, and the next attempt of the same
(image, destination) removes a dead one's when it starts. The sweep is for the rest — a
job whose retries were spent, a request never made again: every :data:`INTERVAL` seconds
the service puts one sweep job on the queue, and a worker runs it:

* local work directories (``<staging_dir>/<image>-<site>``);
* ``.part`` files in a destination's remote staging directory (``REGISTER=ssh``);
* copies of ours in Glance that never became active (``queued``, ``saving``, ``killed``);
* EBS snapshots tagged as ours that no AMI uses.

A pair is swept only while the sweep holds its lease (so no attempt of it runs meanwhile),
and staged files only once they are older than the longest retry delay plus
:data:`GRACE` seconds (a retry that is due would resume them).
"""

from __future__ import annotations

import logging
import re
import shutil
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

from redis import Redis

from migratio.atmosphere.keys import Keys
from migratio.config import AmazonSite, OpenStackSite, Settings
from migratio.errors import MigratioError
from migratio.lease import Lease

log = logging.getLogger(__name__)

#: seconds between sweeps
INTERVAL = 600
#: staged files younger than the longest retry delay plus this are left for the retry
GRACE = 600
#: copies in these Glance states were never finished
UNFINISHED = ("queued", "saving", "killed")
_UUID_LENGTH = 36
_UUID = re.compile(r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}")


@dataclass
class SweepReport:
    """What one sweep removed (and what it left because the pair was busy)."""

    removed: list[str] = field(default_factory=list)
    busy: list[str] = field(default_factory=list)


@dataclass
class Sweeper:
    """One sweep over this site's staging and its destinations."""

    settings: Settings
    redis: Redis
    min_age: float
    report: SweepReport = field(default_factory=SweepReport)

    @contextmanager
    def pair(self, image_id: str, destination: str) -> Iterator[bool]:
        """Hold the pair's lease for the block; yields False (and holds nothing) if it is busy."""
        lease = Lease(
            self.redis,
            Keys(self.settings.namespace),
            self.settings.name,
            image_id,
            destination,
            job_id="sweep",
        )
        if not lease.acquire():
            self.report.busy.append(f"{image_id} to {destination}")
            yield False
            return
        try:
            yield True
        finally:
            lease.release()

    def local(self) -> None:
        staging = self.settings.staging_dir
        if not staging.is_dir():
            return
        now = time.time()
        for entry in sorted(staging.iterdir()):
            image_id, site = entry.name[:_UUID_LENGTH], entry.name[_UUID_LENGTH + 1 :]
            if not _UUID.fullmatch(image_id) or not site or not entry.is_dir():
                continue  # not a work directory (.link-<site>.json, for one)
            if now - entry.stat().st_mtime < self.min_age:
                continue
            with self.pair(image_id, site) as mine:
                if mine:
                    shutil.rmtree(entry, ignore_errors=True)
                    self.report.removed.append(f"local {entry}")

    def openstack(self, site: OpenStackSite) -> None:
        from migratio.openstack.migration import destination_for  # noqa: PLC0415 (heavy)

        destination = destination_for(site, self.settings)
        owner: str | None = None
        for copy in destination.find(source_cs=self.settings.name):
            image_id = copy.properties.get("source_uuid", "")
            if copy.status not in UNFINISHED or not image_id:
                continue
            owner = owner or destination.own_project()
            if copy.owner != owner:
                continue  # another project's image is never deleted
            with self.pair(image_id, site.site_id) as mine:
                if mine:
                    destination.delete(copy.id)
                    self.report.removed.append(f"{copy.status} image {copy.id} at {site.site_id}")
        if site.register != "ssh":
            return
        from migratio.adapters.glance_cli import RemoteGlance, site_tag, tag_of  # noqa: PLC0415

        assert isinstance(destination, RemoteGlance)
        remote_dir = site.remote_staging_dir.rstrip("/") or "."
        minutes = int(self.min_age // 60)
        # sites reached through one account share its staging directory: each site's
        # files are swept under that site's leases, untagged (older) ones under any
        others = {
            site_tag(other.site_id)
            for other in self.settings.sites.values()
            if isinstance(other, OpenStackSite) and other.site_id != site.site_id
        }
        for name in destination.list_parts(remote_dir, older_than_minutes=minutes):
            image_id, tag = name[:_UUID_LENGTH], tag_of(name)
            if tag in others:
                continue
            with self.pair(image_id, site.site_id) as mine:
                if mine:
                    destination.remove_parts(remote_dir, image_id, tags=(tag,))
                    self.report.removed.append(f"{remote_dir}/{name} at {site.site_id}")

    def amazon(self, site: AmazonSite) -> None:
        from migratio.adapters.aws import AwsClients  # noqa: PLC0415
        from migratio.amazon.migration import unused_snapshots  # noqa: PLC0415 (heavy)

        clients = AwsClients(site, self.settings.aws)
        for image_id, snapshot_id in unused_snapshots(clients.ec2, self.settings.name):
            with self.pair(image_id, site.site_id) as mine:
                if mine:
                    clients.ec2.delete_snapshot(SnapshotId=snapshot_id)
                    self.report.removed.append(f"snapshot {snapshot_id} in {site.region}")

    def run(self) -> SweepReport:
        """Sweep everything; a destination that fails is logged and the others still swept."""
        self.local()
        for site in self.settings.sites.values():
            try:
                if isinstance(site, AmazonSite):
                    self.amazon(site)
                else:
                    self.openstack(site)
            except MigratioError as exc:
                log.warning("sweep of %s: %s", site.site_id, exc.message)
        for what in self.report.removed:
            log.info("sweep: removed %s, left by an attempt that is gone", what)
        return self.report


def sweep(settings: Settings, redis: Redis, *, min_age: float | None = None) -> SweepReport:
    """Remove the leftovers of attempts whose lease is gone (see the module's text)."""
    if min_age is None:
        min_age = max(settings.retry_delays, default=0) + GRACE
    return Sweeper(settings, redis, min_age).run()
