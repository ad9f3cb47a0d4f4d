"""The console's channel layer (console/channel_layer.py) against the real Redis: a burst of
messages to many connections of one process all arrive, each connection's in the order sent,
and they are drained in batches rather than one Redis round trip per message."""

import asyncio

from django.conf import settings

from console.channel_layer import BatchingRedisChannelLayer


def make_layer() -> BatchingRedisChannelLayer:
    return BatchingRedisChannelLayer(**settings.CHANNEL_LAYERS["default"]["CONFIG"])


def test_a_burst_to_many_connections_arrives_complete_and_in_order_per_connection():
    async def scenario():
        layer = make_layer()
        channels = [await layer.new_channel() for _ in range(60)]
        received: dict[str, list[int]] = {c: [] for c in channels}
        pops = 0
        original = layer._pop_queued

        async def counting(channel):
            nonlocal pops
            pops += 1
            return await original(channel)

        layer._pop_queued = counting

        async def consume(channel):
            while len(received[channel]) < 10:
                received[channel].append((await layer.receive(channel))["n"])

        # The burst is queued in Redis faster than a busy server's loop takes it out (here: all
        # of it before the connections read), as a rollout step's offers are.
        for n in range(10):
            for channel in channels:
                await layer.send(channel, {"type": "test.message", "n": n})
        consumers = [asyncio.create_task(consume(c)) for c in channels]
        await asyncio.wait_for(asyncio.gather(*consumers), 20)
        await layer.flush()
        await layer.close_pools()
        return received, pops

    received, pops = asyncio.run(scenario())
    assert all(got == list(range(10)) for got in received.values())
    assert pops <= 3  # a few receive round trips for 600 messages, not one each
