"""Configuration: loaded once, validated at start-up, frozen afterwards.

Three kinds of files, all as the original Ruby tool had them:

* ``config.yml`` — own site id, Redis, namespace, plus migratio's new optional keys;
* the credentials file (``~/.creds``) — ``export KEY=VALUE`` lines for the source site;
* ``config/<site id>.conf`` — one per destination site, same syntax.

Every error names the file, the key and the reason, and is a :class:`ConfigError`.
"""

from __future__ import annotations

import difflib
import ipaddress
import os
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from types import MappingProxyType
from typing import Any, Literal
from urllib.parse import urlsplit

import yaml

from migratio.errors import ConfigError, SiteConfigError, UnknownSiteError
from migratio.redis_client import RedisTls, validate_tls, validate_url
from migratio.shellvars import read_shell_file

DEFAULT_REDIS_URL = "redis://localhost:6379"
#: the original's config loader fell back to this when ``namespace`` was absent or null
DEFAULT_NAMESPACE = "air"
DEFAULT_IMAGES_DIR = "/var/lib/glance/images"
#: as the original's logrotate example: daily, 90 kept
DEFAULT_LOG_KEEP_DAYS = 90
#: seconds an unused staging cache entry is kept (for jobs of the same image that come later)
DEFAULT_STAGING_KEEP = 3600.0
#: migrations to one destination that run at once (a site file's MAX_PARALLEL)
DEFAULT_MAX_PARALLEL = 2
DEFAULT_CIPHERS = (
    "aes128-gcm@openssh.com,chacha20-poly1305@openssh.com,aes256-gcm@openssh.com,aes128-ctr"
)
DISK_FORMATS = frozenset({"raw", "qcow2", "vmdk", "vdi", "vhd", "vhdx", "iso", "ploop"})

#: instance architectures EC2 registers, and the boot modes it knows
ARCHITECTURES = ("x86_64", "arm64", "i386")
BOOT_MODES = ("legacy-bios", "uefi", "uefi-preferred")
ROOT_VOLUME_TYPES = ("gp3", "gp2", "io1", "io2", "standard")

_AWS_REGION = re.compile(r"[a-z]{2,5}(-[a-z]+)+-[0-9]{1,2}")
_S3_BUCKET = re.compile(r"[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]")
_SITE_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,127}")
_SSH_USER = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]{0,63}")
_SSH_HOST = re.compile(r"[A-Za-z0-9_.:\[\]%-]{1,253}")


def check_site_id(site_id: str, *, what: str = "site id") -> str:
    """Return ``site_id`` if it is a plain name, usable as a file name; raise otherwise."""
    if not isinstance(site_id, str) or not _SITE_ID.fullmatch(site_id) or ".." in site_id:
        raise UnknownSiteError(
            f"{what} {site_id!r} is not a plain site name "
            "(letters, digits, '.', '_', '-'; no '/', no '..')"
        )
    return site_id


