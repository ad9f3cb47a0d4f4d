"""Keepalive without server pings: heartbeats are the liveness signal (docs/protocol.md, "Keepalive").

A real uvicorn server with a 1 s heartbeat interval, so "three heartbeat intervals" is seconds.
"""

import asyncio
import contextlib
import time

import pytest
from django.db import connection

from agent_stub import protocol as p
from fleet.models import Device
from tests.agent.rawagent import enroll_active, in_db, run
from tests.harness import ConsoleServer

pytestmark = pytest.mark.django_db(transaction=True)


@pytest.fixture
def fast_heartbeat_server(transactional_db):
    server = ConsoleServer(connection.settings_dict, extra_env={"AGENT_HEARTBEAT_S": "1"}).start()
    yield server
    server.stop()


def test_the_server_does_not_ping_agents_over_websocket(fast_heartbeat_server):
    """The flags the console runs with switch uvicorn's pings off (the silence watch replaces them)."""
    args = fast_heartbeat_server.proc.args
    assert args[args.index("--ws-ping-interval") + 1] == "0"


def test_a_device_that_falls_silent_is_closed_after_three_heartbeat_intervals_and_goes_offline(
        fast_heartbeat_server, enrollment_token):
    token = enrollment_token(auto_approve=True)

    async def scenario():
        agent = await enroll_active(fast_heartbeat_server.ws_url, "quiet-1", token)
        assert (await in_db(Device.objects.get, uid="quiet-1")).online
        last_frame = time.monotonic()  # the enroll frame; from here on the agent sends nothing
        frames = []
        try:
            while True:
                frames.append(await agent.recv(timeout=15))
        except Exception as exc:  # noqa: BLE001 -- the close is what we wait for
            closed = exc
        silent_for = time.monotonic() - last_frame
        return frames, closed, silent_for

    frames, closed, silent_for = run(scenario())
    assert getattr(getattr(closed, "rcvd", None), "code", None) == p.Close.GOING_AWAY, closed
    assert [f["code"] for f in frames if f["type"] == "error"] == ["silent"]
    # Closed between 3 and 4 sweeps (of 1 s) after its last frame; allow for a loaded machine.
    assert 2.9 <= silent_for < 8, silent_for
    deadline = time.monotonic() + 10
    while Device.objects.get(uid="quiet-1").online and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not Device.objects.get(uid="quiet-1").online


def test_a_device_that_sends_heartbeats_stays_connected_well_past_the_silence_limit(fast_heartbeat_server,
                                                                                    enrollment_token):
    token = enrollment_token(auto_approve=True)

    async def scenario():
        agent = await enroll_active(fast_heartbeat_server.ws_url, "chatty-1", token)
        received = []
        loop = asyncio.get_running_loop()
        end = loop.time() + 7  # more than twice the 3-4 s a silent connection lasts
        while loop.time() < end:
            await agent.send(p.heartbeat(p.now_ms(), 1, 0))
            with contextlib.suppress(TimeoutError):
                received.append(await agent.recv(timeout=0.8))
        # Still open: a frame that needs an answer gets one.
        await agent.send({"type": "no.such.type"})
        answer = await agent.recv_type("error", timeout=5)
        await agent.close()
        return received, answer

    received, answer = run(scenario())
    assert answer["code"] == "unknown_type"
    assert not [f for f in received if f["type"] == "error"], received
