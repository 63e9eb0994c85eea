"""Status lines to Atmosphere: each line of a migration becomes a Sidekiq job on ``feedback``."""

from __future__ import annotations

import logging
import re
import time
from collections.abc import Callable

from redis import Redis
from redis.exceptions import RedisError

from migratio.atmosphere.keys import Keys
from migratio.atmosphere.sidekiq import push_status

log = logging.getLogger(__name__)

_PROGRESS = re.compile(r"^\w+: (\d+)% ")
#: progress lines reach Atmosphere only every this many percent or seconds
PROGRESS_STEP = 10
PROGRESS_SECONDS = 30.0


class AtmosphereSink:
    """A status sink that pushes to Atmosphere's feedback queue.

    Progress lines are thinned so Atmosphere's status text stays readable. A line that cannot
    be pushed (Redis down) is kept and sent before the next one, so none is lost or reordered.
    """

    def __init__(
        self,
        redis: Redis,
        keys: Keys,
        image_id: str,
        own_site: str,
        destination: str,
        *,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.redis = redis
        self.keys = keys
        self.args = (image_id, own_site, destination)
        self.clock = clock
        self.pending: list[str] = []
        self._last_percent = -PROGRESS_STEP
        self._last_time = -PROGRESS_SECONDS

    def __call__(self, text: str) -> None:
        match = _PROGRESS.match(text)
        if match:
            percent, now = int(match.group(1)), self.clock()
            if (
                percent - self._last_percent < PROGRESS_STEP
                and now - self._last_time < PROGRESS_SECONDS
            ):
                return
            self._last_percent, self._last_time = percent, now
        self.pending.append(text)
        self.flush()

    def flush(self) -> None:
        """Send what is pending, oldest first; keep the rest if Redis fails."""
        while self.pending:
            try:
                push_status(self.redis, self.keys, *self.args, self.pending[0])
            except RedisError as exc:
                log.warning("cannot send a status line to Atmosphere yet: %s", exc)
                return
            self.pending.pop(0)