@dataclass(frozen=True)
class OpenStackCredentials:
    """How to reach one site's Glance: Keystone password auth, or a token and an endpoint."""

    source: str
    auth_url: str | None = None
    username: str | None = None
    password: str | None = field(default=None, repr=False)
    project_name: str | None = None
    project_id: str | None = None
    user_domain_name: str | None = None
    project_domain_name: str | None = None
    user_domain_id: str | None = None
    project_domain_id: str | None = None
    region_name: str | None = None
    interface: str = "public"
    token: str | None = field(default=None, repr=False)
    image_url: str | None = None
    cacert: str | None = None
    insecure: bool = False

    @classmethod
    def from_vars(cls, values: Mapping[str, str], source: str) -> OpenStackCredentials:
        """Build from ``OS_*`` variables; name what is missing."""
        creds = cls(
            source=source,
            auth_url=values.get("OS_AUTH_URL") or None,
            username=values.get("OS_USERNAME") or None,
            password=values.get("OS_PASSWORD") or None,
            project_name=values.get("OS_PROJECT_NAME") or values.get("OS_TENANT_NAME") or None,
            project_id=values.get("OS_PROJECT_ID") or values.get("OS_TENANT_ID") or None,
            user_domain_name=values.get("OS_USER_DOMAIN_NAME") or None,
            project_domain_name=values.get("OS_PROJECT_DOMAIN_NAME") or None,
            user_domain_id=values.get("OS_USER_DOMAIN_ID") or None,
            project_domain_id=values.get("OS_PROJECT_DOMAIN_ID") or None,
            region_name=values.get("OS_REGION_NAME") or None,
            interface=values.get("OS_INTERFACE") or values.get("OS_ENDPOINT_TYPE") or "public",
            token=values.get("OS_AUTH_TOKEN") or values.get("OS_TOKEN") or None,
            image_url=values.get("OS_IMAGE_URL") or None,
            cacert=values.get("OS_CACERT") or None,
            insecure=values.get("OS_INSECURE", "").lower() in {"1", "true", "yes"},
        )
        creds.validate()
        return creds

    @property
    def uses_token(self) -> bool:
        """True when a fixed token and Glance endpoint are given (no Keystone)."""
        return bool(self.token and self.image_url)

    def validate(self) -> None:
        """Raise :class:`ConfigError` naming the missing variables."""
        if self.uses_token:
            return
        if self.token and not self.image_url:
            raise ConfigError(f"{self.source}: OS_AUTH_TOKEN is set but OS_IMAGE_URL is missing")
        missing = [
            key
            for key, value in (
                ("OS_AUTH_URL", self.auth_url),
                ("OS_USERNAME", self.username),
                ("OS_PASSWORD", self.password),
            )
            if not value
        ]
        if not (self.project_name or self.project_id):
            missing.append("OS_TENANT_NAME (or OS_PROJECT_NAME)")
        if missing:
            raise ConfigError(
                f"{self.source}: missing {', '.join(missing)} "
                "(or set OS_AUTH_TOKEN and OS_IMAGE_URL for a Glance without Keystone)"
            )


@dataclass(frozen=True)
class SshTarget:
    """An account on a destination host reachable with a key and a verified host key."""

    user: str
    host: str
    port: int = 22
    key_file: Path | None = None
    known_hosts: Path | None = None
    ciphers: str = DEFAULT_CIPHERS
    connect_timeout: int = 15
    #: a running master connection to share (:class:`~migratio.adapters.ssh.SshMaster`);
    #: not configured
    control_path: Path | None = None

    @property
    def destination(self) -> str:
        """``user@host`` as ssh and rsync take it."""
        host = f"[{self.host}]" if ":" in self.host and not self.host.startswith("[") else self.host
        return f"{self.user}@{host}"


@dataclass(frozen=True)
class OpenStackSite:
    """A destination OpenStack site (``config/<site_id>.conf``)."""

    site_id: str
    path: Path
    register: Literal["ssh", "api"]
    ssh: SshTarget | None
    api: OpenStackCredentials | None
    disk_format: str | None = None
    remote_staging_dir: str = ".migratio-staging"
    remote_creds: str = "~/.creds"
    remote_glance: str = "glance"
    remote_python: str = "python3"
    #: how the helper there puts the file into Glance: ``auto`` (its API, with the credentials
    #: of ``remote_creds``, when it understands them; else the CLI) or ``cli`` (``glance``)
    remote_upload: Literal["auto", "cli"] = "auto"
    #: rsync compression: auto (decided per image, see openstack.compression), zstd, lz4, none
    compress: Literal["auto", "zstd", "lz4", "none"] = "auto"
    #: the cap, in bytes per second, of what goes over the link to this site (None: no cap)
    bwlimit: int | None = None
    #: rsync streams at once over ranges of the file (None: auto, from the round trip)
    streams: int | None = None
    #: migrations to this site that run at once, whatever the number of workers
    max_parallel: int = DEFAULT_MAX_PARALLEL
    kind: Literal["openstack"] = "openstack"


@dataclass(frozen=True)
class AwsCredentials:
    """Amazon keys (``AWS_ACCESS_KEY``, ``AWS_SECRET_KEY``)."""

    access_key: str
    secret_key: str = field(repr=False)


@dataclass(frozen=True)
class AmazonSite:
    """A destination Amazon EC2 region (``config/<site_id>.conf`` with ``AWS_REGION``)."""

    site_id: str
    path: Path
    region: str
    #: endpoints; None means boto3's standard endpoint for the region
    ec2_url: str | None = None
    ebs_url: str | None = None
    s3_url: str | None = None
    sts_url: str | None = None
    #: the site's own keys, overriding the credentials file's (None: that file, else boto3's chain)
    credentials: AwsCredentials | None = None
    upload_method: Literal["ebs", "vmimport"] = "ebs"
    s3_bucket: str | None = None
    s3_prefix: str = "migratio/"
    vmimport_role: str | None = None
    upload_concurrency: int = 8
    default_architecture: str = "x86_64"
    default_boot_mode: str | None = None
    volume_type: str = "gp3"
    snapshot_timeout: float = 3600.0
    import_timeout: float = 4 * 3600.0
    poll_interval: float = 15.0
    #: migrations to this site that run at once, whatever the number of workers
    max_parallel: int = DEFAULT_MAX_PARALLEL
    kind: Literal["amazon"] = "amazon"


