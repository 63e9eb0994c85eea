"""OpenStack → OpenStack: move one Glance image to another OpenStack site.

Steps, each idempotent so that a re-run after any failure finishes the job:

1. find the image in the source Glance (:mod:`migratio.source_site`, shared with Amazon);
2. skip it when the destination already has an active copy with the same content;
3. get the bytes (the local file store, else a verified download into staging);
4. inspect them before any tool opens them;
5. convert with qemu-img when the destination wants another disk format;
6. transfer with rsync over SSH (resumable) while the destination's glance CLI uploads the
   arriving file — or, with ``REGISTER=api``, stream straight into the destination's API;
7. register with the source's metadata and the link properties;
8. verify the destination's hashes; 9. clean up.
"""

from __future__ import annotations

import contextlib
import logging
import shutil
import subprocess
import threading
import time
from collections.abc import Callable, Mapping
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple, Protocol

from migratio.adapters import processes, qemu_img, rsync
from migratio.adapters.glance_api import GlanceApi
from migratio.adapters.glance_cli import RemoteGlance, site_tag, staging_name, upload_way
from migratio.adapters.ssh import LOGIN_RETRIES, SshMaster, login_refused
from migratio.atmosphere import status
from migratio.atmosphere.status import StatusSink, human_bytes
from migratio.config import OpenStackSite, Settings
from migratio.errors import (
    Cancelled,
    ConfigError,
    MetadataError,
    MigratioError,
    RemoteError,
    VerificationError,
    quietly,
)
from migratio.hashing import Digests
from migratio.images import CONVERTED_HASH, LINK_PROPERTIES, SOURCE_HASH, ImageRecord
from migratio.openstack import compression
from migratio.openstack.bandwidth import ThrottledReader
from migratio.openstack.compression import Choice, LinkHistory, PieceCompression
from migratio.openstack.copies import Owners, why_not_ours
from migratio.openstack.streams import layout, linked, measure_rtt, push_ranges
from migratio.request import MigrationRequest, MigrationResult, MigrationRun, Outcome
from migratio.source_site import SourceSite
from migratio.staging import Entry

log = logging.getLogger(__name__)

#: how long the remote upload waits for the transferred file to grow before giving up
FOLLOW_IDLE = 900.0
#: non-active states of a copy that a failed earlier attempt of ours may have left behind
LEFTOVER_STATES = frozenset({"queued", "saving", "killed"})


class Destination(Protocol):
    """What the steps need of a destination Glance (its API, or its CLI over SSH)."""

    def get(self, image_id: str) -> ImageRecord | None: ...
    def find(self, **filters: str) -> list[ImageRecord]: ...
    def delete(self, image_id: str) -> None: ...
    def own_project(self) -> str | None: ...
    def check_fields(self, image_id: str, fields: Mapping[str, Any]) -> None: ...
    def readback(self, text: str) -> str: ...


