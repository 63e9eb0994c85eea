"""Run one migration: :func:`migrate` picks the OpenStack or the Amazon one by destination."""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import TYPE_CHECKING, Literal

from migratio.atmosphere.status import StatusSink
from migratio.config import Settings
from migratio.errors import ConfigError, MigratioError
from migratio.openstack.migration import migrate_to_openstack
from migratio.request import MigrationRequest, MigrationResult

if TYPE_CHECKING:
    from migratio.adapters.ssh import SshMaster

_KIND_NAMES = {"openstack": "OpenStack", "amazon": "Amazon"}


def migrate(
    settings: Settings,
    request: MigrationRequest,
    sink: StatusSink,
    *,
    kind: Literal["openstack", "amazon"] | None = None,
    cancel: threading.Event | None = None,
    fence: Callable[[], None] | None = None,
    master: SshMaster | None = None,
) -> MigrationResult:
    """Migrate one image to its destination, OpenStack or Amazon, reporting to ``sink``.

    ``kind`` is what the job asked for (Atmosphere's job class); a destination of the other
    kind is refused. Failures are reported to ``sink`` and raised. ``fence`` raises when this
    attempt may no longer touch the destination (its lease is lost, see :mod:`migratio.lease`).
    ``master``: the destination's SSH master connection when the caller started it already
    (:func:`migratio.cli.early_login`).
    """
    try:
        site = settings.site(request.destination)
        if kind is not None and site.kind != kind:
            raise ConfigError(
                f"site {site.site_id} is an {_KIND_NAMES[site.kind]} site, but the job asks "
                f"for a migration to {_KIND_NAMES[kind]}"
            )
    except MigratioError as exc:
        sink(exc.status_line())
        raise
    if site.kind == "amazon":
        # imported here: boto3 costs ~0.3 s that a migration to OpenStack need not wait for
        from migratio.amazon.migration import migrate_to_amazon  # noqa: PLC0415

        return migrate_to_amazon(settings, request, sink, cancel=cancel, fence=fence)
    return migrate_to_openstack(settings, request, sink, cancel=cancel, fence=fence, master=master)
