"""What every migration takes (a request), gives (a result), and has while it runs."""

from __future__ import annotations

import re
import threading
from collections.abc import Callable
from contextlib import ExitStack
from dataclasses import dataclass, field
from enum import Enum
from pathlib import Path
from typing import TYPE_CHECKING

from migratio.atmosphere.status import Progress, StatusSink
from migratio.errors import ImageNotFoundError

if TYPE_CHECKING:
    from migratio.config import Settings
    from migratio.source_site import SourceSite

_UUID = re.compile(r"[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}")


@dataclass(frozen=True)
class MigrationRequest:
    """Copy image ``image_id`` of this site to site ``destination``."""

    image_id: str
    destination: str

    def __post_init__(self) -> None:
        if not isinstance(self.image_id, str) or not _UUID.fullmatch(self.image_id):
            raise ImageNotFoundError(f"{self.image_id!r} is not an image id (a UUID)")


class Outcome(Enum):
    """How a migration ended well."""

    MIGRATED = "migrated"
    ALREADY_THERE = "already there"


@dataclass(frozen=True)
class MigrationResult:
    """What a successful migration did."""

    outcome: Outcome
    destination_image_id: str
    bytes_sent: int = 0


@dataclass(kw_only=True)
class MigrationRun:
    """One run of one migration, whatever the destination's kind: what all its steps use."""

    settings: Settings
    request: MigrationRequest
    status: StatusSink
    source: SourceSite
    workdir: Path
    cancel: threading.Event
    #: raises when this attempt may no longer touch the destination (see migratio.lease)
    fence: Callable[[], None] = lambda: None
    #: the staging cache entries this run uses (held until the end of the run)
    staged: ExitStack = field(default_factory=ExitStack)

    @property
    def me(self) -> str:
        """This site's name (what the copies' ``source_t`` says)."""
        return self.settings.name

    def progress(self, label: str, total: int) -> Callable[[int], None]:
        """A progress callback for ``total`` bytes: status lines, and the lease's fence."""
        report = Progress(self.status, label, total, interval=self.settings.progress_interval)

        def fenced(done: int) -> None:
            self.fence()
            report(done)

        return fenced
