"""``migratio check``: prove, before any job arrives, that every migration can work."""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from enum import Enum

from migratio import redis_client
from migratio.adapters import processes
from migratio.adapters.aws import AwsClients, aws_errors, known_regions
from migratio.adapters.glance_api import GlanceApi
from migratio.adapters.glance_cli import follow_upload_source
from migratio.adapters.ssh import SshClient
from migratio.atmosphere.status import human_bytes
from migratio.config import AmazonSite, OpenStackSite, Settings
from migratio.errors import AwsError, MigratioError, RedisFailure


class Level(Enum):
    """How a check ended."""

    OK = "ok"
    WARN = "warning"
    FAIL = "FAILED"


@dataclass(frozen=True)
class Check:
    """One line of the report."""

    level: Level
    what: str
    detail: str

    def __str__(self) -> str:
        return f"{self.level.value:8} {self.what}: {self.detail}"


TOOLS = ("qemu-img", "rsync", "ssh")


def run_checks(settings: Settings, site_ids: Sequence[str] = ()) -> Iterator[Check]:
    """Check Redis and this site, then each named destination (all of them when none is named)."""
    for warning in settings.warnings:
        yield Check(Level.WARN, "configuration", warning)
    yield from _check_redis(settings)
    for tool in TOOLS:
        path = shutil.which(tool)
        yield Check(Level.OK if path else Level.FAIL, f"local {tool}", path or "not found on PATH")
    yield _attempt(f"source Glance ({settings.name})", lambda: _ping(GlanceApi(settings.source)))
    images = settings.images_dir
    readable = images.is_dir() and os.access(images, os.R_OK | os.X_OK)
    yield Check(
        Level.OK if readable else Level.WARN,
        "file store",
        f"{images} readable"
        if readable
        else f"{images} not readable: images will be downloaded from Glance (slower); "
        "add this user to the glance group",
    )
    yield _check_staging(settings)
    for site_id in site_ids or sorted({*settings.sites, *settings.broken_sites}):
        try:
            site = settings.site(site_id)
        except MigratioError as exc:
            yield Check(Level.FAIL, f"site {site_id}", exc.message)
            continue
        if isinstance(site, AmazonSite):
            yield from _check_amazon(site, AwsClients(site, settings.aws), settings.name)
        else:
            yield from _check_openstack(site)


def _check_staging(settings: Settings) -> Check:
    """``staging_dir`` is writable here; its free space and the cache's bound."""
    staging = settings.staging_dir
    try:
        staging.mkdir(parents=True, exist_ok=True)
        probe = staging / f".check-{os.getpid()}"
        probe.write_bytes(b"")
        probe.unlink()
        stat = os.statvfs(staging)
    except OSError as exc:
        return Check(Level.FAIL, "staging", f"{staging} is not writable: {exc}")
    free = stat.f_bavail * stat.f_frsize
    bound = settings.staging_max_bytes
    limit = "no staging_max_bytes" if bound is None else f"staging_max_bytes {human_bytes(bound)}"
    level = Level.WARN if bound is not None and bound > free else Level.OK
    more = "; the disk has less free than the bound" if level is Level.WARN else ""
    return Check(level, "staging", f"{staging} writable, {human_bytes(free)} free, {limit}{more}")


def _check_redis(settings: Settings) -> Iterator[Check]:
    redis = redis_client.connect(settings.redis_url, settings.redis_tls)
    try:
        for what, detail in redis_client.probe(
            redis, settings.redis_url, settings.namespace, settings.name
        ):
            yield Check(Level.OK, what, detail)
    except RedisFailure as exc:
        yield Check(Level.FAIL, "Redis", exc.message)
    finally:
        redis.close()


