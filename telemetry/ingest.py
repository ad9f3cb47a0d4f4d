"""The per-process ingest flusher: exactly-once, batched storage of telemetry frames.

The agent connection (WebSocket consumer) hands every validated `telemetry` frame to
`get_flusher().submit(...)` and acks the frame when the call returns. The flusher batches the
frames of every connection in this process and writes each batch in ONE transaction:

1. lock the batch's devices' `fleet_uplinkcursor` rows (in device-id order, so two processes
   never deadlock), then for each device's contiguous run of frames s..e:
   `UPDATE fleet_uplinkcursor SET last_acked_seq = e WHERE device_id = d AND last_acked_seq = s - 1`
   — one statement for all devices;
2. binary COPY of the points of the devices whose cursor advanced (and of nothing else);
3. commit. Then each frame's future resolves: "stored" when its device advanced; otherwise,
   by the cursor read in the same transaction, "duplicate" (seq <= cursor: another connection
   or process stored it) or "conflict" (the consumer closes, the agent re-handshakes).

The conditional UPDATE's row lock is what makes storage exactly-once across processes. If
anything fails before the commit, nothing was stored, every frame of the batch raises
`FlushFailed` and the agent resends it (it was not acked).

The flusher owns dedicated psycopg AsyncConnections (TELEMETRY_FLUSH_CONNECTIONS, not the ORM),
built from `django.db.connection.settings_dict` when they first connect, and reconnects after
failures. Batching, the queue bound and the frames' futures live on the serving event loop, and
a frame whose metric names all have ids is packed into its COPY rows there as it is queued (a
queued frame holds no Python object per point); the transactions (packing the other frames,
BEGIN + locks + cursor UPDATE in one pipelined round trip, one COPY write, COMMIT) run on a
private event loop in a thread, so that their round trips do not wait
behind every agent connection's frame handling when the serving loop is busy. While the
database is unreachable, `submit()` fails fast with FlushFailed for a short back-off instead of
queueing work that cannot be written. The queue is bounded in rows: past the bound,
`submit()` raises `Overloaded` at once and enqueues nothing.

Metric names map to 2-byte ids through `telemetry_metric` (cached in process); a device may
report at most TELEMETRY_MAX_METRICS_PER_DEVICE distinct metrics: points of new metrics past
the cap are rejected (`metric_cardinality_exceeded`), the rest of the frame is stored.

Latest values: after each commit the flusher keeps, in memory, the newest stored point of every
(device, metric) it wrote; at most every TELEMETRY_LATEST_FLUSH_MS it writes the changed series
to `telemetry_devicemetric.last_time/last_value` in ONE statement on its own connection, outside
any ingest transaction, and only ever forwards (`_write_latest`). Derived data: a crash loses at
most that interval, and the series' next point repairs it.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import datetime as dt
import logging
import struct
import threading
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from operator import itemgetter
from typing import Any, Literal

import numpy as np
import psycopg
from psycopg import errors as pg_errors

from telemetry import conf

log = logging.getLogger(__name__)

DAY_MS = 86_400_000
HOUR_MS = 3_600_000
_PG_EPOCH_MS = 946_684_800_000  # 2000-01-01T00:00:00Z, the origin of binary timestamptz
# One binary COPY tuple: field count, then (length, value) for time (µs since 2000), device_id
# (int4), metric_id (int2), value (float8). Packing it ourselves is ~3× cheaper than building a
# datetime per point for write_row(), and is byte-for-byte what write_row() would send.
_ROW = struct.Struct(">hiqiiihid")
_COPY_HEADER = b"PGCOPY\n\xff\r\n\x00" + struct.pack(">ii", 0, 0)
_COPY_TRAILER = struct.pack(">h", -1)
_COPY_SQL = "COPY telemetry_point (time, device_id, metric_id, value) FROM STDIN (FORMAT BINARY)"
# The same tuple as a numpy record: a whole frame is packed with a handful of C-speed array
# operations instead of one struct.pack (and a few comparisons) per point.
_ROW_DTYPE = np.dtype([("n", ">i2"), ("lt", ">i4"), ("t", ">i8"), ("ld", ">i4"), ("d", ">i4"),
                       ("lm", ">i4"), ("m", ">i2"), ("lv", ">i4"), ("v", ">f8")])
assert _ROW_DTYPE.itemsize == _ROW.size
# Times whose (t - 2000-01-01) in µs fits the int8 of binary timestamptz; others are rejected.
_T_MIN = _PG_EPOCH_MS - (2**63 // 1000)
_T_MAX = _PG_EPOCH_MS + (2**63 - 1) // 1000
_INT4_MIN, _INT4_MAX = -(2**31), 2**31 - 1
_T, _NAME, _VALUE = itemgetter(0), itemgetter(1), itemgetter(2)

REASON_CARDINALITY = "metric_cardinality_exceeded"
REASON_CATALOG_FULL = "metric_catalog_full"
REASON_INVALID = "invalid_point"

# Keys of DATABASES[...]["OPTIONS"] that are Django's, not libpq's.
_DJANGO_ONLY_OPTIONS = {"isolation_level", "server_side_binding", "pool", "assume_role", "cursor_factory"}


class FlushFailed(Exception):
    """The frame was not stored (database down, timeout, crash before commit): do not ack it."""


class Overloaded(Exception):
    """The flusher's queue is full; nothing was enqueued. Back off `retry_after_ms`."""

    def __init__(self, retry_after_ms: int) -> None:
        super().__init__(f"ingest queue full; retry after {retry_after_ms} ms")
        self.retry_after_ms = retry_after_ms


