"""Server-side faults (issue #9): PostgreSQL down, Redis down, a network partition, the server
killed under load. Real agents (agent_stub, SQLite outboxes) stream to a real uvicorn; each
test ends by counting, per device, the points every agent generated against the points
stored: none lost, none duplicated.

The PostgreSQL outage needs a database it may stop, so it runs the console against a private
cluster (tests.reliability.faults.PgCluster) migrated with `manage.py migrate` and counted
with psycopg; the test's own Django test database is not involved. The other tests use the
test database as usual and private Redis / proxy processes where they break something.
"""

from __future__ import annotations

import asyncio
import json
import threading
import time
from collections import Counter
from pathlib import Path

import pytest
from django.db import connection

from agent_stub.client import Agent, Config, Stats
from agent_stub.inference import AnomalyModel, BatchScorer
from tests.harness import ConsoleServer
from tests.reliability.faults import PartitionProxy, PgCluster, RedisServer, call_in_loop

# Close codes of the contract an agent may see when the server sheds load or goes away.
CONTRACT_SHED_CODES = {1000, 1001, 4429, 4503}


class CountingAgent(Agent):
    """An agent that records every telemetry point it commits to its outbox (= generated)."""

    def __init__(self, *args, **kwargs) -> None:
        self.emitted: Counter = Counter()  # before Agent.__init__, which may already emit
        super().__init__(*args, **kwargs)

    def emit(self, frame: dict) -> int | None:
        row = super().emit(frame)
        if frame.get("type") == "telemetry" and row is not None:
            self.emitted.update((int(t), name, float(value)) for t, name, value in frame["points"])
        return row


class Fleet:
    """Counting agents on one event loop in a background thread (one client process's worth)."""

    def __init__(self, token: str, state_dir: Path, members: list[tuple[str, str]], *, sample_hz: float = 10,
                 batch_points: int = 50, batch_s: float = 0.5, backoff_start: float = 0.2, backoff_cap: float = 1.5,
                 ack_timeout_s: float = 5, ramp_s: float = 0.0) -> None:
        self.token, self.state_dir, self.members = token, state_dir, members
        self.config = {"sample_hz": sample_hz, "batch_points": batch_points, "batch_s": batch_s}
        self.agent_kwargs = {"backoff_start": backoff_start, "backoff_cap": backoff_cap, "ack_timeout_s": ack_timeout_s}
        self.ramp_s = ramp_s
        self.agents: list[CountingAgent] = []
        self.ready = threading.Event()
        self.loop: asyncio.AbstractEventLoop | None = None
        self.thread = threading.Thread(target=lambda: asyncio.run(self._main()), daemon=True)

    async def _main(self) -> None:
        self.loop = asyncio.get_running_loop()
        scorer = BatchScorer(AnomalyModel())  # one ONNX session for every agent
        self.agents = [
            CountingAgent(url, self.state_dir / uid, enroll_token=self.token, device_uid=uid, scorer=scorer,
                          config=Config(**self.config), stats=Stats(), **self.agent_kwargs)
            for uid, url in self.members
        ]
        self.ready.set()
        step = self.ramp_s / max(1, len(self.agents))

        async def run(i: int, agent: CountingAgent) -> int:
            await asyncio.sleep(i * step)
            return await agent.run()

        await asyncio.gather(*(run(i, a) for i, a in enumerate(self.agents)), return_exceptions=True)

    def start(self) -> Fleet:
        self.thread.start()
        assert self.ready.wait(60)
        return self

    def call(self, fn) -> None:
        assert call_in_loop(self.loop, fn, timeout=30)

    def select(self, uids: set[str] | None) -> list[CountingAgent]:
        return [a for a in self.agents if uids is None or a.device_uid in uids]

    def acked(self, uids: set[str] | None = None) -> int:
        return sum(a.stats.acked_points for a in self.select(uids))

    def buffered(self, uids: set[str] | None = None) -> int:
        return sum(a.outbox.buffered for a in self.select(uids))

    def closes(self) -> Counter:
        total: Counter = Counter()
        for agent in self.agents:
            total.update(agent.stats.closes)
        return total

    def wait_until(self, predicate, timeout: float, poll: float = 0.2) -> float | None:
        """Seconds until predicate() held, None on timeout."""
        started = time.monotonic()
        while time.monotonic() - started < timeout:
            if predicate():
                return time.monotonic() - started
            time.sleep(poll)
        return None

    def quiet(self) -> None:
        """Stop sampling and put every sampled point into the outbox, so the outboxes can drain
        to empty and what was generated is final."""
        def slow_down() -> None:
            for agent in self.agents:
                agent.config.sample_hz = 0.001
        self.call(slow_down)
        time.sleep(1.0)  # the sample already scheduled at the old rate happens now

        def flush() -> None:
            for agent in self.agents:
                agent._flush_points()
        self.call(flush)

    def wait_drained(self, timeout: float) -> bool:
        return self.wait_until(lambda: all(a.outbox.buffered == 0 and not a._points for a in self.agents),
                               timeout) is not None

    def stop(self) -> None:
        if self.loop is not None:
            self.loop.call_soon_threadsafe(lambda: [a.stop() for a in self.agents])
        self.thread.join(60)


