"""Doorbells to a device's live connection, from any process, through the channel layer.

Each agent connection joins a group holding only its own device (`dev.<id>`); nothing is
ever sent to a group spanning the fleet. The channel layer is at-most-once: what a push
announces is state already committed to PostgreSQL, which the connection re-reads, and
which is re-sent when the device reconnects. A failed push is logged, never raised.
"""

from __future__ import annotations

import logging

from asgiref.sync import async_to_sync
from channels.layers import get_channel_layer

log = logging.getLogger(__name__)


def device_group(device_id: int) -> str:
    return f"dev.{device_id}"


def send_to_device(device_id: int, message: dict) -> None:
    layer = get_channel_layer()
    if layer is None:
        return
    try:
        async_to_sync(layer.group_send)(device_group(device_id), message)
    except Exception:
        log.warning("push to device %s failed; it will catch up on reconnect", device_id, exc_info=True)


def status_changed(device_id: int, status: str) -> None:
    send_to_device(device_id, {"type": "device.status", "status": status})


def commands_waiting(device_id: int) -> None:
    send_to_device(device_id, {"type": "device.commands"})
