"""The Redis shared with Atmosphere: how migratio connects, and what it says when it cannot.

* ``redis_url`` (``redis://``, ``rediss://`` for TLS, ``unix://``; an ACL user and password in
  the URL) and the TLS files (``redis_ca_file``, ``redis_cert_file``, ``redis_key_file``) are
  checked when the configuration is loaded, like every other key;
* :func:`connect` is the one place a client is made;
* :func:`redis_errors` turns any Redis failure into a :class:`RedisFailure`: one line naming
  the URL (never its password), what failed and what to check;
* :func:`probe` is what ``migratio check`` asks of Redis: connect and authenticate, version
  6.2 or newer, the namespace's keys readable, ``BLMOVE`` allowed and working.
"""

from __future__ import annotations

import os
import re
import ssl
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import parse_qs, urlsplit

from migratio.atmosphere.keys import Keys, migration_queue
from migratio.errors import ConfigError, RedisFailure

if TYPE_CHECKING:
    from redis import Redis

# redis-py is imported where it is used (~0.2 s with its asyncio half): the configuration,
# which validates the URL here, is loaded before ``migrate`` starts its SSH login

SCHEMES = ("redis", "rediss", "unix")
#: BLMOVE, which takes jobs without losing one, came with Redis 6.2
MIN_VERSION = (6, 2)
#: socket timeouts: longer than the service's blocking pop; a dead host is noticed in seconds
SOCKET_TIMEOUT = 30
CONNECT_TIMEOUT = 5


@dataclass(frozen=True)
class RedisTls:
    """TLS files for a ``rediss://`` URL (None: the system's CAs, no client certificate)."""

    ca_file: Path | None = None
    cert_file: Path | None = None
    key_file: Path | None = None

    @property
    def any(self) -> bool:
        """True when any of the files is set."""
        return any((self.ca_file, self.cert_file, self.key_file))


def redacted(url: str) -> str:
    """``url`` with its password replaced by ``***`` (the user name stays: it helps).

    Works on malformed URLs too (a password with an unencoded ``/`` or ``@``): everything
    between the user name and the last ``@`` is taken for the password.
    """
    url = re.sub(r"([?&]password=)[^&]*", r"\1***", url)
    scheme, sep, rest = url.partition("://")
    if not sep:  # no scheme (a mistake, but the password must stay hidden all the same)
        rest = url
    if "@" not in rest:
        return url
    userinfo, _, host = rest.rpartition("@")
    user, colon, _ = userinfo.partition(":")
    return f"{scheme + '://' if sep else ''}{user}{':***' if colon else ''}@{host}"


def validate_url(value: object, where: str) -> str:
    """``value`` if it is a Redis URL migratio can use; else :class:`ConfigError` saying why.

    ``where`` names the file (``config.yml``) for the message.
    """
    if not isinstance(value, str) or not value.strip():
        raise ConfigError(f"{where}: 'redis_url' must be a URL like redis://HOST:6379/0")
    url = value.strip()
    shown = redacted(url)
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError:  # (its text may quote the password)
        raise ConfigError(
            f"{where}: 'redis_url' {shown} is not a valid URL: the port must be a number, and "
            "special characters in the password %-encoded (/ as %2F, @ as %40, # as %23)"
        ) from None
    if parts.scheme not in SCHEMES:
        raise ConfigError(
            f"{where}: 'redis_url' {shown} must start with redis:// (or rediss:// for TLS, "
            "unix:// for a socket), e.g. redis://localhost:6379/0"
        )
    query = parse_qs(parts.query)
    if parts.scheme == "unix":
        if not parts.path:
            raise ConfigError(f"{where}: 'redis_url' {shown} names no socket path")
        db_text = query.get("db", ["0"])[0]
    else:
        if not parts.hostname:
            raise ConfigError(f"{where}: 'redis_url' {shown} names no host")
        if port == 0:
            raise ConfigError(f"{where}: 'redis_url' {shown}: port 0 is not a port")
        path = parts.path.strip("/")
        db_text = path or query.get("db", ["0"])[0]
    if not re.fullmatch(r"[0-9]{1,5}", db_text):
        raise ConfigError(
            f"{where}: 'redis_url' {shown}: the database must be a number (…/0), not {db_text!r}"
        )
    return url