def stored_points(cursor, prefix: str) -> dict[str, Counter]:
    """Each device's stored points as a multiset (a duplicate shows as a count of 2)."""
    cursor.execute(
        "SELECT d.uid, (extract(epoch FROM p.time) * 1000)::bigint, m.name, p.value FROM telemetry_point p "
        "JOIN telemetry_metric m ON m.id = p.metric_id JOIN fleet_device d ON d.id = p.device_id "
        "WHERE d.uid LIKE %s", [prefix + "%"])
    stored: dict[str, Counter] = {}
    for uid, t, name, value in cursor.fetchall():
        stored.setdefault(uid, Counter())[(int(t), name, float(value))] += 1
    return stored


def uplink_cursors(cursor, prefix: str) -> dict[str, int]:
    cursor.execute("SELECT d.uid, c.last_acked_seq FROM fleet_uplinkcursor c JOIN fleet_device d "
                   "ON d.id = c.device_id WHERE d.uid LIKE %s", [prefix + "%"])
    return dict(cursor.fetchall())


def count_exactly_once(fleet: Fleet, stored: dict[str, Counter]) -> dict:
    """Generated vs stored, per device; asserts nothing lost and nothing duplicated."""
    generated = lost = extra = 0
    bad = {}
    for agent in fleet.agents:
        mine = stored.get(agent.device_uid, Counter())
        missing, surplus = agent.emitted - mine, mine - agent.emitted
        generated += sum(agent.emitted.values())
        lost += sum(missing.values())
        extra += sum(surplus.values())
        if missing or surplus:
            bad[agent.device_uid] = (sum(missing.values()), sum(surplus.values()))
    figures = {"agents": len(fleet.agents), "generated": generated, "stored": sum(sum(c.values()) for c in stored.values()),
               "lost": lost, "duplicated": extra}
    print(f"\n{figures}")
    assert not bad, f"devices with lost/extra points: {dict(list(bad.items())[:10])} — {figures}"
    return figures


# --- PostgreSQL stopped mid-ingest ----------------------------------------------------------------------

@pytest.fixture(scope="module")
def private_pg():
    """A private PostgreSQL cluster with the console's schema in database `console`."""
    cluster = PgCluster().init().start()
    try:
        cluster.create_database("console")
        cluster.manage("console", "migrate", "--noinput", "-v", "0")
        yield cluster
    finally:
        cluster.destroy()


def token_in(cluster: PgCluster, max_uses: int) -> str:
    out = cluster.manage("console", "shell", "-v", "0", "-c",
                         "from datetime import timedelta\nfrom security.services import enrollment_token_create\n"
                         f"print('TOKEN=' + enrollment_token_create(actor='fault-test', expires_in=timedelta(hours=1), "
                         f"max_uses={max_uses}, auto_approve=True)[1])")
    return [line for line in out.splitlines() if line.startswith("TOKEN=")][-1][len("TOKEN="):]


