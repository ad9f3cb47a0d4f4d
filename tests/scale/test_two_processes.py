"""Scale-out: several uvicorn processes on one PostgreSQL and one Redis channel layer.

Each test starts real console processes against the test database. They share nothing but
PostgreSQL and Redis, which is the production layout: any process can take any agent, a
command issued anywhere reaches the process that holds the device, and a dead process
leaves behind nothing that the survivors or the presence sweep do not repair.
"""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import time
import urllib.request
import uuid
from concurrent.futures import ThreadPoolExecutor
from datetime import timedelta
from pathlib import Path

import psutil
import pytest
from django.db import connection
from django.utils import timezone

from agent_stub import protocol as p
from tests.agent.rawagent import RawAgent, in_db
from tests.agent.test_agent_e2e import Fleet, assert_stored_exactly_once
from tests.harness import ROOT, ConsoleServer, _die_with_parent, database_url_for, shared_listener

pytestmark = pytest.mark.django_db(transaction=True)

# Heartbeats flushed to PostgreSQL quickly so presence is observable within a test's time.
FAST_PRESENCE = {"AGENT_PRESENCE_FLUSH_S": "0.2"}


def each(method: str, servers: list[ConsoleServer]) -> None:
    """Start or stop servers concurrently (start-up is seconds of imports each)."""
    if method == "start":
        for server in servers:
            server.launch()  # from this thread: a child dies with the thread that spawned it
        for server in servers:
            server.wait_ready()
        return
    with ThreadPoolExecutor(len(servers)) as pool:
        list(pool.map(lambda server: getattr(server, method)(), servers))


@pytest.fixture
def two_servers(transactional_db):
    """Processes A and B on their own ports, so a test knows which one holds which agent."""
    servers = [ConsoleServer(connection.settings_dict, extra_env=FAST_PRESENCE) for _ in range(2)]
    try:
        each("start", servers)
        yield servers
    finally:
        each("stop", servers)


@pytest.fixture
def operator_token(operator_user) -> str:
    from rest_framework.authtoken.models import Token

    return Token.objects.get_or_create(user=operator_user)[0].key


def child_env() -> dict:
    """The environment of a non-server process (script, Celery worker) on the test database."""
    return {**os.environ, "DATABASE_URL": database_url_for(connection.settings_dict), "DB_CONN_MAX_AGE": "0"}


def api_post(server: ConsoleServer, path: str, token: str, body: dict) -> dict:
    request = urllib.request.Request(
        f"{server.http_url}/api/v1/{path}", data=json.dumps(body).encode(), method="POST",
        headers={"Authorization": f"Token {token}", "Content-Type": "application/json"},
    )
    with urllib.request.urlopen(request, timeout=10) as response:
        assert response.status == 201
        return json.loads(response.read())


async def enrolled(server: ConsoleServer, token: str, uid: str) -> RawAgent:
    """A protocol-level agent enrolled and welcomed on `server`, its connect-time frames read."""
    agent = RawAgent(server.ws_url, uid)
    welcome = await agent.enroll(token)
    assert welcome["type"] == "welcome" and welcome["status"] == "active", welcome
    await agent.recv_type("attest.challenge")  # every fresh session of an active device gets one
    return agent


def device_row(uid: str) -> dict:
    from fleet.models import Device

    return Device.objects.filter(uid=uid).values("id", "online", "last_seen", "session").get()


def held_connections(server: ConsoleServer) -> int:
    """Agent connections this server process holds (accepted sockets on its listening port)."""
    return sum(1 for c in psutil.Process(server.pid).net_connections("tcp")
               if c.status == psutil.CONN_ESTABLISHED and c.laddr and c.laddr.port == server.port)


# --- 1. cross-process delivery --------------------------------------------------------------


def test_a_command_issued_through_process_b_reaches_an_agent_connected_to_process_a_and_its_result_is_recorded(
    two_servers, enrollment_token, operator_token
):
    from fleet.models import DeviceCommand

    a, b = two_servers
    token = enrollment_token(auto_approve=True)

    async def scenario() -> tuple[dict, dict, float]:
        agent = await enrolled(a, token, "cross-a-1")
        try:
            issued_at = time.monotonic()
            issued = await asyncio.to_thread(api_post, b, "devices/cross-a-1/commands/", operator_token,
                                             {"name": "sync_state", "args": {}})
            # Same connection, no reconnect: only the channel layer can have carried it from B to A.
            command = await agent.recv_type("command", timeout=10)
            latency = time.monotonic() - issued_at
            await agent.send(p.command_result(1, command["command_id"], True, "state sent from A"))
            ack = await agent.recv_type("ack")
            assert (ack["seq"], ack["accepted"]) == (1, 1)
            return issued, command, latency
        finally:
            await agent.close()

    issued, command, latency = asyncio.run(scenario())
    assert (command["command_id"], command["name"]) == (issued["id"], "sync_state")
    stored = DeviceCommand.objects.get(pk=issued["id"])
    assert (stored.state, stored.output) == (DeviceCommand.State.SUCCEEDED, "state sent from A")
    print(f"\ncommand issued on B reached the agent on A in {latency * 1000:.0f} ms")


