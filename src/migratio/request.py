"""What every migration takes (a request) and gives (a result)."""

from __future__ import annotations

import re
from dataclasses import dataclass
from enum import Enum

from migratio.errors import ImageNotFoundError

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
