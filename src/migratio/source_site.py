"""This site's side of every migration: find the image in Glance, get its bytes, inspect them.

Both migrations (to OpenStack and to Amazon) start with exactly these steps.
"""

from __future__ import annotations

import logging
import os
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from migratio.adapters import qemu_img
from migratio.adapters.glance_api import GlanceApi
from migratio.atmosphere.status import Progress, StatusSink, human_bytes
from migratio.config import Settings
from migratio.errors import ImageNotFoundError
from migratio.hashing import file_digests
from migratio.images import ImageRecord
from migratio.inspection import inspect_image
from migratio.staging import Entry, StagingCache, entry_name

log = logging.getLogger(__name__)


@dataclass
class SourceSite:
    """The source Glance and its file store, reporting to one migration's status sink."""

    settings: Settings
    api: GlanceApi
    status: StatusSink

    @property
    def name(self) -> str:
        return self.settings.name

    def find(self, image_id: str) -> ImageRecord:
        """The image, active and with data; :class:`ImageNotFoundError` otherwise."""
        image = self.api.get(image_id)
        if image is None:
            raise ImageNotFoundError(f"image {image_id} is not on site {self.name}")
        if image.status != "active":
            raise ImageNotFoundError(
                f"image {image.id} on site {self.name} is {image.status}, not active"
            )
        if not image.disk_format or not image.size:
            raise ImageNotFoundError(f"image {image.id} on site {self.name} has no data")
        return image

    @property
    def cache(self) -> StagingCache:
        """This host's staging cache, shared by every job (see :mod:`migratio.staging`)."""
        return StagingCache(
            self.settings.staging_dir / "cache",
            self.settings.staging_max_bytes,
            self.settings.staging_keep,
        )

    def has_local_file(self, image: ImageRecord) -> bool:
        """Whether the image's file is in the local file store (no download needed)."""
        stored = self.settings.images_dir / image.id
        try:
            return stored.is_file() and stored.stat().st_size == image.size
        except OSError:
            return False

    def stored_file(self, image: ImageRecord) -> Path | None:
        """The image's file in the local file store, if it is there and readable."""
        stored = self.settings.images_dir / image.id
        try:
            if stored.is_file() and os.access(stored, os.R_OK):
                if stored.stat().st_size == image.size:
                    log.info("reading %s from the file store", stored)
                    return stored
                log.warning("%s has the wrong size; downloading from Glance instead", stored)
        except OSError as exc:
            log.info("cannot use %s (%s); downloading from Glance", stored, exc)
        return None

    @contextmanager
    def local_bytes(self, image: ImageRecord, cancel: threading.Event) -> Iterator[Entry]:
        """The image's file in the file store, else a verified download in the staging cache.

        The download is shared with every other job of the same image (and content) on this
        host, and kept in the cache while the block runs. Its md5 (or the algorithm
        :meth:`Digests.cheapest` picks) was computed from the bytes as they were written and
        equals the source Glance's: :meth:`Entry.unchanged` tells it from the file store's
        file, which migratio has not hashed (its entry has no ``meta``).
        """
        stored = self.stored_file(image)
        if stored is not None:
            yield Entry(stored, {})
            return
        size = image.size or 0

        def download(target: Path) -> dict[str, Any]:
            self.status(f"Downloading {human_bytes(size)} from Glance at {self.name}")
            progress = Progress(
                self.status, "Downloading", size, interval=self.settings.progress_interval
            )
            self.api.download_to(image, target, progress)
            return {"image": image.id, "source_hash": image.source_hash, "made": "download"}

        name = entry_name(image.id, image.source_hash, str(image.disk_format))
        with self.cache.use(name, size, download, cancel=cancel) as entry:
            yield entry

    @contextmanager
    def inspected_bytes(self, image: ImageRecord, cancel: threading.Event) -> Iterator[Entry]:
        """:meth:`local_bytes`, checked to be what Glance says they are and safe to open."""
        with self.local_bytes(image, cancel) as local:
            inspect_image(local.path, str(image.disk_format))
            yield local

    @contextmanager
    def converted(
        self, image: ImageRecord, local: Path, target_format: str, cancel: threading.Event
    ) -> Iterator[Entry]:
        """``local`` (the image's inspected bytes) converted to ``target_format``, cached.

        The conversion is made once per image, content and format on this host; its entry
        records the ``size`` and ``md5`` of the converted bytes.

        One digest is all that is needed afterwards: every Glance reports the md5 of an
        image's bytes as ``checksum``, and the copy's check (:meth:`Digests.matches`) needs one
        agreeing digest; the remote helper of ``REGISTER=ssh`` checks one algorithm
        (:meth:`Digests.cheapest`, md5 here); ``converted_hash`` on the copy is compared with
        Glance's ``checksum`` the same way. A second digest (sha512, as until December 2026)
        cost a core for ~8 s per 4 GiB and was compared only where md5 already was.
        """

        def convert(target: Path) -> dict[str, Any]:
            qemu_img.convert(
                local,
                str(image.disk_format),
                target,
                target_format,
                timeout=self.settings.command_timeout,
                cancel=cancel,
            )
            digests = file_digests(target, ("md5",))
            return {"image": image.id, "source_hash": image.source_hash, **digests}

        name = entry_name(image.id, image.source_hash, target_format)
        with self.cache.use(
            name, conversion_estimate(local, target_format), convert, cancel=cancel
        ) as entry:
            yield entry


def conversion_estimate(local: Path, target_format: str) -> int:
    """Disk space a conversion of ``local`` may take: a sparse raw file holds its data only.

    Not exact (qcow2 compression, zero clusters): the cache counts the real size once made.
    """
    stat = local.stat()
    return max(stat.st_size, stat.st_blocks * 512)
