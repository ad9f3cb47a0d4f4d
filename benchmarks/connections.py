"""Connections benchmark: authenticated agents held by one uvicorn process.

    .venv/bin/python -m benchmarks.connections [--connections 10000] [--clients 4] [--hold 60] [--heartbeat 30]

Pre-provisions N devices with Ed25519 keys directly in a scratch database (bulk INSERTs — the
auth contract accepts pre-registered keys, see `security.services.device_preauthorize`), starts
one real console (uvicorn, `tests.harness.ConsoleServer`, persistent DB connections) and
`--clients` client processes. Each client opens its share of raw WebSocket connections doing
the real handshake (`hello` → `auth` signed over the nonce → `welcome`), then only sends an
app-level `heartbeat` every --heartbeat seconds (plus the WebSocket library's pings, as the real
agent; the server sends none, see docs/protocol.md "Keepalive"). Measures, on the server
process: memory growth per connection ((after − before) / added connections, RSS and USS) from
a warm baseline, and its CPU over a --hold second window (also per connection and per heartbeat).
Loopback only; bounded; stops the server and the clients and drops the scratch database.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import hashlib
import json
import random
import resource
import signal
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks import ROOT, cpu_seconds, memory, result, row, scratch_database

WARM = 50  # connections opened before the memory baseline


def device_key(i: int):
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    return Ed25519PrivateKey.from_private_bytes(hashlib.sha256(f"bench-conn-{i}".encode()).digest())


def uid(i: int) -> str:
    return f"conn-{i:05d}"


def provision(n: int) -> None:
    """N active devices with their active keys and uplink cursors, in bulk."""
    from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

    from fleet.models import Device, UplinkCursor
    from security.models import DeviceKey
    from security.services import key_fingerprint

    devices = Device.objects.bulk_create([Device(uid=uid(i), status="active") for i in range(n)], batch_size=5000)
    UplinkCursor.objects.bulk_create([UplinkCursor(device=d) for d in devices], batch_size=5000)
    keys = []
    for i, d in enumerate(devices):
        public = device_key(i).public_key().public_bytes(Encoding.Raw, PublicFormat.Raw)
        keys.append(DeviceKey(device=d, public_key=public, fingerprint=key_fingerprint(public), source="preauthorized"))
    DeviceKey.objects.bulk_create(keys, batch_size=5000)


# --- client process ---------------------------------------------------------------------------


async def authenticate(ws, i: int, timeout: float = 30) -> dict:
    """The agent handshake of device `i` on an open WebSocket: `hello` → `auth` signed over the
    nonce → the server's answer (`welcome`, or an `error` frame), returned as a dict."""
    from agent_stub import protocol as p

    hello = json.loads(await asyncio.wait_for(ws.recv(), timeout))
    nonce = p.b64d(hello["nonce"])
    sig = p.b64e(device_key(i).sign(p.auth_message(nonce, uid(i))))
    await ws.send(json.dumps({"type": "auth", "device_uid": uid(i), "sig": sig, "agent_version": "bench"}))
    return json.loads(await asyncio.wait_for(ws.recv(), timeout))


