"""Object storage settings that reach every process of a job: the driver and every Ray worker.

Users point the jobs at S3 (or any S3-compatible store) the usual ways:

* the standard AWS environment variables (``AWS_ENDPOINT_URL``, ``AWS_ACCESS_KEY_ID``,
  ``AWS_SECRET_ACCESS_KEY``, ``AWS_SESSION_TOKEN``, ``AWS_REGION``, ...), read by s3fs/botocore
  and by pyarrow's S3 filesystem;
* a ``storage_options`` block in the job's config: fsspec's options for ``s3://`` URLs
  (``endpoint_url``, ``key``, ``secret``, ``client_kwargs``, ...), as with
  ``fsspec.open(url, **storage_options)``.

A Ray worker does not inherit the driver's environment (it inherits its raylet's, which may be on
another node and started long before the job). So the driver captures both into a
:class:`Storage` value that travels with every task and actor as an argument, and each of them
calls :meth:`Storage.apply` first: it sets the same variables and registers the options as
fsspec's defaults for ``s3``, so every ``fsspec.open(url)`` in that process behaves as on the
driver. :func:`ray_env_vars` gives the same variables for a ``runtime_env``.
"""

from __future__ import annotations

import os
import posixpath
from dataclasses import dataclass, field
from typing import Mapping

import fsspec

# The variables a user sets for S3; values are forwarded only when set on the driver.
AWS_ENV_VARS = ("AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3", "AWS_ACCESS_KEY_ID",
                "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_DEFAULT_REGION", "AWS_REGION",
                "AWS_PROFILE", "AWS_CA_BUNDLE")
OBJECT_STORE_PROTOCOLS = ("s3", "s3a")


@dataclass(frozen=True)
class Storage:
    """The driver's object-storage settings, shipped to workers as a task argument."""

    env: Mapping[str, str] = field(default_factory=dict)
    options: Mapping = field(default_factory=dict)

    @classmethod
    def capture(cls, storage_options: Mapping | None = None) -> "Storage":
        """The AWS variables set in this process plus the config's ``storage_options``."""
        env = {k: os.environ[k] for k in AWS_ENV_VARS if os.environ.get(k)}
        return cls(env=env, options=dict(storage_options or {}))

    def apply(self) -> "Storage":
        """Make this process open URLs as the driver does (idempotent, cheap). fsspec's defaults
        for ``s3`` become exactly the job's ``storage_options``; the AWS variables are set (a
        variable the driver does not have is left as the worker has it)."""
        changed = False
        for k, v in self.env.items():
            if os.environ.get(k) != v:
                os.environ[k] = v
                changed = True
        for proto in OBJECT_STORE_PROTOCOLS:
            # The job's options replace whatever this process held before (a reused worker, or
            # a driver that ran another job): the settings of one job never leak into the next.
            if fsspec.config.conf.get(proto, {}) != dict(self.options):
                fsspec.config.conf[proto] = dict(self.options)
                changed = True
        if changed:  # filesystems cached before this point were built with other settings
            _clear_fs_cache()
        return self


def _clear_fs_cache() -> None:
    for proto in OBJECT_STORE_PROTOCOLS:
        try:
            fsspec.get_filesystem_class(proto).clear_instance_cache()
        except (ImportError, ValueError, AttributeError):
            pass


def ray_env_vars(storage: Storage) -> dict[str, str]:
    """``runtime_env`` ``env_vars`` carrying the same settings to workers (fsspec reads
    ``FSSPEC_S3`` as JSON options for ``s3``)."""
    import json

    env = dict(storage.env)
    if storage.options:
        env["FSSPEC_S3"] = json.dumps(dict(storage.options))
    return env


def is_remote(url: str | os.PathLike) -> bool:
    """True for URLs with a non-local protocol (``s3://``, ``gs://``, ...)."""
    text = str(url)
    if "://" not in text:
        return False
    return text.split("://", 1)[0] not in ("file", "local")


def url_join(url: str, *parts: str) -> str:
    """Join path parts to a local path or a URL, keeping the protocol."""
    if is_remote(url):
        proto, rest = url.split("://", 1)
        return f"{proto}://" + posixpath.join(rest, *parts)
    return os.path.join(str(url), *parts)


def absolute(url: str | os.PathLike) -> str:
    """A URL unchanged; a local path made absolute (workers may run in another directory)."""
    text = str(url)
    if is_remote(text):
        return text
    if text.startswith("file://"):
        text = text[len("file://"):]
    return os.path.abspath(text)
