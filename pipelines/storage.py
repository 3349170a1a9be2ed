"""Object storage access: fsspec filesystems for local paths, s3:// and any other fsspec URL.

Owns how credentials and endpoints reach the filesystem (the usual AWS environment variables, or
explicit options) and turns storage failures a user can fix (no credentials, unreachable endpoint,
access denied, missing bucket or prefix) into one-sentence ``StorageError`` messages. Secrets never
appear in those messages or in ``describe()``.
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field
from typing import Any

import fsspec
from fsspec.core import url_to_fs


class StorageError(RuntimeError):
    """Storage cannot be used as asked; the message says what to change."""


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
            # Throttling (SlowDown, 503) and dropped connections are retried with backoff by
            # botocore's adaptive mode before an error reaches us.
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


def explain(err: BaseException, url: str, options: StorageOptions | None = None) -> StorageError:
    """A StorageError saying in one sentence what went wrong with ``url`` and what to do."""
    options = options or StorageOptions()
    where = options.describe(url)
    name = type(err).__name__
    text = str(err)
    if "InvalidAccessKeyId" in text or "SignatureDoesNotMatch" in text:
        return StorageError(f"the credentials for {where} were rejected: check the key and secret")
    if name in ("NoCredentialsError", "PartialCredentialsError"):
        return StorageError(
            f"no credentials for {where}: set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY "
            "(or pass them as options), or use anonymous access"
        )
    if name in ("EndpointConnectionError", "ConnectTimeoutError", "ConnectionError") or isinstance(
        err, (ConnectionError, TimeoutError)
    ):
        return StorageError(f"cannot reach storage for {where}: check the endpoint and network")
    if isinstance(err, PermissionError) or "AccessDenied" in text or "Forbidden" in text:
        return StorageError(f"access denied to {where}: check the credentials' permissions")
    if isinstance(err, FileNotFoundError):
        return StorageError(f"{where} does not exist (or its bucket does not)")
    return StorageError(f"storage error on {where}: {name}: {text.splitlines()[0] if text else ''}")


def storage_call(url: str, options: StorageOptions | None, fn, *args, **kwargs):
    """Run ``fn`` and turn any storage failure into a StorageError about ``url``."""
    try:
        return fn(*args, **kwargs)
    except StorageError:
        raise
    except Exception as err:  # noqa: BLE001 - botocore, aiohttp and OSError subclasses alike
        raise explain(err, url, options) from err
