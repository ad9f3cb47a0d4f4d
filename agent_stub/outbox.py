"""The durable outbox: every durable uplink frame, on disk, until the server acks it.

What it owns
------------
* Storage of durable frames (``telemetry``, ``event``, ``state``, ``rollout.status``,
  ``command.result``) in SQLite, in production order, surviving restarts.
* The device's ``seq`` counter (persisted).
* The buffer cap: dropping the oldest telemetry first when full or when the disk is
  full, and the persisted drop counters behind the ``agent.buffer.dropped`` metric.

How seq numbers are handled (and why dropped frames never leave a gap)
----------------------------------------------------------------------
The server commits frames strictly in order and rejects ``seq > last_acked + 1`` as a
gap, so the numbers it sees must be contiguous.  If a number were fixed when a frame is
produced, dropping an old telemetry frame from a full buffer would punch a hole the
server could never get past.  So numbers are assigned **when a frame is taken for
sending** (``take``), in production order, and written to disk in the same transaction
before the frame is handed to the socket.  Frames that were never taken have no number;
dropping them creates no hole.

A frame that has a number may have been committed by the server even if its ack never
arrived.  Those frames are only renumbered at a point where the server has told us, with
authority, what it committed: ``resume_from(last_acked_seq)`` (on ``welcome``, and on a
``seq_gap`` error, whose ``expected`` is ``last_acked + 1``).  There, frames ``<=
last_acked`` are deleted (committed), and every other frame loses its number and is
numbered again from ``last_acked + 1``: nothing above ``last_acked`` was committed,
because the server commits in order.

While connected (``set_online(True)``), numbered frames are never dropped by the cap:
one may be in flight, committed under its number; dropping it and renumbering on a
later ``seq_gap`` could make the server take a different frame for a duplicate.  While
offline any frame may be dropped; the holes this leaves among numbered frames are
closed by the renumbering on the next ``welcome``.  (Such a frame may turn out to have
been committed before the link died; the drop counter is corrected at that ``welcome``,
so ``agent.buffer.dropped`` counts only data the server never got.)  The only in-flight frame ever
removed is one the server explicitly refused (``drop_rejected``): it committed nothing
under that number, and the ``seq_gap`` that follows renumbers the rest.

If the server's ``last_acked_seq`` is above every number we ever assigned, the server
knows a previous incarnation of this device (state restored or lost): our frames are
all new to it, so they are kept and numbered from ``last_acked + 1`` — the counter
moves forward, nothing is deleted.

A full disk
-----------
In WAL mode every write, a delete included, first appends pages to the WAL, and a checkpoint
copies them into the database file, growing it.  On a disk that is 100 % full neither can
happen: the oldest telemetry could not even be deleted, and the newest frames would be lost
instead.  Two measures prevent that:

* Before each write the outbox sets SQLite's ``max_page_count`` to what the database file may
  grow into while leaving ``min_free_bytes`` of the filesystem free.  When the outbox itself
  fills the disk, SQLite says "full" while there is still room for the WAL, and the oldest
  telemetry is dropped to make room (its pages are reused).
* When something else fills the disk, the filesystem says ENOSPC.  The outbox then gives back
  ``<db>.reserve`` (``reserve_bytes`` allocated at open, at least the WAL's size), checkpoints
  the WAL into the database file (the WAL file keeps its size and is rewritten from its
  start), and from then on drops the oldest telemetry to fit new frames into the pages it
  already owns.  The reserve is taken again once the disk has room.

Only when nothing at all can be written is the new frame refused; it is counted as dropped
too.  No path leaves a half-written frame: SQLite rolls the transaction back.

Durability settings: WAL with ``synchronous=NORMAL``.  WAL never corrupts the database
on a crash or power cut; NORMAL skips the fsync on each commit, so a power cut may lose
the last few hundred milliseconds of frames but never leaves a half-written one.  That
trade is right for an edge box producing a frame every few seconds from flash storage
(an fsync per frame wears flash and costs milliseconds), and it lets one process hold
thousands of simulated devices' outboxes.  ``:memory:`` gives a non-durable outbox for
benchmarks.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import sqlite3
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, TypeVar

from agent_stub.protocol import DURABLE_TYPES, dumps

log = logging.getLogger(__name__)

T = TypeVar("T")

DEFAULT_MAX_FRAMES = 100_000
DEFAULT_MAX_BYTES = 64 * 1024 * 1024
# Disk space the database may not grow into (see "A full disk" in the module doc).
DEFAULT_MIN_FREE_BYTES = 1024 * 1024
# Size of the reserve file given back to the filesystem when the disk is really full.
DEFAULT_RESERVE_BYTES = 1024 * 1024
# WAL pages before an automatic checkpoint (SQLite's default is 1000): the WAL must fit in the
# reserve, so a checkpoint can always complete once the reserve is released.
_WAL_AUTOCHECKPOINT_PAGES = 128
_SQLITE_MAX_PAGES = 4_294_967_294
# Attempts to free space when SQLite reports a full disk before giving up on one write.
_FULL_RETRIES = 64

_SCHEMA = """
CREATE TABLE IF NOT EXISTS frames (
    id     INTEGER PRIMARY KEY AUTOINCREMENT,  -- production order, never reused
    seq    INTEGER,                            -- NULL until taken for sending
    kind   TEXT    NOT NULL,
    points INTEGER NOT NULL,
    nbytes INTEGER NOT NULL,
    body   TEXT    NOT NULL                    -- the frame's JSON without "seq"
);
CREATE UNIQUE INDEX IF NOT EXISTS frames_seq ON frames(seq) WHERE seq IS NOT NULL;
CREATE INDEX IF NOT EXISTS frames_telemetry ON frames(id) WHERE kind = 'telemetry';
CREATE INDEX IF NOT EXISTS frames_unsent ON frames(id) WHERE seq IS NULL;
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value INTEGER NOT NULL);
-- Numbered frames dropped while offline: the server may have committed them after all.
-- The next resume_from un-counts those at or below last_acked_seq.
CREATE TABLE IF NOT EXISTS dropped_numbered (seq INTEGER PRIMARY KEY, points INTEGER NOT NULL);
"""


@dataclass(frozen=True, slots=True)
class OutboxFrame:
    """A frame ready to send: its seq, type and complete JSON text."""

    seq: int
    kind: str
    text: str


def _is_full(exc: sqlite3.OperationalError) -> bool:
    return "full" in str(exc).lower()


class Outbox:
    """One device's outbox (see the module docstring for the numbering rules).

    Not thread-safe: one asyncio task (or one thread) per outbox.
    """

    def __init__(self, path: str | os.PathLike[str] = ":memory:", *, max_frames: int = DEFAULT_MAX_FRAMES,
                 max_bytes: int = DEFAULT_MAX_BYTES, min_free_bytes: int = DEFAULT_MIN_FREE_BYTES,
                 reserve_bytes: int = DEFAULT_RESERVE_BYTES) -> None:
        self.path = str(path)
        self.max_frames = max_frames
        self.max_bytes = max_bytes
        self.min_free_bytes = min_free_bytes  # 0: no free-space guard (the disk itself is the limit)
        self.reserve_bytes = reserve_bytes  # 0: no reserve file
        self._reserve_path = self.path + ".reserve"
        # isolation_level=None: we issue BEGIN/COMMIT ourselves so every write is exactly
        # one transaction we can roll back on SQLITE_FULL.
        self._db = sqlite3.connect(self.path, isolation_level=None)
        if self.path != ":memory:":
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute("PRAGMA synchronous=NORMAL")
            self._db.execute(f"PRAGMA wal_autocheckpoint={_WAL_AUTOCHECKPOINT_PAGES}")
        self._db.executescript(_SCHEMA)
        self._page_size = int(self._db.execute("PRAGMA page_size").fetchone()[0])
        self._reserve_held = self._hold_reserve()
        self._online = False
        self._full_logged = False
        self.acked_points_total = 0  # telemetry points acked since this object was opened
        row = self._db.execute("SELECT COUNT(*), COALESCE(SUM(nbytes), 0) FROM frames").fetchone()
        self._frames, self._bytes = int(row[0]), int(row[1])
        self._assigned = int(self._db.execute("SELECT COUNT(*) FROM frames WHERE seq IS NOT NULL").fetchone()[0])
        self._meta = {k: int(v) for k, v in self._db.execute("SELECT key, value FROM meta")}

    # --- small helpers -----------------------------------------------------------------
    def _get(self, key: str) -> int:
        return self._meta.get(key, 0)

    def _set(self, key: str, value: int) -> None:
        self._db.execute("INSERT INTO meta(key, value) VALUES (?, ?) "
                         "ON CONFLICT(key) DO UPDATE SET value = excluded.value", (key, value))

    def _txn(self, fn: Callable[[], T]) -> T:
        """Run ``fn`` in one IMMEDIATE transaction; on a full disk, free space and retry.

        Freeing space, in order: checkpoint the WAL into the database file (releasing the
        reserve first if the filesystem is too full for that), retry; then drop the oldest
        telemetry, one frame at a time, each drop followed by another checkpoint so the next
        write reuses the WAL file from its start instead of growing it.
        """
        checkpointed = False
        self._guard_free_space()
        for _ in range(_FULL_RETRIES):
            meta_before = dict(self._meta)
            counts_before = (self._frames, self._bytes, self._assigned)
            try:
                self._db.execute("BEGIN IMMEDIATE")
                result = fn()
                self._db.execute("COMMIT")
                if not checkpointed:
                    self._full_logged = False  # room again: the next full disk is worth a warning
                return result
            except BaseException as exc:  # any failure: roll back, then decide
                if self._db.in_transaction:
                    self._db.execute("ROLLBACK")
                # In-memory mirrors must match what the rolled-back database holds.
                self._meta = meta_before
                self._frames, self._bytes, self._assigned = counts_before
                if not (isinstance(exc, sqlite3.OperationalError) and _is_full(exc)):
                    raise
                if not checkpointed:
                    # A checkpoint that fails means the filesystem itself is full: give the
                    # reserve back so the WAL can be folded into the database file.
                    checkpointed = True
                    if not self._checkpoint() and self._release_reserve():
                        self._checkpoint()
                    self._guard_free_space()
                    continue
                # One warning per full-disk episode, not one per frame (the log may be on that disk too).
                (log.debug if self._full_logged else log.warning)(
                    "outbox %s: disk full, dropping the oldest telemetry to make room", self.path)
                self._full_logged = True
                if not self._drop_one(allow_any_kind=False):
                    raise
                self._checkpoint()
        raise sqlite3.OperationalError("database or disk is full (outbox could not free space)")

    # --- public API --------------------------------------------------------------------
    def set_online(self, online: bool) -> None:
        """Tell the outbox whether numbered frames may be in flight (see module doc)."""
        self._online = online

    def append(self, frame: Mapping[str, Any]) -> int | None:
        """Store a durable frame (its ``seq``, if any, is ignored); returns its row id.

        Returns ``None`` when the frame could not be stored because the disk is full and
        nothing else could be dropped; it is then counted as dropped.
        """
        kind = frame.get("type")
        if kind not in DURABLE_TYPES:
            raise ValueError(f"{kind!r} is not a durable frame type")
        body = dumps({k: v for k, v in frame.items() if k != "seq"})
        points = len(frame.get("points") or ()) if kind == "telemetry" else 0
        nbytes = len(body.encode("utf-8"))

        def insert() -> int:
            cur = self._db.execute("INSERT INTO frames(seq, kind, points, nbytes, body) VALUES (NULL, ?, ?, ?, ?)",
                                   (kind, points, nbytes, body))
            self._frames += 1
            self._bytes += nbytes
            return int(cur.lastrowid or 0)

        try:
            row_id = self._txn(insert)
        except sqlite3.OperationalError as exc:
            if not _is_full(exc):
                raise
            log.error("outbox %s: disk full, %s frame dropped", self.path, kind)
            self._count_drop_outside_txn(points)
            return None
        self._enforce_cap()
        return row_id

    def take(self, limit: int) -> list[OutboxFrame]:
        """Number up to ``limit`` of the oldest unnumbered frames and return them.

        The numbers are on disk before this returns, i.e. before the frames are sent.
        """
        if limit <= 0:
            return []

        def assign() -> list[OutboxFrame]:
            rows = self._db.execute("SELECT id, kind, body FROM frames WHERE seq IS NULL ORDER BY id LIMIT ?",
                                    (limit,)).fetchall()
            if not rows:
                return []
            first = self._get("last_seq") + 1
            self._db.executemany("UPDATE frames SET seq = ? WHERE id = ?",
                                 [(first + i, row_id) for i, (row_id, _, _) in enumerate(rows)])
            self._meta["last_seq"] = first + len(rows) - 1
            self._set("last_seq", self._meta["last_seq"])
            self._assigned += len(rows)
            return [OutboxFrame(first + i, kind, f'{{"seq":{first + i},{body[1:]}')
                    for i, (_, kind, body) in enumerate(rows)]

        return self._txn(assign)

    def in_flight(self) -> list[OutboxFrame]:
        """Numbered, unacked frames in seq order (what a resend would send)."""
        rows = self._db.execute("SELECT seq, kind, body FROM frames WHERE seq IS NOT NULL ORDER BY seq").fetchall()
        return [OutboxFrame(seq, kind, f'{{"seq":{seq},{body[1:]}') for seq, kind, body in rows]

    def ack(self, seq: int) -> int:
        """The server committed everything up to ``seq``: delete those frames."""

        def delete() -> int:
            rows = self._db.execute(
                "SELECT COUNT(*), COALESCE(SUM(nbytes), 0), COALESCE(SUM(points), 0) FROM frames WHERE seq <= ?",
                (seq,)).fetchone()
            if rows[0]:
                self._db.execute("DELETE FROM frames WHERE seq <= ?", (seq,))
                self._frames -= rows[0]
                self._bytes -= rows[1]
                self._assigned -= rows[0]
                self.acked_points_total += rows[2]
            return int(rows[0])

        return self._txn(delete)

    def resume_from(self, last_acked_seq: int, *, limit: int | None = None) -> list[OutboxFrame]:
        """Apply the server's ``last_acked_seq`` and return what to send next, in order.

        Frames ``<= last_acked_seq`` are deleted; every remaining frame is (re)numbered
        from ``last_acked_seq + 1`` in production order.  Returns up to ``limit`` of them
        (all when ``None``), already numbered; the rest are numbered by later ``take``.
        """

        def rewind() -> None:
            if last_acked_seq <= self._get("last_seq"):
                # Frames we dropped offline that the server had committed were not lost.
                delivered = self._db.execute(
                    "SELECT COUNT(*), COALESCE(SUM(points), 0) FROM dropped_numbered WHERE seq <= ?",
                    (last_acked_seq,)).fetchone()
                if delivered[0]:
                    self._bump("dropped_frames", -delivered[0])
                    self._bump("dropped_points", -delivered[1])
                row = self._db.execute("SELECT COUNT(*), COALESCE(SUM(nbytes), 0) FROM frames WHERE seq <= ?",
                                       (last_acked_seq,)).fetchone()
                self._db.execute("DELETE FROM frames WHERE seq <= ?", (last_acked_seq,))
                self._frames -= row[0]
                self._bytes -= row[1]
            else:
                log.warning("outbox %s: server acked seq %d, above anything assigned here (%d); keeping all "
                            "frames and numbering them after it", self.path, last_acked_seq, self._get("last_seq"))
            self._db.execute("DELETE FROM dropped_numbered")
            self._db.execute("UPDATE frames SET seq = NULL WHERE seq IS NOT NULL")
            self._assigned = 0
            self._meta["last_seq"] = last_acked_seq
            self._set("last_seq", last_acked_seq)

        self._txn(rewind)
        return self.take(self._frames if limit is None else limit)

    def drop_rejected(self, seq: int) -> bool:
        """Remove frame ``seq`` that the server refused (it committed nothing under it)."""

        def delete() -> bool:
            row = self._db.execute("SELECT points, nbytes FROM frames WHERE seq = ?", (seq,)).fetchone()
            if row is None:
                return False
            self._db.execute("DELETE FROM frames WHERE seq = ?", (seq,))
            self._frames -= 1
            self._bytes -= row[1]
            self._assigned -= 1
            self._bump("rejected_frames", 1)
            return True

        return self._txn(delete)

    @property
    def last_seq(self) -> int:
        """The highest seq currently assigned (0 before the first)."""
        return self._get("last_seq")

    @property
    def buffered(self) -> int:
        """Frames waiting for an ack (numbered or not)."""
        return self._frames

    @property
    def buffered_bytes(self) -> int:
        """Bytes of frame JSON waiting for an ack."""
        return self._bytes

    @property
    def in_flight_count(self) -> int:
        """Numbered frames not yet acked."""
        return self._assigned

    @property
    def unsent_count(self) -> int:
        """Frames not yet numbered (never sent since the last rewind)."""
        return self._frames - self._assigned

    @property
    def dropped_frames(self) -> int:
        """Frames dropped by the cap or a full disk, ever (persisted)."""
        return self._get("dropped_frames")

    @property
    def dropped_points(self) -> int:
        """Telemetry points in those frames, ever (persisted): ``agent.buffer.dropped``."""
        return self._get("dropped_points")

    def close(self) -> None:
        """Checkpoint the WAL into the database file and close."""
        try:
            if self.path != ":memory:":
                self._db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        except sqlite3.Error as exc:  # a checkpoint is an optimisation; the WAL is durable
            log.warning("outbox %s: checkpoint failed: %s", self.path, exc)
        self._db.close()

    def _guard_free_space(self) -> None:
        """Let the database file grow only into the filesystem's free space minus ``min_free_bytes``."""
        if self.path == ":memory:" or self._db.in_transaction:
            return
        try:
            st = os.statvfs(os.path.dirname(os.path.abspath(self.path)))
        except OSError:
            return
        free = st.f_bavail * st.f_frsize
        if not self._reserve_held and self.reserve_bytes > 0 and free >= self.reserve_bytes + self.min_free_bytes:
            self._reserve_held = self._hold_reserve()  # the disk has room again
            free -= self.reserve_bytes if self._reserve_held else 0
        if self.min_free_bytes <= 0:
            return
        spare = free - self.min_free_bytes
        pages = int(self._db.execute("PRAGMA page_count").fetchone()[0])
        limit = min(_SQLITE_MAX_PAGES, pages + max(0, spare) // self._page_size)
        self._db.execute(f"PRAGMA max_page_count = {int(limit)}")

    def _hold_reserve(self) -> bool:
        """Allocate ``<db>.reserve`` (really allocated, not sparse); False if there is no room."""
        if self.path == ":memory:" or self.reserve_bytes <= 0:
            return False
        try:
            fd = os.open(self._reserve_path, os.O_WRONLY | os.O_CREAT, 0o600)
            try:
                os.posix_fallocate(fd, 0, self.reserve_bytes)
            finally:
                os.close(fd)
        except OSError:
            with contextlib.suppress(OSError):
                os.unlink(self._reserve_path)
            return False
        return True

    def _release_reserve(self) -> bool:
        """Give the reserve's space back to the filesystem; False if there was none."""
        self._reserve_held = False
        try:
            os.unlink(self._reserve_path)
        except OSError:
            return False
        log.warning("outbox %s: disk full, released the %d-byte reserve", self.path, self.reserve_bytes)
        return True

    def _checkpoint(self) -> bool:
        """Copy the WAL into the database file so the next write starts the WAL file from its
        beginning (reusing its space); False if that did not complete (e.g. the database file
        could not grow on a full disk). Never raises."""
        if self.path == ":memory:" or self._db.in_transaction:
            return False
        try:
            row = self._db.execute("PRAGMA wal_checkpoint(RESTART)").fetchone()
        except sqlite3.Error:
            return False
        return row is not None and row[0] == 0

    # --- the cap -----------------------------------------------------------------------
    def _bump(self, key: str, by: int) -> None:
        self._meta[key] = self._get(key) + by
        self._set(key, self._meta[key])

    def _count_drop_outside_txn(self, points: int) -> None:
        meta_before = dict(self._meta)
        try:
            self._db.execute("BEGIN IMMEDIATE")
            self._bump("dropped_frames", 1)
            self._bump("dropped_points", points)
            self._db.execute("COMMIT")
        except sqlite3.OperationalError:
            # Even the counter update did not fit; keep the in-memory count so the
            # metric still reports it while this process lives.
            if self._db.in_transaction:
                self._db.execute("ROLLBACK")
            self._meta = meta_before  # _bump already counted it once
            self._meta["dropped_frames"] = self._get("dropped_frames") + 1
            self._meta["dropped_points"] = self._get("dropped_points") + points

    def _victim(self, *, allow_any_kind: bool) -> tuple[int, int, int, int | None] | None:
        # Numbered frames may be in flight while online: never drop those (module doc).
        # The SQL is assembled from constant fragments only, hence the S608 waivers.
        unsent = " AND seq IS NULL" if self._online else ""
        row = self._db.execute(
            f"SELECT id, points, nbytes, seq FROM frames WHERE kind = 'telemetry'{unsent} ORDER BY id LIMIT 1"  # noqa: S608
        ).fetchone()
        if row is None and allow_any_kind:
            where = " WHERE seq IS NULL" if self._online else ""
            row = self._db.execute(f"SELECT id, points, nbytes, seq FROM frames{where} ORDER BY id LIMIT 1").fetchone()  # noqa: S608
        return row

    def _drop_one(self, *, allow_any_kind: bool) -> bool:
        """Delete the oldest droppable frame and count it, in one transaction; False if none."""
        victim = self._victim(allow_any_kind=allow_any_kind)
        if victim is None:
            return False
        row_id, points, nbytes, seq = victim
        meta_before = dict(self._meta)
        try:
            self._db.execute("BEGIN IMMEDIATE")
            self._db.execute("DELETE FROM frames WHERE id = ?", (row_id,))
            self._bump("dropped_frames", 1)
            self._bump("dropped_points", points)
            if seq is not None:
                self._db.execute("INSERT OR REPLACE INTO dropped_numbered(seq, points) VALUES (?, ?)", (seq, points))
            self._db.execute("COMMIT")
        except sqlite3.OperationalError as exc:
            if self._db.in_transaction:
                self._db.execute("ROLLBACK")
            self._meta = meta_before
            if not _is_full(exc):
                raise
            # Not even the counter row fits: delete alone and keep the count in memory for
            # as long as this process lives. In WAL mode a delete needs WAL space too; if
            # even that fails nothing was dropped (and nothing is counted).
            try:
                self._db.execute("DELETE FROM frames WHERE id = ?", (row_id,))
            except sqlite3.OperationalError as again:
                if not _is_full(again):
                    raise
                return False
            self._meta["dropped_frames"] = self._get("dropped_frames") + 1
            self._meta["dropped_points"] = self._get("dropped_points") + points
        self._frames -= 1
        self._bytes -= nbytes
        if seq is not None:
            self._assigned -= 1
        return True

    def _enforce_cap(self) -> None:
        while self._frames > self.max_frames or self._bytes > self.max_bytes:
            # Telemetry first; other kinds only when no telemetry is left to drop.
            if not self._drop_one(allow_any_kind=False) and not self._drop_one(allow_any_kind=True):
                log.warning("outbox %s over its cap but every frame is in flight", self.path)
                return


def frame_from_text(text: str) -> dict[str, Any]:
    """Parse a frame produced by the outbox (helper for tests and tools)."""
    return json.loads(text)
