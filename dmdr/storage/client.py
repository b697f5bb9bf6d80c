"""S3 client configuration, client construction, and the start-of-run preflight.

Credentials come from the standard AWS chain (environment variables, shared config/credential
files and profiles, IRSA web identity, instance roles); only the endpoint, region, addressing
style and transfer tuning are ours. Credentials are never logged or put in error messages.
"""
from __future__ import annotations

import os
import sys
import uuid
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Iterator

import boto3
import botocore.exceptions as bexc
from botocore.config import Config
from s3transfer.manager import TransferConfig

from dmdr.errors import UserError
from dmdr.redact import redact
from dmdr.storage.uri import S3Uri

MiB = 1024 * 1024
CHECKSUM_MODES = ("when_required", "when_supported")


@dataclass
class StorageConfig:
    """How to reach the object store and how hard to push it.

    Attributes:
        s3_uri: remote home of the runs, ``s3://bucket/prefix`` (None: no object storage).
        endpoint_url: custom endpoint (MinIO, Ceph RGW, R2, moto); None falls back to
            ``AWS_ENDPOINT_URL_S3`` / ``AWS_ENDPOINT_URL`` / the profile, then to AWS itself.
        region: region name; None uses the AWS chain, then ``us-east-1``.
        profile: AWS profile name; None uses ``AWS_PROFILE`` / the default chain.
        path_style: path-style addressing (``http://host/bucket/key``), needed by most MinIO
            and Ceph setups.
        checksum_mode: "when_required" or "when_supported" for request checksums and response
            validation. None (default) picks "when_required" for custom endpoints (many
            S3-compatible stores reject the CRC trailers boto3 >= 1.36 sends) and
            "when_supported" for AWS; ``AWS_REQUEST_CHECKSUM_CALCULATION`` also counts as asking.
        max_concurrency: parallel part transfers per file batch.
        part_size_mb: multipart part size and threshold in MiB (S3 minimum: 5). Uploads hold
            at most (max_concurrency + 2) parts in memory.
        retries: attempts per request inside botocore (standard retry mode).
        connect_timeout: seconds to wait for a TCP connection.
        read_timeout: seconds to wait for a response byte.
        max_bandwidth: upload bandwidth cap in bytes/s (None: unlimited).
        announce_retries: print one line on stderr per failed attempt that is retried
            (interactive commands: a slow store is never silent).
    """

    s3_uri: str | None = None
    endpoint_url: str | None = None
    region: str | None = None
    profile: str | None = None
    path_style: bool = False
    checksum_mode: str | None = None
    max_concurrency: int = 10
    part_size_mb: int = 16
    retries: int = 5
    connect_timeout: float = 5.0
    read_timeout: float = 60.0
    max_bandwidth: int | None = None
    announce_retries: bool = False

    def __post_init__(self) -> None:
        if self.s3_uri is not None:
            S3Uri.parse(self.s3_uri)
        if self.checksum_mode is not None and self.checksum_mode not in CHECKSUM_MODES:
            raise UserError(
                f"S3 checksum mode '{self.checksum_mode}' is not known: use one of "
                f"{', '.join(CHECKSUM_MODES)}."
            )
        if self.part_size_mb < 5:
            raise UserError(f"S3 part size {self.part_size_mb} MiB is below the S3 minimum: use 5 or more.")
        if self.max_concurrency < 1 or self.retries < 1:
            raise UserError("S3 max_concurrency and retries must be at least 1.")

    @property
    def uri(self) -> S3Uri:
        """The parsed `s3_uri` (UserError when unset)."""
        if not self.s3_uri:
            raise UserError("No S3 URI given: pass --s3-uri s3://BUCKET/PREFIX or set DMDR_S3_URI.")
        return S3Uri.parse(self.s3_uri)


def _session(cfg: StorageConfig) -> boto3.session.Session:
    try:
        return boto3.session.Session(profile_name=cfg.profile, region_name=cfg.region)
    except bexc.ProfileNotFound:
        raise UserError(
            f"AWS profile '{cfg.profile}' is not in ~/.aws/config or ~/.aws/credentials: fix the "
            "profile name or AWS_PROFILE."
        ) from None