Site = OpenStackSite | AmazonSite


@dataclass(frozen=True)
class Settings:
    """Everything migratio needs to know, validated and frozen."""

    name: str
    config_path: Path
    redis_url: str = field(repr=False)  # it may hold a password
    redis_tls: RedisTls
    namespace: str
    credentials_file: Path
    sites_dir: Path
    staging_dir: Path
    log_dir: Path
    progress_interval: float
    command_timeout: float
    workers: int
    job_timeout: float
    retry_delays: tuple[int, ...]
    images_dir: Path
    source: OpenStackCredentials
    aws: AwsCredentials | None
    sites: Mapping[str, Site]
    #: the Prometheus endpoint (None: off) and the address it listens on
    metrics_port: int | None = None
    metrics_address: str = "127.0.0.1"
    #: daily log files kept (0: never rotate; leave it to logrotate)
    log_keep_days: int = DEFAULT_LOG_KEEP_DAYS
    #: the staging cache's bound in bytes (None: only the disk's free space)
    staging_max_bytes: int | None = None
    #: seconds an unused staging cache entry is kept for later jobs
    staging_keep: float = DEFAULT_STAGING_KEEP

    #: site files that failed to load: site id → the error (only that site's jobs fail)
    broken_sites: Mapping[str, str] = field(default_factory=lambda: MappingProxyType({}))
    #: things an operator should know that do not stop migratio (unknown keys, …)
    warnings: tuple[str, ...] = ()

    def site(self, site_id: str) -> Site:
        """The destination site ``site_id``, or a :class:`ConfigError` saying why not.

        A site file that was broken at start-up (or added since) is read again here, so fixing
        it lets the next attempt through without a restart; while it is broken, the error is a
        retryable :class:`SiteConfigError`. No file at all is an :class:`UnknownSiteError`.
        """
        check_site_id(site_id, what="destination site")
        site = self.sites.get(site_id)
        if site is not None:
            return site
        path = self.sites_dir / f"{site_id}.conf"
        if site_id in self.broken_sites or path.is_file():
            try:
                return load_site(site_id, path)
            except ConfigError as exc:
                raise SiteConfigError(exc.message) from None
        raise UnknownSiteError(f"unknown destination site {site_id!r}: there is no {path}")


def default_config_path() -> Path:
    """``$MIGRATIO_CONFIG``, else ``./config.yml``."""
    return Path(os.environ.get("MIGRATIO_CONFIG") or "config.yml")