@dataclass(kw_only=True)
class Migration(MigrationRun):
    """One run of one OpenStack → OpenStack migration, with everything its steps use."""

    site: OpenStackSite
    destination: Destination
    #: REGISTER=ssh: the master connection the migration uses, once started (by the caller,
    #: or by :meth:`run`, which then also stops it)
    master: SshMaster | None = None

    # 2
    @property
    def owners(self) -> Owners:
        return Owners(self.settings.staging_dir)

    def own_project(self) -> str | None:
        """The project migratio registers into at the destination (learned once, then kept)."""
        return self.owners.get(self.site.site_id, self.site.path, self.destination.own_project)

    def existing_copy(self, image: ImageRecord, target_format: str) -> ImageRecord | None:
        """Our proven copy of the image there (:mod:`migratio.openstack.copies`), or None.

        Unfinished copies an interrupted attempt of ours left are deleted on the way.
        """
        candidates = self.destination.find(source_uuid=image.id)
        if not candidates:
            return None
        owner = self.own_project()
        self.delete_leftovers(candidates)
        found = None
        for copy in candidates:
            if copy.status in LEFTOVER_STATES and copy.owner == owner:
                continue  # deleted above
            why = why_not_ours(copy, image, me=self.me, owner=owner, target_format=target_format)
            if why is None and found is None:
                found = copy
            elif why is not None:
                log.info(
                    "image %s at %s is not taken as the copy: %s", copy.id, self.site.site_id, why
                )
        return found

    # 5
    def convert(self, image: ImageRecord, local: Path, target_format: str) -> Payload:
        """The image in ``target_format``: one conversion shared by every job of the image."""
        entry = self.staged.enter_context(
            self.source.converted(image, local, target_format, self.cancel)
        )
        size = int(entry.meta["size"])
        self.status(f"Converted {image.disk_format} to {target_format} ({human_bytes(size)})")
        sha512 = entry.meta.get("sha512")  # entries made before December 2026 have it too
        digests = Digests(
            size, str(entry.meta["md5"]), "sha512" if sha512 else None, sha512 or None
        )
        return Payload(entry.path, digests, entry)

    # 7 (the record)
    def fields(self, image: ImageRecord, target_format: str) -> dict[str, Any]:
        fields: dict[str, Any] = {
            key: value for key, value in image.properties.items() if key not in LINK_PROPERTIES
        }
        fields.update(
            name=image.name,
            disk_format=target_format,
            container_format=image.container_format or "bare",
            min_disk=image.min_disk,
            min_ram=image.min_ram,
            source_uuid=image.id,
            source_cs=self.me,
            source_t=self.me,
        )
        fields[SOURCE_HASH] = image.source_hash
        return fields

    # 8
    def verify(
        self,
        image_id: str,
        sent: Digests,
        fields: Mapping[str, Any],
        shown: ImageRecord | None = None,
    ) -> ImageRecord:
        """Read the copy back: check its state, hashes, name and properties; delete it if wrong.

        ``shown``: the copy as the destination showed it once its data were in (``glance
        image-create`` prints it), instead of asking again.
        """
        copy = (
            shown if shown is not None and shown.id == image_id else self.destination.get(image_id)
        )
        problem = None
        if copy is None:
            problem = "it disappeared"
        elif copy.status != "active":
            problem = f"it is {copy.status}, not active"
        elif not copy.digests.matches(sent):
            problem = (
                f"its size/checksum ({copy.size}, {copy.checksum}) differ from what was sent "
                f"({sent.size}, {sent.md5})"
            )
        if problem is not None or copy is None:
            self.destination.delete(image_id)
            raise VerificationError(f"the copy at {self.site.site_id} was deleted: {problem}")
        self.owners.remember(self.site.site_id, self.site.path, copy.owner)
        different = self.metadata_difference(copy, fields)
        if different is not None:
            self.destination.delete(image_id)
            raise MetadataError(
                f"the copy at {self.site.site_id} was deleted: {different}", retryable=False
            )
        return copy

    def metadata_difference(self, copy: ImageRecord, fields: Mapping[str, Any]) -> str | None:
        """How the copy's name and properties differ from ``fields`` (None: they do not).

        Compared as exactly as the destination can show them (the glance CLI's table trims
        the ends of lines; the API shows everything).
        """
        shown = self.destination.readback
        core: dict[str, object] = {
            "name": copy.name,
            "disk_format": copy.disk_format,
            "container_format": copy.container_format,
            "min_disk": copy.min_disk,
            "min_ram": copy.min_ram,
        }
        properties = {shown(key): value for key, value in copy.properties.items()}
        for key, want in fields.items():
            got = core[key] if key in core else properties.get(shown(key))
            if got is None or shown(str(got)) != shown(str(want)):
                return f"its {key!r} reads back as {got!r}, not {want!r} as sent"
        return None

    def run(self) -> MigrationResult:
        """Run every step; raise a :class:`MigratioError` on failure."""
        self.status(
            f"{status.MIGRATION_STARTED}: image {self.request.image_id} to {self.site.site_id}"
        )
        if isinstance(self.destination, RemoteGlance):
            with contextlib.ExitStack() as stack:
                # the master's login (several round trips) goes on while the source is asked;
                # the command line starts it sooner still, before most of migratio is imported
                master = self.master or stack.enter_context(SshMaster(self.destination.ssh.target))
                self.destination.ssh.target = master.target  # the lookups share one login
                self.master = master
                return self.run_over_ssh(master)
        image, target_format, fields = self.prepare()
        existing = self.existing_copy(image, target_format)
        if existing is not None:
            return self.already_there(existing)
        self.workdir.mkdir(parents=True, exist_ok=True)
        try:
            payload = self.payload(image, target_format, fields)
            copy_id = self.stream_to_api(payload, fields)
        finally:
            self.staged.close()  # the cache entries this job used may go now
            shutil.rmtree(self.workdir, ignore_errors=True)
        return MigrationResult(Outcome.MIGRATED, copy_id, payload.digests.size)

    def prepare(self) -> tuple[ImageRecord, str, dict[str, Any]]:
        """The source image, the format the site wants, and the fields of its copy there."""
        image = self.source.find(self.request.image_id)
        target_format = self.site.disk_format or str(image.disk_format)
        if target_format != image.disk_format:
            qemu_img.check_convertible(image.disk_format, target_format)
        fields = self.fields(image, target_format)
        self.destination.check_fields(image.id, fields)
        return image, target_format, fields

    def already_there(self, existing: ImageRecord) -> MigrationResult:
        shutil.rmtree(self.workdir, ignore_errors=True)  # a killed attempt's
        self.status(f"{status.ALREADY_UPLOADED} {self.site.site_id} has it as image {existing.id}")
        return MigrationResult(Outcome.ALREADY_THERE, existing.id)

    def payload(self, image: ImageRecord, target_format: str, fields: dict[str, Any]) -> Payload:
        """The bytes to send (inspected; converted when the site wants another format)."""
        local = self.staged.enter_context(self.source.inspected_bytes(image, self.cancel))
        if target_format == image.disk_format:
            return Payload(local.path, image.digests, local)
        payload = self.convert(image, local.path, target_format)
        fields[CONVERTED_HASH] = payload.digests.to_text()
        return payload

    def run_over_ssh(self, master: SshMaster) -> MigrationResult:
        """REGISTER=ssh: the transfer starts while the destination is still being looked up.

        Looking for an existing copy costs a few runs of the remote glance CLI (seconds);
        the transfer only writes the remote staging directory, so it need not wait. The
        upload into Glance, which does make an image, starts only once the lookup found no
        copy. A download from the source Glance or a conversion waits for the lookup, so
        that a copy already there costs neither. What needs only the image's id -- the
        round trip, what an earlier attempt left in the staging directory there -- is asked
        before the source is, and so are the samples of the file store's file that tell
        ``COMPRESS=auto`` how well it compresses.
        """
        cli = self.destination
        assert isinstance(cli, RemoteGlance)
        ssh = self.site.ssh
        assert ssh is not None
        image_id = self.request.image_id

        def left_there() -> dict[str, int]:
            master.wait()  # share its login rather than make one more at the same time
            return cli.staged_sizes(self.remote_dir, image_id)  # one round trip through it

        with ThreadPoolExecutor(max_workers=5, thread_name_prefix="lookup") as pool:
            rtt = pool.submit(measure_rtt, ssh.host, ssh.port)
            earlier = pool.submit(left_there)
            # the file store's file is what is sent, unless it must be downloaded or
            # converted: its samples are compressed (zlib, off the GIL) meanwhile
            stored = self.settings.images_dir / image_id
            sampled = (
                pool.submit(compression.sample_ratio, stored)
                if self.site.compress == "auto" and _is_file(stored)
                else None
            )
            image, target_format, fields = self.prepare()

            def look_up() -> ImageRecord | None:
                master.wait()
                return self.existing_copy(image, target_format)

            lookup = pool.submit(look_up)
            if target_format != image.disk_format or not self.source.has_local_file(image):
                existing = lookup.result()
                if existing is not None:
                    quietly(self.remove_staged, cli, image.id)  # a killed attempt's
                    return self.already_there(existing)
            self.workdir.mkdir(parents=True, exist_ok=True)
            try:
                payload = self.payload(image, target_format, fields)
                choice = pool.submit(
                    self.choose_compression,
                    payload.path,
                    rtt.result(),
                    sampled if payload.path == stored else None,
                )
                copy_id, sent = self.rsync_and_upload(
                    cli,
                    image,
                    payload.path,
                    payload.digests,
                    fields,
                    lookup,
                    rtt.result(),
                    _left_there(earlier),
                    choice.result(),
                )
                # the helper removed what it fed; an earlier attempt may have sent the file
                # in another layout (one file, or pieces: STREAMS=auto found another round trip)
                quietly(self.remove_staged, cli, image.id, target_format)
            except AlreadyThere as there:
                quietly(self.remove_staged, cli, image.id)
                return self.already_there(there.copy)
            finally:
                self.staged.close()
                shutil.rmtree(self.workdir, ignore_errors=True)
        return MigrationResult(Outcome.MIGRATED, copy_id, sent)

    def remove_staged(self, cli: RemoteGlance, image_id: str, disk_format: str = "*") -> None:
        """Remove the image's staging files there, of any format or in ``disk_format`` (this
        pair's: only while the lease is ours; another site on the same account may be
        sending the image too, in this format or another)."""
        self.fence()
        cli.remove_parts(
            self.remote_dir, image_id, disk_format, (site_tag(self.site.site_id), None)
        )

    # 6-8, REGISTER=api
    def stream_to_api(self, payload: Payload, fields: Mapping[str, Any]) -> str:
        """Create the record and upload the bytes into it through the destination's API.

        A file of the staging cache (a download, a conversion), hashed by migratio when it was
        made and unchanged since, goes as it is (:meth:`GlanceApi.upload_file`: no second
        hashing, zero-copy); other bytes (the source's file store) are hashed on the way and
        cut off before the last byte if they are wrong (:meth:`GlanceApi.upload`). Either way
        Glance's own hashes are compared with ``payload.digests`` afterwards.
        """
        api = self.destination
        assert isinstance(api, GlanceApi)
        digests = payload.digests
        self.fence()
        copy = api.create(fields)
        try:
            report = self.progress("Uploading", digests.size)

            def on_progress(done: int) -> None:
                # SIGTERM to ``migratio migrate``, a cold stop: the rest is not sent
                if self.cancel.is_set():
                    raise Cancelled("the upload was stopped on request")
                report(done)

            if payload.entry is not None and payload.entry.unchanged():
                api.upload_file(
                    copy.id,
                    payload.path,
                    digests,
                    on_progress,
                    bwlimit=self.site.bwlimit,
                    unchanged=payload.entry.unchanged,
                )
            else:
                with payload.path.open("rb") as stream:
                    reader = (
                        stream
                        if self.site.bwlimit is None
                        else ThrottledReader(stream, self.site.bwlimit)
                    )
                    api.upload(copy.id, reader, digests, on_progress)
            self.status(f"{status.TRANSFERED} {human_bytes(digests.size)} to {api.where}")
            self.verify(copy.id, digests, fields)
        except BaseException:
            quietly(api.delete, copy.id)
            raise
        self.status(f"{status.REGISTERED} as image {copy.id} at {self.site.site_id}")
        return copy.id

    def push(
        self,
        payload: Path,
        remote_path: str,
        *,
        sparse: bool,
        cancel: threading.Event,
        choice: Choice,
        streams: int = 1,
        piece: int | None = None,
    ) -> rsync.RsyncResult:
        """rsync ``payload`` there, compressed as ``choice`` says (:meth:`choose_compression`).

        With ``piece``, it goes in pieces of that size over ``streams`` connections at once
        (:mod:`migratio.openstack.streams`). The remote staging directory is made on the way.
        """
        assert self.site.ssh is not None
        assert self.master is not None
        history = LinkHistory(self.settings.staging_dir)
        size = payload.stat().st_size
        per_piece = (
            None if piece is None else PieceCompression(choice, streams, -(-size // piece), piece)
        )
        plan = choice.algorithm if per_piece is None else per_piece.plan()
        log.info("compression %s (%s)", plan, choice.reason)
        on_progress = self.progress("Transferring", size)
        if piece is not None and per_piece is not None:
            result = push_ranges(
                payload,
                self.site.ssh,
                remote_path,
                streams=streams,
                piece=piece,
                workdir=self.workdir,
                timeout=self.settings.command_timeout,
                cancel=cancel,
                on_progress=on_progress,
                compress=per_piece,
                bwlimit=self.site.bwlimit,
                make_dir=self.remote_dir,
                shared=self.master,
            )
        else:
            self.master.wait()  # its login is under way: sooner than one of rsync's own
            result = rsync.push(
                payload,
                self.master.target,
                remote_path,
                sparse=sparse,
                timeout=self.settings.command_timeout,
                cancel=cancel,
                on_progress=on_progress,
                compress=choice.algorithm,
                bwlimit=self.site.bwlimit,
                make_dir=self.remote_dir,
                renice_sshd=False,  # the master's sshd starts the upload helper too
            )
        history.record(
            self.site.site_id,
            result.bytes_sent,
            result.seconds,
            capped=self.site.bwlimit is not None,
            compressed=result.compress != "none",  # "lz4, then zstd" too
        )
        trial = None if per_piece is None else per_piece.outcome()
        if trial is not None:
            history.record_trial(self.site.site_id, trial)
        return result

    def choose_compression(
        self, payload: Path, rtt: float | None, sampled: Future[float] | None = None
    ) -> Choice:
        """How rsync compresses ``payload``: the site's ``COMPRESS``, or what ``auto`` finds
        (from ``sampled``, its samples' ratio, when they were taken already)."""
        link_rate, trial = LinkHistory(self.settings.staging_dir).known(self.site.site_id)
        ratio = None
        if sampled is not None:
            try:
                ratio = sampled.result()
            except OSError as exc:
                log.info("sampling %s failed (%s): again", payload, exc)
        return compression.choose(
            self.site.compress, payload, link_rate, rtt, ratio=ratio, trial=trial
        )

    @property
    def remote_dir(self) -> str:
        return self.site.remote_staging_dir.rstrip("/") or "."

    # 6-8, over SSH
    def rsync_and_upload(
        self,
        cli: RemoteGlance,
        image: ImageRecord,
        payload: Path,
        digests: Digests,
        fields: Mapping[str, Any],
        lookup: Future[ImageRecord | None],
        rtt: float | None,
        earlier: Mapping[str, int],
        choice: Choice,
    ) -> tuple[str, int]:
        """rsync the file while the destination's glance CLI uploads what has arrived.

        The transfer starts at once; the upload only when ``lookup`` (the search for an
        existing copy) has found none. If it found one, the transfer is stopped and
        :class:`AlreadyThere` raised. ``earlier`` (staging file → bytes there) says in
        which layout an interrupted attempt left the file, to resume it in the same one;
        ``choice`` how rsync compresses it.
        """
        assert self.site.ssh is not None
        target_format = str(fields["disk_format"])
        _, digest = digests.cheapest()
        name = staging_name(image.id, digest, self.site.site_id, target_format)
        remote_path = f"{self.remote_dir}/{name}"
        sparse = target_format == "raw"
        streams, piece = (
            (1, None) if sparse else layout(self.site.streams, rtt, digests.size, earlier, name)
        )
        self.fence()
        with linked(self.cancel) as stop, ThreadPoolExecutor(1, "transfer") as pool:
            transfer = pool.submit(
                self.push,
                payload,
                remote_path,
                sparse=sparse,
                cancel=stop,
                choice=choice,
                streams=streams,
                piece=piece,
            )
            try:
                existing = lookup.result()
                if existing is not None:
                    raise AlreadyThere(existing)
                self.fence()
            except BaseException:
                stop.set()  # and the pool waits for the transfer to end
                raise
            return self.upload(cli, image, transfer, remote_path, digests, fields, piece)

    def upload(
        self,
        cli: RemoteGlance,
        image: ImageRecord,
        transfer: Future[rsync.RsyncResult],
        remote_path: str,
        digests: Digests,
        fields: Mapping[str, Any],
        piece: int | None,
    ) -> tuple[str, int]:
        """Upload the file arriving at ``remote_path`` into Glance there, check the copy."""
        assert self.site.ssh is not None
        algo, digest = digests.cheapest()
        log.info(
            "no copy at %s yet: uploading into its Glance as the file arrives", self.site.site_id
        )

        def start() -> processes.Child:
            return cli.start_follow_create(
                fields, remote_path, digests.size, algo, digest, FOLLOW_IDLE, piece
            )

        follower = start()
        copy: ImageRecord | None = None
        try:
            try:
                pushed = transfer.result()
                sent = pushed.bytes_sent
                self.status(
                    f"{status.TRANSFERED} {human_bytes(digests.size)} to {self.site.ssh.host} "
                    f"({human_bytes(sent)} sent, compression {pushed.compress})"
                )
                for pause in (*LOGIN_RETRIES, None):
                    _tell(follower.popen.stdin, b"done\n")
                    upload = follower.communicate(
                        timeout=self.settings.command_timeout, cancel=self.cancel
                    )
                    if (
                        pause is None
                        or upload.returncode != 255
                        or not login_refused(upload.stderr)
                    ):
                        break
                    # the helper never ran (no master: a login of its own, which sshd refused)
                    log.info("the ssh login to %s was refused (%s); again in %.1f s",
                             self.site.ssh.host, upload.tail(1), pause)  # fmt: skip
                    time.sleep(pause)
                    follower = start()
                log.info(
                    "the upload into Glance at %s (%s) exited %d",
                    self.site.site_id,
                    upload_way(upload.stdout),
                    upload.returncode,
                )
            finally:
                _end(follower)
            copy, shown = cli.uploaded(upload.stdout, fields)
            if upload.returncode != 0:
                if "follow_upload: aborted" in upload.stderr and algo in upload.stderr:
                    for path in remote_files(remote_path, digests.size, piece):
                        quietly(cli.remove_file, path)  # wrong bytes: nothing to resume
                raise RemoteError(
                    f"uploading into Glance at {self.site.site_id} failed "
                    f"(exit {upload.returncode}): {_why(upload, self.site.ssh.host)}",
                    retryable=True,
                )
            if copy is None:
                raise RemoteError(
                    f"the upload into Glance at {self.site.site_id} printed no image "
                    f"({upload_way(upload.stdout)})"
                )
            self.verify(copy.id, digests, fields, shown=shown)
        except BaseException as exc:
            if copy is not None:
                quietly(cli.delete, copy.id)
            else:
                quietly(lambda: self.delete_leftovers(cli.find(source_uuid=image.id)))
            if not (isinstance(exc, MigratioError) and exc.retryable):
                # nothing will resume this transfer: the staged file goes now, not at the sweep
                quietly(self.remove_staged, cli, image.id)
            raise
        self.status(f"{status.REGISTERED} as image {copy.id} at {self.site.site_id}")
        return copy.id, sent

    def delete_leftovers(self, copies: list[ImageRecord]) -> None:
        """Delete unfinished copies that an interrupted attempt of ours left behind.

        Only in migratio's own project: another project's image is never deleted.
        """
        if not any(copy.status in LEFTOVER_STATES for copy in copies):
            return
        owner = self.own_project()
        for copy in copies:
            if (
                copy.status in LEFTOVER_STATES
                and copy.properties.get("source_cs") == self.me
                and copy.owner == owner
            ):
                self.fence()
                log.info("deleting %s copy %s left by an interrupted attempt", copy.status, copy.id)
                self.destination.delete(copy.id)


def _why(upload: processes.Completed, host: str) -> str:
    """Why the remote upload failed, in the helper's words (or the shell's, or ssh's)."""
    why = upload.tail() or (
        f"the ssh connection to {host} was lost"
        if upload.returncode == 255
        else "it printed nothing"
    )
    if 128 < upload.returncode < 255 and "follow_upload:" not in upload.stderr:
        # the remote shell's status of the helper it ran: a signal ended it
        why = f"the upload helper there was killed by signal {upload.returncode - 128} ({why})"
    return why


def _is_file(path: Path) -> bool:
    try:
        return path.is_file()
    except OSError:
        return False


def _left_there(listing: Future[dict[str, int]]) -> dict[str, int]:
    """What an interrupted attempt left in the remote staging directory (nothing known when
    it could not be listed: the transfer then reports what is wrong with the host)."""
    try:
        return listing.result()
    except Exception as exc:
        log.warning("cannot list the remote staging files (%s): resuming in this layout only", exc)
        return {}


class Payload(NamedTuple):
    """The bytes a migration sends, what they hash to, and their staging cache entry: one
    whose file migratio itself hashed as it made it (a download checked against the source
    Glance's digest, a conversion) is :meth:`Entry.unchanged` while it stays as made."""

    path: Path
    digests: Digests
    entry: Entry | None = None


class AlreadyThere(Exception):
    """The lookup found the copy while the transfer was running."""

    def __init__(self, copy: ImageRecord) -> None:
        super().__init__(copy.id)
        self.copy = copy


def destination_for(site: OpenStackSite, settings: Settings) -> GlanceApi | RemoteGlance:
    """The adapter for registering at ``site``: its Glance API or its glance CLI over SSH."""
    if site.register == "api":
        assert site.api is not None
        return GlanceApi(site.api)
    return RemoteGlance(site, timeout=min(settings.command_timeout, 900))


def migrate_to_openstack(
    settings: Settings,
    request: MigrationRequest,
    sink: StatusSink,
    *,
    cancel: threading.Event | None = None,
    fence: Callable[[], None] | None = None,
    master: SshMaster | None = None,
) -> MigrationResult:
    """Migrate one image to an OpenStack site, reporting each step to ``sink``.

    A failure is reported to ``sink`` with the original's text where it had one, then raised.
    ``master``: the site's SSH master connection, already started (REGISTER=ssh; else the
    migration starts its own).
    """
    try:
        site = settings.site(request.destination)
        if not isinstance(site, OpenStackSite):
            raise ConfigError(f"site {site.site_id} is an Amazon site, not an OpenStack one")
        migration = Migration(
            settings=settings,
            request=request,
            site=site,
            status=sink,
            source=SourceSite(settings, GlanceApi(settings.source), sink),
            destination=destination_for(site, settings),
            workdir=settings.staging_dir / f"{request.image_id}-{site.site_id}",
            cancel=cancel or threading.Event(),
            master=master,
        )
        if fence is not None:
            migration.fence = fence
        return migration.run()
    except MigratioError as exc:
        sink(exc.status_line())
        raise


def remote_files(remote_path: str, size: int, segment: int | None) -> list[str]:
    """The file, or its pieces (one per stream), that the transfer writes there."""
    if not segment:
        return [remote_path]
    return [f"{remote_path}.{k}" for k in range(-(-size // segment))]


def _end(follower: processes.Child, grace: float = 10.0) -> None:
    """End the remote upload and wait for it: EOF on its stdin makes the helper kill its
    ``glance image-create`` and exit, so that an image record the CLI was still creating
    exists before the caller looks for leftovers (then stop whatever is left)."""
    if follower.poll() is None:
        with contextlib.suppress(OSError):
            if follower.popen.stdin is not None:
                follower.popen.stdin.close()
        with contextlib.suppress(subprocess.TimeoutExpired):
            follower.popen.wait(timeout=grace)
    follower.stop()


def _tell(stream: Any, message: bytes) -> None:
    try:
        stream.write(message)
        stream.flush()
    except (BrokenPipeError, OSError):
        pass  # the helper is gone; its exit status says why
