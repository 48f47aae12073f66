"""A store under an S3 bucket prefix (AWS S3 or a compatible server such as SeaweedFS or MinIO).

Configuration is boto3's standard one, so the same settings work on a laptop and in a pod:
endpoint from AWS_ENDPOINT_URL / AWS_ENDPOINT_URL_S3 (or the config file), credentials from the
default chain (environment, profile, web identity for IRSA), region from AWS_DEFAULT_REGION.
Nothing here overrides those; this module only adds retries, timeouts, path-style addressing for
custom endpoints, and the translation of S3 failures into the pipeline's two error kinds.

Atomic writes come from S3 itself: a PutObject or a completed multipart upload becomes visible
whole, so no temporary key is needed.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from typing import Any
from urllib.parse import urlparse

import boto3
import botocore.session
import structlog
from boto3.exceptions import S3UploadFailedError
from boto3.s3.transfer import TransferConfig
from botocore.config import Config
from botocore.exceptions import (
    BotoCoreError,
    ClientError,
    ConnectionError as BotoConnectionError,
    CredentialRetrievalError,
    HTTPClientError,
    IncompleteReadError,
    NoCredentialsError,
    PartialCredentialsError,
    SSLError,
)

from controller.stores.base import StoreKeyMissing
from controller.stores.keys import clean_key, clean_prefix, new_probe_key
from nexlify.errors import InputError, PermanentError, TemporaryError

log = structlog.get_logger(__name__)

MULTIPART_THRESHOLD = 8 * 1024 * 1024  # files above this go up in parts of MULTIPART_CHUNKSIZE
MULTIPART_CHUNKSIZE = 8 * 1024 * 1024
DEFAULT_MAX_ATTEMPTS = 5  # botocore "standard" retries: 5xx, throttling and connection errors, with backoff

ADDRESSING_STYLES = ("path", "virtual", "auto")

MISSING_KEY_CODES = frozenset({"NoSuchKey", "404", "NotFound"})
CREDENTIAL_CODES = frozenset({
    "InvalidAccessKeyId", "SignatureDoesNotMatch", "InvalidToken", "ExpiredToken", "TokenRefreshRequired",
    "InvalidClientTokenId", "RequestTimeTooSkewed",
})
ACCESS_CODES = frozenset({"AccessDenied", "403", "Forbidden", "AllAccessDisabled", "AccountProblem"})
BUCKET_CODES = frozenset({"NoSuchBucket", "InvalidBucketName", "PermanentRedirect", "AuthorizationHeaderMalformed"})
TEMPORARY_CODES = frozenset({
    "SlowDown", "Throttling", "ThrottlingException", "RequestThrottled", "RequestLimitExceeded",
    "TooManyRequestsException", "RequestTimeout", "RequestTimeoutException", "InternalError",
    "ServiceUnavailable", "OperationAborted", "429", "500", "502", "503", "504",
})


# ----------------------------------------------------------------------------------------------
# Client construction


def choose_addressing_style(env_value: str | None, endpoint_url: str | None, config_file_style: str | None) -> str | None:
    """Addressing style to force on the client, or None to leave botocore's default.

    Explicit settings win (AWS_S3_ADDRESSING_STYLE, then `s3 = addressing_style = ...` in the AWS
    config file). Otherwise a custom endpoint (anything but *.amazonaws.com) gets path style:
    SeaweedFS, MinIO and most in-cluster servers are reached by one host name or an IP, where
    virtual-hosted style (bucket.host) cannot resolve. AWS itself keeps its default (virtual).
    """
    if env_value:
        style = env_value.strip().lower()
        if style not in ADDRESSING_STYLES:
            raise InputError(
                f"AWS_S3_ADDRESSING_STYLE={env_value!r} is not one of {', '.join(ADDRESSING_STYLES)}"
            )
        return style
    if config_file_style:
        return None  # botocore reads the config file itself
    if endpoint_url and not _is_aws_host(urlparse(endpoint_url).hostname or ""):
        return "path"
    return None


def _is_aws_host(host: str) -> bool:
    return host.endswith(".amazonaws.com") or host.endswith(".amazonaws.com.cn")


def make_s3_client(*, max_attempts: int = DEFAULT_MAX_ATTEMPTS, connect_timeout: float = 10.0,
                   read_timeout: float = 60.0) -> Any:
    """An S3 client from boto3's default configuration chain, with standard retries and timeouts.

    The endpoint (AWS_ENDPOINT_URL / AWS_ENDPOINT_URL_S3 / config file), the credentials (env,
    profile, web identity) and the region are resolved by botocore; this function never sets them.
    """
    core_session = botocore.session.get_session()
    session = boto3.session.Session(botocore_session=core_session)
    config = Config(
        retries={"mode": "standard", "max_attempts": max_attempts},
        connect_timeout=connect_timeout,
        read_timeout=read_timeout,
    )
    client = session.client("s3", config=config)
    config_file_style = (core_session.get_scoped_config().get("s3") or {}).get("addressing_style")
    style = choose_addressing_style(
        os.environ.get("AWS_S3_ADDRESSING_STYLE"), client.meta.endpoint_url, config_file_style
    )
    if style is not None:
        client = session.client("s3", config=config.merge(Config(s3={"addressing_style": style})))
    return client


def default_transfer_config() -> TransferConfig:
    """Managed transfers: multipart above MULTIPART_THRESHOLD, a few parts in parallel."""
    return TransferConfig(
        multipart_threshold=MULTIPART_THRESHOLD,
        multipart_chunksize=MULTIPART_CHUNKSIZE,
        max_concurrency=4,
        preferred_transfer_client="classic",
    )


# ----------------------------------------------------------------------------------------------
# Error translation


def translate_s3_error(error: BaseException, *, bucket: str, location: str, action: str,
                       endpoint: str | None) -> Exception:
    """The pipeline's error for a boto3 failure: StoreKeyMissing, PermanentError or TemporaryError.

    `location` is the s3:// URL concerned and `action` a verb phrase ("reading", "writing").
    Messages name the bucket and what to check; they never contain credentials (botocore's own
    messages do not either, and the access key id is not repeated).
    """
    where = f" at {endpoint}" if endpoint else ""
    if isinstance(error, S3UploadFailedError) and isinstance(error.__context__, ClientError):
        error = error.__context__
    if isinstance(error, ClientError):
        info = error.response.get("Error", {})
        meta = error.response.get("ResponseMetadata", {})
        code = str(info.get("Code", "") or meta.get("HTTPStatusCode", ""))
        status = int(meta.get("HTTPStatusCode") or 0)
        server_message = info.get("Message") or ""
        if code in MISSING_KEY_CODES:
            return StoreKeyMissing(f"{location} does not exist")
        if code in CREDENTIAL_CODES:
            return PermanentError(
                f"S3{where} refused the credentials for bucket '{bucket}' ({code}) while {action} {location}: "
                "check AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY (or the AWS profile / IRSA role in use), "
                "that they belong to this endpoint (AWS_ENDPOINT_URL), and that the clock is right"
            )
        if code in ACCESS_CODES:
            return PermanentError(
                f"S3{where} denied access to bucket '{bucket}' ({code}) while {action} {location}: "
                "check that the identity in use (AWS_ACCESS_KEY_ID, profile or IRSA role) may read, write, "
                "list and delete under this prefix (IAM policy, bucket policy)"
            )
        if code in BUCKET_CODES:
            return PermanentError(
                f"S3 bucket '{bucket}'{where} cannot be used ({code}: {server_message}) while {action} "
                f"{location}: check the bucket name in the URL (s3://bucket/prefix), that the bucket exists, "
                "and the region (AWS_DEFAULT_REGION) and endpoint (AWS_ENDPOINT_URL)"
            )
        if code in TEMPORARY_CODES or status >= 500 or status == 429:
            attempts = int(meta.get("RetryAttempts", 0)) + 1
            return TemporaryError(
                f"S3{where} is unavailable ({code}) while {action} {location}, after {attempts} attempt(s); "
                "retry later"
            )
        return PermanentError(f"S3{where} rejected {action} {location} ({code}: {server_message})")
    if isinstance(error, (NoCredentialsError, PartialCredentialsError, CredentialRetrievalError)):
        return PermanentError(
            f"no usable AWS credentials for bucket '{bucket}' while {action} {location} ({error}): set "
            "AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY, AWS_PROFILE, or a web identity (IRSA service account)"
        )
    if isinstance(error, SSLError):
        return PermanentError(
            f"TLS to S3{where} failed while {action} {location} ({error}): check AWS_ENDPOINT_URL "
            "(http or https) and AWS_CA_BUNDLE"
        )
    if isinstance(error, (BotoConnectionError, HTTPClientError, IncompleteReadError)):
        return TemporaryError(
            f"cannot reach S3{where} while {action} {location} ({error}): check AWS_ENDPOINT_URL and the network"
        )
    if isinstance(error, BotoCoreError):
        return PermanentError(f"S3 request failed while {action} {location}: {error}")
    return PermanentError(f"S3 request failed while {action} {location}: {type(error).__name__}: {error}")


# ----------------------------------------------------------------------------------------------
# The store


class S3Store:
    """Keys live under `s3://bucket/prefix/`; `url(key)` is `s3://bucket/prefix/key`."""

    def __init__(self, bucket: str, prefix: str = "", *, client: Any = None,
                 transfer_config: TransferConfig | None = None) -> None:
        if not bucket or "/" in bucket:
            raise InputError(f"S3 bucket name {bucket!r} is not valid; use a URL like s3://bucket/prefix")
        self.bucket = bucket
        self.prefix = clean_prefix(prefix).rstrip("/")
        self.client = client if client is not None else make_s3_client()
        self.transfer_config = transfer_config or default_transfer_config()
        self.root_url = f"s3://{bucket}/{self.prefix}" if self.prefix else f"s3://{bucket}"

    def __repr__(self) -> str:
        return f"S3Store({self.root_url!r})"

    # -- keys --

    def _object_key(self, key: str) -> str:
        key = clean_key(key)
        return f"{self.prefix}/{key}" if self.prefix else key

    def _root(self) -> str:
        return f"{self.prefix}/" if self.prefix else ""

    def url(self, key: str) -> str:
        return f"s3://{self.bucket}/{self._object_key(key)}"

    @contextlib.contextmanager
    def _errors(self, action: str, location: str) -> Iterator[None]:
        try:
            yield
        except (ClientError, BotoCoreError, S3UploadFailedError) as error:
            translated = translate_s3_error(
                error, bucket=self.bucket, location=location, action=action,
                endpoint=getattr(self.client.meta, "endpoint_url", None),
            )
            raise translated from error

    # -- the Store API --

    def read_bytes(self, key: str) -> bytes:
        object_key = self._object_key(key)
        with self._errors("reading", self.url(key)):
            response = self.client.get_object(Bucket=self.bucket, Key=object_key)
            return response["Body"].read()

    def write_bytes(self, key: str, data: bytes) -> None:
        object_key = self._object_key(key)
        with self._errors("writing", self.url(key)):
            self.client.put_object(Bucket=self.bucket, Key=object_key, Body=data)
        log.debug("store_write", url=self.url(key), size=len(data))

    def exists(self, key: str) -> bool:
        object_key = self._object_key(key)
        try:
            with self._errors("checking", self.url(key)):
                self.client.head_object(Bucket=self.bucket, Key=object_key)
        except StoreKeyMissing:
            return False
        return True

    def list(self, prefix: str = "") -> list[str]:
        root = self._root()
        full_prefix = root + clean_prefix(prefix)
        keys: list[str] = []
        with self._errors("listing", f"s3://{self.bucket}/{full_prefix}"):
            paginator = self.client.get_paginator("list_objects_v2")
            for page in paginator.paginate(Bucket=self.bucket, Prefix=full_prefix):
                for item in page.get("Contents", []):
                    name = item["Key"]
                    if name.endswith("/"):
                        continue  # a "folder" marker some tools create; not an object of ours
                    keys.append(name[len(root):])
        return sorted(keys)

    def delete(self, key: str) -> None:
        object_key = self._object_key(key)
        with self._errors("deleting", self.url(key)):
            self.client.delete_object(Bucket=self.bucket, Key=object_key)

    def move(self, key: str, new_key: str) -> None:
        with self._errors("moving", self.url(key)):
            self.client.copy_object(Bucket=self.bucket, Key=self._object_key(new_key),
                                    CopySource={"Bucket": self.bucket, "Key": self._object_key(key)})
        self.delete(key)

    def upload_file(self, key: str, local_path: str) -> None:
        object_key = self._object_key(key)
        if not os.path.isfile(local_path):
            raise PermanentError(f"cannot upload {local_path} to {self.url(key)}: it is not a readable file")
        with self._errors("uploading", self.url(key)):
            self.client.upload_file(local_path, self.bucket, object_key, Config=self.transfer_config)
        log.debug("store_upload", url=self.url(key), source=local_path)

    def download_file(self, key: str, local_path: str) -> None:
        """Download to local_path; boto3 writes a temporary sibling and renames it when complete."""
        object_key = self._object_key(key)
        folder = os.path.dirname(os.path.abspath(local_path))
        os.makedirs(folder, exist_ok=True)
        with self._errors("downloading", self.url(key)):
            self.client.download_file(self.bucket, object_key, local_path, Config=self.transfer_config)

    def check_writable(self) -> None:
        """Put, read back and delete a probe object; PermanentError (or TemporaryError if unreachable)."""
        probe = new_probe_key()
        payload = os.urandom(32)
        self.write_bytes(probe, payload)
        try:
            try:
                returned = self.read_bytes(probe)
            except StoreKeyMissing:
                returned = None
            if returned != payload:
                raise PermanentError(
                    f"S3 bucket '{self.bucket}' did not return the probe object {self.url(probe)} as written; "
                    "check that AWS_ENDPOINT_URL points to a consistent S3 server"
                )
        finally:
            self.delete(probe)