def load_settings(config_path: Path | None = None) -> Settings:
    """Load and validate every configuration file; raise :class:`ConfigError` on any problem."""
    path = (config_path or default_config_path()).expanduser()
    raw = _ReadKeys(_read_yaml(path))
    base = path.resolve().parent

    def key(name: str, default: Any = None) -> Any:
        value = raw.get(name)
        return default if value is None else value

    name = key("name")
    if not isinstance(name, str) or not name:
        raise ConfigError(f"{path}: 'name' is required: the Atmosphere site_id of this site")
    try:
        check_site_id(name, what="'name'")
    except ConfigError as exc:
        raise ConfigError(f"{path}: {exc.message}") from None

    namespace = raw.get("namespace", DEFAULT_NAMESPACE)
    namespace = DEFAULT_NAMESPACE if namespace is None else str(namespace)

    credentials_file = _path(key("credentials_file", "~/.creds"), base)
    creds, warnings = _read_credentials(credentials_file)
    source_cs = creds.get("SOURCE_CS")
    if source_cs and source_cs != name:
        raise ConfigError(
            f"{credentials_file}: SOURCE_CS={source_cs!r} differs from 'name: {name}' in {path}"
        )

    aws = None
    if creds.get("AWS_ACCESS_KEY") and creds.get("AWS_SECRET_KEY"):
        aws = AwsCredentials(creds["AWS_ACCESS_KEY"], creds["AWS_SECRET_KEY"])

    redis_url = validate_url(key("redis_url", DEFAULT_REDIS_URL), str(path))
    ca, cert, tls_key = (
        _path(raw[name], base) if raw.get(name) else None
        for name in ("redis_ca_file", "redis_cert_file", "redis_key_file")
    )
    redis_tls = validate_tls(redis_url, RedisTls(ca, cert, tls_key), str(path))
    sites_dir = _path(key("sites_dir", "config"), base)
    try:
        source = OpenStackCredentials.from_vars(creds, str(credentials_file))
    except ConfigError:
        if credentials_file.exists():
            raise
        raise ConfigError(
            f"{credentials_file}: credentials file not found (credentials_file in {path}), "
            "and the environment does not hold this site's OS_* credentials either"
        ) from None
    site_files = load_sites(sites_dir)
    settings = Settings(
        name=name,
        config_path=path,
        redis_url=redis_url,
        redis_tls=redis_tls,
        namespace=namespace,
        credentials_file=credentials_file,
        sites_dir=sites_dir,
        staging_dir=_path(key("staging_dir", "staging"), base),
        log_dir=_path(key("log_dir", "log"), base),
        progress_interval=_number(path, "progress_interval", key("progress_interval", 5.0)),
        command_timeout=_number(path, "command_timeout", key("command_timeout", 6 * 3600)),
        workers=int(_number(path, "workers", key("workers", 1))),
        job_timeout=_number(path, "job_timeout", key("job_timeout", 12 * 3600)),
        retry_delays=_delays(path, key("retry_delays", [60, 300, 900])),
        images_dir=Path(creds.get("IMAGES_DIR") or DEFAULT_IMAGES_DIR).expanduser(),
        source=source,
        aws=aws,
        sites=MappingProxyType(site_files.sites),
        broken_sites=MappingProxyType(site_files.broken),
        warnings=tuple(warnings + site_files.warnings),
        metrics_port=_port(path, "metrics_port", raw.get("metrics_port")),
        metrics_address=_address(path, key("metrics_address", "127.0.0.1")),
        log_keep_days=_count(path, "log_keep_days", key("log_keep_days", DEFAULT_LOG_KEEP_DAYS)),
        staging_max_bytes=_bytes(path, "staging_max_bytes", raw.get("staging_max_bytes")),
        staging_keep=_number(path, "staging_keep", key("staging_keep", DEFAULT_STAGING_KEEP)),
    )
    unknown = [
        f"{path}: unknown key {name!r} ({_nearest(str(name), raw.read)})"
        for name in raw
        if name not in raw.read
    ]
    if unknown:
        settings = replace(settings, warnings=(*unknown, *settings.warnings))
    return settings


@dataclass(frozen=True)
class SiteFiles:
    """The destination site files: those that loaded, those that did not, and warnings."""

    sites: dict[str, Site]
    broken: dict[str, str]
    warnings: list[str]


class _ReadKeys(dict[str, Any]):
    """config.yml's mapping, remembering which keys were asked for (the others are unknown)."""

    def __init__(self, data: dict[str, Any]) -> None:
        super().__init__(data)
        self.read: set[str] = set()

    def get(self, name: str, default: Any = None) -> Any:
        self.read.add(name)
        return super().get(name, default)

    def __getitem__(self, name: str) -> Any:
        self.read.add(name)
        return super().__getitem__(name)


def _nearest(name: str, known: Iterable[str]) -> str:
    near = difflib.get_close_matches(name, sorted(known), n=1, cutoff=0.6)
    return f"did you mean {near[0]}?" if near else "migratio does not use it"


def load_sites(sites_dir: Path) -> SiteFiles:
    """Read every ``<site id>.conf`` in ``sites_dir``; a broken one breaks only its site."""
    if not sites_dir.is_dir():
        raise ConfigError(f"{sites_dir}: the site directory does not exist")
    found = SiteFiles({}, {}, [])
    for conf in sorted(sites_dir.glob("*.conf")):
        site_id = conf.name.removesuffix(".conf")
        try:
            check_site_id(site_id)
        except ConfigError as exc:
            found.warnings.append(f"{conf}: ignored: {exc.message}")
            continue
        try:
            site, warnings = _load_site(site_id, conf)
        except ConfigError as exc:
            found.broken[site_id] = exc.message
            continue
        found.sites[site_id] = site
        found.warnings.extend(warnings)
    return found


