"""The durable queue behind the local async inference routes: plain, synchronous SQLite.

Why SQLite: the queue must survive `kill -9` of the runner (Baseten's queue outlives a
replica), and one file in WAL mode gives atomic, durable state changes with no server to run.
Every state change is one transaction; a claim is `BEGIN IMMEDIATE` so two claimers can never
take the same request, whether they are threads here or other processes on the same file.

Threads: each thread gets its own connection (the HTTP layer calls in through
`asyncio.to_thread`), so readers never wait for each other; writers in this process take a
lock before `BEGIN IMMEDIATE`, so they queue up in Python instead of spinning in SQLite's busy
handler (which still covers writers in other processes).

Lifecycle of a request (status / webhook_status):

    enqueue                 QUEUED       / PENDING or NO_WEBHOOK_PROVIDED
    claim_next              IN_PROGRESS  (attempts += 1)
    complete                SUCCEEDED
    fail, attempts left     QUEUED again, not before now + backoff
    fail, none left         FAILED       (errors = [the last error])
    expire_overdue          EXPIRED      (only requests never started; errors = [EXPIRED])
    cancel (QUEUED only)    CANCELED     / CANCELED if a webhook was given
    set_webhook_result      webhook SUCCEEDED, or FAILED and status WEBHOOK_FAILED

A store that fails (a lock another process holds past the busy timeout, a full disk) fails
the call with QueueUnavailable, after rolling back its transaction; every write's outcome
feeds `health` (store_health.py), which readiness and async_predict consult.

Times are Unix seconds (`time.time()`, which survives a restart where a monotonic clock does
not); every method that depends on the time takes an optional `now` so tests need no sleeps.
"""

from __future__ import annotations

import json
import random
import sqlite3
import threading
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Literal

from .models import (
    MAX_MODEL_INPUT_BYTES,
    AsyncError,
    AsyncErrorCode,
    AsyncPredictRequest,
    AsyncRequestRecord,
    AsyncStatus,
    QueueStatus,
    WebhookStatus,
)
from .store_health import StoreHealth, error_name, is_full, is_store_error

__all__ = [
    "MAX_ACTIVE_REQUESTS",
    "MAX_MODEL_INPUT_BYTES",
    "MAX_STORED_OUTPUT_BYTES",
    "AsyncQueue",
    "InvalidTransitionError",
    "Job",
    "PayloadTooLargeError",
    "QueueFullError",
    "QueueUnavailable",
]

MiB = 1024 * 1024

# Which priority runs first. Baseten: "A lower value corresponds to a higher priority
# (requests with priority 0 are scheduled before requests of priority 1)". "DESC" would run
# 2 before 0; the claim index is named after the direction, so flipping builds a new one.
PRIORITY_ORDER: Literal["ASC", "DESC"] = "ASC"

# Baseten limits an organization to 50,000 QUEUED or IN_PROGRESS requests (429 beyond).
MAX_ACTIVE_REQUESTS = 50_000
# A result is kept only until its webhook is settled (Baseten stores no outputs); a larger
# one is handed to the webhook from memory but not persisted (see `complete`).
MAX_STORED_OUTPUT_BYTES = 16 * MiB
# Backoff delays are scaled by a random factor in [1 - BACKOFF_JITTER, 1], so retries of
# requests that failed together spread out and never exceed max_delay_ms.
BACKOFF_JITTER = 0.25
# A request whose runner died this many times while running it is failed instead of being
# requeued again: a request that crashes the process must not crash it forever.
MAX_CRASH_RECOVERIES = 3
# How long a write waits for the database's lock (held by another process, or by another
# writer here) before it fails as a store error: a client's async_predict waits this long.
BUSY_TIMEOUT_S = 5.0
# What a 503 from an unavailable store tells the client to wait (about a worker's backoff).
STORE_RETRY_AFTER_S = 5
# Settled requests deleted per transaction, so a purge never holds the write lock for long.
PURGE_BATCH = 500
# FULL: an fsync of the WAL per commit, so a request_id handed to a client survives an OS
# crash or power loss too. NORMAL in WAL mode would already survive kill -9 (a commit is in
# the WAL file, in the page cache, before COMMIT returns; only the OS going down can drop the
# last commits, and never corrupts the file). benchmarks/queue_bench.py measures the price on
# a 2-core VM: ~2x fewer enqueues per second, still thousands per second, far above Baseten's
# 200 requests/s async_predict limit. Pass synchronous="NORMAL" where fsync is slow.
DEFAULT_SYNCHRONOUS: Literal["NORMAL", "FULL"] = "FULL"
SCHEMA_VERSION = 1

