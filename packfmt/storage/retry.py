"""Retries with exponential backoff and full jitter.

Object stores answer bursts with ``503 SlowDown``, drop connections and, rarely,
send fewer bytes than promised. Every remote call in ``packfmt.storage`` goes
through :meth:`RetryPolicy.call`: a transient failure is retried after a random
sleep in ``[0, min(cap, base * 2**attempt))`` ("full jitter", which spreads the
retries of many workers instead of synchronising them); after ``attempts`` tries
the last error is raised to the caller, who turns it into one clear exception.

botocore's and urllib3's own retries are switched off so that there is exactly
one retry loop, this one, and the request counters see every attempt.
"""

from __future__ import annotations

import errno
import random
import socket
import time
from dataclasses import dataclass
from typing import Callable, Optional, TypeVar

T = TypeVar("T")

TRANSIENT_HTTP_STATUS = frozenset({408, 429, 500, 502, 503, 504})
TRANSIENT_S3_CODES = frozenset({
    "SlowDown", "ServiceUnavailable", "InternalError", "RequestTimeout",
    "RequestTimeTooSkewed", "Throttling", "ThrottlingException", "TooManyRequests",
    "RequestLimitExceeded", "BandwidthLimitExceeded", "ProvisionedThroughputExceededException",
    "EC2ThrottledException", "PriorRequestNotComplete", "OperationAborted",
})


class ShortReadError(Exception):
    """The server sent fewer (or more) bytes than the range asked for: retryable."""


class PermanentError(Exception):
    """A failure that retrying cannot fix (wrapped original in ``__cause__``)."""


def is_transient(exc: BaseException) -> bool:
    """Whether ``exc`` is worth retrying (throttling, 5xx, timeouts, resets, short reads)."""
    if isinstance(exc, PermanentError):
        return False
    if isinstance(exc, ShortReadError):
        return True
    try:
        import botocore.exceptions as bce
        if isinstance(exc, bce.ClientError):
            err = exc.response.get("Error", {}) or {}
            status = (exc.response.get("ResponseMetadata", {}) or {}).get("HTTPStatusCode")
            return err.get("Code") in TRANSIENT_S3_CODES or status in TRANSIENT_HTTP_STATUS
        if isinstance(exc, (bce.ConnectionError, bce.IncompleteReadError,
                            bce.ResponseStreamingError, bce.ReadTimeoutError,
                            bce.ConnectTimeoutError, bce.ConnectionClosedError)):
            return True
        if isinstance(exc, bce.HTTPClientError):     # wraps urllib3 errors raised mid-send
            return True
    except ImportError:  # pragma: no cover - botocore ships with boto3, a hard dependency of s3://
        pass
    try:
        import urllib3.exceptions as ue
        if isinstance(exc, (ue.ProtocolError, ue.TimeoutError, ue.NewConnectionError,
                            ue.IncompleteRead, ue.MaxRetryError, ue.DecodeError,
                            ue.SSLError, ue.ResponseError)):
            return True
    except ImportError:  # pragma: no cover
        pass
    status = getattr(exc, "status", None)
    if isinstance(status, int) and status in TRANSIENT_HTTP_STATUS:
        return True
    if isinstance(exc, (ConnectionError, socket.timeout, TimeoutError)):
        return True
    if isinstance(exc, OSError) and exc.errno in (errno.ECONNRESET, errno.ECONNABORTED,
                                                  errno.EPIPE, errno.ETIMEDOUT,
                                                  errno.ECONNREFUSED, errno.EHOSTUNREACH):
        return True
    return False


@dataclass
class RetryPolicy:
    """``attempts`` tries in total; sleeps ``uniform(0, min(cap, base * 2**k))`` before try k+1.

    >>> RetryPolicy(attempts=3, base=0.0).call(lambda: 42)
    42
    """

    attempts: int = 10
    base: float = 0.1
    cap: float = 10.0
    sleep: Callable[[float], None] = time.sleep

    def __post_init__(self):
        if self.attempts < 1:
            raise ValueError("retry attempts must be >= 1")

    def backoff(self, attempt: int) -> float:
        return random.uniform(0.0, min(self.cap, self.base * (2 ** attempt)))

    def call(self, fn: Callable[[], T], on_retry: Optional[Callable[[BaseException], None]] = None) -> T:
        """Run ``fn()``; retry transient failures; re-raise the last one after the budget."""
        for attempt in range(self.attempts):
            try:
                return fn()
            except Exception as exc:  # noqa: BLE001 - classified right below
                if not is_transient(exc) or attempt + 1 >= self.attempts:
                    raise
                if on_retry is not None:
                    on_retry(exc)
                self.sleep(self.backoff(attempt))
        raise AssertionError("unreachable")  # pragma: no cover

    def __getstate__(self):
        state = dict(self.__dict__)
        state["sleep"] = None if state["sleep"] is time.sleep else state["sleep"]
        return state

    def __setstate__(self, state):
        if state.get("sleep") is None:
            state["sleep"] = time.sleep
        self.__dict__.update(state)
