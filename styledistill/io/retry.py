"""Retries with exponential backoff for storage calls that fail transiently (object stores drop
connections, throttle, time out). Permanent errors (missing file, no permission, disk full) are raised at
once: retrying them only delays the one line the user needs to read.

Attempts and backoff come from the environment so Ray workers see the same policy as the driver:
STYLEDISTILL_IO_ATTEMPTS (default 5) and STYLEDISTILL_IO_BACKOFF_S (first delay, default 0.5 s; doubled
each time, with jitter, at most 20 s).
"""

from __future__ import annotations

import errno
import logging
import os
import random
import time
from collections.abc import Callable
from typing import TypeVar

logger = logging.getLogger(__name__)
T = TypeVar("T")

PERMANENT_ERRNOS = {errno.ENOENT, errno.EACCES, errno.EPERM, errno.ENOSPC, errno.EDQUOT, errno.EROFS,
                    errno.EISDIR, errno.ENOTDIR, errno.EEXIST, errno.EFBIG, errno.ENAMETOOLONG, errno.EINVAL}
# Transient errors of the usual object-store clients (botocore, aiohttp, google-auth, requests), by name,
# so none of them has to be imported.
TRANSIENT_NAMES = {"ReadTimeoutError", "ConnectTimeoutError", "EndpointConnectionError", "ConnectionClosedError",
                   "ServerDisconnectedError", "ClientPayloadError", "ClientOSError", "ServerTimeoutError",
                   "IncompleteRead", "ProtocolError", "ChunkedEncodingError", "TransportError", "RetryError",
                   "SlowDown", "ServiceUnavailable", "TooManyRequests", "InternalServerError"}

# The transient errnos a storage call can raise.
TRANSIENT_ERRNOS = {errno.EIO, errno.EAGAIN, errno.EBUSY, errno.ETIMEDOUT, errno.ECONNRESET, errno.ECONNREFUSED,
                    errno.ECONNABORTED, errno.EPIPE, errno.ENETUNREACH, errno.EHOSTUNREACH, errno.ESTALE}


class OutputWriteError(OSError):
    """The output refused a write for good: one line naming the path and the cause."""


def output_write_error(uri: str, cause: BaseException) -> OutputWriteError:
    if isinstance(cause, OutputWriteError):
        return cause
    reason = getattr(cause, "strerror", None) or str(cause) or type(cause).__name__
    return OutputWriteError(f"cannot write {uri}: {reason} ({type(cause).__name__}); free space or fix the "
                            f"output, then rerun the same command to resume")


def is_retryable(err: BaseException) -> bool:
    if getattr(err, "retryable", None) is not None:
        return bool(err.retryable)
    if isinstance(err, OutputWriteError):
        return False
    if any(type(c).__name__ in TRANSIENT_NAMES for c in _chain(err)):
        return True
    if isinstance(err, (ConnectionError, TimeoutError)):
        return True
    if isinstance(err, OSError):
        return err.errno in TRANSIENT_ERRNOS
    return False


def _chain(err: BaseException):
    seen = set()
    while err is not None and id(err) not in seen:
        seen.add(id(err))
        yield err
        err = err.__cause__ or err.__context__


def attempts() -> int:
    return max(1, int(os.environ.get("STYLEDISTILL_IO_ATTEMPTS", "5")))


def backoff_s() -> float:
    return float(os.environ.get("STYLEDISTILL_IO_BACKOFF_S", "0.5"))


class RetriesExhausted(OSError):
    """A transient error that did not go away: the message keeps the cause and the number of attempts."""

    retryable = False


def retrying(call: Callable[[], T], what: str = "storage call", *, sleep: Callable[[float], None] = time.sleep) -> T:
    """`call()`, retried on transient errors with exponential backoff (and jitter)."""
    tries = attempts()
    delay = backoff_s()
    for attempt in range(1, tries + 1):
        try:
            return call()
        except Exception as err:  # noqa: BLE001 - classified below; anything permanent is re-raised as is
            if not is_retryable(err):
                raise
            if attempt == tries:
                raise RetriesExhausted(f"{type(err).__name__}: {err} (still failing after {tries} attempts)") from err
            logger.warning("%s failed (%s: %s); retry %d/%d in %.2fs", what, type(err).__name__, err, attempt,
                           tries - 1, delay)
            sleep(delay * (0.5 + random.random() / 2))
            delay = min(delay * 2, 20.0)
    raise AssertionError("unreachable")