def run_postgres_outage(cluster: PgCluster, tmp_path: Path, *, outage_s: float, agents: int, prefix: str) -> None:
    started = time.monotonic()
    server = ConsoleServer(cluster.settings_dict("console"), extra_env={"LOG_LEVEL": "WARNING"}).start()
    pid = server.proc.pid
    token = token_in(cluster, agents)
    uids = [f"{prefix}{i}" for i in range(agents)]
    fleet = Fleet(token, tmp_path, [(uid, server.ws_url) for uid in uids], backoff_start=0.5, backoff_cap=3).start()
    try:
        assert fleet.wait_until(lambda: all(a.stats.acked_points for a in fleet.agents), 60) is not None, \
            server.log_tail()

        cluster.stop("immediate")  # PostgreSQL crashes: every connection is cut
        down_at = time.monotonic()
        closes_before = fleet.closes()
        time.sleep(3)  # frames in flight when it died fail, their connections are shed
        acked_during, buffered_during = fleet.acked(), fleet.buffered()
        time.sleep(outage_s - 3)
        # No acks while PostgreSQL is down; the agents keep sampling into their outboxes.
        assert fleet.acked() == acked_during, "frames were acked while PostgreSQL was down"
        assert fleet.buffered() > buffered_during
        shed = fleet.closes() - closes_before
        assert shed, "no connection was shed while PostgreSQL was down"
        assert set(shed) <= CONTRACT_SHED_CODES, f"closes outside the contract: {shed}"
        assert server.proc.poll() is None, server.log_tail()

        cluster.start()
        up_at = time.monotonic()
        acked_at_return = {a.device_uid: a.stats.acked_points for a in fleet.agents}
        resumed = fleet.wait_until(
            lambda: all(a.stats.acked_points > acked_at_return[a.device_uid] for a in fleet.agents), 30)
        assert resumed is not None, f"ingest did not resume within 30 s of PostgreSQL's return\n{server.log_tail()}"
        assert server.proc.pid == pid and server.proc.poll() is None  # the same uvicorn, never restarted
        time.sleep(2)
        fleet.quiet()
        assert fleet.wait_drained(120), f"outboxes did not drain: {[a.outbox.buffered for a in fleet.agents]}"
    finally:
        fleet.stop()
        server.stop()
    with cluster.connect("console") as conn, conn.cursor() as cursor:
        figures = count_exactly_once(fleet, stored_points(cursor, prefix))
        assert uplink_cursors(cursor, prefix) == {a.device_uid: a.outbox.last_seq for a in fleet.agents}
    assert figures["generated"] > 0
    print(f"PostgreSQL down {up_at - down_at:.1f}s; shed closes {dict(shed)}; every agent acked again "
          f"{resumed:.1f}s after its return; test ran {time.monotonic() - started:.0f}s")


def test_postgres_stopped_mid_ingest_sheds_with_4503_then_resumes_without_losing_or_duplicating_a_point(
    private_pg, tmp_path
):
    run_postgres_outage(private_pg, tmp_path, outage_s=9, agents=6, prefix="pgdown-")


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_postgres_stopped_for_30_seconds_resumes_within_30_seconds_of_its_return_losing_nothing(private_pg, tmp_path):
    run_postgres_outage(private_pg, tmp_path, outage_s=30, agents=10, prefix="pgdown30-")


# --- Redis stopped ---------------------------------------------------------------------------------------

@pytest.fixture
def private_redis():
    redis = RedisServer().start()
    yield redis
    redis.destroy()


def use_channel_layer(settings, redis_url: str) -> None:
    """Point this test process's channel layer (command pushes) at `redis_url`."""
    from channels.layers import channel_layers

    layers = json.loads(json.dumps(settings.CHANNEL_LAYERS))
    layers["default"]["CONFIG"]["hosts"][0]["address"] = redis_url
    settings.CHANNEL_LAYERS = layers
    channel_layers.backends.clear()


async def dashboard_push(server: ConsoleServer, session_cookie: str, device_id: int, timeout: float) -> dict:
    """Open /ws/ui/, subscribe to one device's presence and return the first delta pushed."""
    from websockets.asyncio.client import connect

    async with connect(f"ws://127.0.0.1:{server.port}/ws/ui/", open_timeout=10,
                       additional_headers={"Cookie": f"sessionid={session_cookie}", "Origin": server.http_url}) as ws:
        await ws.send(json.dumps({"subscribe": {"presence": {"ids": [device_id]}}}))
        while True:
            message = json.loads(await asyncio.wait_for(ws.recv(), timeout))
            if message.get("type") == "delta":
                return message