@dataclass(frozen=True)
class IngestResult:
    status: Literal["stored", "duplicate", "conflict"]
    rejected: list[tuple[int, str]]  # (position in the submitted `points` list, reason)


@dataclass(eq=False)
class _Frame:
    device_id: int
    seq: int
    # The submitted points; None once the frame is packed at admission (`_pack_on_admission`).
    points: list[tuple[int, str, float]] | None
    future: asyncio.Future
    size: int = field(init=False)  # points submitted: what the queue bound counts
    rejected: dict[int, str] = field(default_factory=dict)
    payload: bytes = b""
    rows: int = 0
    min_t: int | None = None
    max_t: int | None = None
    newest: dict[int, tuple[int, float]] = field(default_factory=dict)  # metric id -> (t, value) stored
    # Packed frames: each stored row's time (ms) and metric id, in row order.
    times: np.ndarray | None = None
    mids: np.ndarray | None = None

    def __post_init__(self) -> None:
        self.size = len(self.points)


def connection_kwargs(settings_dict: dict) -> dict:
    """libpq keyword arguments for a Django DATABASES entry."""
    kwargs: dict[str, Any] = {
        "dbname": settings_dict.get("NAME") or "postgres",
        "user": settings_dict.get("USER") or None,
        "password": settings_dict.get("PASSWORD") or None,
        "host": settings_dict.get("HOST") or None,
        "port": str(settings_dict["PORT"]) if settings_dict.get("PORT") else None,
    }
    for key, value in (settings_dict.get("OPTIONS") or {}).items():
        if key not in _DJANGO_ONLY_OPTIONS:
            kwargs[key] = value
    return {k: v for k, v in kwargs.items() if v is not None}


def _django_settings_dict() -> dict:
    from django.db import connections

    return dict(connections["default"].settings_dict)