def _check_openstack(site: OpenStackSite) -> Iterator[Check]:
    name = f"site {site.site_id}"
    if site.register == "api":
        assert site.api is not None
        api = site.api
        yield _attempt(f"{name} Glance API", lambda: _ping(GlanceApi(api)))
        return
    assert site.ssh is not None
    ssh = SshClient(site.ssh, creds=site.remote_creds)
    login = _attempt(
        f"{name} SSH login",
        lambda: (
            ssh.run(["true"], what="ssh login", timeout=30, creds=False)
            and f"{site.ssh.destination} port {site.ssh.port}, host key verified"
        ),
    )
    yield login
    if login.level is Level.FAIL:
        return
    remote = [
        ("remote rsync", ["rsync", "--version"], False),
        (  # the upload helper itself, in a mode that makes nothing (a token, at most)
            f"remote {site.remote_python}",
            [site.remote_python, "-c", follow_upload_source(), "--check", "--http"]
            if site.remote_upload == "auto"
            else [site.remote_python, "-c", follow_upload_source(), "--check"],
            site.remote_upload == "auto",
        ),
        (
            "remote staging dir",
            ["sh", "-c", 'mkdir -p -- "$1" && test -w "$1"', "sh", site.remote_staging_dir],
            False,
        ),
        (
            "remote glance CLI",
            [site.remote_glance, "--os-image-api-version", "2", "image-list", "--limit", "1"],
            True,
        ),
    ]
    for what, argv, creds in remote:
        yield _attempt(
            f"{name} {what}",
            lambda argv=argv, creds=creds, what=what: _first_line(
                ssh.run(argv, what=what, timeout=120, creds=creds)
            ),
        )


def _check_amazon(site: AmazonSite, aws: AwsClients, settings_name: str) -> Iterator[Check]:
    name = f"site {site.site_id}"

    def identity() -> str:
        with aws_errors("checking the AWS credentials"):
            who = aws.sts.get_caller_identity()
        return f"account {who.get('Account')} ({who.get('Arn')})"

    def region() -> str:
        where = aws.ec2.meta.endpoint_url
        with aws_errors(f"asking EC2 about region {site.region}"):
            found = aws.ec2.describe_regions(RegionNames=[site.region], AllRegions=True)
        if not found.get("Regions"):
            raise AwsError(f"EC2 at {where} does not know region {site.region}")
        with aws_errors(f"listing this account's AMIs in {site.region}"):
            aws.ec2.describe_images(Owners=["self"], MaxResults=5)
        return f"{site.region} at {where}"

    def bucket() -> str:
        assert site.s3_bucket is not None
        with aws_errors(f"checking S3 bucket {site.s3_bucket}"):
            aws.s3.head_bucket(Bucket=site.s3_bucket)
            where = aws.s3.get_bucket_location(Bucket=site.s3_bucket).get("LocationConstraint")
        where = where or "us-east-1"  # S3 reports the oldest region as no constraint
        if where != site.region:
            raise AwsError(
                f"bucket {site.s3_bucket} is in {where}, but VM Import needs it in {site.region}"
            )
        probe = f"{site.s3_prefix}{settings_name}/.migratio-check"
        with aws_errors(f"writing and deleting s3://{site.s3_bucket}/{probe}"):
            aws.s3.put_object(Bucket=site.s3_bucket, Key=probe, Body=b"")
            aws.s3.delete_object(Bucket=site.s3_bucket, Key=probe)
        return f"s3://{site.s3_bucket} in {where}, writable"

    login = _attempt(f"{name} AWS credentials", identity)
    yield login
    if login.level is Level.FAIL:
        return
    yield _attempt(f"{name} EC2 region", region)
    if site.upload_method == "vmimport":
        yield _attempt(f"{name} S3 bucket for VM Import", bucket)
    if site.ec2_url is None and site.region not in known_regions():
        yield Check(
            Level.WARN,
            f"{name} region",
            f"this boto3 does not know {site.region}; upgrade boto3 if calls fail",
        )


def _ping(api: GlanceApi) -> str:
    api.ping()
    return f"reachable at {api.where}"


def _first_line(done: processes.Completed) -> str:
    lines = done.stdout.strip().splitlines()
    if not lines or lines[0].startswith("+-"):  # the glance CLI's table: it answered
        return "works"
    return lines[0][:100]


def _attempt(what: str, action: object) -> Check:
    assert callable(action)
    try:
        return Check(Level.OK, what, str(action()))
    except MigratioError as exc:
        return Check(Level.FAIL, what, exc.message)
    except Exception as exc:  # a check must report, never crash the report
        return Check(Level.FAIL, what, f"{type(exc).__name__}: {exc}")