FINISHED = (AsyncStatus.SUCCEEDED, AsyncStatus.FAILED, AsyncStatus.EXPIRED)
# Statuses replaced by WEBHOOK_FAILED when the result could not be delivered (the errors of
# a FAILED or EXPIRED request stay in `errors`).
WEBHOOK_FAILURE_REPLACES = FINISHED

_Q = AsyncStatus.QUEUED.value
_FINISHED_SQL = ", ".join(f"'{s.value}'" for s in FINISHED)
_TABLE = "async_requests"
_CLAIM_INDEX = f"queued_by_priority_{PRIORITY_ORDER.lower()}"
# Settled: nothing left to do for the request (run, webhook), so it may be purged.
_SETTLED = f"status NOT IN ('{_Q}', 'IN_PROGRESS') AND webhook_status != 'PENDING'"
_SETTLED_INDEX = "settled_by_status_at"

_SCHEMA = [
    f"""CREATE TABLE IF NOT EXISTS {_TABLE} (
        seq INTEGER PRIMARY KEY,          -- enqueue order: FIFO within a priority
        request_id TEXT NOT NULL UNIQUE,
        environment TEXT NOT NULL,
        model_input TEXT NOT NULL,        -- JSON
        priority INTEGER NOT NULL,
        webhook_endpoint TEXT,
        status TEXT NOT NULL,
        webhook_status TEXT NOT NULL,
        created_at REAL NOT NULL,
        status_at REAL NOT NULL,
        expires_at REAL NOT NULL,         -- applies while the request was never started
        not_before REAL NOT NULL,         -- retry backoff
        started_at REAL,
        attempts INTEGER NOT NULL DEFAULT 0,
        max_attempts INTEGER NOT NULL,
        initial_delay_ms INTEGER NOT NULL,
        max_delay_ms INTEGER NOT NULL,
        crash_count INTEGER NOT NULL DEFAULT 0,
        errors TEXT NOT NULL DEFAULT '[]', -- JSON: a list of code/message objects
        output TEXT                       -- JSON, only while a webhook is pending
    )""",
    # The next runnable request is the first entry of this index whose not_before has
    # passed: O(log n), plus one step per request waiting out a retry backoff ahead of it.
    f"""CREATE INDEX IF NOT EXISTS {_CLAIM_INDEX}
        ON {_TABLE}(priority {PRIORITY_ORDER}, seq) WHERE status = '{_Q}'""",
    f"""CREATE INDEX IF NOT EXISTS queued_by_expiry
        ON {_TABLE}(expires_at) WHERE status = '{_Q}' AND attempts = 0""",
    f"""CREATE INDEX IF NOT EXISTS queued_by_not_before
        ON {_TABLE}(not_before) WHERE status = '{_Q}'""",
    f"""CREATE INDEX IF NOT EXISTS in_progress
        ON {_TABLE}(seq) WHERE status = '{AsyncStatus.IN_PROGRESS.value}'""",
    f"""CREATE INDEX IF NOT EXISTS webhook_pending
        ON {_TABLE}(seq) WHERE webhook_status = 'PENDING' AND status IN ({_FINISHED_SQL})""",
    # The purge's order: oldest settled first, without a scan of the whole table.
    f"CREATE INDEX IF NOT EXISTS {_SETTLED_INDEX} ON {_TABLE}(status_at) WHERE {_SETTLED}",
    # Counts per status kept by triggers, so the queue status and the active-request limit
    # cost O(1) instead of a count over every queued row.
    "CREATE TABLE IF NOT EXISTS status_counts (status TEXT PRIMARY KEY, n INTEGER NOT NULL)",
    f"""CREATE TRIGGER IF NOT EXISTS count_insert AFTER INSERT ON {_TABLE} BEGIN
        UPDATE status_counts SET n = n + 1 WHERE status = NEW.status; END""",
    f"""CREATE TRIGGER IF NOT EXISTS count_update AFTER UPDATE OF status ON {_TABLE}
        WHEN OLD.status IS NOT NEW.status BEGIN
        UPDATE status_counts SET n = n - 1 WHERE status = OLD.status;
        UPDATE status_counts SET n = n + 1 WHERE status = NEW.status; END""",
    f"""CREATE TRIGGER IF NOT EXISTS count_delete AFTER DELETE ON {_TABLE} BEGIN
        UPDATE status_counts SET n = n - 1 WHERE status = OLD.status; END""",
]

