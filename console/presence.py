"""Coalesced presence: heartbeats mark devices seen in memory; one UPDATE per interval.

A process with 10,000 agents sending heartbeats every 30 s would otherwise write ~330
rows a second; this writes one statement every `AGENT_PRESENCE_FLUSH_S` for all of them.
"""

from __future__ import annotations

import asyncio
import logging

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