class DashboardWatcher:
    """A dashboard page's socket held open across a fault: every delta, with when it came."""

    def __init__(self, server: ConsoleServer, session_cookie: str, device_id: int) -> None:
        self.args = (server, session_cookie, device_id)
        self.deltas: list[float] = []
        self.closed: tuple[float, int | None] | None = None
        self.stop_event: asyncio.Event | None = None
        self.loop: asyncio.AbstractEventLoop | None = None
        self.thread = threading.Thread(target=lambda: asyncio.run(self._main()), daemon=True)

    async def _main(self) -> None:
        from websockets.asyncio.client import connect
        from websockets.exceptions import ConnectionClosed

        server, cookie, device_id = self.args
        self.loop, self.stop_event = asyncio.get_running_loop(), asyncio.Event()
        async with connect(f"ws://127.0.0.1:{server.port}/ws/ui/", open_timeout=10,
                           additional_headers={"Cookie": f"sessionid={cookie}", "Origin": server.http_url}) as ws:
            await ws.send(json.dumps({"subscribe": {"presence": {"ids": [device_id]}}}))
            stopping = asyncio.ensure_future(self.stop_event.wait())
            try:
                while not self.stop_event.is_set():
                    receiving = asyncio.ensure_future(ws.recv())
                    await asyncio.wait([receiving, stopping], return_when=asyncio.FIRST_COMPLETED)
                    if not receiving.done():
                        receiving.cancel()
                        break
                    if json.loads(receiving.result()).get("type") == "delta":
                        self.deltas.append(time.monotonic())
            except ConnectionClosed:
                self.closed = (time.monotonic(), ws.close_code)

    def start(self) -> DashboardWatcher:
        self.thread.start()
        return self

    def stop(self) -> None:
        if self.loop is not None:
            self.loop.call_soon_threadsafe(self.stop_event.set)
        self.thread.join(15)


