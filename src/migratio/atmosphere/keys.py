"""The Redis keys migratio shares with Atmosphere — an interface to a program that is not ours.

Atmosphere speaks Sidekiq through redis-namespace: every Sidekiq key ``K`` is stored as
``<namespace>:K``. An empty namespace is *not* "no namespace" in Ruby: it gives the prefix ``:``.
migratio's own keys live under the same prefix but never as ``queue:*``, which Sidekiq's tools
would take for queues.
"""

from __future__ import annotations

from dataclasses import dataclass

#: Atmosphere's job classes, and the migration kind each asks for
OPENSTACK_MIGRATOR = "Migratio::Worker::OpenstackOpenstackMigrator"
AMAZON_MIGRATOR = "Migratio::Worker::OpenstackAmazonMigrator"
MIGRATION_CLASSES = {OPENSTACK_MIGRATOR: "openstack", AMAZON_MIGRATOR: "amazon"}
#: the Sidekiq worker in Atmosphere that takes migratio's status lines
FEEDBACK_CLASS = "Atmosphere::UpdateMigrationJobStatusWorker"
FEEDBACK_QUEUE = "feedback"


def migration_queue(site_id: str) -> str:
    """The Sidekiq queue name Atmosphere pushes a site's migrations to."""
    return f"migration_{site_id}"


@dataclass(frozen=True)
class Keys:
    """Full Redis key names under one namespace (None: bare keys)."""

    namespace: str | None

    def key(self, name: str) -> str:
        """``name`` with the namespace prefix."""
        return name if self.namespace is None else f"{self.namespace}:{name}"

    @property
    def queues(self) -> str:
        """Sidekiq's set of queue names."""
        return self.key("queues")

    def queue(self, queue_name: str) -> str:
        """A Sidekiq queue's list."""
        return self.key(f"queue:{queue_name}")

    def inflight(self, site_id: str) -> str:
        """migratio's list of jobs taken from the queue but not yet handed to a worker."""
        return self.key(f"migratio:inflight:{site_id}")

    def dead(self, site_id: str) -> str:
        """migratio's dead-letter list: payloads it could not understand, with the reason."""
        return self.key(f"migratio:dead:{site_id}")

    def lease(self, site_id: str, image_id: str, destination: str) -> str:
        """The lease that lets one attempt at a time migrate ``image_id`` to ``destination``."""
        return self.key(f"migratio:lease:{site_id}:{image_id}:{destination}")

    def lease_history(self, site_id: str) -> str:
        """A stream of every lease taken, renewed, released or lost (for operators and tests)."""
        return self.key(f"migratio:leases:{site_id}")

    def running(self, site_id: str, destination: str) -> str:
        """The migrations to ``destination`` running now (a sorted set: job → slot expiry)."""
        return self.key(f"migratio:running:{site_id}:{destination}")

    def waiting(self, site_id: str, destination: str) -> str:
        """The migrations to ``destination`` waiting for a slot (a sorted set: job → arrival)."""
        return self.key(f"migratio:waiting:{site_id}:{destination}")

    def waiting_seen(self, site_id: str, destination: str) -> str:
        """When each waiting migration to ``destination`` last asked for a slot."""
        return self.key(f"migratio:waiting-seen:{site_id}:{destination}")

    def metrics(self, site_id: str) -> str:
        """migratio's counters for Prometheus (a hash every worker process adds to)."""
        return self.key(f"migratio:metrics:{site_id}")

    def sweep(self, site_id: str) -> str:
        """Set while the last sweep of leftovers is recent (its expiry times the next one)."""
        return self.key(f"migratio:sweep:{site_id}")

    def rq_queue_name(self, site_id: str) -> str:
        """The RQ queue that migratio's workers take this site's migrations from."""
        prefix = "" if self.namespace is None else f"{self.namespace}-"
        return f"{prefix}migratio-{site_id}"
