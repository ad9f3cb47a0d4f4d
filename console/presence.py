"""Coalesced presence, and liveness without WebSocket pings from the server.

Presence: heartbeats mark devices seen in memory; one UPDATE per interval. A process with
10,000 agents sending heartbeats every 30 s would otherwise write ~330 rows a second; this
writes one statement every `AGENT_PRESENCE_FLUSH_S` for all of them.

Liveness (`silence()`): the agent sends a heartbeat every `heartbeat_s`, so a connection that has
sent nothing for several heartbeat intervals is dead or stuck, and is closed. One sweep per
interval for the whole process replaces a WebSocket ping, its pong and two timers per
connection per minute (docs/protocol.md, "Keepalive").
"""

from __future__ import annotations

import asyncio
import logging
import weakref
from typing import Any

from channels.db import database_sync_to_async
from django.conf import settings

from fleet import services as fleet_services

log = logging.getLogger(__name__)


class PresenceBuffer:
    def __init__(self, interval_s: float) -> None:
        self.interval_s = interval_s
        self._seen: set[int] = set()
        self._task: asyncio.Task | None = None

    def seen(self, device_id: int) -> None:
        self._seen.add(device_id)
        if self._task is None or self._task.done():
            self._task = asyncio.get_running_loop().create_task(self._run())

    async def flush(self) -> None:
        if not self._seen:
            return
        ids, self._seen = self._seen, set()
        try:
            await database_sync_to_async(fleet_services.presence_mark_seen)(device_ids=ids)
        except Exception:
            self._seen |= ids
            log.warning("presence flush failed; will retry", exc_info=True)

    async def _run(self) -> None:
        while True:
            await asyncio.sleep(self.interval_s)
            await self.flush()
            if not self._seen:
                return


_buffer: PresenceBuffer | None = None


def presence() -> PresenceBuffer:
    global _buffer
    if _buffer is None:
        _buffer = PresenceBuffer(getattr(settings, "AGENT_PRESENCE_FLUSH_S", 5.0))
    return _buffer


class SilenceWatch:
    """Closes the connections that have sent no frame for more than `rounds` sweeps of `interval_s`.

    A watched connection resets its own `quiet` count to 0 on every frame it receives (an
    attribute store: nothing per frame here) and has an async `silent()` that closes it. Each sweep counts
    every watched connection one round quieter and closes those past `rounds`: a connection is
    closed between `rounds` and `rounds + 1` intervals after its last frame.
    """

    def __init__(self, interval_s: float, rounds: int) -> None:
        self.interval_s = interval_s
        self.rounds = rounds
        self.watched: set[Any] = set()
        self._task: asyncio.Task | None = None
        self._closing: set[asyncio.Task] = set()

    def watch(self, conn: Any) -> None:
        conn.quiet = 0
        self.watched.add(conn)
        if self._task is None or self._task.done():
            self._task = asyncio.get_running_loop().create_task(self._run())

    def forget(self, conn: Any) -> None:
        self.watched.discard(conn)

    def sweep(self) -> list[Any]:
        """One round: the connections now silent too long (no longer watched)."""
        silent = []
        for conn in self.watched:
            conn.quiet += 1
            if conn.quiet > self.rounds:
                silent.append(conn)
        self.watched.difference_update(silent)
        return silent

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        while self.watched:
            await asyncio.sleep(self.interval_s)
            for conn in self.sweep():
                task = loop.create_task(conn.silent())
                self._closing.add(task)
                task.add_done_callback(self._closing.discard)


_watches: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, SilenceWatch] = weakref.WeakKeyDictionary()


def silence() -> SilenceWatch:
    """This event loop's silence watch: sweeps every `AGENT_HEARTBEAT_S`, closes after
    `AGENT_SILENT_HEARTBEATS` (3) intervals without a frame."""
    loop = asyncio.get_running_loop()
    if loop not in _watches:
        _watches[loop] = SilenceWatch(settings.AGENT_HEARTBEAT_S, getattr(settings, "AGENT_SILENT_HEARTBEATS", 3))
    return _watches[loop]