@pytest.mark.django_db(transaction=True)
def test_with_redis_stopped_telemetry_keeps_flowing_and_commands_and_dashboard_pushes_resume_when_it_returns(
    enrollment_token, private_redis, settings, tmp_path
):
    from django.contrib.auth import get_user_model
    from django.test import Client

    from fleet import services as fleet_services
    from fleet.models import Device, DeviceCommand

    started = time.monotonic()
    use_channel_layer(settings, private_redis.url)
    server = ConsoleServer(connection.settings_dict,
                           extra_env={"REDIS_URL": private_redis.url, "LOG_LEVEL": "WARNING"}).start()
    token = enrollment_token(auto_approve=True, max_uses=10)
    fleet = Fleet(token, tmp_path, [(f"nored-{i}", server.ws_url) for i in range(3)], backoff_cap=1.5).start()
    late = None
    admin = get_user_model().objects.create_superuser("fault-admin", "a@example.com", "pw-fault-admin-1")
    web = Client()
    web.force_login(admin)
    session = web.cookies["sessionid"].value
    try:
        assert fleet.wait_until(lambda: all(a.stats.acked_points for a in fleet.agents), 60) is not None
        device = Device.objects.get(uid="nored-0")
        assert asyncio.run(dashboard_push(server, session, device.id, 10))["presence"]["devices"][0]["uid"] == "nored-0"
        page = DashboardWatcher(server, session, device.id).start()  # a dashboard left open through the outage
        assert fleet.wait_until(lambda: page.deltas, 15) is not None

        private_redis.stop()
        down_at = time.monotonic()
        acked_at_stop = fleet.acked()
        # A command issued now is stored; its doorbell cannot ring.
        during = fleet_services.command_issue(actor="test", device=device, name="sync_state")
        # A device (re)connecting while Redis is down still gets in and streams.
        late = Fleet(token, tmp_path, [("nored-late", server.ws_url)], backoff_cap=1.5).start()
        time.sleep(8)
        assert fleet.acked() > acked_at_stop, f"telemetry stopped with Redis\n{server.log_tail()}"
        assert late.wait_until(lambda: late.acked() > 0, 20) is not None, server.log_tail()
        assert fleet.wait_until(lambda: any(t > down_at for t in page.deltas), 10) is not None, \
            f"the open dashboard got no push while Redis was down (closed: {page.closed})"
        redis_down_s = time.monotonic() - down_at

        private_redis.start()
        up_at = time.monotonic()
        after = fleet_services.command_issue(actor="test", device=device, name="sync_state")
        delivered = fleet.wait_until(
            lambda: DeviceCommand.objects.filter(id__in=[during.id, after.id],
                                                 state=DeviceCommand.State.SUCCEEDED).count() == 2, 30)
        assert delivered is not None, (
            f"commands not answered after Redis returned: "
            f"{list(DeviceCommand.objects.filter(id__in=[during.id, after.id]).values_list('state', flat=True))}\n"
            f"{server.log_tail()}")
        push = asyncio.run(dashboard_push(server, session, device.id, 15))
        assert push["presence"]["devices"][0]["online"] is True
        pushed_after = time.monotonic() - up_at
        # The page left open through the outage hears about changes again too (presence
        # last_seen moves every AGENT_PRESENCE_FLUSH_S while the devices stream).
        assert fleet.wait_until(lambda: any(t > up_at for t in page.deltas), 20) is not None, \
            f"the open dashboard socket got no push after Redis returned (closed: {page.closed})"
        page.stop()
        fleet.quiet()
        late.quiet()
        assert fleet.wait_drained(60) and late.wait_drained(60)
    finally:
        fleet.stop()
        if late is not None:
            late.stop()
        server.stop()
    with connection.cursor() as cursor:
        stored = stored_points(cursor, "nored-")
    count_exactly_once(fleet, {k: v for k, v in stored.items() if k != "nored-late"})
    count_exactly_once(late, {"nored-late": stored.get("nored-late", Counter())})
    print(f"Redis down {redis_down_s:.1f}s; commands answered {delivered:.1f}s and a dashboard push "
          f"{pushed_after:.1f}s after its return; test ran {time.monotonic() - started:.0f}s")


# --- a network partition ---------------------------------------------------------------------------------

def run_partition(server: ConsoleServer, token: str, tmp_path: Path, *, partition_s: float, prefix: str) -> None:
    started = time.monotonic()
    proxy = PartitionProxy(server.port).start()
    cut = {f"{prefix}cut-{i}" for i in range(4)}
    members = [(uid, proxy.url()) for uid in sorted(cut)] + [(f"{prefix}ok-{i}", server.ws_url) for i in range(4)]
    others = {uid for uid, _ in members} - cut
    fleet = Fleet(token, tmp_path, members, backoff_cap=3, ack_timeout_s=5).start()
    try:
        assert fleet.wait_until(lambda: all(a.stats.acked_points for a in fleet.agents), 60) is not None
        proxy.partition()
        cut_at = time.monotonic()
        time.sleep(3)
        acked_cut, acked_others = fleet.acked(cut), fleet.acked(others)
        time.sleep(partition_s - 3)
        assert fleet.acked(cut) == acked_cut, "acks crossed the partition"
        assert fleet.acked(others) > acked_others, "the agents outside the partition stopped streaming"
        assert fleet.buffered(cut) > 0
        buffered_at_heal = fleet.buffered(cut)
        proxy.heal()
        healed_at = time.monotonic()
        at_heal = {a.device_uid: a.stats.acked_points for a in fleet.select(cut)}
        caught_up = fleet.wait_until(
            lambda: all(a.stats.acked_points > at_heal[a.device_uid] for a in fleet.select(cut)), 60)
        assert caught_up is not None, f"partitioned agents did not reconnect\n{server.log_tail()}"
        time.sleep(2)
        fleet.quiet()
        assert fleet.wait_drained(120), f"outboxes did not drain: {[a.outbox.buffered for a in fleet.agents]}"
    finally:
        fleet.stop()
        proxy.stop()
    with connection.cursor() as cursor:
        figures = count_exactly_once(fleet, stored_points(cursor, prefix))
        # In order and complete: each device's cursor is the last seq its agent assigned
        # (the server accepts a device's frames only in seq order, with no gap).
        assert uplink_cursors(cursor, prefix) == {a.device_uid: a.outbox.last_seq for a in fleet.agents}
    print(f"partitioned {len(cut)} of {len(members)} agents for {healed_at - cut_at:.0f}s ({proxy.dropped_bytes} bytes "
          f"dropped, {buffered_at_heal} frames buffered); acked again {caught_up:.1f}s after healing; "
          f"{figures['generated']} points; test ran {time.monotonic() - started:.0f}s")