def effective_endpoint(cfg: StorageConfig, session: boto3.session.Session | None = None) -> str | None:
    """The custom endpoint in force, or None for AWS S3 itself."""
    if cfg.endpoint_url:
        return cfg.endpoint_url
    if os.environ.get("AWS_IGNORE_CONFIGURED_ENDPOINT_URLS", "").lower() == "true":
        return None
    for var in ("AWS_ENDPOINT_URL_S3", "AWS_ENDPOINT_URL"):
        if os.environ.get(var):
            return os.environ[var]
    session = session or _session(cfg)
    scoped = session._session.get_scoped_config()  # the profile's own settings
    s3_section = scoped.get("s3") if isinstance(scoped.get("s3"), dict) else {}
    return s3_section.get("endpoint_url") or scoped.get("endpoint_url")


def effective_checksum_mode(cfg: StorageConfig, endpoint: str | None) -> str:
    """The checksum mode to use: explicit setting, then the AWS variable, then by endpoint."""
    if cfg.checksum_mode:
        return cfg.checksum_mode
    env = os.environ.get("AWS_REQUEST_CHECKSUM_CALCULATION", "").lower()
    if env in CHECKSUM_MODES:
        return env
    return "when_required" if endpoint else "when_supported"


def make_client(cfg: StorageConfig, *, retries: int | None = None, connect_timeout: float | None = None,
                read_timeout: float | None = None) -> Any:
    """A thread-safe boto3 S3 client for `cfg` (keyword overrides serve short-lived probes)."""
    session = _session(cfg)
    endpoint = effective_endpoint(cfg, session)
    checksum = effective_checksum_mode(cfg, endpoint)
    config = Config(
        region_name=cfg.region or session.region_name or "us-east-1",
        retries={"max_attempts": retries or cfg.retries, "mode": "standard"},
        connect_timeout=connect_timeout if connect_timeout is not None else cfg.connect_timeout,
        read_timeout=read_timeout if read_timeout is not None else cfg.read_timeout,
        max_pool_connections=max(10, 2 * cfg.max_concurrency + 4),
        s3={"addressing_style": "path" if cfg.path_style else "auto"},
        request_checksum_calculation=checksum,
        response_checksum_validation=checksum,
    )
    client = session.client("s3", endpoint_url=endpoint, config=config)
    if cfg.announce_retries:
        attempts = (retries or cfg.retries) + 1  # botocore's max_attempts counts retries
        client.meta.events.register("needs-retry.s3", _RetryNotice(attempts, endpoint or "AWS S3"))
    return client


class _RetryNotice:
    """botocore `needs-retry` observer: one stderr line per failed attempt that will be retried."""

    def __init__(self, attempts: int, endpoint: str):
        self.attempts, self.endpoint = attempts, safe_endpoint(endpoint)

    def __call__(self, response: Any = None, attempts: int = 0, caught_exception: Any = None,
                 operation: Any = None, **kwargs: Any) -> None:
        if caught_exception is not None:
            why = type(caught_exception).__name__
        elif response is not None and response[0].status_code >= 500:
            why = f"HTTP {response[0].status_code}"
        else:
            return None
        if attempts < self.attempts:
            name = getattr(operation, "name", "request")
            print(f"S3 {name} at {self.endpoint}: attempt {attempts}/{self.attempts} failed ({why}); retrying",
                  file=sys.stderr, flush=True)
        return None


def transfer_config(cfg: StorageConfig, *, for_upload: bool = True) -> TransferConfig:
    """s3transfer tuning derived from `cfg` (bandwidth cap applies to uploads only)."""
    part = cfg.part_size_mb * MiB
    return TransferConfig(
        multipart_threshold=part,
        multipart_chunksize=part,
        max_request_concurrency=cfg.max_concurrency,
        max_in_memory_upload_chunks=cfg.max_concurrency + 2,
        max_bandwidth=cfg.max_bandwidth if for_upload else None,
    )


def error_code(exc: BaseException) -> str:
    """The S3 error code of a ClientError ("" for anything else)."""
    if isinstance(exc, bexc.ClientError):
        return str(exc.response.get("Error", {}).get("Code", ""))
    return ""


def describe_error(exc: BaseException) -> str:
    """A short, credential-free description of a storage error for log lines."""
    code = error_code(exc)
    if code:
        return f"{code} ({exc.operation_name})" if hasattr(exc, "operation_name") else code
    return f"{type(exc).__name__}: {exc}"


_NETWORK_ERRORS = (bexc.EndpointConnectionError, bexc.ConnectTimeoutError, bexc.ReadTimeoutError,
                   bexc.ConnectionClosedError, bexc.ProxyConnectionError, bexc.SSLError)
