"""Agent protocol v1 handshake against a real server over real sockets."""

import asyncio
import json
import time

import pytest

from agent_stub import protocol as p
from fleet import services as fleet_services
from fleet.models import Device
from security import services as security_services
from security.models import DeviceKey
from tests.agent.rawagent import RawAgent, in_db, public_bytes, run

pytestmark = pytest.mark.django_db(transaction=True)



def test_enroll_is_pending_until_an_operator_approves_then_welcome_says_active(console_server, enrollment_token):
    token = enrollment_token()

    async def scenario():
        agent = RawAgent(console_server.ws_url, "gw-1")
        welcome = await agent.enroll(token)
        assert welcome["type"] == "welcome" and welcome["status"] == "pending"
        assert welcome["last_acked_seq"] == 0
        # Pending devices may only send heartbeats.
        await agent.telemetry(1, [[p.now_ms(), "cpu.load", 0.5]])
        assert (await agent.recv())["code"] == "not_allowed"
        device = await in_db(Device.objects.get, uid="gw-1")
        await in_db(fleet_services.device_approve, actor="test", device=device)
        welcome = await agent.recv_type("welcome")
        assert welcome["status"] == "active"
        await agent.close()

    run(scenario())
    assert Device.objects.get(uid="gw-1").status == "active"


def test_auto_approve_token_enrolls_an_active_device_with_token_labels(console_server, enrollment_token):
    token = enrollment_token(auto_approve=True, labels={"batch": "b7"})
    welcome = run(RawAgent(console_server.ws_url, "gw-2").enroll(token))
    assert welcome["status"] == "active"
    device = Device.objects.get(uid="gw-2")
    assert device.labels == {"batch": "b7"}
    assert device.hardware_model == "test-box" and device.tier == 2


def test_known_device_authenticates_and_later_reconnects(console_server, enrollment_token):
    token = enrollment_token(auto_approve=True)

    async def scenario():
        agent = RawAgent(console_server.ws_url, "gw-3")
        await agent.enroll(token)
        await agent.close()
        welcome = await agent.auth()
        assert welcome["type"] == "welcome" and welcome["status"] == "active"
        await agent.close()

    run(scenario())


def test_forged_signature_is_refused_with_4401(console_server, enrollment_token):
    token = enrollment_token(auto_approve=True)

    async def scenario():
        agent = RawAgent(console_server.ws_url, "gw-4")
        await agent.enroll(token)
        await agent.close()
        impostor = RawAgent(console_server.ws_url, "gw-4")  # a different key
        await impostor.open()
        await impostor.send({"type": "auth", "device_uid": "gw-4", "sig": impostor.sign(), "agent_version": "t"})
        error = await impostor.recv()
        assert error["type"] == "error" and error["code"] == "auth_failed"
        return await impostor.closed_code()

    assert run(scenario()) == 4401


def test_a_replayed_auth_frame_from_another_connection_is_refused(console_server, enrollment_token):
    token = enrollment_token(auto_approve=True)

    async def scenario():
        agent = RawAgent(console_server.ws_url, "gw-5")
        await agent.enroll(token)
        await agent.close()
        await agent.open()
        captured = {"type": "auth", "device_uid": "gw-5", "sig": agent.sign(), "agent_version": "t"}
        await agent.send(captured)
        assert (await agent.recv())["type"] == "welcome"
        await agent.close()
        attacker = RawAgent(console_server.ws_url, "gw-5")
        await attacker.open()  # a fresh nonce: the captured signature covers the old one
        await attacker.send(captured)
        return await attacker.closed_code()

    assert run(scenario()) == 4401


def test_a_second_auth_on_the_same_connection_is_a_protocol_error(console_server, enrollment_token):
    token = enrollment_token(auto_approve=True)

    async def scenario():
        agent = RawAgent(console_server.ws_url, "gw-6")
        await agent.enroll(token)
        await agent.send({"type": "auth", "device_uid": "gw-6", "sig": agent.sign(), "agent_version": "t"})
        return await agent.closed_code()

    assert run(scenario()) == 4400


