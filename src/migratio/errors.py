"""The one exception tree of migratio.

Every error carries a message for the operator (and for Atmosphere's status line) and says
whether retrying the same work can help. Tracebacks go to the log only.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

from migratio.atmosphere import status

log = logging.getLogger(__name__)


class MigratioError(Exception):
    """Root of every error migratio raises on purpose.

    ``message`` is what an operator reads; ``retryable`` says whether the same job run again
    later may succeed (a network hiccup) or never will (a missing image).
    """

    retryable: bool = False
    #: the original tool's status text for this kind of failure, when it had one
    status_text: str | None = None

    def __init__(self, message: str, *, retryable: bool | None = None) -> None:
        super().__init__(message)
        self.message = message
        if retryable is not None:
            self.retryable = retryable

    def __str__(self) -> str:
        return self.message

    def status_line(self) -> str:
        """The line Atmosphere shows for this failure: the original's text, then the detail."""
        if self.status_text:
            return f"{self.status_text} {self.message}"
        return f"Error: {self.message}"


class ConfigError(MigratioError):
    """Configuration is missing or invalid; names the file, the key and the reason."""

    exit_code = 78  # EX_CONFIG from sysexits.h


class RedisFailure(MigratioError):
    """Redis (shared with Atmosphere) cannot be used: unreachable, refused, or unfit.

    The message names the URL (never its password), what failed and what to check.
    """

    exit_code = 69  # EX_UNAVAILABLE from sysexits.h
    retryable = True


class SiteConfigError(ConfigError):
    """A destination's site file is broken: only jobs to that site fail, and they are retried
    (fixing the file lets the next attempt through)."""

    retryable = True


class PayloadError(MigratioError):
    """A job's payload cannot be understood (bad JSON, unknown class, wrong args)."""


class UnknownSiteError(ConfigError):
    """A job names a destination site that has no configuration file."""


class ImageNotFoundError(MigratioError):
    """The requested image is not on the source site, or not usable there."""

    status_text = status.IMAGE_NOT_EXIST


class ImageRefusedError(MigratioError):
    """The image's bytes are unsafe or do not match what Glance says they are."""

    status_text = status.IMAGE_NOT_EXIST


class MetadataError(MigratioError):
    """The image's name or properties cannot be registered exactly at the destination."""


class ToolError(MigratioError):
    """An external program (qemu-img, rsync, ssh, glance) failed or is missing."""


class ConversionError(ToolError):
    """qemu-img could not convert the image."""

    status_text = status.NOT_CONVERTED


class TransferError(ToolError):
    """Moving the bytes to the destination failed."""

    retryable = True


class RemoteError(ToolError):
    """A command on the destination host failed."""

    retryable = True


class GlanceError(MigratioError):
    """A Glance API call failed (source or destination)."""


class VerificationError(MigratioError):
    """The bytes that arrived are not the bytes that left."""

    retryable = True


class Cancelled(MigratioError):
    """The work was stopped on request (SIGTERM or a deadline)."""

    retryable = True


class StagingFullError(MigratioError):
    """The image does not fit in the staging cache (``staging_max_bytes``) or its disk."""


class AwsError(MigratioError):
    """An Amazon Web Services call failed (EC2, EBS direct APIs, S3, VM Import)."""


class NotUploadedError(AwsError):
    """The image's bytes did not reach Amazon (snapshot blocks, S3 object, or the import)."""

    status_text = status.NOT_UPLOADED


def quietly(action: Callable[..., Any], *args: Any) -> None:
    """Run a best-effort clean-up step: its failure is logged, never raised over the real error."""
    try:
        action(*args)
    except Exception:
        log.exception("clean-up step %s%r failed", getattr(action, "__name__", action), args)