async def client_main(url: str, first: int, count: int, heartbeat_s: float, ramp_s: float) -> None:
    """Open `count` authenticated connections, heartbeat until SIGTERM; report on stdout as JSON lines."""
    import websockets

    from agent_stub import protocol as p
    from agent_stub.client import PING_INTERVAL_S, PING_TIMEOUT_S

    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    loop.add_signal_handler(signal.SIGTERM, stop.set)
    loop.add_signal_handler(signal.SIGINT, stop.set)
    stats = {"welcomed": 0, "failed": 0, "heartbeats": 0, "closed": 0, "shed": 0, "retries": 0, "errors": []}
    give_up_s = ramp_s + 240
    started = time.monotonic()

    async def connect(i: int):
        """Connect and authenticate as the agent does: a 4503 `overloaded` is retried after its
        `retry_after_ms` (counted in `shed`), any other failure (a handshake time-out, a refused
        connect) after an exponential backoff with jitter (counted in `retries`), until
        `give_up_s` after the client started; then it is a failure."""
        backoff = 1.0
        while True:
            ws = welcome = None
            try:
                ws = await websockets.connect(url, compression=None, open_timeout=30, close_timeout=2,
                                              ping_interval=PING_INTERVAL_S, ping_timeout=PING_TIMEOUT_S)
                welcome = await authenticate(ws, i)
            except Exception as exc:  # noqa: BLE001 -- counted, reported and retried
                welcome = {"exception": repr(exc)[:200]}
            if welcome.get("type") == "welcome":
                return ws
            if ws is not None:
                with contextlib.suppress(Exception):
                    await ws.close()
            if welcome.get("code") == "overloaded":
                stats["shed"] += 1
                delay = welcome.get("retry_after_ms", 1000) / 1000
            else:
                stats["retries"] += 1
                if len(stats["errors"]) < 5:
                    stats["errors"].append(str(welcome)[:200])
                delay, backoff = random.uniform(backoff / 2, backoff), min(backoff * 2, 30.0)
            if time.monotonic() + delay - started > give_up_s:
                stats["failed"] += 1
                return None
            await asyncio.sleep(delay)

    async def one(i: int) -> None:
        ws = await connect(i)
        if ws is None:
            return
        try:
            stats["welcomed"] += 1
            next_hb = loop.time() + random.uniform(0, heartbeat_s)
            while not stop.is_set():
                try:
                    await asyncio.wait_for(ws.recv(), max(0.0, next_hb - loop.time()))  # drain server frames
                except TimeoutError:
                    await ws.send(json.dumps(p.heartbeat(int(time.time() * 1000), int(loop.time() - started), 0)))
                    stats["heartbeats"] += 1
                    next_hb += heartbeat_s
        except websockets.ConnectionClosed:
            stats["closed"] += 1
        except Exception as exc:  # noqa: BLE001 -- counted and reported
            stats["failed"] += 1
            stats["errors"].append(repr(exc)[:200])
        finally:
            with contextlib.suppress(Exception):
                await ws.close()

    tasks = []
    for k in range(count):
        tasks.append(asyncio.create_task(one(first + k)))
        if ramp_s > 0:
            await asyncio.sleep(ramp_s / count)
        if k % 100 == 99:
            print(json.dumps({"progress": stats["welcomed"]}), flush=True)
    deadline = loop.time() + 300
    while stats["welcomed"] + stats["failed"] + stats["closed"] < count and loop.time() < deadline:
        await asyncio.sleep(0.2)
    print(json.dumps({"ready": stats["welcomed"], "failed": stats["failed"], "shed": stats["shed"]}), flush=True)
    await stop.wait()
    holders = [t for t in tasks if not t.done()]
    await asyncio.wait(holders, timeout=10) if holders else None
    stats["errors"] = stats["errors"][:5]
    print(json.dumps({"final": stats, "cpu_s": cpu_seconds()}), flush=True)


# --- benchmark ----------------------------------------------------------------------------------


def _raise_nofile(want: int) -> int:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    new = min(hard, max(soft, want))
    resource.setrlimit(resource.RLIMIT_NOFILE, (new, hard))
    return new


def _die_with_parent() -> None:
    from tests.harness import _die_with_parent as die

    die()


def _start_clients(url: str, ranges: list[tuple[int, int]], heartbeat_s: float, ramp_s: float) -> list[subprocess.Popen]:
    return [subprocess.Popen(
        [sys.executable, "-m", "benchmarks.connections", "--client", "--url", url, "--first", str(first),
         "--count", str(count), "--heartbeat", str(heartbeat_s), "--ramp", str(ramp_s)],
        cwd=ROOT, stdout=subprocess.PIPE, text=True, preexec_fn=_die_with_parent) for first, count in ranges]


def _wait_ready(clients: list[subprocess.Popen], timeout: float) -> tuple[int, int]:
    ready = failed = 0
    deadline = time.monotonic() + timeout
    for c in clients:
        while time.monotonic() < deadline:
            line = c.stdout.readline()
            if not line:
                raise RuntimeError(f"client {c.pid} exited with {c.wait()} before it was ready")
            msg = json.loads(line)
            if "ready" in msg:
                ready += msg["ready"]
                failed += msg["failed"]
                break
        else:
            raise RuntimeError("clients not ready in time")
    return ready, failed


def _stop_clients(clients: list[subprocess.Popen]) -> list[dict]:
    finals = []
    for c in clients:
        if c.poll() is None:
            c.send_signal(signal.SIGTERM)
    for c in clients:
        try:
            out, _ = c.communicate(timeout=20)
        except subprocess.TimeoutExpired:
            c.kill()
            out, _ = c.communicate()
        for line in (out or "").splitlines():
            with contextlib.suppress(ValueError):
                msg = json.loads(line)
                if "final" in msg:
                    finals.append(msg)
    return finals


