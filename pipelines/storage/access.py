"""Object storage access: fsspec filesystems for local paths, s3:// and any other fsspec URL.

Owns how credentials and endpoints reach the filesystem (the usual AWS environment variables, or
explicit options) and turns storage failures a user can fix (no credentials, unreachable endpoint,
access denied, missing bucket or prefix) into one-sentence ``StorageError`` messages. Secrets never
appear in those messages or in ``describe()``.
"""

from __future__ import annotations

import dataclasses
import errno
import os
import re
from dataclasses import dataclass, field
from typing import Annotated, Any

import fsspec
from fsspec.core import url_to_fs
from pydantic import AfterValidator


class StorageError(RuntimeError):
    """Storage cannot be used as asked; the message says what to change."""


class StorageUnavailable(StorageError):
    """Storage kept failing (5xx, throttling, dropped or refused connections) through every retry.

    Unlike a missing file or a rejected key, this is not the data's fault: the data stage does
    not skip a shard for it, it stops, and the run can be resumed once storage answers again.
    """


# S3 error codes that mean "try again later" (besides any HTTP 5xx status).
_RETRYABLE_CODES = frozenset({"SlowDown", "ServiceUnavailable", "InternalError", "RequestTimeout",
                              "Throttling", "ThrottlingException", "RequestLimitExceeded"})
# S3 error codes for a key that does not exist or a secret that does not match it.
_REJECTED_CODES = frozenset({"InvalidAccessKeyId", "SignatureDoesNotMatch"})
# s3fs turns SlowDown and ServiceUnavailable into EBUSY, InternalError into EREMOTEIO.
_S3FS_RETRYABLE_ERRNOS = frozenset({errno.EBUSY, errno.EREMOTEIO})
# Transport failures, by class name: botocore's, aiohttp's and the standard library's.
_TRANSPORT_ERRORS = frozenset({
    "EndpointConnectionError", "ConnectTimeoutError", "ReadTimeoutError", "ConnectionClosedError",
    "ClientConnectorError", "ServerDisconnectedError", "ClientOSError", "ConnectionError",
})


@dataclass(frozen=True)
class StorageOptions:
    """Connection settings for object storage; unset fields fall back to the AWS environment."""

    endpoint_url: str | None = None
    key: str | None = field(default=None, repr=False)
    secret: str | None = field(default=None, repr=False)
    anon: bool = False
    connect_timeout_s: float = 10.0
    max_attempts: int = 8

    def with_environment_endpoint(self) -> "StorageOptions":
        """These options with the endpoint taken from AWS_ENDPOINT_URL here, if none was given."""
        endpoint = self.endpoint_url or os.environ.get("AWS_ENDPOINT_URL")
        return dataclasses.replace(self, endpoint_url=endpoint)

    def for_protocol(self, protocol: str) -> dict[str, Any]:
        """Keyword arguments for the fsspec filesystem of ``protocol``."""
        if protocol not in ("s3", "s3a"):
            return {}
        options: dict[str, Any] = {
            "anon": self.anon,
            # Throttling (SlowDown, 503), 5xx answers and dropped connections are retried with
            # exponential backoff by botocore's adaptive mode (and s3fs's own loop for
            # throttling) before an error reaches us; max_attempts bounds how long that lasts.
            "config_kwargs": {
                "connect_timeout": self.connect_timeout_s,
                "read_timeout": 120,
                "retries": {"max_attempts": self.max_attempts, "mode": "adaptive"},
            },
        }
        endpoint = self.endpoint_url or os.environ.get("AWS_ENDPOINT_URL")
        if endpoint:
            options["endpoint_url"] = endpoint
        if self.key:
            options["key"] = self.key
        if self.secret:
            options["secret"] = self.secret
        return options

    def describe(self, url: str) -> str:
        """Where ``url`` lives, for messages: the endpoint but never a credential."""
        endpoint = self.endpoint_url or os.environ.get("AWS_ENDPOINT_URL")
        return f"{url} (endpoint {endpoint})" if endpoint and is_remote(url) else url


CREDENTIALS_IN_URL = "must not carry credentials"


def refuse_credentials_in_url(url: str) -> str:
    """``url`` unchanged if it has no ``user:password@`` part (a pydantic validator)."""
    # user@ or user:password@ right after the scheme (a secret may hold a raw "/").
    if re.match(r"^[A-Za-z][A-Za-z0-9+.-]*://(?:[^/@]*:[^@]*|[^/@:]+)@", url):
        raise ValueError(f"{CREDENTIALS_IN_URL} (user:password@): give them in "
                         "AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY or a Kubernetes Secret")
    return url