def test_agents_cut_off_by_a_network_partition_catch_up_in_order_once_it_heals(console_server, enrollment_token,
                                                                               tmp_path):
    run_partition(console_server, enrollment_token(auto_approve=True, max_uses=10), tmp_path, partition_s=20,
                  prefix="part-")


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_agents_cut_off_for_three_minutes_catch_up_in_order_once_the_partition_heals(console_server, enrollment_token,
                                                                                   tmp_path):
    run_partition(console_server, enrollment_token(auto_approve=True, max_uses=10), tmp_path, partition_s=180,
                  prefix="partlong-")


# --- the server killed under load ------------------------------------------------------------------------

def run_server_kill(server: ConsoleServer, token: str, tmp_path: Path, *, agents: int, prefix: str) -> None:
    started = time.monotonic()
    fleet = Fleet(token, tmp_path, [(f"{prefix}{i:04d}", server.ws_url) for i in range(agents)], sample_hz=2,
                  batch_points=100, batch_s=2.0, backoff_start=0.5, backoff_cap=max(5, agents / 10),
                  ack_timeout_s=15, ramp_s=agents / 5).start()
    try:
        # Every agent enrolled and connected, points being acked: kill it now.
        streaming = fleet.wait_until(lambda: all(a.connected for a in fleet.agents) and fleet.acked() > 0,
                                     60 + agents)
        assert streaming is not None, server.log_tail()
        time.sleep(3)
        assert sum(1 for a in fleet.agents if a.stats.acked_points) > len(fleet.agents) // 2
        acked_before = fleet.acked()
        server.kill()  # SIGKILL: no goodbye; flushes in flight die before or after their commit
        time.sleep(3)
        server.start()
        reconnected = fleet.wait_until(lambda: fleet.acked() > acked_before and all(
            a.connected for a in fleet.agents), 60 + agents)
        assert reconnected is not None, server.log_tail()
        time.sleep(3)
        fleet.quiet()
        assert fleet.wait_drained(180), f"outboxes did not drain: {sum(a.outbox.buffered for a in fleet.agents)}"
    finally:
        fleet.stop()
    with connection.cursor() as cursor:
        figures = count_exactly_once(fleet, stored_points(cursor, prefix))
        assert uplink_cursors(cursor, prefix) == {a.device_uid: a.outbox.last_seq for a in fleet.agents}
    print(f"{agents} agents streaming; killed after {streaming:.0f}s; all reconnected {reconnected:.1f}s after the "
          f"restart; {figures['generated']} points; test ran {time.monotonic() - started:.0f}s")


@pytest.mark.slow  # `make test` keeps the 12-agent version (tests/agent/test_agent_e2e.py)
def test_server_killed_under_fifty_streaming_agents_stores_every_point_exactly_once_after_restart(
    console_server, enrollment_token, tmp_path
):
    run_server_kill(console_server, enrollment_token(auto_approve=True, max_uses=60), tmp_path, agents=50,
                    prefix="kill50-")


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_server_killed_under_250_streaming_agents_stores_every_point_exactly_once_after_restart(
    transactional_db, enrollment_token, tmp_path
):
    # Persistent database connections, as in production (the harness default opens one per call).
    server = ConsoleServer(connection.settings_dict, extra_env={"DB_CONN_MAX_AGE": "60", "LOG_LEVEL": "WARNING"})
    try:
        run_server_kill(server.start(), enrollment_token(auto_approve=True, max_uses=300), tmp_path, agents=250,
                        prefix="kill250-")
    finally:
        server.stop()