_COLUMNS = (
    "request_id, environment, model_input, priority, webhook_endpoint, status, webhook_status,"
    " created_at, status_at, expires_at, not_before, started_at, attempts, max_attempts,"
    " initial_delay_ms, max_delay_ms, crash_count, errors, output"
)


class QueueFullError(Exception):
    """Too many QUEUED or IN_PROGRESS requests; the HTTP layer answers 429."""


class PayloadTooLargeError(ValueError):
    """model_input serializes to more than MAX_MODEL_INPUT_BYTES; the HTTP layer answers 413."""


class QueueUnavailable(Exception):
    """The store failed (locked past the busy timeout, disk full, I/O error) or has been
    failing for long (`health`): the HTTP layer answers 503 with `headers`."""

    def __init__(self, message: str, retry_after_s: int = STORE_RETRY_AFTER_S) -> None:
        super().__init__(message)
        self.retry_after_s = retry_after_s

    @property
    def headers(self) -> dict[str, str]:
        return {"Retry-After": str(self.retry_after_s)}


class InvalidTransitionError(Exception):
    """The request is unknown or not in a state that allows this change (a caller's bug)."""


@dataclass(frozen=True)
class Job:
    """A request as the worker sees it: what to run, and what the webhook needs."""

    request_id: str
    environment: str
    model_input_json: str
    priority: int
    webhook_endpoint: str | None
    status: AsyncStatus
    webhook_status: WebhookStatus
    created_at: float
    status_at: float
    expires_at: float
    not_before: float
    started_at: float | None
    attempts: int  # runs started so far, this one included
    max_attempts: int
    initial_delay_ms: int
    max_delay_ms: int
    crash_count: int  # runs interrupted by the death of the runner
    errors: tuple[AsyncError, ...]
    output_json: str | None  # set for SUCCEEDED requests whose webhook is pending

    @property
    def model_input(self) -> Any:
        return json.loads(self.model_input_json)

    @classmethod
    def _from_row(cls, row: sqlite3.Row) -> Job:
        return cls(
            request_id=row["request_id"], environment=row["environment"],
            model_input_json=row["model_input"], priority=row["priority"],
            webhook_endpoint=row["webhook_endpoint"], status=AsyncStatus(row["status"]),
            webhook_status=WebhookStatus(row["webhook_status"]),
            created_at=row["created_at"], status_at=row["status_at"],
            expires_at=row["expires_at"], not_before=row["not_before"],
            started_at=row["started_at"], attempts=row["attempts"],
            max_attempts=row["max_attempts"], initial_delay_ms=row["initial_delay_ms"],
            max_delay_ms=row["max_delay_ms"], crash_count=row["crash_count"],
            errors=tuple(AsyncError(**e) for e in json.loads(row["errors"])),
            output_json=row["output"],
        )


