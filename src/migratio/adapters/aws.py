"""Adapter for Amazon Web Services (boto3): clients for one site, and readable errors.

Every AWS call of migratio runs inside :func:`aws_errors`, which turns botocore's many
exception types into one :class:`~migratio.errors.AwsError` whose message says what was being
done, what AWS answered, and — for the common mistakes — what to change.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from functools import cached_property
from typing import TYPE_CHECKING, Any

import boto3
from botocore.config import Config
from botocore.exceptions import (
    BotoCoreError,
    ClientError,
    EndpointConnectionError,
    NoCredentialsError,
    NoRegionError,
    ParamValidationError,
    PartialCredentialsError,
    ReadTimeoutError,
)
from botocore.exceptions import (
    ConnectionError as BotoConnectionError,
)
from botocore.parsers import ResponseParserError

from migratio import __version__
from migratio.config import AmazonSite, AwsCredentials
from migratio.errors import AwsError

if TYPE_CHECKING:
    from mypy_boto3_ebs import EBSClient
    from mypy_boto3_ec2 import EC2Client
    from mypy_boto3_s3 import S3Client
    from mypy_boto3_sts import STSClient

#: error codes that mean "slow down or try again later"
_TRANSIENT_CODES = frozenset(
    {
        "Throttling",
        "ThrottlingException",
        "RequestLimitExceeded",
        "RequestThrottled",
        "SlowDown",
        "TooManyRequestsException",
        "InternalError",
        "InternalFailure",
        "InternalServerException",
        "ServiceUnavailable",
        "ServiceUnavailableException",
        "RequestTimeout",
        "RequestTimeoutException",
        "ConcurrentLimitExceededException",
        "ResourceLimitExceeded",
    }
)
#: error codes (and bare HTTP statuses) that mean the keys are wrong
_CREDENTIAL_CODES = frozenset(
    {
        "AuthFailure",
        "InvalidClientTokenId",
        "SignatureDoesNotMatch",
        "UnrecognizedClientException",
        "InvalidAccessKeyId",
        "IncompleteSignature",
        "ExpiredToken",
        "ExpiredTokenException",
        "AccessDeniedException",
        "AccessDenied",
        "UnauthorizedOperation",
        "403",
    }
)


@dataclass
class AwsClients:
    """boto3 clients for one Amazon site, made on first use (clients are thread-safe)."""

    site: AmazonSite
    credentials: AwsCredentials | None = None
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    @cached_property
    def session(self) -> boto3.Session:
        keys = self.site.credentials or self.credentials
        if keys is None:  # boto3's own chain: environment, shared config, instance role
            return boto3.Session(region_name=self.site.region)
        return boto3.Session(
            aws_access_key_id=keys.access_key,
            aws_secret_access_key=keys.secret_key,
            region_name=self.site.region,
        )

    def _config(self, **extra: Any) -> Config:
        return Config(
            region_name=self.site.region,
            retries={"mode": "standard", "max_attempts": 6},
            connect_timeout=20,
            read_timeout=120,
            max_pool_connections=max(10, 2 * self.site.upload_concurrency),
            user_agent_extra=f"migratio/{__version__}",
            **extra,
        )

    def _client(self, service: str, endpoint: str | None, **extra: Any) -> Any:
        with self._lock:  # boto3 sessions are not thread-safe; creating clients must not race
            return self.session.client(
                service,  # type: ignore[call-overload]
                endpoint_url=endpoint,
                config=self._config(**extra),
            )

    @cached_property
    def ec2(self) -> EC2Client:
        client: EC2Client = self._client("ec2", self.site.ec2_url)
        return client

    @cached_property
    def ebs(self) -> EBSClient:
        client: EBSClient = self._client("ebs", self.site.ebs_url)
        return client

    @cached_property
    def s3(self) -> S3Client:
        # a private endpoint has no per-bucket host names: address buckets by path
        style = {"s3": {"addressing_style": "path"}} if self.site.s3_url else {}
        client: S3Client = self._client("s3", self.site.s3_url, **style)
        return client

    @cached_property
    def sts(self) -> STSClient:
        client: STSClient = self._client("sts", self.site.sts_url)
        return client


def error_code(exc: ClientError) -> str:
    """AWS's error code of a ClientError (``AuthFailure``, ``InvalidAMIID.NotFound`` …)."""
    error = exc.response.get("Error", {})
    return str(error.get("Code") or exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode"))


def describe(exc: Exception, what: str) -> AwsError:
    """The :class:`AwsError` for ``exc``, raised while ``what``."""
    if isinstance(exc, ClientError):
        code = error_code(exc)
        message = str(exc.response.get("Error", {}).get("Message") or "").strip()
        status = exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0)
        text = f"{what}: AWS answered {code}" + (f": {message}" if message else "")
        hint = _hint(code, message)
        retryable = code in _TRANSIENT_CODES or (isinstance(status, int) and status >= 500)
        return AwsError(text + (f" ({hint})" if hint else ""), retryable=retryable)
    if isinstance(exc, ResponseParserError):
        body = str(exc).split("\n", 1)[-1].strip()[:200]
        return AwsError(
            f"{what}: the endpoint did not answer like AWS (an HTML error page?): {body} "
            "(check the site's EC2_URL, EBS_URL or S3_URL, and that AWS_REGION is a region "
            "it serves)",
            retryable=False,
        )
    if isinstance(exc, NoCredentialsError | PartialCredentialsError):
        return AwsError(
            f"{what}: no AWS credentials: set AWS_ACCESS_KEY and AWS_SECRET_KEY in the "
            "credentials file or the site's file, or configure boto3 (environment, "
            "~/.aws/credentials, instance role)",
            retryable=False,
        )
    if isinstance(exc, EndpointConnectionError | ReadTimeoutError | BotoConnectionError):
        return AwsError(f"{what}: cannot reach AWS: {exc}", retryable=True)
    if isinstance(exc, NoRegionError | ParamValidationError):
        return AwsError(f"{what}: {exc}", retryable=False)
    return AwsError(f"{what}: {type(exc).__name__}: {exc}", retryable=False)