class Worker:
    """A real Celery worker on the test database, consuming a queue of its own."""

    def __init__(self, log_path: Path, *, extra_env: dict | None = None) -> None:
        self.queue = f"scale-{uuid.uuid4().hex[:8]}"
        self.log_path = log_path
        with log_path.open("wb") as log:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "celery", "-A", "console", "worker", "--pool", "solo", "-Q", self.queue,
                 "--without-gossip", "--without-mingle", "--without-heartbeat", "--loglevel", "INFO"],
                cwd=ROOT, env={**child_env(), **(extra_env or {})}, stdout=log, stderr=subprocess.STDOUT,
                preexec_fn=_die_with_parent,
            )

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")[-3000:]

    def wait_ready(self, timeout: float = 60) -> None:
        deadline = time.monotonic() + timeout
        while b" ready." not in self.log_path.read_bytes():
            assert self.proc.poll() is None, self.log()
            assert time.monotonic() < deadline, f"worker not ready after {timeout} s:\n{self.log()}"
            time.sleep(0.2)

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(15)
        except subprocess.TimeoutExpired:
            self.proc.kill()


@pytest.fixture
def celery_worker(transactional_db, tmp_path):
    """Started at once, waited for only when used: it boots while the servers do."""
    worker = Worker(tmp_path / "worker.log")
    yield worker
    worker.stop()


def test_a_command_from_a_plain_process_and_a_challenge_from_a_celery_worker_reach_an_agent_on_process_b(
    celery_worker, two_servers, enrollment_token
):
    from console.celery import app
    from fleet.models import DeviceCommand
    from security.models import AttestationChallenge, DeviceTrust

    _, b = two_servers
    token = enrollment_token(auto_approve=True)
    env = child_env()

    async def scenario() -> tuple[dict, dict]:
        agent = await enrolled(b, token, "cross-b-1")
        try:
            # A maintenance script: a separate Python process calling the service layer.
            script = ("from fleet import services; from fleet.models import Device; "
                      "services.command_issue(actor='script', device=Device.objects.get(uid='cross-b-1'), "
                      "name='attest')")
            done = await asyncio.to_thread(subprocess.run, [sys.executable, "manage.py", "shell", "-c", script],
                                           cwd=ROOT, env=env, capture_output=True, text=True, timeout=60)
            assert done.returncode == 0, done.stdout + done.stderr
            command = await agent.recv_type("command", timeout=10)

            # A Celery task on a real worker: the periodic attestation round finds the device due.
            await in_db(lambda: DeviceTrust.objects.filter(device__uid="cross-b-1").update(
                last_challenge_at=timezone.now() - timedelta(days=1)))
            await asyncio.to_thread(celery_worker.wait_ready)
            await asyncio.to_thread(lambda: app.send_task("security.tasks.attest_due", queue=celery_worker.queue))
            challenge = await agent.recv_type("attest.challenge", timeout=30)
            return command, challenge
        finally:
            await agent.close()

    command, challenge = asyncio.run(scenario())
    assert DeviceCommand.objects.get(pk=command["command_id"]).created_by == "script"
    assert command["name"] == "attest"
    made = AttestationChallenge.objects.get(pk=challenge["challenge_id"])
    assert (made.device.uid, made.reason) == ("cross-b-1", "schedule"), celery_worker.log()


# --- 2. one port for N processes, and failover ----------------------------------------------


def run_failover(tmp_path: Path, *, agents: int, rounds: int) -> dict:
    """Two processes share one listening socket; each round SIGKILLs the one holding more agents,
    waits until every agent is back on the survivor, then restarts the killed one."""
    sock = shared_listener()
    servers = [ConsoleServer(connection.settings_dict, extra_env=FAST_PRESENCE, sock=sock) for _ in range(2)]
    figures: dict = {"held_before_kill": [], "reconnect_s": []}
    began = time.monotonic()
    fleet = None
    try:
        each("start", servers)
        from security.services import enrollment_token_create

        token = enrollment_token_create(actor="test", expires_in=timedelta(hours=1), max_uses=agents + 5,
                                        auto_approve=True)[1]
        fleet = Fleet(servers[0].ws_url, token, tmp_path, n=agents, prefix="fo-").start()
        figures["servers_up_s"] = round(time.monotonic() - began, 1)
        for _ in range(rounds):
            deadline = time.monotonic() + 60
            while sum(held_connections(s) for s in servers) < agents or not all(a.connected for a in fleet.agents):
                assert time.monotonic() < deadline, [held_connections(s) for s in servers]
                time.sleep(0.2)
            time.sleep(2)  # streaming on both sides of the kill
            figures.setdefault("all_connected_s", round(time.monotonic() - began, 1))
            held = [held_connections(s) for s in servers]
            victim, survivor = (servers[0], servers[1]) if held[0] >= held[1] else (servers[1], servers[0])
            figures["held_before_kill"].append(held)
            victim.kill()
            killed_at = time.monotonic()
            deadline = killed_at + 60
            while held_connections(survivor) < agents or not all(a.connected for a in fleet.agents):
                assert time.monotonic() < deadline, (held_connections(survivor), survivor.log_tail())
                time.sleep(0.1)
            figures["reconnect_s"].append(round(time.monotonic() - killed_at, 1))
            time.sleep(2)
            if len(figures["reconnect_s"]) < rounds:
                victim.start()  # back into the pool for the next round's kill
        fleet.quiet()
        drain_from = time.monotonic()
        assert fleet.wait_drained(120), f"outboxes did not drain: {[a.outbox.buffered for a in fleet.agents]}"
        figures["drain_s"] = round(time.monotonic() - drain_from, 1)
        from fleet.models import Device

        figures["online"] = Device.objects.filter(uid__startswith="fo-", online=True).count()
    finally:
        if fleet is not None:
            fleet.stop()
        each("stop", servers)
        sock.close()
    figures["points"] = assert_stored_exactly_once(fleet.agents)
    return figures


