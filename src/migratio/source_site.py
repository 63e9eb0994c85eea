"""This site's side of every migration: find the image in Glance, get its bytes, inspect them.

Both migrations (to OpenStack and to Amazon) start with exactly these steps.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path

from migratio.config import Settings
from migratio.errors import ImageNotFoundError
from migratio.glance_api import GlanceApi
from migratio.images import ImageRecord
from migratio.inspection import inspect_image
from migratio.status import Progress, StatusSink, human_bytes

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

    def local_bytes(self, image: ImageRecord, workdir: Path) -> Path:
        """The image's file in the local file store, else a verified download into ``workdir``."""
        stored = self.settings.images_dir / image.id
        try:
            if stored.is_file() and os.access(stored, os.R_OK):
                if stored.stat().st_size == image.size:
                    log.info("reading %s from the file store", stored)
                    return stored
                log.warning("%s has the wrong size; downloading from Glance instead", stored)
        except OSError as exc:
            log.info("cannot use %s (%s); downloading from Glance", stored, exc)
        path = workdir / f"{image.id}.{image.disk_format}"
        size = image.size or 0
        self.status(f"Downloading {human_bytes(size)} from Glance at {self.name}")
        progress = Progress(
            self.status, "Downloading", size, interval=self.settings.progress_interval
        )
        self.api.download_to(image, path, progress)
        return path

    def inspected_bytes(self, image: ImageRecord, workdir: Path) -> Path:
        """:meth:`local_bytes`, checked to be what Glance says they are and safe to open."""
        path = self.local_bytes(image, workdir)
        inspect_image(path, str(image.disk_format))
        return path