def validate_tls(url: str, tls: RedisTls, where: str) -> RedisTls:
    """The TLS files, checked: readable, a certificate and its key together, only for TLS."""
    if tls.any and not url.startswith("rediss://"):
        raise ConfigError(
            f"{where}: redis_ca_file, redis_cert_file and redis_key_file are for TLS; "
            f"'redis_url' {redacted(url)} must then start with rediss://"
        )
    if (tls.cert_file is None) != (tls.key_file is None):
        raise ConfigError(f"{where}: set both redis_cert_file and redis_key_file, or neither")
    for key, path in (
        ("redis_ca_file", tls.ca_file),
        ("redis_cert_file", tls.cert_file),
        ("redis_key_file", tls.key_file),
    ):
        if path is not None and not (path.is_file() and os.access(path, os.R_OK)):
            raise ConfigError(f"{where}: '{key}' {path} is not a readable file")
    return tls


def connect(url: str, tls: RedisTls = RedisTls(), **options: Any) -> Redis:
    """A client for ``url`` (bytes replies) with timeouts that outlast a blocking pop."""
    options.setdefault("socket_timeout", SOCKET_TIMEOUT)
    options.setdefault("socket_connect_timeout", CONNECT_TIMEOUT)
    options.setdefault("health_check_interval", 30)
    if url.startswith("rediss://"):
        if tls.ca_file is not None:
            options["ssl_ca_certs"] = str(tls.ca_file)
        if tls.cert_file is not None and tls.key_file is not None:
            options["ssl_certfile"] = str(tls.cert_file)
            options["ssl_keyfile"] = str(tls.key_file)
    from redis import Redis  # noqa: PLC0415 (see the imports)

    return Redis.from_url(url, **options)


def describe(exc: BaseException, url: str, doing: str = "") -> RedisFailure:
    """One line for the operator: where, what failed, what to check."""
    from redis import exceptions as rexc  # noqa: PLC0415 (see the imports)

    where = f"Redis at {redacted(url)}"
    if doing:
        where += f" ({doing})"
    text = " ".join(str(exc).split()) or type(exc).__name__
    tls = url.startswith("rediss://")
    if isinstance(exc, rexc.AuthenticationError) or "WRONGPASS" in text or "NOAUTH" in text:
        what = (
            "authentication failed"
            if "WRONGPASS" in text or "invalid" in text
            else "authentication required"
        )
        hint = (
            "check the user and password in redis_url (user:password@host, "
            "special characters %-encoded) against the server's ACL"
        )
    elif isinstance(exc, rexc.NoPermissionError) or "NOPERM" in text:
        what, hint = (
            f"permission denied: {_short(text)}",
            "grant this ACL user the commands and keys migratio needs (see the README)",
        )
    elif "CERTIFICATE_VERIFY_FAILED" in text or "certificate verify failed" in text:
        what = f"the server's TLS certificate is not trusted: {_ssl_reason(text)}"
        hint = "set redis_ca_file to the CA that signed it (and the host name must match)"
    elif tls and ("SSL" in text or "TLS" in text or isinstance(exc, ssl.SSLError)):
        what = f"TLS handshake failed: {_ssl_reason(text)}"
        hint = (
            "check redis_cert_file/redis_key_file (a server with tls-auth-clients wants a "
            "client certificate) and that the port speaks TLS"
        )
    elif isinstance(exc, rexc.TimeoutError):
        what = "timed out"
        hint = "check that the host and port are right and reachable from here"
    elif isinstance(exc, rexc.ConnectionError):
        what = f"cannot connect: {_connection_reason(text)}"
        hint = "check that redis-server runs there and that redis_url is right" + (
            "" if tls else " (rediss:// if the server speaks TLS)"
        )
    elif isinstance(exc, rexc.ResponseError):
        what, hint = f"refused a command: {_short(text)}", "Redis 6.2 or newer is required"
    else:
        what, hint = f"failed: {_short(text)}", "check the server and redis_url"
    return RedisFailure(f"{where}: {what}; {hint}")


