"""Doorbells through the real Redis channel layer."""

import asyncio

from asgiref.sync import async_to_sync
from channels.layers import get_channel_layer

from fleet import push


def test_many_pushes_go_out_in_one_batch_and_each_reaches_its_own_device():
    layer = get_channel_layer()
    device_ids = list(range(9_000_001, 9_000_201))  # ids no other test's devices use

    async def join() -> dict[int, str]:
        channels = {}
        for device_id in device_ids:
            channels[device_id] = await layer.new_channel()
            await layer.group_add(push.device_group(device_id), channels[device_id])
        return channels

    channels = async_to_sync(join)()
    try:
        sent = push.send_many((d, {"type": "device.frame", "frame": {"n": d}}) for d in device_ids)

        async def receive_all() -> dict[int, dict]:
            return {d: await asyncio.wait_for(layer.receive(channels[d]), 5) for d in device_ids}

        received = async_to_sync(receive_all)()
    finally:
        async def leave() -> None:
            for device_id, channel in channels.items():
                await layer.group_discard(push.device_group(device_id), channel)

        async_to_sync(leave)()
    assert sent == 200
    assert all(received[d] == {"type": "device.frame", "frame": {"n": d}} for d in device_ids)


def test_a_push_without_a_channel_layer_or_messages_does_nothing(settings):
    assert push.send_many([]) == 0