def _hint(code: str, message: str) -> str:
    lowered = message.lower()
    if code in _CREDENTIAL_CODES:
        return (
            "check the AWS keys (AWS_ACCESS_KEY and AWS_SECRET_KEY, or boto3's credentials), "
            "and that they may call this operation on this resource in this region"
        )
    if "vmimport" in lowered or ("role" in lowered and "import" in lowered):
        return (
            "VM Import needs the service role 'vmimport' (or VMIMPORT_ROLE) trusted by "
            "vmie.amazonaws.com with read access to S3_BUCKET: see the VM Import user guide, "
            "'Required service role'"
        )
    if "bucket" in lowered and "region" in lowered:
        return "S3_BUCKET must be in the same region as AWS_REGION"
    if code in {"NoSuchBucket", "PermanentRedirect", "AuthorizationHeaderMalformed"}:
        return "check that S3_BUCKET exists in AWS_REGION and belongs to this account"
    return ""


@contextlib.contextmanager
def aws_errors(what: str, error: type[AwsError] = AwsError) -> Iterator[None]:
    """Turn any botocore exception raised inside into ``error`` (an :class:`AwsError`)."""
    try:
        yield
    except (ClientError, BotoCoreError, ResponseParserError) as exc:
        described = describe(exc, what)
        raise error(described.message, retryable=described.retryable) from exc


def tags(pairs: Mapping[str, str]) -> list[dict[str, str]]:
    """``{"k": "v"}`` → ``[{"Key": "k", "Value": "v"}]``, values cut to AWS's 256 characters."""
    return [{"Key": key, "Value": value[:256]} for key, value in pairs.items()]


def tag_dict(resource: Mapping[str, Any]) -> dict[str, str]:
    """A resource's ``Tags`` list as ``{"k": "v"}``."""
    return {str(tag.get("Key")): str(tag.get("Value")) for tag in resource.get("Tags", [])}


def tag_filters(pairs: Mapping[str, str]) -> list[dict[str, Any]]:
    """``Filters`` of a describe call for resources carrying every tag of ``pairs``."""
    return [{"Name": f"tag:{key}", "Values": [value]} for key, value in pairs.items()]


def known_regions() -> list[str]:
    """The EC2 regions this boto3 knows (a newer region needs a newer boto3)."""
    return boto3.Session().get_available_regions("ec2")