# A storage location in a config: never with credentials, which would be printed and saved.
StorageUrl = Annotated[str, AfterValidator(refuse_credentials_in_url)]


def is_remote(url: str) -> bool:
    return "://" in url and not url.startswith("file://")


def protocol_of(url: str) -> str:
    return url.split("://", 1)[0] if "://" in url else "file"


def open_filesystem(
    url: str, options: StorageOptions | None = None
) -> tuple[fsspec.AbstractFileSystem, str]:
    """The filesystem for ``url`` and the path inside it."""
    options = options or StorageOptions()
    try:
        return url_to_fs(url, **options.for_protocol(protocol_of(url)))
    except (ImportError, ValueError) as err:
        raise StorageError(f"cannot open {url}: {err}") from None


def causes(err: BaseException):
    """``err`` and everything it wraps, each once: Python's cause and context, and what Ray's
    errors carry (a task error's cause, Ray Train's controller and per-worker failures)."""
    pending, seen = [err], set()
    while pending:
        link = pending.pop()
        if link is None or id(link) in seen:
            continue
        seen.add(id(link))
        yield link
        pending += [link.__cause__, link.__context__, getattr(link, "cause", None),
                    getattr(link, "controller_failure", None),
                    *getattr(link, "worker_failures", {}).values()]


def _responses(err: BaseException):
    """(S3 error code, HTTP status) of each botocore response in ``err``'s chain."""
    for link in causes(err):
        response = getattr(link, "response", None)
        if isinstance(response, dict):
            yield (response.get("Error", {}).get("Code", ""),
                   response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0))


def unavailable_reason(err: BaseException) -> str | None:
    """Why storage looks unavailable (a retryable failure) in ``err``'s chain, or None."""
    for code, status in _responses(err):
        if code in _RETRYABLE_CODES or status >= 500:
            return f"{code or 'HTTP'} {status}".strip()
    for link in causes(err):
        if type(link).__name__ in _TRANSPORT_ERRORS or isinstance(link, (ConnectionError,
                                                                          TimeoutError)):
            return type(link).__name__
        # s3fs's translation of those codes, whose cause is lost once it crossed processes.
        if isinstance(link, OSError) and link.errno in _S3FS_RETRYABLE_ERRNOS:
            return f"{link.strerror or link}"
        code = next((code for code in _RETRYABLE_CODES if f"({code})" in str(link)), None)
        if code:
            return code
    return None


def explain(err: BaseException, url: str, options: StorageOptions | None = None) -> StorageError:
    """A StorageError saying in one sentence what went wrong with ``url`` and what to do."""
    options = options or StorageOptions()
    where = options.describe(url)
    name = type(err).__name__
    text = str(err)
    codes = {code for code, _ in _responses(err)}
    if codes & _REJECTED_CODES or any(code in text for code in _REJECTED_CODES):
        return StorageError(f"the credentials for {where} were rejected: check the key and secret")
    if name in ("NoCredentialsError", "PartialCredentialsError"):
        return StorageError(
            f"no credentials for {where}: set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY "
            "(or pass them as options), or use anonymous access"
        )
    if name in ("EndpointConnectionError", "ConnectTimeoutError") or isinstance(
        err, ConnectionRefusedError
    ):
        return StorageUnavailable(
            f"cannot reach storage for {where}: check the endpoint and network")
    unavailable = unavailable_reason(err)
    if unavailable:
        return StorageUnavailable(
            f"storage for {where} kept failing ({unavailable}) through {options.max_attempts} "
            "attempts with backoff: check the storage service, then rerun the same command "
            "to resume")
    if isinstance(err, PermissionError) or "AccessDenied" in text or "Forbidden" in text:
        return StorageError(f"access denied to {where}: check the credentials' permissions")
    if isinstance(err, FileNotFoundError):
        bucket = " (or its bucket does not)" if is_remote(url) else ""
        return StorageError(f"{where} does not exist{bucket}")
    return StorageError(f"storage error on {where}: {name}: {text.splitlines()[0] if text else ''}")


def storage_call(url: str, options: StorageOptions | None, fn, *args, **kwargs):
    """Run ``fn`` and turn any storage failure into a StorageError about ``url``."""
    try:
        return fn(*args, **kwargs)
    except StorageError:
        raise
    except Exception as err:  # noqa: BLE001 - botocore, aiohttp and OSError subclasses alike
        raise explain(err, url, options) from err