#: every key a site file may set (others get a warning naming the nearest of these)
SITE_KEYS = frozenset(
    {
        # OpenStack over SSH
        "EXTERNAL_USER", "EXTERNAL_HOST", "SSH_PORT", "SSH_KEY", "SSH_KNOWN_HOSTS",
        "SSH_CIPHERS", "SSH_CONNECT_TIMEOUT", "REMOTE_STAGING_DIR", "REMOTE_CREDS",
        "REMOTE_GLANCE", "REMOTE_PYTHON", "REMOTE_UPLOAD", "DISK_FORMAT", "REGISTER", "COMPRESS",
        "BWLIMIT", "STREAMS",
        # OpenStack through its API (an openrc's keys)
        "OS_AUTH_URL", "OS_USERNAME", "OS_PASSWORD", "OS_PROJECT_NAME", "OS_TENANT_NAME",
        "OS_PROJECT_ID", "OS_TENANT_ID", "OS_USER_DOMAIN_NAME", "OS_PROJECT_DOMAIN_NAME",
        "OS_USER_DOMAIN_ID", "OS_PROJECT_DOMAIN_ID", "OS_REGION_NAME", "OS_INTERFACE",
        "OS_ENDPOINT_TYPE", "OS_AUTH_TOKEN", "OS_TOKEN", "OS_IMAGE_URL", "OS_CACERT",
        "OS_INSECURE", "OS_IDENTITY_API_VERSION", "OS_IMAGE_API_VERSION", "OS_AUTH_TYPE",
        # Amazon
        "AWS_REGION", "EC2_URL", "EBS_URL", "S3_URL", "AWS_ACCESS_KEY", "AWS_SECRET_KEY",
        "UPLOAD_METHOD", "UPLOAD_CONCURRENCY", "S3_BUCKET", "S3_PREFIX", "VMIMPORT_ROLE",
        "DEFAULT_ARCHITECTURE", "DEFAULT_BOOT_MODE", "VOLUME_TYPE", "SNAPSHOT_TIMEOUT",
        "IMPORT_TIMEOUT", "POLL_INTERVAL",
        # both
        "MAX_PARALLEL",
    }
)  # fmt: skip


def load_site(site_id: str, path: Path) -> Site:
    """Read one destination site file."""
    return _load_site(site_id, path)[0]


def _load_site(site_id: str, path: Path) -> tuple[Site, list[str]]:
    """One site file, and a warning for each key migratio does not know."""
    sourced = read_shell_file(path)
    values = sourced.values
    unknown = []
    for key, line in sourced.assigned.items():
        if key not in SITE_KEYS:
            unknown.append(f"{path}, line {line}: unknown key {key} ({_nearest(key, SITE_KEYS)})")
    try:
        return _site_from_values(site_id, path, values), unknown + sourced.warnings
    except ConfigError as exc:
        if not unknown:
            raise
        raise ConfigError(f"{exc.message}; also {'; '.join(unknown)}") from None


def _site_from_values(site_id: str, path: Path, values: Mapping[str, str]) -> Site:
    if "AWS_REGION" in values or "EC2_URL" in values:
        return _amazon_site(site_id, path, values)

    register = _one_of(values, path, "REGISTER", ("ssh", "api"))
    disk_format = values.get("DISK_FORMAT") or None
    if disk_format is not None and disk_format not in DISK_FORMATS:
        raise ConfigError(
            f"{path}: DISK_FORMAT {disk_format!r} is not one of {', '.join(sorted(DISK_FORMATS))}"
        )
    compress = _one_of(values, path, "COMPRESS", ("auto", "zstd", "lz4", "none"))
    remote_upload = _one_of(values, path, "REMOTE_UPLOAD", ("auto", "cli"))
    bwlimit = parse_rate(values["BWLIMIT"], f"{path}: BWLIMIT") if values.get("BWLIMIT") else None
    streams_text = values.get("STREAMS", "auto").lower() or "auto"
    streams = None
    if streams_text != "auto":
        if not streams_text.isdigit() or not 1 <= int(streams_text) <= 16:
            raise ConfigError(f"{path}: STREAMS must be auto or 1 to 16, not {streams_text!r}")
        streams = int(streams_text)
    ssh = _ssh_target(values, path) if register == "ssh" else None
    api = OpenStackCredentials.from_vars(values, str(path)) if register == "api" else None
    return OpenStackSite(
        site_id=site_id,
        path=path,
        register=register,  # type: ignore[arg-type]  # checked by _one_of
        ssh=ssh,
        api=api,
        disk_format=disk_format,
        remote_staging_dir=values.get("REMOTE_STAGING_DIR") or ".migratio-staging",
        remote_creds=values.get("REMOTE_CREDS") or "~/.creds",
        remote_glance=values.get("REMOTE_GLANCE") or "glance",
        remote_python=values.get("REMOTE_PYTHON") or "python3",
        remote_upload=remote_upload,  # type: ignore[arg-type]  # checked by _one_of
        compress=compress,  # type: ignore[arg-type]  # checked by _one_of
        bwlimit=bwlimit,
        streams=streams,
        max_parallel=_max_parallel(values, path),
    )