def iso_utc(ts: float) -> str:
    """`2025-01-31T12:00:00.123456Z`: ISO-8601 in UTC, as Baseten's status route answers."""
    return datetime.fromtimestamp(ts, UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def backoff_delay_s(attempt: int, initial_delay_ms: int, max_delay_ms: int,
                    rng: random.Random | None = None) -> float:
    """Delay before retrying after failed attempt number `attempt` (1-based).

    initial_delay_ms * 2**(attempt-1), capped at max_delay_ms, then scaled down by up to
    BACKOFF_JITTER at random.
    """
    exponent = min(max(attempt - 1, 0), 32)  # 2**32 ms is past any cap; avoid huge ints
    delay_ms = min(max_delay_ms, initial_delay_ms * 2**exponent)
    jitter = 1.0 - BACKOFF_JITTER * (rng or random).random()
    return delay_ms * jitter / 1000.0


def _errors_json(code: str, message: str) -> str:
    return json.dumps([{"code": str(code), "message": message}])


class AsyncQueue:
    """Async requests of one model deployment, persisted in one SQLite file."""

    def __init__(self, path: Path, model_id: str, deployment_id: str, *,
                 max_active_requests: int | None = MAX_ACTIVE_REQUESTS,
                 synchronous: Literal["NORMAL", "FULL"] = DEFAULT_SYNCHRONOUS,
                 rng: random.Random | None = None, busy_timeout_s: float = BUSY_TIMEOUT_S,
                 max_bytes: int | None = None, health: StoreHealth | None = None) -> None:
        """`max_bytes` caps the database file (SQLite's max_page_count): past it a write
        fails as a full disk would, with QueueUnavailable, instead of filling the disk."""
        if synchronous not in ("NORMAL", "FULL"):
            raise ValueError(f"synchronous must be NORMAL or FULL, not {synchronous!r}")
        self.path = Path(path)
        self.model_id = model_id
        self.deployment_id = deployment_id
        self.max_active_requests = max_active_requests
        self._synchronous = synchronous
        self._rng = rng or random.Random()
        self._busy_timeout_s = busy_timeout_s
        self._max_bytes = max_bytes
        self.health = health or StoreHealth()
        self._local = threading.local()
        self._connections: list[sqlite3.Connection] = []
        self._connections_lock = threading.Lock()
        self._write_lock = threading.Lock()
        self._closed = False
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._create_schema()

    # -- connections and transactions -------------------------------------------------

    def _conn(self) -> sqlite3.Connection:
        conn = getattr(self._local, "conn", None)
        if conn is None:
            if self._closed:
                raise RuntimeError("the queue is closed")
            # Autocommit mode: transactions are the explicit BEGIN IMMEDIATE of `_write`.
            conn = sqlite3.connect(self.path, timeout=self._busy_timeout_s,
                                   isolation_level=None, check_same_thread=False)
            conn.row_factory = sqlite3.Row
            conn.execute(f"PRAGMA synchronous={self._synchronous}")
            if self._max_bytes is not None:  # a per-connection setting, not the file's
                page_size = conn.execute("PRAGMA page_size").fetchone()[0]
                conn.execute(f"PRAGMA max_page_count = {max(1, self._max_bytes // page_size)}")
            self._local.conn = conn
            with self._connections_lock:
                self._connections.append(conn)
        return conn

    @contextmanager
    def _write(self, operation: str = "write") -> Iterator[sqlite3.Connection]:
        """One write transaction, holding the database's write lock from its first statement.

        BEGIN IMMEDIATE (rather than a deferred BEGIN that upgrades on the first write) means
        a claim's SELECT and UPDATE see the same queue and no other writer slips in between.
        Whatever fails, COMMIT included, is rolled back, so a connection never keeps the write
        lock; a store error counts against `health` and is raised as QueueUnavailable.
        """
        # Bounded like SQLite's own wait: behind a stuck writer, fail rather than pile up.
        if not self._write_lock.acquire(timeout=self._busy_timeout_s):
            self.health.failed(operation, "WRITE_LOCK_WAIT", "another write here is stuck")
            raise QueueUnavailable(f"The async queue is unavailable: its store stayed busy "
                                   f"for {self._busy_timeout_s:g} s. Retry shortly.")
        try:
            conn = self._conn()
            conn.execute("BEGIN IMMEDIATE")
            try:
                yield conn
                conn.execute("COMMIT")
            except BaseException:
                _rollback(conn)
                raise
        except Exception as exc:
            if not is_store_error(exc):
                raise
            raise self._store_failed(operation, exc) from exc
        else:
            self.health.succeeded()
        finally:
            self._write_lock.release()

    @contextmanager
    def _read(self) -> Iterator[sqlite3.Connection]:
        """A read: a store error is raised as QueueUnavailable (it does not judge health,
        since reads in WAL mode go on while every write fails)."""
        try:
            yield self._conn()
        except Exception as exc:
            if not is_store_error(exc):
                raise
            raise QueueUnavailable(f"The async queue is unavailable: reading its store "
                                   f"failed ({_detail(exc)}).") from exc

    def _store_failed(self, operation: str, exc: BaseException) -> QueueUnavailable:
        name, detail = error_name(exc), _detail(exc)
        self.health.failed(operation, name, detail)
        state = "is full" if is_full(name) else "failed"
        return QueueUnavailable(f"The async queue is unavailable: its store {state} "
                                f"({detail}). Retry shortly.")

    def check_available(self) -> None:
        """Raise QueueUnavailable while `health` says the store is unhealthy."""
        if not self.health.healthy:
            raise QueueUnavailable(
                "The async queue is unavailable: its store has been failing for "
                f"{self.health.unhealthy_after_s:g} s or more. Retry later.")

    def _create_schema(self) -> None:
        conn = self._conn()
        mode = conn.execute("PRAGMA journal_mode=WAL").fetchone()[0]
        if mode.lower() != "wal":
            raise RuntimeError(f"{self.path}: SQLite refused WAL mode (got {mode!r})")
        with self._write("schema") as conn:
            version = conn.execute("PRAGMA user_version").fetchone()[0]
            if version > SCHEMA_VERSION:
                raise RuntimeError(f"{self.path}: schema version {version} is newer than "
                                   f"this code ({SCHEMA_VERSION})")
            for statement in _SCHEMA:
                conn.execute(statement)
            # One row per status; counted from the table so an existing file stays right.
            conn.executemany(
                f"INSERT OR IGNORE INTO status_counts(status, n) "
                f"SELECT ?, COUNT(*) FROM {_TABLE} WHERE status = ?",
                [(s.value, s.value) for s in AsyncStatus])
            conn.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")

    def close(self) -> None:
        """Close every connection (the last one to close folds the WAL into the file)."""
        self._closed = True
        with self._connections_lock:
            connections, self._connections = self._connections, []
        for conn in connections:
            conn.close()
        self._local = threading.local()

    def __enter__(self) -> AsyncQueue:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- producer side ----------------------------------------------------------------

    def enqueue(self, request: AsyncPredictRequest, environment: str,
                now: float | None = None) -> str:
        """Store a validated request as QUEUED and return its request_id (uuid4 hex).

        Raises PayloadTooLargeError (model_input over MAX_MODEL_INPUT_BYTES as JSON),
        QueueFullError (max_active_requests QUEUED or IN_PROGRESS already) or ValueError
        (NaN or infinity in model_input, which JSON cannot carry).
        """
        now = time.time() if now is None else now
        model_input = json.dumps(request.model_input, separators=(",", ":"),
                                 ensure_ascii=False, allow_nan=False)
        # A str of n characters is at most 4n bytes in UTF-8: encode only when it may be over.
        if (len(model_input) * 4 > MAX_MODEL_INPUT_BYTES
                and len(model_input.encode()) > MAX_MODEL_INPUT_BYTES):
            raise PayloadTooLargeError(
                f"model_input is larger than {MAX_MODEL_INPUT_BYTES // 1024} KiB")
        retry = request.inference_retry_config
        webhook_status = (WebhookStatus.PENDING if request.webhook_endpoint
                          else WebhookStatus.NO_WEBHOOK_PROVIDED)
        request_id = uuid.uuid4().hex
        self.check_available()  # fail fast: no wait for a store known to be failing
        with self._write("enqueue") as conn:
            if self.max_active_requests is not None:
                active = self._active_count(conn)
                if active >= self.max_active_requests:
                    raise QueueFullError(
                        f"{active} async requests are already queued or in progress "
                        f"(limit {self.max_active_requests})")
            conn.execute(
                f"INSERT INTO {_TABLE} (request_id, environment, model_input, priority,"
                " webhook_endpoint, status, webhook_status, created_at, status_at, expires_at,"
                " not_before, max_attempts, initial_delay_ms, max_delay_ms)"
                " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (request_id, environment, model_input, request.priority,
                 request.webhook_endpoint, _Q, webhook_status.value, now, now,
                 now + request.max_time_in_queue_seconds, now, retry.max_attempts,
                 retry.initial_delay_ms, retry.max_delay_ms))
        return request_id

    def cancel(self, request_id: str, now: float | None = None) -> bool:
        """QUEUED -> CANCELED (webhook CANCELED too, if one was given). False otherwise:
        unknown, already running, or finished."""
        now = time.time() if now is None else now
        with self._write("cancel") as conn:
            cursor = conn.execute(
                f"UPDATE {_TABLE} SET status = 'CANCELED', status_at = ?, webhook_status ="
                " CASE webhook_status WHEN 'PENDING' THEN 'CANCELED' ELSE webhook_status END"
                f" WHERE request_id = ? AND status = '{_Q}'", (now, request_id))
            return cursor.rowcount == 1

    # -- worker side ------------------------------------------------------------------

    def expire_overdue(self, now: float | None = None) -> list[Job]:
        """Mark EXPIRED every never-started request past max_time_in_queue_seconds.

        Returns them so the caller can send their webhooks (webhook_status stays PENDING
        until `set_webhook_result`). Retries are not expired: the request did start in time.
        """
        now = time.time() if now is None else now
        with self._write("expire") as conn:
            return self._expire(conn, now)

    def _expire(self, conn: sqlite3.Connection, now: float) -> list[Job]:
        rows = conn.execute(
            f"UPDATE {_TABLE} SET status = 'EXPIRED', status_at = :now, errors = json_array("
            f"json_object('code', '{AsyncErrorCode.EXPIRED.value}', 'message',"
            " 'The request was not started within max_time_in_queue_seconds ('"
            " || CAST(round(expires_at - created_at) AS INTEGER) || ' s).'))"
            f" WHERE status = '{_Q}' AND attempts = 0 AND expires_at <= :now"
            f" RETURNING {_COLUMNS}", {"now": now}).fetchall()
        return [Job._from_row(row) for row in rows]

    def claim_next(self, now: float | None = None) -> Job | None:
        """Atomically take the next runnable request and mark it IN_PROGRESS.

        Next = lowest priority number (see PRIORITY_ORDER), then first enqueued, among
        QUEUED requests whose retry backoff (not_before) has passed. Overdue requests are
        skipped, never run, and left QUEUED for `expire_overdue`, the one place that expires
        and hands them back for their webhooks (expiring them here would lose the webhook
        until a restart).
        """
        now = time.time() if now is None else now
        with self._write("claim") as conn:
            row = conn.execute(
                f"UPDATE {_TABLE} SET status = 'IN_PROGRESS', attempts = attempts + 1,"
                " started_at = :now, status_at = :now"
                # INDEXED BY: with few rows the planner would rather sort the range of the
                # not_before index, which is O(n log n) per claim once the queue is long.
                f" WHERE seq = (SELECT seq FROM {_TABLE} INDEXED BY {_CLAIM_INDEX}"
                f"  WHERE status = '{_Q}' AND not_before <= :now"
                "   AND (attempts > 0 OR expires_at > :now)"
                f"  ORDER BY priority {PRIORITY_ORDER}, seq LIMIT 1)"
                f" RETURNING {_COLUMNS}", {"now": now}).fetchone()
            return None if row is None else Job._from_row(row)

    def complete(self, request_id: str, output_json: str | None,
                 now: float | None = None) -> Job:
        """IN_PROGRESS -> SUCCEEDED. Returns the finished job.

        The output is stored only while a webhook is pending (so a restarted runner can still
        deliver it) and only up to MAX_STORED_OUTPUT_BYTES; a larger one is not persisted and
        `pending_webhooks` would then list the job with output_json None.
        """
        now = time.time() if now is None else now
        keep = output_json is not None and len(output_json.encode()) <= MAX_STORED_OUTPUT_BYTES
        with self._write("complete") as conn:
            row = conn.execute(
                f"UPDATE {_TABLE} SET status = 'SUCCEEDED', status_at = ?,"
                " output = CASE webhook_status WHEN 'PENDING' THEN ? END"
                f" WHERE request_id = ? AND status = 'IN_PROGRESS' RETURNING {_COLUMNS}",
                (now, output_json if keep else None, request_id)).fetchone()
            if row is None:
                raise self._transition_error(conn, request_id, "complete")
            return Job._from_row(row)

    def fail(self, request_id: str, code: str, message: str, now: float | None = None, *,
             retryable: bool = True) -> Literal["retry", "failed"]:
        """An attempt failed: requeue it after a backoff if attempts remain, else FAILED.

        "retry": QUEUED again, runnable from now + backoff_delay_s(attempts, ...).
        "failed": FAILED with errors = [{code, message}] (webhook still PENDING if given).
        `retryable=False` fails at once (for errors a retry cannot fix, like bad input).
        """
        now = time.time() if now is None else now
        with self._write("fail") as conn:
            row = conn.execute(
                f"SELECT attempts, max_attempts, initial_delay_ms, max_delay_ms FROM {_TABLE}"
                " WHERE request_id = ? AND status = 'IN_PROGRESS'", (request_id,)).fetchone()
            if row is None:
                raise self._transition_error(conn, request_id, "fail")
            if retryable and row["attempts"] < row["max_attempts"]:
                delay = backoff_delay_s(row["attempts"], row["initial_delay_ms"],
                                        row["max_delay_ms"], self._rng)
                conn.execute(
                    f"UPDATE {_TABLE} SET status = '{_Q}', status_at = ?, not_before = ?"
                    " WHERE request_id = ?", (now, now + delay, request_id))
                return "retry"
            conn.execute(
                f"UPDATE {_TABLE} SET status = 'FAILED', status_at = ?, errors = ?"
                " WHERE request_id = ?", (now, _errors_json(code, message), request_id))
            return "failed"

    def set_webhook_result(self, request_id: str, ok: bool, now: float | None = None) -> None:
        """Record the delivery of a finished request's webhook; drops the stored output.

        ok: webhook_status SUCCEEDED. Not ok: webhook_status FAILED and status WEBHOOK_FAILED
        (Baseten's final status for a result that could not be delivered; the errors of a
        FAILED or EXPIRED request are kept). Only for finished requests with a PENDING webhook.
        """
        now = time.time() if now is None else now
        replaced = ", ".join(f"'{s.value}'" for s in WEBHOOK_FAILURE_REPLACES)
        if ok:
            assignments = "webhook_status = 'SUCCEEDED'"
        else:
            assignments = ("webhook_status = 'FAILED', status = CASE WHEN status IN"
                           f" ({replaced}) THEN 'WEBHOOK_FAILED' ELSE status END")
        with self._write("webhook_result") as conn:
            cursor = conn.execute(
                f"UPDATE {_TABLE} SET {assignments}, output = NULL, status_at = ?"
                f" WHERE request_id = ? AND webhook_status = 'PENDING'"
                f" AND status IN ({_FINISHED_SQL})", (now, request_id))
            if cursor.rowcount != 1:
                raise self._transition_error(conn, request_id, "set_webhook_result")

    def recover_after_crash(self, now: float | None = None) -> int:
        """At start-up: requeue every IN_PROGRESS request (its runner died). Returns how many.

        Call it before any worker of this file runs. At-least-once: the interrupted run
        counts as an attempt made, yet the request always gets at least one more run even if
        that exceeds max_attempts (a crash is not the request's failure); a later `fail` then
        finds no attempts left and fails it. A request interrupted MAX_CRASH_RECOVERIES times
        is FAILED (INTERNAL_SERVER_ERROR) instead, so one that kills the runner cannot do so
        forever. A requeued request keeps its place: first in its priority.
        """
        now = time.time() if now is None else now
        message = (f"The runner stopped while running this request {MAX_CRASH_RECOVERIES + 1}"
                   " times; it is not retried again.")
        with self._write("recover") as conn:
            conn.execute(
                f"UPDATE {_TABLE} SET status = 'FAILED', status_at = ?, errors = ?,"
                " crash_count = crash_count + 1"
                " WHERE status = 'IN_PROGRESS' AND crash_count >= ?",
                (now, _errors_json(AsyncErrorCode.INTERNAL_SERVER_ERROR, message),
                 MAX_CRASH_RECOVERIES))
            cursor = conn.execute(
                f"UPDATE {_TABLE} SET status = '{_Q}', status_at = ?, not_before = ?,"
                " crash_count = crash_count + 1 WHERE status = 'IN_PROGRESS'", (now, now))
            return cursor.rowcount

    def requeue_interrupted(self, claimed_since: float, now: float | None = None) -> int:
        """On an orderly stop (SIGTERM drain, Ctrl-C), once no worker runs any more: put the
        requests this runner claimed (at or after `claimed_since`, its start) and was still
        running back in the queue as if they had not been started, so that the stop costs
        them neither an attempt nor a crash (`recover_after_crash`, for a runner that died,
        counts both; a request a dead runner left behind is left to it). They keep their
        place, first in their priority; one back at no attempts gets a fresh
        max_time_in_queue from now, since it started in time. Returns how many.
        """
        now = time.time() if now is None else now
        with self._write("requeue") as conn:
            cursor = conn.execute(
                f"UPDATE {_TABLE} SET status = '{_Q}', status_at = :now, not_before = :now,"
                " attempts = MAX(attempts - 1, 0),"
                " expires_at = MAX(expires_at, :now + expires_at - created_at)"
                " WHERE status = 'IN_PROGRESS' AND started_at >= :since",
                {"now": now, "since": claimed_since})
            return cursor.rowcount

    def pending_webhooks(self) -> list[Job]:
        """Finished requests (SUCCEEDED, FAILED, EXPIRED) whose webhook is still PENDING,
        oldest first: what a restarted runner must still deliver."""
        with self._read() as conn:
            rows = conn.execute(
                f"SELECT {_COLUMNS} FROM {_TABLE} WHERE webhook_status = 'PENDING'"
                f" AND status IN ({_FINISHED_SQL}) ORDER BY seq").fetchall()
        return [Job._from_row(row) for row in rows]

    def next_wakeup(self, now: float | None = None) -> float | None:
        """Seconds until a queued request becomes runnable (0.0 if one already is), or None
        when none will: how long an idle worker may sleep. Overdue requests are not
        runnable (they wait for `expire_overdue`), so they cannot keep a worker spinning."""
        now = time.time() if now is None else now
        with self._read() as conn:
            (first,) = conn.execute(
                f"SELECT MIN(not_before) FROM {_TABLE} WHERE status = '{_Q}'"
                " AND (attempts > 0 OR expires_at > ?)", (now,)).fetchone()
        return None if first is None else max(0.0, first - now)

    # -- reading ----------------------------------------------------------------------

    def get_job(self, request_id: str) -> Job | None:
        with self._read() as conn:
            row = conn.execute(f"SELECT {_COLUMNS} FROM {_TABLE} WHERE request_id = ?",
                               (request_id,)).fetchone()
        return None if row is None else Job._from_row(row)

    def get(self, request_id: str) -> AsyncRequestRecord | None:
        """The body of `GET /async_request/{request_id}`, or None if unknown."""
        job = self.get_job(request_id)
        if job is None:
            return None
        return AsyncRequestRecord(
            request_id=job.request_id, model_id=self.model_id,
            deployment_id=self.deployment_id, status=job.status,
            webhook_status=job.webhook_status, created_at=iso_utc(job.created_at),
            status_at=iso_utc(job.status_at), errors=list(job.errors))

    def counts(self) -> dict[AsyncStatus, int]:
        """Requests per status (kept by triggers: O(1))."""
        with self._read() as conn:
            rows = conn.execute("SELECT status, n FROM status_counts").fetchall()
        return {AsyncStatus(status): n for status, n in rows}

    def queue_status(self) -> QueueStatus:
        counts = self.counts()
        return QueueStatus(model_id=self.model_id, deployment_id=self.deployment_id,
                           num_queued_requests=counts.get(AsyncStatus.QUEUED, 0),
                           num_in_progress_requests=counts.get(AsyncStatus.IN_PROGRESS, 0))

    def purge_finished(self, older_than: float, limit: int = PURGE_BATCH) -> int:
        """Delete up to `limit` settled requests (finished, webhook not pending) last changed
        before `older_than`, oldest first, so the file does not grow forever. Returns how
        many; call again while it returns `limit` (each call is one short transaction)."""
        with self._write("purge") as conn:
            cursor = conn.execute(
                f"DELETE FROM {_TABLE} WHERE seq IN (SELECT seq FROM {_TABLE}"
                f" INDEXED BY {_SETTLED_INDEX} WHERE {_SETTLED} AND status_at < ?"
                " ORDER BY status_at LIMIT ?)", (older_than, limit))
            return cursor.rowcount

    # -- helpers ----------------------------------------------------------------------

    @staticmethod
    def _active_count(conn: sqlite3.Connection) -> int:
        return conn.execute(
            f"SELECT COALESCE(SUM(n), 0) FROM status_counts"
            f" WHERE status IN ('{_Q}', 'IN_PROGRESS')").fetchone()[0]

    @staticmethod
    def _transition_error(conn: sqlite3.Connection, request_id: str,
                          action: str) -> InvalidTransitionError:
        row = conn.execute(f"SELECT status, webhook_status FROM {_TABLE} WHERE request_id = ?",
                           (request_id,)).fetchone()
        if row is None:
            return InvalidTransitionError(f"{action}: unknown request {request_id}")
        return InvalidTransitionError(
            f"{action}: request {request_id} is {row['status']} (webhook "
            f"{row['webhook_status']})")


def _rollback(conn: sqlite3.Connection) -> None:
    """End a failed transaction. SQLite has already rolled back after some errors (an I/O
    error at COMMIT, say), when ROLLBACK would raise and mask the error that matters."""
    if conn.in_transaction:
        with suppress(sqlite3.Error):
            conn.execute("ROLLBACK")


def _detail(exc: BaseException) -> str:
    """SQLite's message, or the OS's without the file name: what a log or a client sees."""
    if isinstance(exc, OSError) and exc.strerror:
        return exc.strerror
    return str(exc)
