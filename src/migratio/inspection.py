"""Look at an image's bytes before any tool opens it (the CVE-2024-32498 class of checks).

oslo.utils' format inspector is what Glance and Nova use: it reads only the headers, detects
the real format, and refuses backing files, external data files and other unsafe features.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

from oslo_utils.imageutils import format_inspector

from migratio.errors import ImageRefusedError

log = logging.getLogger(__name__)

#: Glance disk formats whose bytes are a plain disk: the inspector may call them gpt or mbr
RAW_LIKE = frozenset({"raw", "gpt", "mbr"})
RAW_DECLARED = frozenset({"raw", "ami", "ari", "aki"})


@dataclass(frozen=True)
class Inspection:
    """What the bytes really are."""

    format: str
    virtual_size: int


def inspect_image(path: Path, declared_format: str) -> Inspection:
    """Detect ``path``'s format, check it is safe and matches Glance's ``disk_format``."""
    try:
        inspector = format_inspector.detect_file_format(str(path))
    except format_inspector.ImageFormatError as exc:
        raise ImageRefusedError(f"cannot tell what format the image is: {exc}") from exc
    if inspector is None:
        raise ImageRefusedError("the image's format is not recognised")
    found = str(inspector)
    matches = found == declared_format or (declared_format in RAW_DECLARED and found in RAW_LIKE)
    if not matches:
        raise ImageRefusedError(
            f"Glance says the image is {declared_format!r} but its bytes are {found!r}; "
            "refusing to process it"
        )
    try:
        inspector.safety_check()
    except format_inspector.SafetyCheckFailed as exc:
        reasons = "; ".join(f"{name}: {why}" for name, why in exc.failures.items())
        raise ImageRefusedError(
            f"the {found} image is unsafe and was not processed ({reasons})"
        ) from exc
    except format_inspector.ImageFormatError as exc:
        raise ImageRefusedError(f"the {found} image cannot be parsed safely: {exc}") from exc
    log.debug("inspected %s: %s, virtual size %d", path, found, inspector.virtual_size)
    return Inspection(
        format="raw" if found in RAW_LIKE else found, virtual_size=inspector.virtual_size
    )