@contextmanager
def redis_errors(url: str, doing: str = "") -> Iterator[None]:
    """Raise any Redis failure inside as a :class:`RedisFailure` (see :func:`describe`)."""
    from redis import exceptions as rexc  # noqa: PLC0415 (see the imports)

    try:
        yield
    except (rexc.RedisError, ssl.SSLError) as exc:
        raise describe(exc, url, doing) from exc


def is_outage(exc: BaseException | None) -> bool:
    """True for a failure that waiting can fix (Redis down, restarting, unreachable).

    A refused password or certificate, a missing permission or an old Redis are not.
    """
    from redis import exceptions as rexc  # noqa: PLC0415 (see the imports)

    if isinstance(exc, rexc.TimeoutError | rexc.BusyLoadingError):
        return True
    if isinstance(exc, rexc.AuthenticationError | rexc.AuthorizationError):
        return False
    text = str(exc)
    return isinstance(exc, rexc.ConnectionError) and not any(
        word in text for word in ("SSL", "certificate", "WRONGPASS", "NOAUTH", "NOPERM")
    )


def version(redis: Redis) -> tuple[int, ...]:
    """The server's version, as numbers."""
    info: dict[str, Any] = redis.info("server")
    return tuple(int(n) for n in re.findall(r"\d+", str(info.get("redis_version", "0")))[:3])


def check_version(found: tuple[int, ...], url: str) -> str:
    """'Redis 7.0.15' when new enough, else :class:`RedisFailure`."""
    text = ".".join(map(str, found))
    if found < MIN_VERSION:
        raise RedisFailure(
            f"Redis at {redacted(url)} is version {text}; migratio needs 6.2 or newer (BLMOVE)"
        )
    return f"Redis {text}"


def probe(redis: Redis, url: str, namespace: str | None, site: str) -> Iterator[tuple[str, str]]:
    """``(what, detail)`` for each of ``check``'s Redis checks; raises :class:`RedisFailure`."""
    keys = Keys(namespace)
    with redis_errors(url, "connecting"):
        redis.ping()
        who = _whoami(redis)
    yield "Redis connection", f"{redacted(url)} as {who}"
    with redis_errors(url, "INFO server"):
        found = version(redis)
    yield "Redis version", check_version(found, url)
    queue = keys.queue(migration_queue(site))
    with redis_errors(url, f"reading {queue}"):
        waiting = redis.llen(queue)
        redis.lrange(queue, 0, 0)
        redis.smembers(keys.queues)
        redis.llen(keys.inflight(site))
        redis.smembers("rq:queues")
    yield "Redis keys", f"{queue}: {waiting} waiting; {keys.queues}, migratio's and RQ's keys"
    scratch = keys.key(f"migratio:check:{site}:{os.getpid()}")
    with redis_errors(url, "BLMOVE"):
        try:
            redis.rpush(f"{scratch}:a", b"probe")
            moved = redis.blmove(f"{scratch}:a", f"{scratch}:b", 1, "RIGHT", "LEFT")
        finally:
            redis.delete(f"{scratch}:a", f"{scratch}:b")
    if moved != b"probe":
        raise RedisFailure(f"Redis at {redacted(url)}: BLMOVE moved {moved!r}, not the probe")
    yield "Redis BLMOVE", "works (jobs are taken without losing one)"


def _whoami(redis: Redis) -> str:
    from redis import exceptions as rexc  # noqa: PLC0415 (see the imports)

    try:
        who = redis.acl_whoami()
        return f"user {who.decode() if isinstance(who, bytes) else who}"
    except rexc.ResponseError:  # before Redis 6: no ACL
        return "the default user"


def _short(text: str) -> str:
    return text[:200]


def _ssl_reason(text: str) -> str:
    found = re.search(r"\[SSL[^\]]*\]\s*([^(]+)", text)
    return (found.group(1).strip() if found else text)[:200]


def _connection_reason(text: str) -> str:
    found = re.search(r"connecting to \S+\.\s*(.+)", text)
    return (found.group(1).rstrip(".") if found else text)[:200]
