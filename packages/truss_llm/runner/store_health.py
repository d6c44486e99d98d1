"""Is the async queue's store usable? Judged from every write to it, so readiness can say so.

One failed write (a lock held by another process past the busy timeout, a full disk) is the
caller's to retry: the workers back off and try again, async_predict answers 503. A store
whose writes have *all* failed for `unhealthy_after_s` is unhealthy: readiness and
async_predict answer 503 with Retry-After (no new work is taken that nothing would run)
until a write succeeds again. The workers keep trying with a bounded backoff, so a store
that recovers is noticed within that bound.

Log lines name the operation and SQLite's error, never a request's input or webhook URL.
"""

from __future__ import annotations

import errno
import logging
import sqlite3
import threading
import time
from collections.abc import Callable

from prometheus_client import Counter, Gauge

logger = logging.getLogger(__name__)

# A store failing every write for this long is unhealthy (RunnerSettings overrides it).
UNHEALTHY_AFTER_S = 10.0

STORE_HEALTHY = Gauge("baseten_surface_async_store_healthy",
                      "1 while the async queue's store takes writes; 0 once every write has "
                      "failed for queue_unhealthy_after_s (readiness and async_predict 503).")
STORE_ERRORS = Counter("baseten_surface_async_store_errors_total",
                       "Failed writes to the async queue's store, by operation and error.",
                       ["operation", "error"])
STORE_HEALTHY.set(1)


def is_store_error(exc: BaseException) -> bool:
    """An error of the store itself (SQLite's or the OS's), as opposed to a bug in a query
    (ProgrammingError) or a constraint (IntegrityError)."""
    return (isinstance(exc, OSError | sqlite3.OperationalError | sqlite3.InternalError)
            # A corrupt or foreign file ("file is not a database") is a bare DatabaseError.
            or type(exc) is sqlite3.DatabaseError)


def error_name(exc: BaseException) -> str:
    """A short, bounded label: SQLITE_BUSY, SQLITE_FULL, ENOSPC, ..."""
    name = getattr(exc, "sqlite_errorname", None)
    if name:
        return name
    if isinstance(exc, OSError) and exc.errno in errno.errorcode:
        return errno.errorcode[exc.errno]
    return type(exc).__name__


def is_full(name: str) -> bool:
    return name in ("SQLITE_FULL", "ENOSPC", "EDQUOT", "EFBIG")


class StoreHealth:
    """Healthy until writes have failed, with no success between, for `unhealthy_after_s`.

    Thread-safe: the queue's writes run in worker threads.
    """

    def __init__(self, unhealthy_after_s: float = UNHEALTHY_AFTER_S,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.unhealthy_after_s = unhealthy_after_s
        self._clock = clock
        self._lock = threading.Lock()
        self._failing_since: float | None = None
        self._failures = 0
        self._healthy = True

    @property
    def healthy(self) -> bool:
        return self._healthy

    def succeeded(self) -> None:
        if self._failing_since is None:  # the common case: no lock taken
            return
        with self._lock:
            failures, self._failures, self._failing_since = self._failures, 0, None
            was_healthy, self._healthy = self._healthy, True
        STORE_HEALTHY.set(1)
        if not was_healthy:
            logger.warning("async queue store recovered after %d failed writes", failures)

    def failed(self, operation: str, error: str, detail: str) -> None:
        STORE_ERRORS.labels(operation, error).inc()
        now = self._clock()
        with self._lock:
            if self._failing_since is None:
                self._failing_since = now
            self._failures += 1
            failing_for = now - self._failing_since
            turned = self._healthy and failing_for >= self.unhealthy_after_s
            if turned:
                self._healthy = False
        logger.warning("async queue store: %s failed (%s: %s); failing for %.1f s",
                       operation, error, detail, failing_for)
        if turned:
            STORE_HEALTHY.set(0)
            logger.error("async queue store unhealthy: every write has failed for %.1f s; "
                         "readiness and async_predict answer 503 until a write succeeds",
                         failing_for)
