"""Rollout benchmark over simulated agents: real WebSockets, real downloads, a real Celery worker and beat.

    .venv/bin/python -m benchmarks.rollout_agents [--devices 10000] [--clients 4] [--quick] [--web-processes 2]
                                                  [--rate 60000] [--soak 3] [--step 0.05] [--timeout 1800]

What runs (all loopback, all real):
- a scratch PostgreSQL database (created, migrated, dropped) with N active devices and their
  preauthorized Ed25519 keys, bulk-inserted (`benchmarks.connections.provision`);
- one console server (uvicorn, `tests.harness.ConsoleServer`, a DB connection pool), or with
  --web-processes N, N of them sharing one listening port (the deploy layout, docs/deploy.md; the
  kernel hands each connection to one of them): the agent WebSocket and the artifact downloads;
- a Celery worker (`celery -A console worker --concurrency 2`, as scripts/run.sh, started through a
  thin wrapper that only records each task's CPU and wall time from Celery's task_prerun/postrun
  signals into a JSON-lines file) and Celery beat (the project's schedule: the orchestrator
  tick every 5 s); broker = REDIS_URL;
- --clients client processes holding one authenticated WebSocket per device. On each
  `rollout.offer` a simulated agent reports `acked`, GETs the signed download URL (a small
  artifact, --artifact-kb; size and SHA-256 checked), then reports `downloading`, `downloaded`,
  `installing`, `verifying` and `committed` (--step seconds apart, each a durable frame with
  its `seq`, acked by the server), or `rolled_back` (`self_test_failed`) if it was chosen to fail.

Scenario 1 (throughput): one campaign over every device, waves 1 % → 10 % → 100 %, soak --soak
seconds, a success-ratio gate (≥ 0.95) per wave; --fail-fraction of the devices of wave
--fail-wave roll back (below the gate's tolerance, so the campaign completes). The campaign's
rate limit is --rate offers/min (default 60,000: 12× the target, so it does not cap the
measurement; the product's own caps are one step's batch, ROLLOUTS_OFFER_BATCH = 500, and a step
per campaign at most once a second from device kicks plus the 5 s tick), max_concurrent = N.
Figures: offers/min counted from the offer frames the agents received (client time stamps, the
first offer per device), overall (start → last offer), the best 10-s window (×6), per whole
minute, and over the last wave alone; beside them the orchestrator's own figure, from the
executions' `offered_at` in the database (per minute, and the last wave from its start); time
from `campaign_start` to the campaign read back `completed`; orchestrator CPU per tick (the
worker's `rollouts.tasks.tick` CPU from the signals, and the whole worker's CPU over the campaign
divided by the ticks it ran, which includes the event-driven steps).

Scenario 2 (gate latency): a new version on the same fleet, waves 10 % → 100 %, a failure gate
(max --gate-max-pct %, min sample --gate-min-sample) on the first wave, --gate-fail-fraction of the
first wave's devices roll back. The moment the threshold is crossed is the client time stamp of
the final report that made failures / decided exceed the maximum with at least min-sample
decided (reports ordered by the time they were sent); the pause is the first time the parent,
polling the database every 0.1 s, reads the campaign `paused`. Target: ≤ 10 s.

Bounded in time; stops the server, the worker, beat and the clients; drops the scratch database.
On SIGTERM each client process first writes what its agents saw to a file in the work directory,
then aborts its sockets at once (no close handshake awaited per socket), so the figures survive
a server that is still busy; a client that wrote nothing is named in the output
(`clients_reported` counts those that did).

Cost: --quick (300 agents, 2 client processes) takes ~2–4 min on 2 cores. The full run (10,000
agents, 4 client processes) holds 10,000 sockets (the file limit is raised), needs roughly 1 GB of
RAM across the server and the clients, and is dominated by the server applying ~60,000 status
frames and by the offer pushes: expect 15–30 min on 2 cores (scenario 1 is bounded by --timeout,
default 1800 s). Every offer, download and report also lands in the figures' details.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import hashlib
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from urllib.parse import urlsplit

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks import ROOT, cpu_seconds, pct, result, row, scratch_database, tree_cpu_seconds
from benchmarks.run import _stop_child

QUICK = {"devices": 300, "clients": 2, "soak": 2, "timeout": 240, "gate_timeout": 90}
V1, V2 = "1.1.0", "1.2.0"


# --- simulated agents (client process) --------------------------------------------------------


async def _fetch(url: str, sem: asyncio.Semaphore) -> tuple[int, bytes]:
    """A minimal HTTP/1.1 GET (Connection: close): (status, body). Keeps the client cheap."""
    parts = urlsplit(url)
    target = parts.path + (f"?{parts.query}" if parts.query else "")
    async with sem:
        reader, writer = await asyncio.open_connection(parts.hostname, parts.port or 80)
        try:
            writer.write(f"GET {target} HTTP/1.1\r\nHost: {parts.netloc}\r\nConnection: close\r\n\r\n".encode())
            data = await asyncio.wait_for(reader.read(-1), 60)
        finally:
            writer.close()
    head, _, body = data.partition(b"\r\n\r\n")
    status = int(head.split(b" ", 2)[1])
    if b"transfer-encoding: chunked" in head.lower():
        out, rest = bytearray(), body
        while rest:
            size_line, _, rest = rest.partition(b"\r\n")
            size = int(size_line.split(b";")[0], 16)
            if size == 0:
                break
            out += rest[:size]
            rest = rest[size + 2:]
        body = bytes(out)
    return status, body


async def agents_main(url: str, first: int, count: int, fails_path: str, step_s: float, ramp_s: float,
                      out_path: str) -> None:
    """Hold `count` agents; follow every offer to its end; on SIGTERM write what was seen as JSON to `out_path`."""
    import websockets

    from agent_stub import protocol as p
    from agent_stub.client import PING_INTERVAL_S, PING_TIMEOUT_S
    from benchmarks.connections import authenticate

    loop = asyncio.get_running_loop()
    started = loop.time()
    stop = asyncio.Event()
    loop.add_signal_handler(signal.SIGTERM, stop.set)
    loop.add_signal_handler(signal.SIGINT, stop.set)
    fails = {version: set(indices) for version, indices in json.loads(Path(fails_path).read_text()).items()}
    sockets: list = []
    downloads = asyncio.Semaphore(64)
    stats = {"welcomed": 0, "failed": 0, "handshake_retries": 0, "closed": 0, "duplicate_offers": 0, "downloads": 0,
             "bad_downloads": 0,
             "status_frames": 0, "acks": 0, "server_errors": 0, "errors": []}
    offers: list[list] = []  # [t, execution_id, device index, version]
    finals: list[list] = []  # [t_sent, t_acked or None, execution_id, device index, version, state]

    def note(exc: BaseException | str) -> None:
        if len(stats["errors"]) < 10:
            stats["errors"].append(str(exc)[:200] if isinstance(exc, str) else repr(exc)[:200])

    async def connect(i: int):
        """An authenticated socket and its `welcome`, retrying like an agent: after a 4503
        `overloaded` its `retry_after_ms`, after anything else a backoff with jitter; it gives
        up `ramp_s + 300` s after the client started."""
        backoff = 1.0
        while True:
            ws = welcome = None
            try:
                ws = await websockets.connect(url, compression=None, open_timeout=60, close_timeout=2,
                                              ping_interval=PING_INTERVAL_S, ping_timeout=PING_TIMEOUT_S)
                welcome = await authenticate(ws, i, timeout=60)
                if welcome.get("type") == "welcome":
                    return ws, welcome
                if welcome.get("code") != "overloaded":
                    note(f"handshake answer: {welcome}")
            except Exception as exc:  # noqa: BLE001 -- counted, reported and retried
                note(exc)
            if ws is not None:
                with contextlib.suppress(Exception):
                    await ws.close()
            stats["handshake_retries"] += 1
            if welcome and welcome.get("code") == "overloaded":
                delay = welcome.get("retry_after_ms", 1000) / 1000
            else:
                delay, backoff = random.uniform(backoff / 2, backoff), min(backoff * 2, 30.0)
            if loop.time() + delay - started > ramp_s + 300:
                return None, None
            await asyncio.sleep(delay)

    async def one(i: int) -> None:
        ws, welcome = await connect(i)
        if ws is None:
            stats["failed"] += 1
            return
        sockets.append(ws)
        seq = 0
        acks: dict[int, asyncio.Future] = {}
        seen: set = set()
        lock = asyncio.Lock()

        async def report(execution_id, state: str, progress: int, error: dict | None = None) -> asyncio.Future:
            nonlocal seq
            async with lock:  # seq order = send order
                seq += 1
                fut = acks[seq] = loop.create_future()
                await ws.send(json.dumps(p.rollout_status(seq, execution_id, state, progress, error)))
            stats["status_frames"] += 1
            return fut

        async def install(offer: dict) -> None:
            execution_id, artifact = offer["execution_id"], offer["artifact"]
            version = artifact["version"]
            await report(execution_id, "acked", 0)
            status, body = await _fetch(artifact["url"], downloads)
            stats["downloads"] += 1
            if status != 200 or len(body) != artifact["size"] or hashlib.sha256(body).hexdigest() != artifact["sha256"]:
                stats["bad_downloads"] += 1
                note(f"download {status}, {len(body)} bytes")
                final, error = "rejected", p.rollout_error("digest_mismatch", retryable=False, detail="bench")
            else:
                for state, progress in (("downloading", 50), ("downloaded", 100), ("installing", 0), ("verifying", 0)):
                    await report(execution_id, state, progress)
                    await asyncio.sleep(step_s)
                final, error = "committed", None
                if i in fails.get(version, ()):
                    final = "rolled_back"
                    error = p.rollout_error("self_test_failed", retryable=False, detail="bench: health check failed")
            sent = time.time()
            fut = await report(execution_id, final, 100 if final == "committed" else 0, error)
            record = [sent, None, execution_id, i, version, final]
            finals.append(record)
            with contextlib.suppress(Exception):
                record[1] = await asyncio.wait_for(fut, 120)

        async def guarded(offer: dict) -> None:
            try:
                await install(offer)
            except websockets.ConnectionClosed:
                pass
            except Exception as exc:  # noqa: BLE001 -- counted and reported
                note(exc)

        try:
            seq = int(welcome.get("last_acked_seq") or 0)
            stats["welcomed"] += 1
            heartbeat_s = float(welcome.get("heartbeat_s") or 30)
            next_hb = loop.time() + heartbeat_s * (0.2 + 0.8 * ((i * 7919) % 1000) / 1000)
            while True:
                try:
                    raw = await asyncio.wait_for(ws.recv(), max(0.0, next_hb - loop.time()))
                except TimeoutError:
                    await ws.send(json.dumps(p.heartbeat(int(time.time() * 1000), 0, 0)))
                    next_hb += heartbeat_s
                    continue
                frame = json.loads(raw)
                kind = frame.get("type")
                if kind == "rollout.offer":
                    offers.append([time.time(), frame["execution_id"], i, frame["artifact"]["version"]])
                    if frame["execution_id"] in seen:
                        stats["duplicate_offers"] += 1  # a re-delivery: an agent ignores an offer it has
                        continue
                    seen.add(frame["execution_id"])
                    asyncio.create_task(guarded(frame))  # noqa: RUF006 -- the socket's life bounds it
                elif kind == "ack":
                    stats["acks"] += 1
                    fut = acks.pop(frame.get("seq"), None)
                    if fut is not None and not fut.done():
                        fut.set_result(time.time())
                elif kind == "error":
                    stats["server_errors"] += 1
                    note(f"server error frame: {raw[:150]}")
        except websockets.ConnectionClosed:
            if not stop.is_set():
                stats["closed"] += 1
        except Exception as exc:  # noqa: BLE001 -- counted and reported
            stats["failed"] += 1
            note(exc)
        finally:
            with contextlib.suppress(Exception):
                await ws.close()

    tasks = []
    for k in range(count):
        tasks.append(asyncio.create_task(one(first + k)))
        if ramp_s > 0:
            await asyncio.sleep(ramp_s / count)
    deadline = started + ramp_s + 310  # connect() gives up at ramp_s + 300
    while stats["welcomed"] + stats["failed"] < count and loop.time() < deadline:
        await asyncio.sleep(0.2)
    print(json.dumps({"ready": stats["welcomed"], "failed": stats["failed"]}), flush=True)
    await stop.wait()
    # The result first, then the sockets. Closing thousands of sockets one close handshake at a
    # time (each waiting for a busy server's answer) outlasted the parent's patience at 10,000
    # agents and the statistics were lost with the killed process: write them to a file (renamed
    # into place, so the parent reads all or nothing), then drop every connection at once
    # (TCP abort: the server sees them go, no handshake awaited) and leave.
    tmp = Path(out_path + ".tmp")
    tmp.write_text(json.dumps({"final": stats, "offers": offers, "finals": finals, "cpu_s": cpu_seconds()}))
    tmp.rename(out_path)
    print(json.dumps({"written": out_path}), flush=True)
    for ws in sockets:
        with contextlib.suppress(Exception):
            ws.transport.abort()
    sys.stdout.flush()
    os._exit(0)  # no teardown of thousands of tasks: the result is on disk


# --- Celery worker wrapper (records per-task CPU; the worker itself is Celery's) --------------------


def celery_main(argv: list[str]) -> None:
    """`celery <argv>` with task_prerun/postrun hooks appending {task, cpu, wall, t} lines to $BENCH_TASK_LOG.

    Prefork children run one task at a time, so the child's process-time delta is the task's CPU."""
    from celery import signals

    path = os.environ["BENCH_TASK_LOG"]
    started: dict[str, tuple[float, float]] = {}
    fds: dict[int, int] = {}

    @signals.task_prerun.connect(weak=False)
    def _pre(task_id=None, task=None, **_):
        started[task_id] = (time.process_time(), time.perf_counter())

    @signals.task_postrun.connect(weak=False)
    def _post(task_id=None, task=None, **_):
        c0, w0 = started.pop(task_id, (None, None))
        if c0 is None:
            return
        line = json.dumps({"task": task.name, "cpu": time.process_time() - c0, "wall": time.perf_counter() - w0,
                           "t": time.time(), "pid": os.getpid()}) + "\n"
        fd = fds.get(os.getpid())
        if fd is None:
            fd = fds[os.getpid()] = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
        os.write(fd, line.encode())  # one write per line on O_APPEND: lines never interleave

    from celery.bin.celery import main

    sys.argv = ["celery", *argv]
    main()


# --- the benchmark ----------------------------------------------------------------------------------


def _die_with_parent() -> None:
    from tests.harness import _die_with_parent as die

    die()


def _spawn(args: list[str], env: dict, log: Path) -> subprocess.Popen:
    """A child in its own process group (so stopping it reaches its pool), killed if we die."""
    with log.open("ab") as out:
        return subprocess.Popen([sys.executable, *args], cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT,
                                preexec_fn=_die_with_parent, start_new_session=True)


def _wait_log(path: Path, needle: str, proc: subprocess.Popen, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if needle in path.read_text(errors="replace"):
            return
        if proc.poll() is not None:
            break
        time.sleep(0.2)
    tail = "\n".join(path.read_text(errors="replace").splitlines()[-30:])
    raise RuntimeError(f"{path.name}: {needle!r} not seen (exit {proc.poll()}):\n{tail}")


def _plan_waves(campaign) -> dict[int, int]:
    """device id → wave, from the same plan SQL that `campaign_start` materialises (deterministic)."""
    from django.db import connection

    from rollouts.services import plan_sql

    sql, params = plan_sql(campaign)
    with connection.cursor() as cursor:
        cursor.execute(f"SELECT device_id, wave, state FROM ({sql}) AS plan", params)  # noqa: S608 -- product SQL
        return {device_id: wave for device_id, wave, state in cursor.fetchall() if state == "pending"}


def _choose(indices: list[int], fraction: float, salt: str) -> list[int]:
    """round(fraction × n) of `indices`, picked by a stable hash (spread over the clients)."""
    n = round(fraction * len(indices))
    return sorted(indices, key=lambda i: hashlib.sha256(f"{salt}:{i}".encode()).digest())[:n]


def _poll_campaign(campaign_id: int, done: tuple[str, ...], timeout: float, every: float) -> tuple[str, float, list]:
    """Poll the campaign row until its state is in `done`: (state, time.time() seen, wave changes)."""
    from django.db import connection

    from rollouts.models import Campaign

    deadline = time.monotonic() + timeout
    waves: list = []
    last = None
    while True:
        state, wave = Campaign.objects.filter(pk=campaign_id).values_list("state", "current_wave").get()
        now = time.time()
        if (state, wave) != last:
            waves.append([round(now, 3), state, wave])
            last = (state, wave)
        if state in done or time.monotonic() > deadline:
            connection.close()
            return state, now, waves
        time.sleep(every)


def _rate_figures(times: list[float], t0: float) -> tuple[float, float]:
    """(overall offers/min from t0 to the last offer, best 10-s window × 6)."""
    if not times:
        return float("nan"), float("nan")
    span = max(times) - t0
    buckets: dict[int, int] = {}
    for t in times:
        buckets[int((t - t0) // 10)] = buckets.get(int((t - t0) // 10), 0) + 1
    return (len(times) / span * 60 if span > 0 else float("nan")), max(buckets.values()) * 6.0


def _stop_agents(agents: list[subprocess.Popen], work: Path, timeout: float = 120) -> list[dict]:
    """SIGTERM every client process at once; each writes its result to `work/agents-K.json`
    before it drops its sockets. Returns the results read back (a client that wrote none is
    reported, and its figures are missing, never silently zero)."""
    for proc in agents:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
    deadline = time.monotonic() + timeout
    finals = []
    for k, proc in enumerate(agents):
        try:
            proc.wait(max(1.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        path = work / f"agents-{k}.json"
        try:
            finals.append(json.loads(path.read_text()))
        except (OSError, ValueError) as exc:
            print(f"[rollout_agents] client {k} (pid {proc.pid}, exit {proc.returncode}) wrote no result: {exc!r}",
                  flush=True)
    return finals


def _per_minute(times: list[float], t0: float) -> list[int]:
    """Counts per whole minute since t0 (minute 0 first)."""
    counts: dict[int, int] = {}
    for t in times:
        counts[int((t - t0) // 60)] = counts.get(int((t - t0) // 60), 0) + 1
    return [counts.get(k, 0) for k in range(max(counts) + 1)] if counts else []


def _stats_ms(values: list[float]) -> dict:
    if not values:
        return {}
    return {"n": len(values), "mean": round(1000 * sum(values) / len(values), 1), "p50": round(1000 * pct(values, .5), 1),
            "p95": round(1000 * pct(values, .95), 1), "max": round(1000 * max(values), 1)}


def run(*, devices: int = 10_000, clients: int = 4, rate: int = 60_000, soak: int = 3, step: float = 0.05,
        artifact_kb: int = 4, fail_wave: int = 3, fail_fraction: float = 0.02, gate_fail_fraction: float = 0.3,
        gate_max_pct: float = 10.0, gate_min_sample: int = 20, timeout: float = 1800.0, gate_timeout: float = 180.0,
        ramp: float | None = None, web_processes: int = 1) -> dict:
    """Both scenarios; returns the runner's rows (see benchmarks/__init__.py)."""
    from django.conf import settings
    from django.core.files.base import ContentFile
    from django.db import connection

    from benchmarks.connections import _raise_nofile, _wait_ready, provision
    from console.celery import app as celery_app
    from fleet.models import Device
    from rollouts import services
    from rollouts.models import Campaign, Execution
    from tests.harness import ConsoleServer, database_url_for, shared_listener

    _raise_nofile(devices + 2000)
    ramp = max(2.0, devices / 200) if ramp is None else ramp  # ~200 handshakes/s offered
    work = Path(tempfile.mkdtemp(prefix="bench-ragents-"))
    settings.MEDIA_ROOT = str(work / "media")
    task_log = work / "tasks.jsonl"
    print(f"[rollout_agents] logs and artifacts in {work} (removed after a successful run)", flush=True)
    server = worker = beat = listener = None
    servers: list = []
    agents: list[subprocess.Popen] = []
    out: dict = {}
    db_offers: list = []
    with scratch_database("bench_ragents") as settings_dict:
        try:
            t_prov = time.monotonic()
            provision(devices)
            index_of = {d: int(u.split("-")[1]) for d, u in Device.objects.values_list("id", "uid")}
            payload = os.urandom(artifact_kb * 1024)

            def campaign(version: str, waves: list[dict]) -> Campaign:
                artifact = services.artifact_create(
                    actor="bench", name="anomaly", kind="model", version=version,
                    variants=[services.VariantUpload("default", [], ContentFile(payload, name=f"model-{version}.onnx"))])
                return services.campaign_create(actor="bench", artifact=artifact, name=f"bench {version}",
                                                rate_per_min=rate, max_concurrent=devices, waves=waves)

            ratio = [{"type": "success_ratio", "min_ratio": 0.95}]
            c1 = campaign(V1, [{"size": "1%", "soak_s": soak, "gates": ratio},
                               {"size": "10%", "soak_s": soak, "gates": ratio},
                               {"size": "100%", "soak_s": soak, "gates": ratio}])
            gate = {"type": "failure", "max_pct": gate_max_pct, "min_sample": gate_min_sample}
            c2 = campaign(V2, [{"size": "10%", "soak_s": soak, "gates": [gate]}, {"size": "100%", "soak_s": soak}])
            waves1 = {index_of[d]: w for d, w in _plan_waves(c1).items()}
            waves2 = {index_of[d]: w for d, w in _plan_waves(c2).items()}
            fails = {V1: _choose([i for i, w in waves1.items() if w == fail_wave - 1], fail_fraction, V1),
                     V2: _choose([i for i, w in waves2.items() if w == 0], gate_fail_fraction, V2)}
            (work / "fails.json").write_text(json.dumps(fails))
            print(f"[rollout_agents] {devices:,} devices provisioned, 2 artifacts and campaigns drafted in "
                  f"{time.monotonic() - t_prov:.1f}s; failing: {len(fails[V1])} in wave {fail_wave} of {V1}, "
                  f"{len(fails[V2])} in wave 1 of {V2}", flush=True)
            connection.close()

            env_db = {"DATABASE_URL": database_url_for(settings_dict), "DB_CONN_MAX_AGE": "60",
                      "MEDIA_ROOT": settings.MEDIA_ROOT, "LOG_LEVEL": "WARNING"}
            # One server, or N uvicorn processes sharing one listening port (the deploy layout,
            # docs/deploy.md): the kernel hands each new connection to one of them.
            listener = shared_listener() if web_processes > 1 else None
            servers = [ConsoleServer(settings_dict, extra_env=env_db, log_dir=work, sock=listener)
                       for _ in range(web_processes)]
            server = servers[0]
            # Download URLs point at this port, whoever builds them (the worker's steps, the
            # server's offers re-sent on connect).
            env_db["ROLLOUTS_DOWNLOAD_BASE_URL"] = server.http_url
            for each in servers:
                each.env["ROLLOUTS_DOWNLOAD_BASE_URL"] = server.http_url
                each.launch()
            for each in servers:
                each.wait_ready(60)
            env = {**os.environ, **env_db, "BENCH_TASK_LOG": str(task_log)}

            share = [devices // clients + (1 if k < devices % clients else 0) for k in range(clients)]
            first = 0
            t_conn = time.monotonic()
            for n in share:
                agents.append(subprocess.Popen(
                    [sys.executable, "-m", "benchmarks.rollout_agents", "--agents", "--url", server.ws_url,
                     "--first", str(first), "--count", str(n), "--fails", str(work / "fails.json"),
                     "--step", str(step), "--ramp", str(ramp), "--out", str(work / f"agents-{len(agents)}.json")],
                    cwd=ROOT, stdout=subprocess.PIPE, text=True, preexec_fn=_die_with_parent))
                first += n
            ready, failed = _wait_ready(agents, ramp + 320)
            deadline = time.monotonic() + 60
            while Device.objects.filter(online=True).count() < ready and time.monotonic() < deadline:
                time.sleep(0.5)
            online = Device.objects.filter(online=True).count()
            connect_s = time.monotonic() - t_conn
            print(f"[rollout_agents] {ready:,} agents connected ({failed} failed), {online:,} online in the DB, "
                  f"in {connect_s:.1f}s", flush=True)

            celery_app.control.purge()  # nothing stale in our broker db
            worker = _spawn(["-m", "benchmarks.rollout_agents", "--celery", "-A", "console", "worker",
                             "--loglevel", "INFO", "--concurrency", "2"], env, work / "worker.log")
            beat = _spawn(["-m", "celery", "-A", "console", "beat", "--loglevel", "INFO",
                           "--schedule", str(work / "celerybeat-schedule")], env, work / "beat.log")
            _wait_log(work / "worker.log", "ready.", worker, 60)
            time.sleep(6)  # a tick or two with no campaign running: the idle baseline

            # --- scenario 1 -----------------------------------------------------------------
            cpu_w0, cpu_s0 = tree_cpu_seconds(worker.pid), sum(cpu_seconds(each.pid) for each in servers)
            t_start = time.time()
            services.campaign_start(actor="bench", campaign=c1, reason="benchmark")
            state1, t_done, waves_seen = _poll_campaign(c1.id, ("completed", "paused", "aborted"), timeout, 0.25)
            cpu_w1, cpu_s1 = tree_cpu_seconds(worker.pid), sum(cpu_seconds(each.pid) for each in servers)
            counts1 = dict(Execution.objects.filter(campaign=c1).values_list("state").annotate(
                n=__import__("django.db.models", fromlist=["Count"]).Count("id")).order_by())
            reason1 = Campaign.objects.get(pk=c1.pk).state_reason
            # The orchestrator's side: when each execution was (last) offered, from the database.
            db_offers = [(o.timestamp(), w) for o, w in Execution.objects.filter(campaign=c1, offered_at__isnull=False)
                         .values_list("offered_at", "wave")]
            print(f"[rollout_agents] scenario 1: {state1} after {t_done - t_start:.1f}s; {counts1}", flush=True)

            # --- scenario 2 -----------------------------------------------------------------
            state2 = None
            t_paused = t_start2 = float("nan")
            if state1 == "completed":
                t_start2 = time.time()
                services.campaign_start(actor="bench", campaign=c2, reason="benchmark")
                state2, t_paused, _ = _poll_campaign(c2.id, ("paused", "completed", "aborted"), gate_timeout, 0.1)
                print(f"[rollout_agents] scenario 2: {state2} after {t_paused - t_start2:.1f}s", flush=True)
                time.sleep(3)  # let in-flight finals of the first wave land
            reason2 = Campaign.objects.get(pk=c2.pk).state_reason
            connection.close()
            server_alive = all(each.proc.poll() is None for each in servers)
            finals = _stop_agents(agents, work)
            agents = []
        finally:
            if agents:
                _stop_agents(agents, work)
            for proc in (beat, worker):
                if proc is not None:
                    _stop_child(proc, grace=15)
            for each in servers:
                each.stop()
            if listener is not None:
                listener.close()

    # --- figures ---------------------------------------------------------------------------------
    stats = {k: sum(f["final"][k] for f in finals) for k in
             ("welcomed", "failed", "handshake_retries", "closed", "duplicate_offers", "downloads", "bad_downloads",
              "status_frames",
              "acks", "server_errors")}
    errors = [e for f in finals for e in f["final"]["errors"]][:8]
    offers = [o for f in finals for o in f["offers"]]
    reports = [r for f in finals for r in f["finals"]]
    first_offer: dict = {}
    for t, eid, i, version in sorted(offers):
        first_offer.setdefault(eid, (t, i, version))
    o1 = [t for t, i, v in first_offer.values() if v == V1]
    overall, peak = _rate_figures(o1, t_start)
    last_wave = [t for t, i, v in first_offer.values() if v == V1 and waves1.get(i) == 2]
    lw_span = max(last_wave) - min(last_wave) if last_wave else 0.0
    last_wave_rate = len(last_wave) / lw_span * 60 if lw_span >= 1 else float("nan")
    per_s: dict[int, int] = {}
    for t in o1:
        per_s[int(t - t_start)] = per_s.get(int(t - t_start), 0) + 1
    offer_timeline = [per_s.get(k, 0) for k in range(max(per_s) + 1)] if per_s else []
    agents_per_min = _per_minute(o1, t_start)
    db_per_min = _per_minute([t for t, _w in db_offers], t_start)
    # From the moment the parent saw the last wave start (polled every 0.25 s) to its last offer:
    # the orchestrator may offer a whole wave in one step (one `offered_at`), so a span between
    # its first and last offers can be zero.
    t_wave3 = next((t for t, _s, w in waves_seen if w == 2), None)
    db_last = [t for t, w in db_offers if w == 2]

    def wave_span(times: list[float]) -> float:
        """Seconds from the last wave's start (as polled, or its first offer if earlier) to its last offer."""
        return max(times) - min(t_wave3 if t_wave3 is not None else min(times), min(times)) if times else 0.0

    def since_wave_start(times: list[float]) -> float:
        span = wave_span(times)
        return len(times) / span * 60 if span >= 1 else float("nan")  # a whole wave in one step: see the span

    db_last_wave_rate, agents_last_wave_rate = since_wave_start(db_last), since_wave_start(last_wave)
    tasks = []
    with contextlib.suppress(OSError):
        tasks = [json.loads(line) for line in task_log.read_text().splitlines() if line.strip()]
    in1 = [t for t in tasks if t_start <= t["t"] <= t_done]
    ticks = [t for t in in1 if t["task"] == "rollouts.tasks.tick"]
    steps = [t for t in in1 if t["task"] == "rollouts.tasks.step_campaign"]
    idle_ticks = [t for t in tasks if t["task"] == "rollouts.tasks.tick" and t["t"] < t_start]
    worker_cpu = cpu_w1 - cpu_w0
    # Gate latency: when did failures / decided first exceed the maximum (reports in send order)?
    crossed = None
    decided = failed_n = 0
    for sent, _acked, _eid, _i, _version, final in sorted(r for r in reports if r[4] == V2 and waves2.get(r[3]) == 0):
        decided += 1
        failed_n += final != "committed"
        if decided >= gate_min_sample and 100 * failed_n / decided > gate_max_pct:
            crossed = sent
            break
    lag = t_paused - crossed if (state2 == "paused" and crossed is not None) else float("nan")
    complete_s = t_done - t_start
    tick_cpu = [t["cpu"] for t in ticks]
    out.update(
        devices=devices, clients=clients, web_processes=web_processes, clients_reported=len(finals),
        rate_limit_per_min=rate, offer_batch=services.conf.get("OFFER_BATCH"),
        soak_s=soak, step_s=step, artifact_kb=artifact_kb, connect_s=round(connect_s, 1), online_before_start=online,
        executions=counts1, state_reason=reason1, waves_seen=[[round(t - t_start, 2), s, w] for t, s, w in waves_seen],
        agents=stats, errors=errors, offers_campaign1=len(o1), final_reports=len(reports),
        offers_per_second_from_start=offer_timeline, offers_per_minute_agents=agents_per_min,
        offers_per_minute_orchestrator=db_per_min, offers_campaign1_db=len(db_offers),
        last_wave_offers=len(last_wave), last_wave_span_s_agents=round(wave_span(last_wave), 2),
        last_wave_span_s_orchestrator=round(wave_span(db_last), 2),
        tick_cpu_ms=_stats_ms(tick_cpu), tick_wall_ms=_stats_ms([t["wall"] for t in ticks]),
        idle_tick_cpu_ms=_stats_ms([t["cpu"] for t in idle_ticks]),
        step_cpu_ms=_stats_ms([t["cpu"] for t in steps]), step_wall_ms=_stats_ms([t["wall"] for t in steps]),
        other_tasks=sorted({t["task"] for t in in1} - {"rollouts.tasks.tick", "rollouts.tasks.step_campaign"}),
        worker_cpu_s=round(worker_cpu, 2), server_cpu_s=round(cpu_s1 - cpu_s0, 2),
        clients_cpu_s=round(sum(f["cpu_s"] for f in finals), 2), server_alive=server_alive,
        scenario2={"state": state2, "reason": reason2, "gate": gate, "failing_in_wave1": len(fails[V2]),
                   "wave1_devices": sum(1 for w in waves2.values() if w == 0),
                   "decided_at_crossing": decided if crossed else None, "failed_at_crossing": failed_n if crossed else None,
                   "start_to_pause_s": round(t_paused - t_start2, 2) if state2 else None})
    n_ticks = max(1, len(ticks))
    shutil.rmtree(work, ignore_errors=True)
    rows = [
        row(f"campaign over {devices:,} agents (WebSocket + Celery)", state1, "", "completed", state1 == "completed"),
        row("time to complete (start → completed, 3 waves, soak "
            f"{soak}s each)", complete_s, "s"),
        row(f"offers/min overall (rate limit {rate:,}/min)", overall, "offers/min", "≥ 5,000/min",
            None if overall != overall else overall >= 5000),
        row("offers/min, best 10-s window", peak, "offers/min", "≥ 5,000/min", None if peak != peak else peak >= 5000),
        row("offers/min, last wave (agents: first offer per device)", last_wave_rate, "offers/min"),
        row("offers/min, last wave from its start (agents / orchestrator's offered_at)",
            f"{agents_last_wave_rate:,.0f} / {db_last_wave_rate:,.0f}", "offers/min"),
        row("offers/min, best whole minute (agents / orchestrator)",
            f"{max(agents_per_min, default=0):,} / {max(db_per_min, default=0):,}", "offers/min"),
        row(f"orchestrator tick CPU (mean of {len(ticks)} ticks)", 1000 * sum(tick_cpu) / n_ticks if ticks else None,
            "ms"),
        row("orchestrator tick CPU p95 / max", f"{out['tick_cpu_ms'].get('p95', '–')} / "
            f"{out['tick_cpu_ms'].get('max', '–')}", "ms"),
        row(f"worker CPU per tick (incl. {len(steps)} event-driven steps)", 1000 * worker_cpu / n_ticks, "ms"),
        row("status frames acked / sent", f"{stats['acks']:,} / {stats['status_frames']:,}", ""),
    ]
    rows.append(row(f"failure gate (max {gate_max_pct:g} %, min sample {gate_min_sample}): campaign", state2 or "–", "",
                    "paused", state2 == "paused"))
    rows.append(row("gate tripped after threshold crossed", lag, "s", "≤ 10 s", None if lag != lag else lag <= 10))
    return result("rollout_agents", rows, **out)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help=f"small and short: {QUICK}")
    parser.add_argument("--devices", type=int)
    parser.add_argument("--clients", type=int, help="client processes (default 4)")
    parser.add_argument("--rate", type=int, default=60_000, help="campaign rate limit, offers/min")
    parser.add_argument("--soak", type=int, help="soak per wave, seconds (default 3)")
    parser.add_argument("--step", type=float, default=0.05, help="agent delay between status reports, seconds")
    parser.add_argument("--artifact-kb", type=int, default=4)
    parser.add_argument("--fail-wave", type=int, default=3, help="scenario 1: wave (1-3) whose devices may fail")
    parser.add_argument("--fail-fraction", type=float, default=0.02, help="scenario 1: fraction of that wave failing")
    parser.add_argument("--gate-fail-fraction", type=float, default=0.3, help="scenario 2: failing fraction of wave 1")
    parser.add_argument("--gate-max-pct", type=float, default=10.0)
    parser.add_argument("--gate-min-sample", type=int, default=20)
    parser.add_argument("--timeout", type=float, help="scenario 1 bound, seconds (default 1800)")
    parser.add_argument("--web-processes", type=int, help="uvicorn processes sharing the port (default 1)")
    parser.add_argument("--json", type=Path, help="also write the result here")
    parser.add_argument("--agents", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--celery", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--url", help=argparse.SUPPRESS)
    parser.add_argument("--first", type=int, default=0, help=argparse.SUPPRESS)
    parser.add_argument("--count", type=int, default=0, help=argparse.SUPPRESS)
    parser.add_argument("--fails", help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    parser.add_argument("--ramp", type=float, default=None, help="seconds to spread the connects over")
    if "--celery" in sys.argv[1:2]:
        celery_main(sys.argv[2:])
        return
    args = parser.parse_args()
    if args.agents:
        asyncio.run(agents_main(args.url, args.first, args.count, args.fails, args.step, args.ramp or 0.0, args.out))
        return
    params = dict(QUICK) if args.quick else {}
    for name in ("devices", "clients", "soak", "timeout", "ramp", "web_processes"):
        if getattr(args, name) is not None:
            params[name] = getattr(args, name)
    params.update(rate=args.rate, step=args.step, artifact_kb=args.artifact_kb, fail_wave=args.fail_wave,
                  fail_fraction=args.fail_fraction, gate_fail_fraction=args.gate_fail_fraction,
                  gate_max_pct=args.gate_max_pct, gate_min_sample=args.gate_min_sample)

    def terminate(signum, frame):  # run the finally blocks: stop processes, drop the scratch database
        raise SystemExit(128 + signum)

    signal.signal(signal.SIGTERM, terminate)
    from benchmarks import setup_django
    from benchmarks.run import print_results

    setup_django()
    res = run(**params)
    print_results([res])
    if args.json:
        args.json.write_text(json.dumps(res, default=str, indent=1))


if __name__ == "__main__":
    main()