@pytest.mark.parametrize("problem", ["spent", "expired", "unknown", "revoked"])
def test_an_unusable_token_is_refused_and_creates_nothing(console_server, enrollment_token, problem):
    from datetime import timedelta

    from django.utils import timezone

    from security.models import EnrollmentToken

    secret = enrollment_token(max_uses=1)
    token = EnrollmentToken.objects.get(secret_hash=security_services.token_digest(secret))
    if problem == "spent":
        run(RawAgent(console_server.ws_url, "first").enroll(secret))
    elif problem == "expired":
        EnrollmentToken.objects.filter(pk=token.pk).update(expires_at=timezone.now() - timedelta(seconds=1))
    elif problem == "unknown":
        secret = "fet_not-a-real-token"
    else:
        security_services.enrollment_token_revoke(actor="test", token=token)
    devices_before = Device.objects.count()

    async def scenario():
        agent = RawAgent(console_server.ws_url, "late-comer")
        reply = await agent.enroll(secret)
        assert reply["type"] == "error" and reply["code"] == "auth_failed"
        return await agent.closed_code()

    assert run(scenario()) == 4401
    assert Device.objects.count() == devices_before
    assert not Device.objects.filter(uid="late-comer").exists()


def test_a_preauthorized_device_authenticates_without_a_token(console_server):
    agent = RawAgent(console_server.ws_url, "pre-1")
    security_services.device_preauthorize(actor="test", uid="pre-1", public_key=public_bytes(agent.key), approve=True)
    assert run(agent.auth())["status"] == "active"


def test_a_revoked_device_gets_4403_now_and_on_its_next_connect(console_server, enrollment_token):
    token = enrollment_token(auto_approve=True)

    async def scenario():
        agent = RawAgent(console_server.ws_url, "gw-7")
        await agent.enroll(token)
        device = await in_db(Device.objects.get, uid="gw-7")
        await in_db(security_services.device_revoke, actor="test", device=device, reason="stolen")
        first = await agent.closed_code()
        again = RawAgent(console_server.ws_url, "gw-7", key=agent.key)
        reply = await again.auth()
        assert reply["code"] == "revoked"
        return first, await again.closed_code()

    assert run(scenario()) == (4403, 4403)
    assert not DeviceKey.objects.filter(device__uid="gw-7", state="active").exists()


def test_a_second_connection_replaces_the_first_with_4409(console_server, enrollment_token):
    token = enrollment_token(auto_approve=True)

    async def scenario():
        first = RawAgent(console_server.ws_url, "gw-8")
        await first.enroll(token)
        second = RawAgent(console_server.ws_url, "gw-8", key=first.key)
        assert (await second.auth())["type"] == "welcome"
        code = await first.closed_code()
        # The survivor is still served.
        await second.send({"type": "heartbeat", "t": p.now_ms(), "uptime_s": 5, "buffered": 0})
        await second.send({"type": "bogus"})
        assert (await second.recv_type("error"))["code"] == "unknown_type"
        await second.close()
        return code

    assert run(scenario()) == 4409


def test_an_oversize_frame_is_refused_with_4413(console_server, enrollment_token):
    token = enrollment_token(auto_approve=True)

    async def scenario():
        agent = RawAgent(console_server.ws_url, "gw-9")
        await agent.enroll(token)
        await agent.send(json.dumps({"type": "heartbeat", "pad": "x" * (300 * 1024)}))
        return await agent.closed_code()

    assert run(scenario()) == 4413


def test_bad_json_before_the_handshake_is_a_4400(console_server):
    async def scenario():
        agent = RawAgent(console_server.ws_url, "gw-10")
        await agent.open()
        await agent.send("{not json")
        return await agent.closed_code()

    assert run(scenario()) == 4400


