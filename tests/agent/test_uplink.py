"""Durable uplink over real sockets: acks follow commits, exactly-once, order, isolation."""


import pytest
from django.db import connection

from agent_stub import protocol as p
from fleet.models import Device, UplinkCursor
from tests.agent.rawagent import RawAgent, in_db, run

pytestmark = pytest.mark.django_db(transaction=True)



def stored_points(uid: str) -> list[tuple[int, str, float]]:
    with connection.cursor() as cursor:
        cursor.execute(
            "SELECT (extract(epoch FROM p.time) * 1000)::bigint, m.name, p.value FROM telemetry_point p "
            "JOIN telemetry_metric m ON m.id = p.metric_id JOIN fleet_device d ON d.id = p.device_id "
            "WHERE d.uid = %s ORDER BY p.time, m.name", [uid])
        return [tuple(row) for row in cursor.fetchall()]


async def active_agent(url: str, uid: str, token: str) -> RawAgent:
    agent = RawAgent(url, uid)
    welcome = await agent.enroll(token)
    assert welcome["status"] == "active"
    return agent


def test_telemetry_is_acked_only_once_its_points_are_committed(console_server, enrollment_token):
    token = enrollment_token(auto_approve=True)
    now = p.now_ms()

    async def scenario():
        agent = await active_agent(console_server.ws_url, "up-1", token)
        await agent.telemetry(1, [[now, "sensor.temp_c", 21.5], [now + 1, "sensor.temp_c", 21.7]])
        ack = await agent.recv_type("ack")
        # At the moment the ack arrives the rows are already visible to another connection.
        rows = await in_db(stored_points, "up-1")
        cursor = await in_db(lambda: UplinkCursor.objects.get(device__uid="up-1").last_acked_seq)
        await agent.close()
        return ack, rows, cursor

    ack, rows, cursor = run(scenario())
    assert ack == {"type": "ack", "seq": 1, "accepted": 2, "rejected": []}
    assert rows == [(now, "sensor.temp_c", 21.5), (now + 1, "sensor.temp_c", 21.7)]
    assert cursor == 1


def test_bad_points_are_rejected_one_by_one_and_the_rest_stored(console_server, enrollment_token):
    token = enrollment_token(auto_approve=True)
    now = p.now_ms()

    async def scenario():
        agent = await active_agent(console_server.ws_url, "up-2", token)
        await agent.send('{"type":"telemetry","seq":1,"points":[[%d,"ok.metric",1],[%d,"Bad-Name",2],'  # noqa: UP031 -- a NaN literal json.dumps would never write
                         '[%d,"ok.metric",NaN],[%d,"ok.metric",3],[%d,"ok.metric",true]]}' % (now, now, now, now + 1, now))
        first = await agent.recv_type("ack", "error")
        await agent.send({"type": "telemetry", "seq": 1, "points": [
            [now, "ok.metric", 1], [now, "Bad-Name", 2], [now - 400 * 86_400_000, "ok.metric", 5],
            [now + 1, "ok.metric", 3], [now, "ok.metric", True]]})
        ack = await agent.recv_type("ack")
        await agent.close()
        return first, ack

    first, ack = run(scenario())
    assert first["type"] == "error" and first["code"] == "bad_frame"  # NaN is not JSON: the frame is refused whole
    assert ack["accepted"] == 2
    assert ack["rejected"] == [{"index": 1, "reason": "bad_metric_name"}, {"index": 2, "reason": "time_out_of_range"},
                               {"index": 4, "reason": "bad_value"}]
    assert [r[2] for r in stored_points("up-2")] == [1.0, 3.0]


def test_resent_frames_are_acked_again_and_stored_once_and_gaps_are_reported(console_server, enrollment_token):
    token = enrollment_token(auto_approve=True)
    now = p.now_ms()

    async def scenario():
        agent = await active_agent(console_server.ws_url, "up-3", token)
        for seq in (1, 2):
            await agent.telemetry(seq, [[now + seq, "m.x", float(seq)]])
        acks = [(await agent.recv_type("ack"))["seq"] for _ in range(2)]
        await agent.telemetry(1, [[now + 1, "m.x", 1.0]])  # a resend after a lost ack
        again = await agent.recv_type("ack")
        await agent.telemetry(5, [[now + 5, "m.x", 5.0]])
        gap = await agent.recv_type("error")
        await agent.close()
        # Reconnect: the server says where to resume.
        welcome = await agent.auth()
        await agent.close()
        return acks, again, gap, welcome

    acks, again, gap, welcome = run(scenario())
    assert acks == [1, 2]
    assert again == {"type": "ack", "seq": 1, "accepted": 0, "rejected": []}
    assert gap["code"] == "seq_gap" and gap["expected"] == 3
    assert welcome["last_acked_seq"] == 2
    assert [r[2] for r in stored_points("up-3")] == [1.0, 2.0]