@pytest.mark.flaky(reruns=1, reruns_delay=2)
def test_agents_of_a_killed_process_behind_a_shared_port_reconnect_to_the_other_and_every_point_is_stored_once(
    transactional_db, tmp_path
):
    figures = run_failover(tmp_path, agents=8, rounds=1)
    (held,) = figures["held_before_kill"]
    assert max(held) >= 1 and sum(held) == 8  # the killed process held agents; all 8 were served on the port
    assert figures["online"] == 8
    assert figures["points"] > 500
    print(f"\nheld before the kill {held}; all back on the survivor in {figures['reconnect_s'][0]} s; "
          f"{figures['points']} points each stored exactly once; {figures}")


@pytest.mark.slow
def test_repeated_kills_of_either_process_behind_a_shared_port_lose_and_duplicate_nothing(transactional_db, tmp_path):
    figures = run_failover(tmp_path, agents=24, rounds=3)
    assert all(max(held) >= 1 for held in figures["held_before_kill"])
    assert figures["online"] == 24
    assert figures["points"] > 5000
    print(f"\n{figures}")


# --- 3. presence when a process dies ---------------------------------------------------------


def test_a_device_whose_process_was_killed_and_that_does_not_come_back_goes_offline_within_the_bound(
    transactional_db, enrollment_token, settings
):
    from fleet.tasks import sweep_presence

    heartbeat_s, offline_after_s, sweep_every_s = 1, 3, 0.5
    settings.FLEET_OFFLINE_AFTER_S = offline_after_s  # the sweep runs here, in the test, as beat would
    env = {**FAST_PRESENCE, "AGENT_HEARTBEAT_S": str(heartbeat_s)}
    a, b = (ConsoleServer(connection.settings_dict, extra_env=env) for _ in range(2))
    token = enrollment_token(auto_approve=True)

    async def heartbeats(agent: RawAgent) -> None:
        while True:
            await agent.send(p.heartbeat(p.now_ms(), 1, 0))
            await asyncio.sleep(heartbeat_s)

    async def scenario() -> dict:
        lost, kept = await enrolled(a, token, "gone-1"), await enrolled(b, token, "kept-1")
        beats = [asyncio.create_task(heartbeats(agent)) for agent in (lost, kept)]
        try:
            await asyncio.sleep(2 * heartbeat_s)  # presence flushed from heartbeats, not just the connect
            before = {uid: (await in_db(device_row, uid))["online"] for uid in ("gone-1", "kept-1")}
            await asyncio.to_thread(a.kill)  # `gone-1` never reconnects: its agent is dead too
            killed_at = time.monotonic()
            beats[0].cancel()
            kept_online, offline_after = [], None
            # Until the orphan is offline and the survivor's device has lived through a whole
            # offline window on heartbeats alone (or the bound has clearly passed).
            watch_s = offline_after_s + 2 * heartbeat_s
            while (offline_after is None or time.monotonic() - killed_at < watch_s) and \
                    time.monotonic() - killed_at < watch_s + 4 * heartbeat_s:
                await in_db(sweep_presence)
                rows = {uid: await in_db(device_row, uid) for uid in ("gone-1", "kept-1")}
                kept_online.append(rows["kept-1"]["online"])
                if offline_after is None and not rows["gone-1"]["online"]:
                    offline_after = time.monotonic() - killed_at
                await asyncio.sleep(sweep_every_s)
            return {"before": before, "offline_after": offline_after, "kept_online": kept_online}
        finally:
            for beat in beats:
                beat.cancel()
            for agent in (lost, kept):
                await agent.close()

    try:
        each("start", [a, b])
        result = asyncio.run(scenario())
    finally:
        each("stop", [a, b])
    assert result["before"] == {"gone-1": True, "kept-1": True}
    bound = offline_after_s + heartbeat_s + sweep_every_s + 1  # last flush ≤ one heartbeat before the kill
    assert result["offline_after"] is not None and result["offline_after"] <= bound, result
    assert all(result["kept_online"]), "a live device on the surviving process was swept offline"
    print(f"\ngone-1 offline {result['offline_after']:.1f} s after its process was killed (bound {bound} s); "
          f"kept-1 online at all {len(result['kept_online'])} sweeps")
