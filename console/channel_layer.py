"""The Channels layer the console runs: channels_redis's, receiving in batches.

channels_redis delivers a process's messages one at a time: each takes a Lua clean-up script, a
`BZPOPMIN`, a `ZADD` to a backup queue and a `ZPOPMIN` of it, one after the other, each waiting
for a turn of the event loop. On a busy server (thousands of agent connections, downloads,
status frames) a turn takes tens of milliseconds, so a burst of pushes — a rollout step's
offers to hundreds of devices — reached them at ~5-15 per second whatever the orchestrator's
pace (docs/benchmarks.md).

Here, after the usual blocking receive of one message, whatever else is already queued for this
process (up to `DRAIN`) is popped in one `ZPOPMIN` and handed to its consumers. Order is kept:
the extra messages are buffered after the first one. They skip channels_redis's backup queue,
which only matters if the process dies between that pop and the handoff: the layer is a
doorbell (fleet/push.py), and what a lost push announced is re-read on reconnect, and offers
are re-sent by the orchestrator (`_redeliver_lost`).
"""

from __future__ import annotations

import asyncio
import logging

from channels_redis.core import RedisChannelLayer

log = logging.getLogger(__name__)


class BatchingRedisChannelLayer(RedisChannelLayer):
    DRAIN = 500  # most extra messages taken in one round trip

    async def receive_single(self, channel):
        first_channel, first = await super().receive_single(channel)
        if "!" not in channel:
            return first_channel, first
        drain = asyncio.ensure_future(self._pop_queued(channel))
        try:
            extra = await asyncio.shield(drain)
        except asyncio.CancelledError:
            # The receiving consumer went away: keep the first message and, once popped, the rest.
            self._buffer([(first_channel, first)])
            drain.add_done_callback(lambda task: None if task.cancelled() else self._buffer(task.result()))
            raise
        if extra:
            # After `receive` has buffered the first one (synchronously, when this returns).
            asyncio.get_running_loop().call_soon(self._buffer, extra)
        return first_channel, first

    async def _pop_queued(self, channel: str) -> list[tuple[str | list, dict]]:
        try:
            popped = await self.connection(self.consistent_hash(channel)).zpopmin(self.prefix + channel, self.DRAIN)
        except Exception:  # Redis unreachable: they stay queued for the next blocking receive
            log.debug("could not drain %s", channel, exc_info=True)
            return []
        out = []
        for content, _score in popped:
            message = self.deserialize(content)
            out.append((message.pop("__asgi_channel__", channel), message))
        return out

    def _buffer(self, messages: list[tuple[str | list, dict]]) -> None:
        for target, message in messages:
            for name in target if isinstance(target, list) else [target]:
                self.receive_buffer[name].put_nowait(message)