class Flusher:
    """Batches frames from every connection of this process into one COPY transaction per flush."""

    def __init__(
        self,
        *,
        max_batch_rows: int | None = None,
        flush_interval_ms: float | None = None,
        max_queue_rows: int | None = None,
        flush_timeout_s: float | None = None,
        connect_timeout_s: float | None = None,
        down_backoff_s: float | None = None,
        max_metrics_per_device: int | None = None,
        late_mark_s: float | None = None,
        connections: int | None = None,
        settings_dict: dict | Callable[[], dict] | None = None,
        latest_flush_ms: float | None = None,
    ) -> None:
        self.max_batch_rows = max_batch_rows or conf.get("FLUSH_MAX_ROWS")
        self.flush_interval = (flush_interval_ms if flush_interval_ms is not None else conf.get("FLUSH_INTERVAL_MS")) / 1000
        self.max_queue_rows = max_queue_rows or conf.get("QUEUE_MAX_ROWS")
        self.flush_timeout = flush_timeout_s or conf.get("FLUSH_TIMEOUT_S")
        self.connect_timeout = connect_timeout_s or conf.get("CONNECT_TIMEOUT_S")
        self.down_backoff = down_backoff_s if down_backoff_s is not None else conf.get("DOWN_BACKOFF_S")
        self.max_metrics = max_metrics_per_device or conf.get("MAX_METRICS_PER_DEVICE")
        self.late_mark_ms = int(1000 * (late_mark_s if late_mark_s is not None else conf.get("LATE_MARK_S")))
        self._settings_dict = settings_dict or _django_settings_dict
        self.connections = connections or conf.get("FLUSH_CONNECTIONS")
        self.latest_interval = (latest_flush_ms if latest_flush_ms is not None else conf.get("LATEST_FLUSH_MS")) / 1000
        # Newest committed point per (device, metric) not yet written to telemetry_devicemetric.
        self._latest: dict[tuple[int, int], tuple[int, float]] = {}
        self._latest_conn: psycopg.AsyncConnection | None = None
        self._latest_task: asyncio.Task | None = None

        self._loop: asyncio.AbstractEventLoop | None = None
        self._task: asyncio.Task | None = None
        self._pending: list[_Frame] = []
        self._pending_rows = 0
        self._queued_rows = 0  # pending + being flushed: what the queue bound counts
        self._first_at = 0.0
        # Frames waiting for room in the queue (enqueue's wait_s), oldest first.
        self._room_waiters: collections.deque[tuple[_Frame, asyncio.Future]] = collections.deque()
        self._wakeup: asyncio.Event | None = None
        self._full: asyncio.Event | None = None
        self._closing = False
        self._closed = False

        self._conns: list[psycopg.AsyncConnection | None] = [None] * self.connections  # used on the flush thread
        self._io_loop: asyncio.AbstractEventLoop | None = None
        self._io_thread: threading.Thread | None = None
        self._slots: asyncio.Queue[int] | None = None
        self._inflight: set[asyncio.Task] = set()
        self._backend: str | None = None
        self._down_until = 0.0
        self._last_error: BaseException | None = None
        self._metric_ids: dict[str, int] = {}
        self._device_metrics: dict[int, set[int]] = {}
        self._known_days: set[int] = set()
        self._rate = 50_000.0  # rows/s, smoothed; only used for retry_after_ms hints

        # Test hook: awaited inside the transaction after the COPY, before the commit.
        self._before_commit: Callable[[], Awaitable[None]] | None = None

        self.stats = {"flushes": 0, "frames": 0, "rows": 0, "failures": 0, "latest_writes": 0, "latest_rows": 0}

    # ------------------------------------------------------------------ public API

    async def submit(self, *, device_id: int, seq: int, points: list[tuple[int, str, float]],
                     wait_s: float = 0.0) -> IngestResult:
        """Store one frame exactly once; returns after its transaction committed.

        Raises Overloaded (nothing enqueued) when the queue is full and stays full for `wait_s`,
        FlushFailed when the frame could not be stored (nothing of it was committed)."""
        future = await self.enqueue(device_id=device_id, seq=seq, points=points, wait_s=wait_s)
        # Shielded: if the caller goes away, the frame is still written and its outcome dropped.
        return await asyncio.shield(future)

    async def enqueue(self, *, device_id: int, seq: int, points: list[tuple[int, str, float]],
                      wait_s: float = 0.0) -> asyncio.Future:
        """Put one frame in the queue and return the future of its outcome (an IngestResult,
        or FlushFailed), resolved after its transaction.

        When the frame does not fit (the queue is bounded in rows), it waits up to `wait_s`
        for room, in arrival order behind frames already waiting; the consumer awaiting this
        does not read its socket meanwhile, so the device is slowed by TCP instead of shed.
        Past `wait_s` it raises Overloaded and nothing is enqueued."""
        loop = asyncio.get_running_loop()
        if self._closing or self._closed:
            raise FlushFailed("the ingest flusher is shutting down")
        if self._loop is None:
            self._start(loop)
        elif self._loop is not loop:
            raise RuntimeError("a Flusher serves one event loop; use get_flusher() in each loop")
        if loop.time() < self._down_until:
            raise FlushFailed(f"database unavailable ({self._last_error}); retry later")
        frame = _Frame(device_id=device_id, seq=seq, points=points, future=loop.create_future())
        self._pack_on_admission(frame)
        if not self._room_waiters and self._fits(frame.size):
            self._admit(frame)
            return frame.future
        if wait_s <= 0:
            raise Overloaded(self._retry_after_ms())
        entry = (frame, loop.create_future())
        self._room_waiters.append(entry)
        try:
            await asyncio.wait([entry[1]], timeout=wait_s)
        finally:
            if not entry[1].done():  # timed out, or the caller went away: leave the line
                self._room_waiters.remove(entry)
                entry[1].cancel()
        if entry[1].cancelled():
            raise Overloaded(self._retry_after_ms())
        entry[1].result()  # FlushFailed if the flusher closed while the frame waited
        return frame.future

    def _fits(self, rows: int) -> bool:
        return not self._queued_rows or self._queued_rows + rows <= self.max_queue_rows

    def _admit(self, frame: _Frame) -> None:
        n = frame.size
        if not self._pending:
            self._first_at = self._loop.time()
            self._wakeup.set()
        self._pending.append(frame)
        self._pending_rows += n
        self._queued_rows += n
        if self._pending_rows >= self.max_batch_rows:
            self._full.set()

    def _admit_waiters(self) -> None:
        """Room was made (a flush ended): frames waiting for it enter the queue, oldest first."""
        while self._room_waiters and self._fits(self._room_waiters[0][0].size):
            frame, admitted = self._room_waiters.popleft()
            self._admit(frame)
            admitted.set_result(None)

    async def close(self) -> None:
        """Flush what is queued, then stop and close the connection."""
        if self._closed:
            return
        self._closing = True
        while self._room_waiters:
            _, admitted = self._room_waiters.popleft()
            admitted.set_exception(FlushFailed("the ingest flusher is shutting down"))
        if self._task is not None:
            self._wakeup.set()
            self._full.set()
            await self._task
        await self._stop_latest()
        if self._io_loop is not None:
            for slot in range(self.connections):
                await self._on_io(self._drop_connection(slot))
            self._io_loop.call_soon_threadsafe(self._io_loop.stop)
            await asyncio.to_thread(self._io_thread.join, 5)
            if not self._io_thread.is_alive():
                self._io_loop.close()
        self._closed = True

    @property
    def queued_rows(self) -> int:
        return self._queued_rows

    # ------------------------------------------------------------------ loop

    def _start(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        self._wakeup = asyncio.Event()
        self._full = asyncio.Event()
        self._slots = asyncio.Queue()
        for slot in range(self.connections):
            self._slots.put_nowait(slot)
        # The flush transactions run on an event loop of their own, in a thread: on the serving
        # loop each of their round trips waited for a turn behind every agent connection's frame
        # handling, and under load a flush of 20,000 rows took seconds while PostgreSQL idled.
        # Here a round trip costs at most a GIL switch (5 ms). Batching, acks and the queue
        # bound stay on the serving loop.
        self._io_loop = asyncio.new_event_loop()
        self._io_thread = threading.Thread(target=self._io_loop.run_forever, name="telemetry-flusher-io", daemon=True)
        self._io_thread.start()
        self._task = loop.create_task(self._run(), name="telemetry-flusher")
        self._latest_task = loop.create_task(self._latest_loop(), name="telemetry-latest")

    def _on_io(self, coro: Awaitable[Any]) -> asyncio.Future:
        """Run `coro` on the flush thread's loop; awaitable from the serving loop."""
        return asyncio.wrap_future(asyncio.run_coroutine_threadsafe(coro, self._io_loop), loop=self._loop)

    def _on_serving_loop(self, coro: Awaitable[Any]) -> asyncio.Future:
        """Run `coro` on the serving loop; awaitable from the flush thread's loop."""
        return asyncio.wrap_future(asyncio.run_coroutine_threadsafe(coro, self._loop))

    def _retry_after_ms(self) -> int:
        return int(min(5000, max(50, 1000 * self._queued_rows / max(self._rate, 1.0))))

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            if not self._pending:
                if self._closing:
                    if self._inflight:
                        await asyncio.wait(self._inflight)
                    return
                self._wakeup.clear()
                await self._wakeup.wait()
                continue
            if self._pending_rows < self.max_batch_rows and not self._closing:
                delay = self._first_at + self.flush_interval - loop.time()
                if delay > 0:
                    self._full.clear()
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(self._full.wait(), delay)
            # Up to `connections` flushes run at once (the server has more than one core). The
            # next one starts only once this one holds its cursor-row locks: a device's frame
            # N+1 in a later batch then waits for frame N's transaction instead of overtaking it.
            slot = await self._slots.get()
            batch = self._take()
            if not batch:
                self._slots.put_nowait(slot)
                continue
            if self._pending:
                self._first_at = loop.time()
            locked = loop.create_future()
            task = loop.create_task(self._flush(batch, slot, locked))
            self._inflight.add(task)
            task.add_done_callback(self._inflight.discard)
            await asyncio.wait([locked, task], return_when=asyncio.FIRST_COMPLETED)

    def _take(self) -> list[_Frame]:
        """Whole frames from the front of the queue, up to max_batch_rows (at least one frame)."""
        rows = count = 0
        for frame in self._pending:
            n = frame.size
            if count and rows + n > self.max_batch_rows:
                break
            rows += n
            count += 1
        batch = self._pending[:count]
        del self._pending[:count]
        self._pending_rows -= rows
        return batch

    async def _flush(self, batch: list[_Frame], slot: int, locked: asyncio.Future) -> None:
        rows = sum(f.size for f in batch)
        started = time.perf_counter()
        try:
            settings_dict = self._settings_dict() if callable(self._settings_dict) else self._settings_dict
            results = await self._on_io(self._flush_io(batch, slot, locked, settings_dict))
        except Exception as exc:  # noqa: BLE001 -- any failure means "nothing committed": fail the frames, keep serving
            self.stats["failures"] += 1
            self._last_error = exc
            log.warning("telemetry flush of %d frames failed: %r", len(batch), exc)
            self._down_until = asyncio.get_running_loop().time() + self.down_backoff
            error = FlushFailed(f"not stored: {exc!r}")
            for frame in batch:
                if not frame.future.done():
                    frame.future.set_exception(error)
                if not frame.future.cancelled():
                    # The caller may be gone (cancelled): mark it retrieved so asyncio does not warn.
                    frame.future.exception()
        else:
            elapsed = max(time.perf_counter() - started, 1e-4)
            self._rate = 0.8 * self._rate + 0.2 * (rows / elapsed)
            self.stats["flushes"] += 1
            self.stats["frames"] += len(batch)
            self.stats["rows"] += rows
            self._note_latest([frame for frame, result in results if result.status == "stored"])
            for frame, result in results:
                if not frame.future.done():
                    frame.future.set_result(result)
        finally:
            self._queued_rows -= rows
            self._admit_waiters()
            self.stats["busy_s"] = self.stats.get("busy_s", 0.0) + time.perf_counter() - started
            if not locked.done():
                locked.set_result(None)
            self._slots.put_nowait(slot)

    # ------------------------------------------------------------------ database (on the flush thread's loop)

    async def _flush_io(self, batch: list[_Frame], slot: int, locked: asyncio.Future,
                        settings_dict: dict) -> list[tuple[_Frame, IngestResult]]:
        try:
            return await asyncio.wait_for(self._flush_once(batch, slot, locked, settings_dict), self.flush_timeout)
        except BaseException:
            # Closing the connection rolls back whatever the transaction had done.
            await self._drop_connection(slot)
            raise

    async def _connection(self, slot: int, settings_dict: dict) -> psycopg.AsyncConnection:
        conn = self._conns[slot]
        if conn is not None and not conn.closed:
            return conn
        kwargs = connection_kwargs(settings_dict)
        timeout_ms = int(self.flush_timeout * 1000)
        kwargs["options"] = f"{kwargs.get('options', '')} -c statement_timeout={timeout_ms}".strip()
        conn = self._conns[slot] = await asyncio.wait_for(
            psycopg.AsyncConnection.connect(
                autocommit=True, connect_timeout=max(1, int(self.connect_timeout)), application_name="telemetry-flusher",
                **kwargs,
            ),
            self.connect_timeout + 1,
        )
        if self._backend is None:
            # A partitioned table is the plain backend; a hypertable is an ordinary table to pg_class.
            cur = await conn.execute("SELECT relkind FROM pg_class WHERE oid = 'telemetry_point'::regclass")
            self._backend = "postgres" if (await cur.fetchone())[0] == "p" else "timescale"
        return conn

    async def _drop_connection(self, slot: int) -> None:
        conn, self._conns[slot] = self._conns[slot], None
        if conn is not None:
            try:
                await asyncio.wait_for(conn.close(), 2)
            except Exception:  # the connection is already broken; closing is best effort
                log.debug("closing a broken flusher connection failed", exc_info=True)

    def _unknown_names(self, batch: list[_Frame]) -> set[str]:
        """Metric names of the batch's points (those that are strings) not in the id cache yet."""
        known = self._metric_ids.keys()
        names: set[Any] = set()
        for frame in batch:
            if frame.points is None:  # packed: every name had an id
                continue
            try:
                names.update(set(map(_NAME, frame.points)) - known)
            except TypeError:  # an unhashable name (a point the consumer should have rejected)
                names.update(p[1] for p in frame.points if isinstance(p[1], str) and p[1] not in known)
        return {name for name in names if isinstance(name, str)}

    async def _resolve_metrics(self, conn: psycopg.AsyncConnection, names: set[str]) -> None:
        missing = sorted(n for n in names if n not in self._metric_ids)
        if not missing:
            return
        cur = await conn.execute("SELECT name, id FROM telemetry_metric WHERE name = ANY(%s)", [missing])
        found = dict(await cur.fetchall())
        new = [n for n in missing if n not in found]
        if new:
            try:
                # Sorted, so two processes adding the same names cannot deadlock on the unique index.
                await conn.execute(
                    "INSERT INTO telemetry_metric (name, created_at) SELECT unnest(%s::text[]), now() "
                    "ON CONFLICT (name) DO NOTHING",
                    [new],
                )
            except pg_errors.SequenceGeneratorLimitExceeded:
                log.error("telemetry_metric is full (32767 names): new metric names are rejected")
            cur = await conn.execute("SELECT name, id FROM telemetry_metric WHERE name = ANY(%s)", [new])
            found.update(await cur.fetchall())
        self._metric_ids.update(found)

    async def _ensure_partitions(self, conn: psycopg.AsyncConnection, batch: list[_Frame]) -> None:
        days: set[int] = set()
        for frame in batch:
            if frame.min_t is not None:
                days.update(range(frame.min_t // DAY_MS, frame.max_t // DAY_MS + 1))
        for day in sorted(days - self._known_days):
            # Its own autocommit transaction, before the flush's: the DDL lock is held only briefly.
            await conn.execute("SELECT telemetry_ensure_partition(%s)", [dt.date(1970, 1, 1) + dt.timedelta(days=day)])
            self._known_days.add(day)

    def _encode(self, frame: _Frame) -> None:
        """Pre-encode the frame's COPY rows (outside the transaction)."""
        if not frame.rejected and self._encode_fast(frame):
            return
        ids = self._metric_ids
        pack = _ROW.pack
        dev = frame.device_id
        rejected = frame.rejected
        parts = []
        min_t = None
        newest: dict[int, tuple[int, float]] = {}
        try:
            for i, (t, name, value) in enumerate(frame.points):
                if rejected and i in rejected:
                    continue
                mid = ids[name]
                parts.append(pack(4, 8, (t - _PG_EPOCH_MS) * 1000, 4, dev, 2, mid, 8, value))
                if min_t is None or t < min_t:
                    min_t = t
                seen = newest.get(mid)
                if seen is None or (t, value) > seen:  # newer, or as new and larger (the rollups' `last`)
                    newest[mid] = (t, value)
        except (struct.error, TypeError, KeyError, ValueError):
            # A point the consumer should have rejected: reject it here, one by one, keep the rest.
            parts = []
            min_t = None
            newest = {}
            for i, point in enumerate(frame.points):
                if rejected and i in rejected:
                    continue
                try:
                    t, name, value = point
                    parts.append(pack(4, 8, (int(t) - _PG_EPOCH_MS) * 1000, 4, dev, 2, ids[name], 8, float(value)))
                    min_t = int(t) if min_t is None else min(min_t, int(t))
                    seen = newest.get(ids[name])
                    if seen is None or (int(t), float(value)) > seen:
                        newest[ids[name]] = (int(t), float(value))
                except (struct.error, TypeError, KeyError, ValueError, OverflowError):
                    unknown = (isinstance(point, tuple | list) and len(point) == 3 and isinstance(point[1], str)
                               and point[1] not in ids)
                    rejected[i] = REASON_CATALOG_FULL if unknown else REASON_INVALID
        frame.payload = b"".join(parts)
        frame.rows = len(parts)
        frame.min_t = min_t
        frame.max_t = max((newest_t for newest_t, _ in newest.values()), default=None)
        frame.newest = newest

    def _encode_fast(self, frame: _Frame) -> bool:
        """`_encode` for the usual frame (validated points, known metric names), with numpy: the
        same bytes, min/max time and newest point per metric. False (nothing set) for anything
        else -- wrong types, unknown names, out-of-range numbers, NaN -- which `_encode` then
        handles point by point."""
        points = frame.points
        n = len(points)
        dev = frame.device_id
        if not n or type(dev) is not int or not _INT4_MIN <= dev <= _INT4_MAX:
            return False
        try:
            times = list(map(_T, points))
            values = list(map(_VALUE, points))
            if set(map(type, times)) != {int} or set(map(type, values)) != {float}:
                return False
            mids = np.fromiter(map(self._metric_ids.__getitem__, map(_NAME, points)), np.int16, n)
            t = np.fromiter(times, np.int64, n)
        except (TypeError, KeyError, IndexError, ValueError, OverflowError):
            return False
        v = np.array(values, np.float64)
        if int(t.min()) < _T_MIN or int(t.max()) > _T_MAX or np.isnan(v).any():
            return False
        self._pack_columns(frame, t, mids, v)
        return True

    @staticmethod
    def _pack_columns(frame: _Frame, t: np.ndarray, mids: np.ndarray, v: np.ndarray) -> None:
        """Set the frame's COPY rows, row count, min/max time and newest point per metric from
        its stored points' columns (times in ms, metric ids, values), in row order."""
        n = len(t)
        frame.times, frame.mids = t, mids
        if not n:
            frame.payload, frame.rows, frame.min_t, frame.max_t, frame.newest = b"", 0, None, None, {}
            return
        dev = frame.device_id
        rows = np.empty(n, _ROW_DTYPE)
        rows["n"], rows["lt"], rows["ld"], rows["d"], rows["lm"], rows["lv"] = 4, 8, 4, dev, 2, 8
        rows["t"] = (t - _PG_EPOCH_MS) * 1000
        rows["m"] = mids
        rows["v"] = v
        # Newest (t, value) per metric: the last point of each metric once sorted by (metric, t, value).
        order = np.lexsort((v, t, mids))
        sorted_mids = mids[order]
        last = order[np.append(sorted_mids[1:] != sorted_mids[:-1], True)]
        frame.newest = dict(zip(mids[last].tolist(), zip(t[last].tolist(), v[last].tolist(), strict=True), strict=True))
        frame.payload = rows.tobytes()
        frame.rows = n
        frame.min_t, frame.max_t = int(t.min()), int(t.max())

    def _pack_on_admission(self, frame: _Frame) -> None:
        """Pack the usual frame as it enters the queue, and let go of its points: a queued frame
        is then a few arrays and bytes, not one tuple per point. (The garbage collector walks
        every young tuple: with a backlog of 500,000 queued points one young-generation pass
        stalled the serving loop for 0.25-0.5 s, which made the backlog longer still.) Frames
        with a metric name that has no id yet are packed at their flush, as before."""
        if self._encode_fast(frame):
            frame.points = None

    def _refuse_packed(self, frame: _Frame, metric_ids: set[int]) -> None:
        """Reject a packed frame's points of `metric_ids` (cardinality cap) and repack the rest."""
        refused = np.isin(frame.mids, np.fromiter(metric_ids, np.int16, len(metric_ids)))
        if not refused.any():
            return
        for i in np.flatnonzero(refused).tolist():
            frame.rejected[i] = REASON_CARDINALITY
        keep = ~refused
        v = np.frombuffer(frame.payload, _ROW_DTYPE)["v"][keep].astype(np.float64)
        self._pack_columns(frame, frame.times[keep], frame.mids[keep], v)

    async def _flush_once(self, batch: list[_Frame], slot: int, locked: asyncio.Future,
                          settings_dict: dict) -> list[tuple[_Frame, IngestResult]]:
        conn = await self._connection(slot, settings_dict)
        await self._resolve_metrics(conn, self._unknown_names(batch))
        for frame in batch:
            if frame.points is not None:
                self._encode(frame)
        if self._backend == "postgres":
            await self._ensure_partitions(conn, batch)

        # Each device's contiguous run of frames; repeats and frames after a gap are resolved
        # from the cursor afterwards (duplicate or conflict) and store nothing now.
        runs: dict[int, list[_Frame]] = {}
        leftovers: list[_Frame] = []
        for frame in sorted(batch, key=lambda f: (f.device_id, f.seq)):
            run = runs.get(frame.device_id)
            if run is None:
                runs[frame.device_id] = [frame]
            elif frame.seq == run[-1].seq + 1:
                run.append(frame)
            else:
                leftovers.append(frame)
        devices = sorted(runs)
        now_ms = int(time.time() * 1000)

        # The transaction is spelt out (BEGIN ... COMMIT on the autocommit connection) so that its
        # first three statements go in ONE round trip (pipeline mode): fewer round trips, shorter
        # lock holds. If anything fails before the COMMIT, `_flush_io` closes the connection,
        # which rolls the transaction back.
        cur = conn.cursor()
        async with conn.pipeline():
            await cur.execute("BEGIN")
            # The cursor rows are locked in device-id order first, so two flushes never deadlock.
            await cur.execute(
                "SELECT device_id FROM fleet_uplinkcursor WHERE device_id = ANY(%s) ORDER BY device_id FOR UPDATE",
                [devices],
            )
            await cur.execute(
                "UPDATE fleet_uplinkcursor AS c SET last_acked_seq = v.e "
                "FROM unnest(%s::bigint[], %s::bigint[], %s::bigint[]) AS v(d, s, e) "
                "WHERE c.device_id = v.d AND c.last_acked_seq = v.s - 1 RETURNING c.device_id",
                [devices, [runs[d][0].seq for d in devices], [runs[d][-1].seq for d in devices]],
            )
            advanced = {row[0] for row in await cur.fetchall()}
        self._loop.call_soon_threadsafe(_resolve, locked)
        stored = [f for d in devices if d in advanced for f in runs[d]]
        new_pairs = await self._check_cardinality(cur, advanced, runs)

        late: set[tuple[int, int]] = set()
        if self._backend == "postgres":
            cutoff = now_ms - self.late_mark_ms
            for frame in stored:
                if frame.min_t is not None and frame.min_t < cutoff:
                    if frame.points is None:
                        hours = np.unique(frame.times[frame.times < cutoff] // HOUR_MS).tolist()
                    else:
                        hours = {p[0] // HOUR_MS for p in frame.points if p[0] < cutoff}
                    late.update((frame.device_id, hour) for hour in hours)
        if late:
            # Markers commit with the points: the rollup job re-aggregates these hours.
            pairs = sorted(late)
            await cur.execute(
                "INSERT INTO telemetry_late (device_id, hour) "
                "SELECT d, to_timestamp(h * 3600) FROM unnest(%s::int[], %s::bigint[]) AS m(d, h) "
                # DO UPDATE, not DO NOTHING: it locks an existing marker, so the rollup job
                # cannot delete it while this transaction's points are still invisible to it.
                "ON CONFLICT (device_id, hour) DO UPDATE SET hour = EXCLUDED.hour",
                [[p[0] for p in pairs], [p[1] for p in pairs]],
            )
        if any(f.rows for f in stored):
            async with cur.copy(_COPY_SQL) as copy:
                # One write, not one per frame: each write waits for a turn of the event loop.
                await copy.write(b"".join([_COPY_HEADER, *(f.payload for f in stored if f.rows), _COPY_TRAILER]))

        others = [f for d in devices if d not in advanced for f in runs[d]] + leftovers
        positions: dict[int, int] = {}
        if others:
            await cur.execute(
                "SELECT device_id, last_acked_seq FROM fleet_uplinkcursor WHERE device_id = ANY(%s)",
                [sorted({f.device_id for f in others})],
            )
            positions = dict(await cur.fetchall())
        if self._before_commit is not None:
            await self._on_serving_loop(self._before_commit())
        await cur.execute("COMMIT")

        # Committed.
        for device_id, metric_ids in new_pairs.items():
            self._device_metrics.setdefault(device_id, set()).update(metric_ids)
        results = []
        for frame in stored:
            results.append((frame, IngestResult("stored", sorted(frame.rejected.items()))))
        for frame in others:
            position = positions.get(frame.device_id)
            status = "duplicate" if position is not None and frame.seq <= position else "conflict"
            results.append((frame, IngestResult(status, [])))
        return results

    # ------------------------------------------------------------------ latest values

    def _note_latest(self, frames: list[_Frame]) -> None:
        """Remember the newest committed point per (device, metric) until the next latest write."""
        latest = self._latest
        for frame in frames:
            dev = frame.device_id
            for mid, point in frame.newest.items():
                seen = latest.get((dev, mid))
                if seen is None or point > seen:
                    latest[(dev, mid)] = point

    async def _latest_loop(self) -> None:
        while True:
            await asyncio.sleep(self.latest_interval)
            try:
                await self._write_latest()
            except Exception as exc:  # noqa: BLE001 -- derived data: keep the values, retry next interval
                log.warning("writing latest telemetry values failed (will retry): %r", exc)

    async def _stop_latest(self) -> None:
        """At close: stop the periodic writer, write what is left (best effort), close its connection."""
        if self._latest_task is not None:
            self._latest_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._latest_task
        try:
            await self._write_latest()
        except Exception as exc:  # noqa: BLE001 -- derived data; the next point repairs it
            log.warning("writing latest telemetry values at close failed: %r", exc)
        if self._io_loop is not None:
            await self._on_io(self._close_latest_conn())

    async def _write_latest(self) -> None:
        """One UPDATE for every series that got newer points since the last write. Never moves a
        series backwards (the comparison is in the WHERE: late points and other processes' newer
        writes win over nothing). Rows are taken in (device, metric) order. On failure the values
        go back into the pending set (unless newer ones arrived meanwhile).

        The pending set is swapped here, on the serving loop; building the arrays and the round
        trip run on the flush thread's loop (5,000 series every 2 s cost the serving loop
        ~10 ms of encoding)."""
        if not self._latest:
            return
        pending, self._latest = self._latest, {}
        try:
            await self._on_io(self._write_latest_io(pending))
        except BaseException:
            for key, point in pending.items():
                seen = self._latest.get(key)
                if seen is None or point > seen:
                    self._latest[key] = point
            raise
        self.stats["latest_writes"] += 1
        self.stats["latest_rows"] += len(pending)

    async def _write_latest_io(self, pending: dict[tuple[int, int], tuple[int, float]]) -> None:
        keys = sorted(pending)
        try:
            conn = self._latest_conn
            if conn is None or conn.closed:
                settings_dict = self._settings_dict() if callable(self._settings_dict) else self._settings_dict
                kwargs = connection_kwargs(settings_dict)
                kwargs["options"] = (f"{kwargs.get('options', '')} "
                                     f"-c statement_timeout={int(self.flush_timeout * 1000)}").strip()
                conn = self._latest_conn = await asyncio.wait_for(psycopg.AsyncConnection.connect(
                    autocommit=True, connect_timeout=max(1, int(self.connect_timeout)),
                    application_name="telemetry-latest", **kwargs), self.connect_timeout + 1)
            await asyncio.wait_for(conn.execute(
                "UPDATE telemetry_devicemetric AS dm SET last_time = v.t, last_value = v.v FROM ("
                " SELECT d, m, timestamptz 'epoch' + t * interval '1 millisecond' AS t, v"
                " FROM unnest(%s::bigint[], %s::smallint[], %s::bigint[], %s::float8[]) AS u(d, m, t, v)) AS v "
                "WHERE dm.device_id = v.d AND dm.metric_id = v.m AND (dm.last_time IS NULL OR dm.last_time < v.t"
                " OR (dm.last_time = v.t AND dm.last_value < v.v))",
                [[k[0] for k in keys], [k[1] for k in keys], [pending[k][0] for k in keys], [pending[k][1] for k in keys]],
            ), self.flush_timeout)
        except BaseException:
            await self._close_latest_conn()
            raise

    async def _close_latest_conn(self) -> None:
        conn, self._latest_conn = self._latest_conn, None
        if conn is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(conn.close(), 2)

    async def _check_cardinality(self, cur: psycopg.AsyncCursor, advanced: set[int],
                                 runs: dict[int, list[_Frame]]) -> dict[int, set[int]]:
        """Enforce the per-device metric cap for the devices being stored (their cursor rows are
        locked, so no other process adds metrics to them meanwhile). Returns pairs added."""
        ids = self._metric_ids
        wanted: dict[int, list[int]] = {}
        for device_id in advanced:
            known = self._device_metrics.get(device_id, set())
            # `newest` has a key for every metric id the frame stores: usually all already known.
            if all(frame.newest.keys() <= known for frame in runs[device_id]):
                continue
            seen: dict[int, None] = {}  # new metric ids in the order of their first point
            for frame in runs[device_id]:
                if frame.points is None:
                    first, at = np.unique(frame.mids, return_index=True)
                    stored = first[np.argsort(at)].tolist()
                else:
                    stored = [ids.get(point[1]) for i, point in enumerate(frame.points) if i not in frame.rejected]
                for mid in stored:
                    if mid is not None and mid not in known:
                        seen[mid] = None
            if seen:
                wanted[device_id] = list(seen)
        if not wanted:
            return {}
        if len(self._device_metrics) > 200_000:  # bound the cache; it refills from the table
            self._device_metrics.clear()
        await cur.execute(
            "SELECT device_id, metric_id FROM telemetry_devicemetric WHERE device_id = ANY(%s)", [sorted(wanted)]
        )
        existing: dict[int, set[int]] = {d: set() for d in wanted}
        for device_id, metric_id in await cur.fetchall():
            existing[device_id].add(metric_id)
        self._device_metrics.update(existing)
        added: dict[int, set[int]] = {}
        refused: dict[int, set[int]] = {}
        for device_id, metric_ids in wanted.items():
            have = existing[device_id]
            room = self.max_metrics - len(have)
            for mid in metric_ids:
                if mid in have:
                    continue
                if room > 0:
                    added.setdefault(device_id, set()).add(mid)
                    room -= 1
                else:
                    refused.setdefault(device_id, set()).add(mid)
        if added:
            pairs = sorted((d, m) for d, ms in added.items() for m in ms)
            await cur.execute(
                "INSERT INTO telemetry_devicemetric (device_id, metric_id, first_seen) "
                "SELECT d, m, now() FROM unnest(%s::bigint[], %s::smallint[]) AS p(d, m) ON CONFLICT DO NOTHING",
                [[p[0] for p in pairs], [p[1] for p in pairs]],
            )
        for device_id, metric_ids in refused.items():
            for frame in runs[device_id]:
                if frame.points is None:
                    self._refuse_packed(frame, metric_ids)
                    continue
                hit = False
                for i, point in enumerate(frame.points):
                    if i not in frame.rejected and ids.get(point[1]) in metric_ids:
                        frame.rejected[i] = REASON_CARDINALITY
                        hit = True
                if hit:
                    self._encode(frame)
        return added


def _resolve(future: asyncio.Future) -> None:
    if not future.done():
        future.set_result(None)


_instance: Flusher | None = None


def get_flusher() -> Flusher:
    """This process's flusher, created on first use on the running event loop."""
    global _instance
    loop = asyncio.get_running_loop()
    if _instance is None or _instance._closed or _instance._closing or (
        _instance._loop is not None and _instance._loop is not loop
    ):
        io_loop = _instance._io_loop if _instance is not None else None
        if io_loop is not None and not io_loop.is_closed() and _instance._loop is not loop:
            # Left behind by an event loop that is gone (tests run one loop after another).
            io_loop.call_soon_threadsafe(io_loop.stop)
        _instance = Flusher()
        _instance._start(loop)
    return _instance