def _one_of(values: Mapping[str, str], path: Path, key: str, allowed: tuple[str, ...]) -> str:
    """The value of ``key`` (any case), one of ``allowed``; unset or empty is the first."""
    value = (values.get(key) or allowed[0]).lower()
    if value not in allowed:
        names = f"{', '.join(allowed[:-1])} or {allowed[-1]}"
        raise ConfigError(f"{path}: {key} must be {names}, not {values[key]!r}")
    return value


def _max_parallel(values: Mapping[str, str], path: Path) -> int:
    text = values.get("MAX_PARALLEL") or str(DEFAULT_MAX_PARALLEL)
    if not text.isdigit() or not 1 <= int(text) <= 1000:
        raise ConfigError(
            f"{path}: MAX_PARALLEL must be a whole number from 1 to 1000, not {text!r}"
        )
    return int(text)


_RATE = re.compile(r"(\d+(?:\.\d+)?)\s*(k|m|g|kbit|mbit|gbit)?(?:/s)?", re.IGNORECASE)
_RATE_UNITS = {
    None: 1024, "k": 1024, "m": 1024**2, "g": 1024**3,
    "kbit": 1000 / 8, "mbit": 1000**2 / 8, "gbit": 1000**3 / 8,
}  # fmt: skip


def parse_rate(text: str, what: str) -> int:
    """Bytes per second from rsync's ``--bwlimit`` syntax, or from Mbit/s.

    A bare number is KiB/s as rsync reads it; ``K``/``M``/``G`` are KiB/MiB/GiB per second;
    ``kbit``/``Mbit``/``Gbit`` are the network's units (powers of 1000, bits).
    """
    match = _RATE.fullmatch(text.strip())
    if match is None:
        raise ConfigError(
            f"{what} {text!r} is not a rate like 51200 (KiB/s, as rsync reads it), 50M or 400Mbit"
        )
    unit = match.group(2).lower() if match.group(2) else None
    rate = int(float(match.group(1)) * _RATE_UNITS[unit])
    if rate < 1024:
        raise ConfigError(f"{what} {text!r} is below 1 KiB/s, the least rsync can limit to")
    return rate