_CREDENTIAL_CODES = {"InvalidAccessKeyId", "SignatureDoesNotMatch", "InvalidToken", "ExpiredToken",
                     "InvalidClientTokenId", "TokenRefreshRequired"}


def safe_endpoint(endpoint: str) -> str:
    """The endpoint URL without any ``user:password@`` part, for messages."""
    return redact(endpoint)


def translate_error(exc: BaseException, uri: S3Uri, endpoint: str) -> UserError | None:
    """One clear UserError for a storage exception a user can fix (None: not one of those)."""
    endpoint = safe_endpoint(endpoint)
    where = f"bucket '{uri.bucket}' at {endpoint}"
    if isinstance(exc, bexc.NoCredentialsError):
        return UserError(
            f"No AWS credentials found for {where}: set AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY, "
            "AWS_PROFILE, or an IAM role (IRSA) for the pod."
        )
    if isinstance(exc, (bexc.PartialCredentialsError, bexc.CredentialRetrievalError)):
        return UserError(
            f"AWS credentials for {where} are incomplete or could not be loaded "
            f"({type(exc).__name__}): check the credential variables, profile or IAM role."
        )
    if isinstance(exc, _NETWORK_ERRORS):
        return UserError(
            f"Cannot reach the S3 endpoint {endpoint} ({type(exc).__name__}): check --s3-endpoint-url "
            "/ AWS_ENDPOINT_URL, the network policy and that the store is running."
        )
    code = error_code(exc)
    if code in ("NoSuchBucket",) or (code == "404" and getattr(exc, "operation_name", "") == "HeadBucket"):
        return UserError(f"The {where} does not exist: create it or fix the bucket in the URI ({uri}).")
    if code in _CREDENTIAL_CODES:
        return UserError(
            f"The S3 store rejected the credentials for {where} ({code}): check "
            "AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY, the profile or the IAM role."
        )
    if code in ("AccessDenied", "403", "AllAccessDisabled"):
        return UserError(
            f"Access denied to {uri} ({where}, {getattr(exc, 'operation_name', 'request')}): grant "
            "s3:ListBucket, s3:GetObject, s3:PutObject and s3:DeleteObject on the prefix."
        )
    return None


@contextmanager
def storage_errors(cfg: StorageConfig, uri: S3Uri) -> Iterator[None]:
    """Turn fixable storage exceptions raised inside the block into one UserError."""
    try:
        yield
    except (bexc.BotoCoreError, bexc.ClientError) as exc:
        err = translate_error(exc, uri, effective_endpoint(cfg) or "AWS S3")
        if err is None:  # e.g. 500s or throttling that outlasted the retries: still one line
            where = safe_endpoint(effective_endpoint(cfg) or "AWS S3")
            err = UserError(f"The S3 store at {where} failed a request for {uri} ({describe_error(exc)}) "
                            f"after {cfg.retries + 1} attempts: it is failing or overloaded; retry later.")
        raise err from None


def preflight(cfg: StorageConfig, *, check_write: bool = True, timeout: float = 5.0) -> None:
    """Check in seconds that the bucket is reachable, exists and accepts our credentials.

    Lists one key under the prefix and (with `check_write`) writes and deletes a small probe
    object, so a read-only credential fails now rather than at the first checkpoint.
    Raises one UserError naming the endpoint/bucket and the fix.
    """
    uri = cfg.uri
    endpoint = safe_endpoint(effective_endpoint(cfg) or "AWS S3")
    client = make_client(cfg, retries=1, connect_timeout=timeout, read_timeout=timeout)
    try:
        with storage_errors(cfg, uri):
            client.list_objects_v2(Bucket=uri.bucket, Prefix=uri.prefix, MaxKeys=1)
            if check_write:
                probe = uri.join(f".dmdr-preflight-{uuid.uuid4().hex}").key
                client.put_object(Bucket=uri.bucket, Key=probe, Body=b"ok")
                try:
                    client.delete_object(Bucket=uri.bucket, Key=probe)
                except bexc.ClientError:
                    pass  # delete permission is only needed for retention; not fatal here
    except (bexc.BotoCoreError, bexc.ClientError) as exc:
        raise UserError(
            f"The S3 check of {uri} at {endpoint} failed ({describe_error(exc)}): fix the S3 settings."
        ) from None