def test_mixed_durable_frames_are_applied_in_order(console_server, enrollment_token):
    token = enrollment_token(auto_approve=True)
    now = p.now_ms()

    async def scenario():
        agent = await active_agent(console_server.ws_url, "up-4", token)
        await agent.telemetry(1, [[now, "m.a", 1.0]])
        await agent.send(p.state(2, {"agent": "1.4.0", "model": "anomaly-1.0.0", "firmware": None},
                                 {"cpu_cores": 8, "ram_mb": 32768, "accelerator": "gpu", "storage_mb": 64000,
                                  "arch": "aarch64", "os": "Debian 12"}))
        await agent.telemetry(3, [[now + 1, "m.a", 2.0]])
        await agent.send(p.event(4, [p.event_item(now, "inference", "warning", "anomaly score 0.97",
                                                  {"score": 0.97})]))
        acks = [(await agent.recv_type("ack"))["seq"] for _ in range(4)]
        await agent.close()
        return acks

    assert run(scenario()) == [1, 2, 3, 4]
    device = Device.objects.get(uid="up-4")
    assert device.installed_versions == {"agent": "1.4.0", "model": "anomaly-1.0.0"}
    assert device.tier == 1 and device.arch == "aarch64"
    assert UplinkCursor.objects.get(device=device).last_acked_seq == 4
    from telemetry.models import DeviceEvent

    assert DeviceEvent.objects.get(device=device).message == "anomaly score 0.97"


def test_a_device_can_only_write_its_own_data(console_server, enrollment_token):
    token = enrollment_token(auto_approve=True)
    now = p.now_ms()

    async def scenario():
        a = await active_agent(console_server.ws_url, "iso-a", token)
        b = await active_agent(console_server.ws_url, "iso-b", token)
        # Fields naming another device are ignored: the connection's identity decides.
        await a.send({"type": "telemetry", "seq": 1, "device_uid": "iso-b", "device_id": 2,
                      "points": [[now, "m.x", 42.0]]})
        await a.recv_type("ack")
        await a.close()
        await b.close()

    run(scenario())
    assert stored_points("iso-a") == [(now, "m.x", 42.0)]
    assert stored_points("iso-b") == []
    assert UplinkCursor.objects.get(device__uid="iso-b").last_acked_seq == 0


def test_a_refused_state_frame_is_acked_as_rejected_so_the_agent_moves_on(console_server, enrollment_token):
    token = enrollment_token(auto_approve=True)

    async def scenario():
        agent = await active_agent(console_server.ws_url, "up-5", token)
        await agent.send(p.state(1, {"agent": "1.0"}, {"cpu_cores": 1, "ram_mb": 2**40, "accelerator": "none",
                                                         "storage_mb": 1, "arch": "x", "os": "y"}))
        ack = await agent.recv_type("ack", "error")
        await agent.close()
        return ack

    ack = run(scenario())
    assert ack["type"] == "ack" and ack["accepted"] == 0 and ack["rejected"][0]["index"] == 0
    assert UplinkCursor.objects.get(device__uid="up-5").last_acked_seq == 1


def test_a_frame_that_does_not_fit_the_ingest_queue_waits_for_room_and_is_stored(transactional_db,
                                                                                 enrollment_token):
    from tests.harness import ConsoleServer

    # The second frame does not fit until the first is flushed (after 1.5 s): it waits, the
    # connection stays open, and both are acked in order.
    server = ConsoleServer(connection.settings_dict, extra_env={
        "TELEMETRY_QUEUE_MAX_ROWS": "5", "TELEMETRY_FLUSH_INTERVAL_MS": "1500", "TELEMETRY_QUEUE_WAIT_MS": "5000"}).start()
    token = enrollment_token(auto_approve=True)
    now = p.now_ms()
    try:
        async def scenario():
            agent = await active_agent(server.ws_url, "patient-1", token)
            await agent.telemetry(1, [[now + i, "m.x", float(i)] for i in range(20)])
            await agent.telemetry(2, [[now + 100 + i, "m.x", float(i)] for i in range(20)])
            return [await agent.recv_type("ack"), await agent.recv_type("ack")]

        acks = run(scenario())
    finally:
        server.stop()
    assert [(a["seq"], a["accepted"]) for a in acks] == [(1, 20), (2, 20)]
    assert len(stored_points("patient-1")) == 40
    assert UplinkCursor.objects.get(device__uid="patient-1").last_acked_seq == 2


def test_a_full_ingest_queue_sheds_the_device_with_4503_after_acking_what_it_stored(transactional_db,
                                                                                      enrollment_token):
    from tests.harness import ConsoleServer

    # A tiny queue and a slow flush timer: the first frame waits in the queue, the second
    # one does not fit, and no waiting for room.
    server = ConsoleServer(connection.settings_dict, extra_env={
        "TELEMETRY_QUEUE_MAX_ROWS": "5", "TELEMETRY_FLUSH_INTERVAL_MS": "1500", "TELEMETRY_QUEUE_WAIT_MS": "0"}).start()
    token = enrollment_token(auto_approve=True)
    now = p.now_ms()
    try:
        async def scenario():
            agent = await active_agent(server.ws_url, "busy-1", token)
            await agent.telemetry(1, [[now + i, "m.x", float(i)] for i in range(20)])
            await agent.telemetry(2, [[now + 100 + i, "m.x", float(i)] for i in range(20)])
            ack = await agent.recv_type("ack")
            error = await agent.recv_type("error")
            return ack, error, await agent.closed_code()

        ack, error, code = run(scenario())
    finally:
        server.stop()
    assert ack["seq"] == 1 and ack["accepted"] == 20
    assert error["code"] == "rate_limited" and error["retry_after_ms"] > 0
    assert code == 4503
    assert len(stored_points("busy-1")) == 20  # frame 2 was refused whole, never half-stored
    assert UplinkCursor.objects.get(device__uid="busy-1").last_acked_seq == 1