def test_a_silent_client_is_cut_off_with_4408(transactional_db):
    from django.db import connection

    from tests.harness import ConsoleServer

    server = ConsoleServer(connection.settings_dict, extra_env={"AGENT_HANDSHAKE_TIMEOUT_S": "0.5"}).start()
    try:
        async def scenario():
            agent = RawAgent(server.ws_url, "silent")
            await agent.open()
            started = time.monotonic()
            code = await agent.closed_code()
            return code, time.monotonic() - started

        code, waited = run(scenario())
        assert code == 4408 and waited < 5
    finally:
        server.stop()


def test_a_device_whose_auth_outlasts_the_handshake_deadline_does_not_come_online(transactional_db, enrollment_token):
    import psycopg
    from django.db import connection

    from fleet.models import PresenceEvent
    from tests.harness import ConsoleServer, database_url_for

    server = ConsoleServer(connection.settings_dict, extra_env={"AGENT_HANDSHAKE_TIMEOUT_S": "1"}).start()
    token = enrollment_token(auto_approve=True)
    try:
        async def scenario():
            agent = RawAgent(server.ws_url, "slow-auth")
            assert (await agent.enroll(token))["status"] == "active"
            await agent.close()
            await asyncio.sleep(1)  # the enrollment session is over
            # The database is slow to answer: the auth check waits on a table lock past the deadline.
            with psycopg.connect(database_url_for(connection.settings_dict)) as blocker:
                blocker.execute("LOCK TABLE fleet_device IN ACCESS EXCLUSIVE MODE")
                again = RawAgent(server.ws_url, "slow-auth", key=agent.key)
                await again.open()
                await again.send({"type": "auth", "device_uid": "slow-auth", "sig": again.sign(),
                                  "agent_version": "test"})
                code = await again.closed_code(timeout=5)
            await asyncio.sleep(2)  # lock released: the verification finishes after the close
            return code

        assert run(scenario()) == 4408
        device = Device.objects.get(uid="slow-auth")
        assert not device.online
        assert list(PresenceEvent.objects.filter(device=device).order_by("id").values_list("kind", flat=True)) == [
            "connected", "disconnected"]  # the enrollment session only
    finally:
        server.stop()


def test_handshakes_beyond_the_admission_backlog_are_shed_with_4503_and_a_retry_hint(transactional_db,
                                                                                    enrollment_token):
    """One handshake at a time and none waiting: while the first is held up in the database,
    the next is refused at once (before anything is read or written for it), and both devices
    get in once the first finishes."""
    import psycopg
    from django.db import connection

    from tests.harness import ConsoleServer, database_url_for

    server = ConsoleServer(connection.settings_dict, extra_env={
        "AGENT_HANDSHAKE_CONCURRENCY": "1", "AGENT_HANDSHAKE_BACKLOG": "0", "AGENT_HANDSHAKE_RETRY_MS": "2000"}).start()
    token = enrollment_token(auto_approve=True)
    try:
        async def scenario():
            first, second = RawAgent(server.ws_url, "adm-first"), RawAgent(server.ws_url, "adm-second")
            for agent in (first, second):
                assert (await agent.enroll(token))["status"] == "active"
                await agent.close()
            with psycopg.connect(database_url_for(connection.settings_dict)) as blocker:
                blocker.execute("LOCK TABLE fleet_device IN ACCESS EXCLUSIVE MODE")  # the first auth waits here
                first, second = (RawAgent(server.ws_url, a.uid, key=a.key) for a in (first, second))
                await first.open()
                await first.send({"type": "auth", "device_uid": first.uid, "sig": first.sign(), "agent_version": "t"})
                await asyncio.sleep(0.5)
                await second.open()
                await second.send({"type": "auth", "device_uid": second.uid, "sig": second.sign(),
                                   "agent_version": "t"})
                shed = await second.recv(timeout=2)  # answered while the table is still locked
                shed_code = await second.closed_code(timeout=2)
            welcome = await first.recv()
            retry = RawAgent(server.ws_url, second.uid, key=second.key)
            assert (await retry.auth())["type"] == "welcome"
            await first.close()
            await retry.close()
            return shed, shed_code, welcome

        shed, shed_code, welcome = run(scenario())
        assert shed_code == 4503
        assert shed["type"] == "error" and shed["code"] == "overloaded"
        assert 1000 <= shed["retry_after_ms"] <= 2000
        assert welcome["type"] == "welcome" and welcome["device_uid"] == "adm-first"
    finally:
        server.stop()