def _amazon_site(site_id: str, path: Path, values: Mapping[str, str]) -> AmazonSite:
    region = values.get("AWS_REGION", "")
    if not region:
        raise ConfigError(f"{path}: AWS_REGION is required for an Amazon site")
    if not _AWS_REGION.fullmatch(region):
        raise ConfigError(f"{path}: AWS_REGION {region!r} is not a region name like eu-west-1")
    urls = {key: _endpoint(path, key, values.get(key)) for key in ("EC2_URL", "EBS_URL", "S3_URL")}
    ec2_url = urls["EC2_URL"]
    if ec2_url is not None:
        host = urlsplit(ec2_url).hostname or ""
        named = re.fullmatch(r"ec2\.([a-z0-9-]+)\.amazonaws\.com(\.cn)?", host)
        if named and named.group(1) != region:
            raise ConfigError(
                f"{path}: EC2_URL {ec2_url} is the endpoint of {named.group(1)}, "
                f"but AWS_REGION is {region}"
            )
        if not _is_aws_host(host):
            # a private endpoint (or moto) serves every service at one address
            urls["EBS_URL"] = urls["EBS_URL"] or ec2_url
            urls["S3_URL"] = urls["S3_URL"] or ec2_url
            urls["STS_URL"] = ec2_url

    def choice(key: str, default: str | None, allowed: tuple[str, ...]) -> str | None:
        value = values.get(key) or default
        if value is not None and value not in allowed:
            raise ConfigError(f"{path}: {key} must be one of {', '.join(allowed)}, not {value!r}")
        return value

    def number(key: str, default: float, low: float, high: float) -> float:
        text = values.get(key) or str(default)
        try:
            value = float(text)
        except ValueError:
            raise ConfigError(f"{path}: {key} must be a number, not {text!r}") from None
        if not low <= value <= high:
            raise ConfigError(f"{path}: {key} must be between {low:g} and {high:g}, not {text}")
        return value

    method = choice("UPLOAD_METHOD", "ebs", ("ebs", "vmimport"))
    bucket = values.get("S3_BUCKET") or None
    if method == "vmimport" and not bucket:
        raise ConfigError(f"{path}: UPLOAD_METHOD=vmimport needs S3_BUCKET (a bucket in {region})")
    if bucket is not None and not _S3_BUCKET.fullmatch(bucket):
        raise ConfigError(f"{path}: S3_BUCKET {bucket!r} is not a valid bucket name")
    concurrency = number("UPLOAD_CONCURRENCY", 8, 1, 64)
    if not concurrency.is_integer():
        raise ConfigError(f"{path}: UPLOAD_CONCURRENCY must be a whole number, not {concurrency}")
    prefix = values.get("S3_PREFIX", "migratio/").lstrip("/")
    if prefix and not prefix.endswith("/"):
        prefix += "/"
    return AmazonSite(
        site_id,
        path,
        region=region,
        ec2_url=ec2_url,
        ebs_url=urls["EBS_URL"],
        s3_url=urls["S3_URL"],
        sts_url=urls.get("STS_URL"),
        credentials=_aws_keys(path, values),
        upload_method="vmimport" if method == "vmimport" else "ebs",
        s3_bucket=bucket,
        s3_prefix=prefix,
        vmimport_role=values.get("VMIMPORT_ROLE") or None,
        upload_concurrency=int(concurrency),
        default_architecture=choice("DEFAULT_ARCHITECTURE", "x86_64", ARCHITECTURES) or "x86_64",
        default_boot_mode=choice("DEFAULT_BOOT_MODE", None, BOOT_MODES),
        volume_type=choice("VOLUME_TYPE", "gp3", ROOT_VOLUME_TYPES) or "gp3",
        snapshot_timeout=number("SNAPSHOT_TIMEOUT", 3600, 0.1, 7 * 86400),
        import_timeout=number("IMPORT_TIMEOUT", 4 * 3600, 0.1, 7 * 86400),
        poll_interval=number("POLL_INTERVAL", 15, 0.01, 3600),
        max_parallel=_max_parallel(values, path),
    )


def _aws_keys(path: Path, values: Mapping[str, str]) -> AwsCredentials | None:
    access, secret = values.get("AWS_ACCESS_KEY"), values.get("AWS_SECRET_KEY")
    if not access and not secret:
        return None
    if not (access and secret):
        raise ConfigError(f"{path}: set both AWS_ACCESS_KEY and AWS_SECRET_KEY, or neither")
    return AwsCredentials(access, secret)


def _endpoint(path: Path, key: str, value: str | None) -> str | None:
    if not value:
        return None
    parts = urlsplit(value)
    if parts.scheme not in {"http", "https"} or not parts.hostname:
        raise ConfigError(f"{path}: {key} {value!r} is not an http(s) URL")
    return value.rstrip("/")


def _is_aws_host(host: str) -> bool:
    """True for Amazon's own endpoints, whose other services have their own host names."""
    return host.endswith((".amazonaws.com", ".amazonaws.com.cn", ".api.aws"))


