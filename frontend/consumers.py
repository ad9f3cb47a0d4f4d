"""The dashboard socket, /ws/ui/: session-authenticated, coalesced pushes (frontend.live).

Protocol (JSON):
  page → {"subscribe": {"nav": {}, "alerts": {"after": 41}, "presence": {"ids": [1, 2]}}}
  server → {"type": "delta", "alerts": {...}, "presence": {...}}   at most one per second
  server → {"type": "refused", "topics": {"name": "reason"}}
Anonymous sockets are accepted then closed with 4401 (so the page sees the code, not a bare
handshake failure); users without a dashboard role get 4403.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from typing import Any

from channels.db import database_sync_to_async
from channels.generic.websocket import AsyncJsonWebsocketConsumer

from frontend import live
from frontend.access import VIEW

log = logging.getLogger(__name__)

MIN_INTERVAL_S = 1.0


class UiConsumer(AsyncJsonWebsocketConsumer):
    # Nothing is sent to a dashboard through the channel layer (it polls PostgreSQL):
    # not listening on it keeps open pages live while Redis is down (alias None = no layer).
    channel_layer_alias = None

    async def connect(self) -> None:
        user = self.scope.get("user")
        await self.accept()
        if user is None or not user.is_authenticated:
            await self.close(code=4401)
            return
        perms = await database_sync_to_async(user.get_all_permissions)()
        if VIEW not in perms and not user.is_superuser:
            await self.close(code=4403)
            return
        self.allowed = set(perms) | ({*live.TOPIC_PERMS.values()} if user.is_superuser else set())
        self.state: dict[str, Any] = {}
        self.pending: dict[str, Any] = {}
        self.wake = asyncio.Event()
        self.task = asyncio.create_task(self._run())

    async def disconnect(self, code: int) -> None:
        task = getattr(self, "task", None)
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task

    async def receive_json(self, content: Any, **kwargs: Any) -> None:
        if not hasattr(self, "task"):
            return
        topics = content.get("subscribe") if isinstance(content, dict) else None
        if not isinstance(topics, dict):
            await self.send_json({"type": "error", "detail": 'send {"subscribe": {topic: options}}'})
            return
        self.pending.update(topics)
        self.wake.set()

    async def _run(self) -> None:
        last_push = 0.0
        while True:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.wake.wait(), timeout=MIN_INTERVAL_S)
            # Coalesce: never more than one push per MIN_INTERVAL_S, whatever woke us.
            wait = last_push + MIN_INTERVAL_S - time.monotonic()
            if wait > 0:
                await asyncio.sleep(wait)
            self.wake.clear()
            try:
                refused = {}
                if self.pending:
                    pending, self.pending = self.pending, {}
                    refused = live.subscribe(self.state, pending, self.allowed)
                if refused:
                    await self.send_json({"type": "refused", "topics": refused})
                if not self.state:
                    continue
                delta = await database_sync_to_async(live.poll)(self.state)
            except asyncio.CancelledError:
                raise
            except Exception:
                log.exception("dashboard poll failed; retrying next tick")
                continue
            if delta:
                await self.send_json({"type": "delta", **delta})
                last_push = time.monotonic()