def test_a_device_flooding_messages_is_rate_limited_with_4429(transactional_db, enrollment_token):
    from django.db import connection

    from tests.harness import ConsoleServer

    server = ConsoleServer(connection.settings_dict, extra_env={"AGENT_RATE_PER_S": "5", "AGENT_RATE_BURST": "10"})
    server.start()
    token = enrollment_token(auto_approve=True)
    try:
        async def scenario():
            agent = RawAgent(server.ws_url, "chatty")
            await agent.enroll(token)
            for _ in range(40):
                await agent.send({"type": "heartbeat", "t": p.now_ms(), "uptime_s": 1, "buffered": 0})
            error = await agent.recv_type("error")
            assert error["code"] == "rate_limited" and error["retry_after_ms"] > 0
            return await agent.closed_code()

        assert run(scenario()) == 4429
    finally:
        server.stop()


def test_presence_follows_the_connection(console_server, enrollment_token):
    token = enrollment_token(auto_approve=True)

    async def scenario():
        agent = RawAgent(console_server.ws_url, "gw-11")
        await agent.enroll(token)
        online = await in_db(lambda: Device.objects.get(uid="gw-11").online)
        await agent.close()
        for _ in range(50):
            if not await in_db(lambda: Device.objects.get(uid="gw-11").online):
                return online, False
            await asyncio.sleep(0.1)
        return online, True

    assert run(scenario()) == (True, False)


def test_queued_commands_reach_the_device_and_results_are_recorded(console_server, enrollment_token):

    token = enrollment_token(auto_approve=True)
    agent = RawAgent(console_server.ws_url, "gw-12")

    async def enroll_and_leave():
        await agent.enroll(token)
        await agent.close()

    run(enroll_and_leave())
    device = Device.objects.get(uid="gw-12")
    command = fleet_services.command_issue(actor="test", device=device, name="sync_state")

    async def scenario():
        assert (await agent.auth())["type"] == "welcome"
        frame = await agent.recv_type("command")
        assert frame["command_id"] == str(command.id) and frame["name"] == "sync_state"
        await agent.send({"type": "command.result", "seq": 1, "command_id": frame["command_id"], "ok": True,
                          "output": "sent state"})
        ack = await agent.recv_type("ack")
        assert ack["seq"] == 1
        await agent.close()

    run(scenario())
    command.refresh_from_db()
    assert command.state == "succeeded" and command.output == "sent state"


def test_a_command_lost_with_its_connection_is_sent_again_on_the_next_session(console_server, enrollment_token):
    token = enrollment_token(auto_approve=True)
    agent = RawAgent(console_server.ws_url, "gw-13")

    async def scenario():
        await agent.enroll(token)
        device = await in_db(Device.objects.get, uid="gw-13")
        command = await in_db(fleet_services.command_issue, actor="test", device=device, name="reboot")
        first = await agent.recv_type("command")
        await agent.close()  # gone before answering
        await agent.auth()
        again = await agent.recv_type("command")
        await agent.close()
        return str(command.id), first["command_id"], again["command_id"]

    issued, first, again = run(scenario())
    assert issued == first == again


def test_a_device_that_leaves_before_its_connection_is_set_up_is_cleaned_up_without_an_error():
    from asgiref.testing import ApplicationCommunicator

    from console.agent_consumer import AgentConsumer

    async def scenario():
        app = ApplicationCommunicator(AgentConsumer.as_asgi(), {
            "type": "websocket", "path": "/ws/agent/v1/", "headers": [], "subprotocols": [],
            "client": ("127.0.0.1", 50000), "server": ("127.0.0.1", 8000)})
        await app.send_input({"type": "websocket.disconnect", "code": 1006})  # gone before `connect` ran
        await app.wait(timeout=5)  # raises what the application raised

    run(scenario())