def run(*, connections: int = 10_000, clients: int = 4, hold: float = 60.0, heartbeat: float = 30.0,
        ramp: float | None = None) -> dict:
    """Hold `connections` authenticated agents on one uvicorn process; measure RSS per connection
    and the server's CPU over `hold` seconds."""
    from django.db import connection

    from tests.harness import ConsoleServer

    connections = max(connections, WARM + clients)
    _raise_nofile(connections + 2000)
    ramp = connections / 200 if ramp is None else ramp  # ~200 connects/s offered; retries come on top
    server = None
    started: list[subprocess.Popen] = []
    with scratch_database("bench_conn") as settings_dict:
        try:
            provision(connections)
            connection.close()
            server = ConsoleServer(settings_dict, extra_env={
                "LOG_LEVEL": "WARNING", "DB_CONN_MAX_AGE": "60", "AGENT_HEARTBEAT_S": str(int(heartbeat))}).start()
            pid = server.proc.pid
            # Warm-up: a few connections so code paths, pools and caches exist before the baseline.
            started += _start_clients(server.ws_url, [(0, WARM)], heartbeat, 1.0)
            warm_ok, _ = _wait_ready(started, 120)
            time.sleep(2)
            before = memory(pid)
            rest = connections - WARM
            share = [rest // clients + (1 if k < rest % clients else 0) for k in range(clients)]
            ranges, first = [], WARM
            for n in share:
                ranges.append((first, n))
                first += n
            t0, ramp_cpu0 = time.monotonic(), cpu_seconds(pid)
            batch = _start_clients(server.ws_url, ranges, heartbeat, ramp)
            started += batch
            ready, failed = _wait_ready(batch, ramp + 320)
            connect_s = time.monotonic() - t0
            ramp_cpu = cpu_seconds(pid) - ramp_cpu0
            held = warm_ok + ready
            time.sleep(3)  # let the server settle after the ramp
            cpu0, w0 = cpu_seconds(pid), time.monotonic()
            time.sleep(hold)
            server_cpu, window = cpu_seconds(pid) - cpu0, time.monotonic() - w0
            after = memory(pid)
            from fleet.models import Device

            online = Device.objects.filter(online=True).count()
            connection.close()
            alive = server.proc.poll() is None
            finals = _stop_clients(started)
            started = []
        finally:
            if started:
                _stop_clients(started)
            if server is not None:
                server.stop()
    added = max(1, ready)
    per_rss = (after["rss"] - before["rss"]) / added
    per_uss = (after["uss"] - before["uss"]) / added
    cpu_pct = 100 * server_cpu / window
    heartbeats = sum(f["final"]["heartbeats"] for f in finals)
    closed = sum(f["final"]["closed"] for f in finals)
    shed = sum(f["final"].get("shed", 0) for f in finals)
    retries = sum(f["final"].get("retries", 0) for f in finals)
    errors = [e for f in finals for e in f["final"]["errors"]][:5]
    return result("connections", [
        row("authenticated connections held", held, "", f"{connections:,} (10,000 full)",
            held >= 10_000 if connections >= 10_000 else None),
        row("devices online in the DB (presence)", online, ""),
        row("server RSS per connection", per_rss / 1024, "KB", "≤ 40 KB", per_rss / 1024 <= 40),
        row("server USS per connection", per_uss / 1024, "KB", "≤ 40 KB", per_uss / 1024 <= 40),
        row("server RSS total", after["rss"] / 2**20, "MB"),
        row("server CPU while holding", cpu_pct, "% of a core", "< 10 %", cpu_pct < 10),
        # Everything the server spent while holding, over the heartbeats it received in the window.
        row("server CPU while holding per connection", 1e6 * server_cpu / window / max(1, held), "µs/s"),
        row("server CPU while holding per heartbeat received", 1e6 * server_cpu / max(1, held * window / heartbeat),
            "µs"),
        row("connect ramp", connect_s, "s"),
        row("handshakes completed per second during the ramp", ready / connect_s, "/s"),
        row("server CPU during the ramp per completed handshake (sheds and retries included)",
            1000 * ramp_cpu / max(1, ready), "ms"),
        row("server CPU during the ramp", 100 * ramp_cpu / connect_s, "% of a core"),
    ], connections=connections, clients=clients, hold_s=hold, heartbeat_s=heartbeat, ramp_s=ramp,
        failed=failed, shed_with_4503_and_retried=shed, retried_after_other_failures=retries,
        closed_during_hold=closed, heartbeats_sent=heartbeats, errors=errors,
        server_alive=alive, memory_before=before, memory_after=after,
        clients_cpu_s=sum(f["cpu_s"] for f in finals))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--connections", type=int, default=10_000)
    parser.add_argument("--clients", type=int, default=4, help="client processes")
    parser.add_argument("--hold", type=float, default=60.0, help="measured window, seconds")
    parser.add_argument("--heartbeat", type=float, default=30.0, help="heartbeat interval, seconds")
    parser.add_argument("--ramp", type=float, default=None, help="seconds to spread the connects over")
    parser.add_argument("--client", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--url", help=argparse.SUPPRESS)
    parser.add_argument("--first", type=int, default=0, help=argparse.SUPPRESS)
    parser.add_argument("--count", type=int, default=0, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.client:
        asyncio.run(client_main(args.url, args.first, args.count, args.heartbeat, args.ramp or 0.0))
        return
    from benchmarks.run import print_results

    print_results([run(connections=args.connections, clients=args.clients, hold=args.hold,
                       heartbeat=args.heartbeat, ramp=args.ramp)])


if __name__ == "__main__":
    main()