def _ssh_target(values: Mapping[str, str], path: Path) -> SshTarget:
    user, host = values.get("EXTERNAL_USER"), values.get("EXTERNAL_HOST")
    missing = [k for k, v in (("EXTERNAL_USER", user), ("EXTERNAL_HOST", host)) if not v]
    if missing:
        raise ConfigError(
            f"{path}: missing {' and '.join(missing)} (or set REGISTER=api with OS_* credentials)"
        )
    assert user is not None
    assert host is not None
    if not _SSH_USER.fullmatch(user):
        raise ConfigError(f"{path}: EXTERNAL_USER {user!r} is not a valid user name")
    if not _SSH_HOST.fullmatch(host) or host.startswith("-"):
        raise ConfigError(f"{path}: EXTERNAL_HOST {host!r} is not a valid host name or address")
    port_text = values.get("SSH_PORT", "22")
    if not port_text.isdigit() or not 0 < int(port_text) < 65536:
        raise ConfigError(f"{path}: SSH_PORT {port_text!r} is not a port number")
    key_file = Path(values["SSH_KEY"]).expanduser() if values.get("SSH_KEY") else None
    known = Path(values["SSH_KNOWN_HOSTS"]).expanduser() if values.get("SSH_KNOWN_HOSTS") else None
    for name, file in (("SSH_KEY", key_file), ("SSH_KNOWN_HOSTS", known)):
        if file is not None and not file.is_file():
            raise ConfigError(f"{path}: {name} {file} does not exist")
    return SshTarget(
        user=user,
        host=host,
        port=int(port_text),
        key_file=key_file,
        known_hosts=known,
        ciphers=values.get("SSH_CIPHERS") or DEFAULT_CIPHERS,
        connect_timeout=int(values.get("SSH_CONNECT_TIMEOUT", "15") or 15),
    )


def _read_yaml(path: Path) -> dict[str, Any]:
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError as exc:
        raise ConfigError(
            f"{path}: file not found (give --config PATH or set MIGRATIO_CONFIG)"
        ) from exc
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read: {exc}") from exc
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML: {exc}") from exc
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping of keys, found {type(data).__name__}")
    return data


def _read_credentials(path: Path) -> tuple[dict[str, str], list[str]]:
    """The credentials file as bash sources it over this process's environment, and warnings.

    Kept: the keys the file sets, and the environment's ``OS_*``, ``AWS_*``, ``IMAGES_DIR``
    and ``SOURCE_CS`` that it does not unset.
    """

    def wanted(key: str) -> bool:
        return key.startswith(("OS_", "AWS_")) or key in {"IMAGES_DIR", "SOURCE_CS"}

    if not path.exists():
        return {k: v for k, v in os.environ.items() if wanted(k)}, []
    sourced = read_shell_file(path, os.environ)
    values = {k: v for k, v in sourced.environment.items() if wanted(k) or k in sourced.assigned}
    return values, sourced.warnings


def _path(value: Any, base: Path) -> Path:
    path = Path(str(value)).expanduser()
    return path if path.is_absolute() else base / path


def _delays(path: Path, value: Any) -> tuple[int, ...]:
    if not isinstance(value, list) or not all(isinstance(v, int) and v >= 0 for v in value):
        raise ConfigError(f"{path}: 'retry_delays' must be a list of seconds, not {value!r}")
    return tuple(value)


def _number(path: Path, name: str, value: Any) -> float:
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise ConfigError(f"{path}: '{name}' must be a number, not {value!r}") from None
    if number <= 0:
        raise ConfigError(f"{path}: '{name}' must be positive, not {value!r}")
    return number


def _port(path: Path, name: str, value: Any) -> int | None:
    if value is None or value is False:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or not 0 < value < 65536:
        raise ConfigError(f"{path}: '{name}' must be a TCP port (1-65535), not {value!r}")
    return value


def _address(path: Path, value: Any) -> str:
    try:
        return str(ipaddress.ip_address(str(value)))
    except ValueError:
        raise ConfigError(
            f"{path}: 'metrics_address' must be an IP address to listen on "
            f"(127.0.0.1, 0.0.0.0, ::), not {value!r}"
        ) from None


_BYTE_UNITS = {"": 1, "K": 2**10, "M": 2**20, "G": 2**30, "T": 2**40}


def _bytes(path: Path, name: str, value: Any) -> int | None:
    """A size in bytes: a whole number, or one with a K/M/G/T suffix (powers of 1024)."""
    if value is None:
        return None
    text = str(value).strip().upper().removesuffix("IB").removesuffix("B")
    unit = text[-1:] if text[-1:] in _BYTE_UNITS else ""
    number = text[: len(text) - len(unit)].strip()
    if isinstance(value, bool) or not number.isdigit() or int(number) == 0:
        raise ConfigError(
            f"{path}: '{name}' must be a size in bytes such as 50G or 53687091200, not {value!r}"
        )
    return int(number) * _BYTE_UNITS[unit]


def _count(path: Path, name: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ConfigError(f"{path}: '{name}' must be a whole number ≥ 0, not {value!r}")
    return value
