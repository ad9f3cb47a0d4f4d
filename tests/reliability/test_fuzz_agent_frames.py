"""Bad input over the agent protocol (issue #9): property-based fuzzing of every frame type a
device can send, over real WebSockets, against one live `ConsoleServer`.

How it works
  * The corpus is drawn by Hypothesis (`tests/reliability/frames.py`): near-valid frames of
    every device→server type of the contract with one field deleted, replaced by a hostile
    value (ints beyond 2^63 and beyond 4,300 digits, NaN/Infinity/-0.0/1e308, lone
    surrogates, NUL, RTL overrides, homoglyphs, 100 KiB strings, nesting 1,000–50,000 deep,
    30,000-item arrays) or joined by an unknown field, plus raw garbage (not JSON, truncated
    JSON, `NaN` literals, binary frames, invalid UTF-8, frames over 256 KiB and over 1 MiB).
    Drawing is reproducible (fixed seeds, no example database, generation phase only) and
    runs in two child processes that stream chunks to the test while it replays them, so
    drawing and sending overlap instead of adding up.
  * Replay: `handshake` cases are the first frame on a fresh connection; `session` cases go
    to several authenticated fuzz devices at once (one of them pending approval). Each frame
    is followed by a probe (a frame of an unknown type); the server handles a connection's
    frames in order, so everything it says before the probe's `unknown_type` answer is its
    reaction to the fuzz frame — an error, a close, or nothing (accepted). Acks, which come
    after the commit, are matched by `seq`. Placeholders are filled per connection: the next
    `seq`, a signature over this connection's nonce, the current time, the last challenge id.
    A device the server closes is reconnected (that is expected for some inputs).
  * The server's rate limit is raised for this test (each frame is doubled by its probe);
    rate limiting is not what is fuzzed here. Database connections persist as in production
    (DB_CONN_MAX_AGE=60; the harness default of 0 makes every reconnect several times dearer).
  * A control device sends valid telemetry in parallel the whole time.

Properties checked at the end: the server log has no traceback or error; every reaction is
one the contract defines (error codes and close codes from docs/protocol.md; counted by
outcome); the control device's points are all stored exactly once, its cursor and status
are right, and fuzzed devices' data is only on fuzzed devices; `/healthz` answers and a fresh
device can enroll and send telemetry afterwards.
"""

from __future__ import annotations

import asyncio
import collections
import json
import math
import multiprocessing
import os
import re
import time
import urllib.request
from dataclasses import dataclass, field

import pytest
import websockets
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from django.db import connection

from agent_stub import protocol as p
from tests.agent.rawagent import RawAgent, public_bytes
from tests.harness import ConsoleServer
from tests.reliability.frames import Case, Fill, RawBytes, RawText, encode, stream_corpus

pytestmark = pytest.mark.django_db(transaction=True)

PROBE = "x-fuzz-probe"
# Error codes the contract and docs/protocol.md define for the server to send.
CONTRACT_ERRORS = {"unknown_type", "bad_frame", "seq_gap", "rate_limited", "not_allowed", "frame_too_large",
                   "handshake_timeout", "challenge_unknown", "unavailable", "auth_failed", "revoked", "replaced"}
CONTRACT_CLOSES = {int(code) for code in p.Close}
# Below the application the WebSocket layer itself refuses: 1009 for frames over uvicorn's
# --ws-max-size (docs/protocol.md, limits), 1007 for a text frame that is not UTF-8 (RFC 6455).
TELEMETRY_REASONS = {"bad_point", "bad_metric_name", "bad_value", "time_out_of_range", "metric_cardinality_exceeded"}
SERVER_PUSHES = {"welcome", "attest.challenge", "attest.result", "command", "rollout.offer", "rollout.cancel"}
CONTROL_UID = "fz-control"
AUTH_TARGET_UID = "fz-auth-target"


@pytest.fixture
def fuzz_server(transactional_db, tmp_path):
    """One live server for the whole run, with the per-connection rate limit out of the way."""
    server = ConsoleServer(connection.settings_dict, log_dir=tmp_path,
                           extra_env={"AGENT_RATE_PER_S": "100000", "AGENT_RATE_BURST": "100000",
                                      "DB_CONN_MAX_AGE": "60"}).start()
    yield server
    server.stop()


def make_token(**kwargs) -> str:
    from datetime import timedelta

    from security.services import enrollment_token_create

    kwargs.setdefault("expires_in", timedelta(hours=2))
    kwargs.setdefault("max_uses", 1_000_000)
    return enrollment_token_create(actor="fuzz", **kwargs)[1]


# --- the run's bookkeeping -----------------------------------------------------------------
@dataclass
class Report:
    sent: int = 0
    outcomes: collections.Counter = field(default_factory=collections.Counter)
    by_label: dict = field(default_factory=lambda: collections.defaultdict(collections.Counter))
    violations: list = field(default_factory=list)
    acks: int = 0
    seconds: float = 0.0
    timings: dict = field(default_factory=dict)
    latency: collections.Counter = field(default_factory=collections.Counter)
    replay_started: float = 0.0
    accepted_points: collections.Counter = field(default_factory=collections.Counter)
    points_bound: collections.Counter = field(default_factory=collections.Counter)
    enrolled: set = field(default_factory=set)
    control_sent: list = field(default_factory=list)
    control_acks: list = field(default_factory=list)

    def violation(self, text: str) -> None:
        if len(self.violations) < 50:
            self.violations.append(text)

    def record(self, case: Case, outcome: str) -> None:
        self.sent += 1
        self.outcomes[outcome] += 1
        self.by_label[case.label][outcome] += 1


def short(case: Case) -> str:
    return f"{case.label} {case.payload!r:.300}"


class Device:
    """A fuzzed device: its key, its next seq and the last challenge it was sent."""

    def __init__(self, server: ConsoleServer, uid: str, key: Ed25519PrivateKey, report: Report) -> None:
        self.server, self.uid, self.key, self.report = server, uid, key, report
        self.ws = None
        self.nonce = b""
        self.expected = 1
        self.challenge: str | None = None
        self.status = ""
        self.acked: dict[int, dict] = {}
        self.telemetry_seqs: set[int] = set()
        self.inflight: set[int] = set()  # submitted on this connection, not acked yet
        self.overtaken = False  # the last connection closed with frames in flight

    async def connect(self) -> None:
        self.ws = await websockets.connect(self.server.ws_url, compression=None, max_size=None, open_timeout=30,
                                           ping_interval=None, close_timeout=5)
        hello = json.loads(await self.ws.recv())
        self.nonce = p.b64d(hello["nonce"])
        sig = p.b64e(self.key.sign(p.auth_message(self.nonce, self.uid)))
        await self.ws.send(json.dumps({"type": "auth", "device_uid": self.uid, "sig": sig, "agent_version": "fuzz"}))
        while True:
            frame = json.loads(await asyncio.wait_for(self.ws.recv(), 30))
            if frame["type"] == "welcome":
                break
            self.report.violation(f"{self.uid}: {frame} before welcome")
        self.status = frame["status"]
        self.expected = frame["last_acked_seq"] + 1
        self.inflight.clear()

    def resolve(self, ctx: dict):
        def fill(f: Fill):
            if f.what == "seq":
                ctx["seq"] = self.expected + f.delta
                return ctx["seq"]
            if f.what == "now":
                return p.now_ms() + f.delta
            if f.what == "challenge":
                return self.challenge or "00000000-0000-4000-8000-000000000000"
            if f.what == "sig":
                return p.b64e(self.key.sign(p.auth_message(self.nonce, self.uid)))
            if f.what == "uid":
                return self.uid
            return 1  # enroll-only placeholders are meaningless on a session

        return fill


def render(case: Case, fill) -> tuple[str | bytes, bool]:
    """The frame's wire form and whether it goes as a text frame."""
    if isinstance(case.payload, RawText):
        return case.payload.text, True
    if isinstance(case.payload, RawBytes):
        return case.payload.data, not case.binary
    text = encode(case.payload, fill)
    if case.binary:
        return text.encode("utf-8", "surrogatepass"), False
    return text, True


def check_error(report: Report, where: str, frame: dict) -> str:
    code = frame.get("code")
    if code not in CONTRACT_ERRORS:
        report.violation(f"{where}: error code outside the contract: {frame!r:.300}")
    return str(code)


# The contract's close codes this run can provoke (nothing is revoked or overloaded). The
# handshake workers run concurrently and all authenticate as one target device, so one of
# them may be replaced (4409) by another.
SESSION_CLOSES = {p.Close.PROTOCOL_ERROR, p.Close.TOO_LARGE}
HANDSHAKE_CLOSES = SESSION_CLOSES | {p.Close.AUTH_FAILED, p.Close.REPLACED}
assert SESSION_CLOSES | HANDSHAKE_CLOSES <= CONTRACT_CLOSES


def expected_closes(codes: set, data: str | bytes, text: bool) -> set:
    """Close codes that may answer this frame: the contract's, plus the transport's own."""
    size = len(data.encode("utf-8", "surrogatepass") if isinstance(data, str) else data)
    # Over uvicorn's 1 MiB the transport closes (1009), sometimes while the frame is still
    # being written, which the sender sees as a dropped connection (1006).
    extra = {1009, 1006} if size > 1024 * 1024 else set()
    if text and isinstance(data, bytes):
        extra.add(1007)
    return codes | extra


def close_code(exc: websockets.ConnectionClosed) -> int:
    return exc.rcvd.code if exc.rcvd is not None else 1006


# --- session fuzzing -----------------------------------------------------------------------
async def session_worker(device: Device, queue: asyncio.Queue, report: Report) -> None:
    await device.connect()
    while True:
        case = await queue.get()
        if case is None:
            break
        if device.ws is None:
            t0 = time.monotonic()
            await device.connect()
            report.latency["reconnect"] += time.monotonic() - t0
        await exchange(device, case, report)
    report.timings[f"{device.uid} sent"] = time.monotonic() - report.replay_started
    await drain_acks(device, report)
    report.timings[f"{device.uid} drained"] = time.monotonic() - report.replay_started
    if device.ws is not None:
        await device.ws.close()


async def exchange(device: Device, case: Case, report: Report) -> None:
    t0 = time.monotonic()
    ctx: dict = {}
    data, text = render(case, device.resolve(ctx))
    sent_type = case.payload.get("type") if type(case.payload) is dict else None
    outcome = "accepted"
    try:
        await device.ws.send(data, text=text)
        await device.ws.send('{"type":"%s"}' % PROBE)  # noqa: UP031
        while True:
            try:
                frame = json.loads(await asyncio.wait_for(device.ws.recv(), 60))
            except TimeoutError:
                report.violation(f"{device.uid}: no answer within 60 s to {short(case)}")
                outcome = "hang"
                await device.ws.close()
                device.ws = None
                break
            kind = frame.get("type")
            if kind == "error" and PROBE in frame.get("message", "") and frame.get("code") == "unknown_type":
                break
            if kind == "error":
                code = check_error(report, f"{device.uid} {case.label}", frame)
                if code == "seq_gap" and type(frame.get("expected")) is int:
                    device.expected = frame["expected"]
                if outcome == "accepted":
                    outcome = f"error:{code}"
            elif kind == "ack":
                note_ack(device, frame, report)
            elif kind == "attest.challenge":
                device.challenge = frame["challenge_id"]
            elif kind == "attest.result":
                if outcome == "accepted":
                    outcome = "attest.result"
            elif kind == "welcome":
                device.status = frame["status"]
            elif kind not in SERVER_PUSHES:
                report.violation(f"{device.uid}: unexpected frame {frame!r:.200} after {short(case)}")
    except websockets.ConnectionClosed as exc:
        code = close_code(exc)
        # A reconnect can overtake the previous connection's in-flight commit; the server then
        # closes with 4409 (docs/protocol.md, durable uplink) and the next welcome resyncs.
        overtaken = {p.Close.REPLACED} if device.overtaken else set()
        if code not in expected_closes(SESSION_CLOSES | overtaken, data, text):
            report.violation(f"{device.uid}: closed {code} after {short(case)}")
        device.overtaken = bool(device.inflight)
        outcome = f"close:{code}" + (f"/{outcome.removeprefix('error:')}" if outcome != "accepted" else "")
        device.ws = None
    if (outcome == "accepted" and sent_type in p.DURABLE_TYPES and ctx.get("seq") == device.expected
            and case.payload.get("seq") == Fill("seq")):
        device.inflight.add(device.expected)
        if sent_type == "telemetry":
            device.telemetry_seqs.add(device.expected)
            # An upper bound on what this frame may store (its ack can be lost to a close).
            wide = p.validate_telemetry(json.loads(data), now_ms=p.now_ms(), retention_ms=10 * 365 * 86_400_000)
            report.points_bound[device.uid] += len(wide.points)
        else:
            # This seq was a telemetry frame's before a reconnect resynced the device below it
            # (that frame was never committed): its ack is now this frame's.
            device.telemetry_seqs.discard(device.expected)
        device.expected += 1
    report.record(case, outcome)
    report.latency[outcome] += time.monotonic() - t0


def note_ack(device: Device, frame: dict, report: Report) -> None:
    seq = frame.get("seq")
    report.acks += 1
    if type(seq) is not int or type(frame.get("accepted")) is not int or type(frame.get("rejected")) is not list:
        report.violation(f"{device.uid}: malformed ack {frame!r:.200}")
        return
    if seq in device.telemetry_seqs:
        for r in frame["rejected"]:
            if r.get("reason") not in TELEMETRY_REASONS:
                report.violation(f"{device.uid}: telemetry ack with a reason outside the contract: {frame!r:.300}")
        if seq not in device.acked:
            report.accepted_points[device.uid] += frame["accepted"]
    device.acked.setdefault(seq, frame)
    device.inflight.discard(seq)


async def drain_acks(device: Device, report: Report) -> None:
    """Wait for the acks of frames still in flight (if the connection is still open)."""
    if device.ws is None:
        return
    deadline = time.monotonic() + 20
    try:
        while device.inflight and time.monotonic() < deadline:
            frame = json.loads(await asyncio.wait_for(device.ws.recv(), 20))
            if frame.get("type") == "ack":
                note_ack(device, frame, report)
    except (TimeoutError, websockets.ConnectionClosed):
        pass


# --- handshake fuzzing ---------------------------------------------------------------------
async def handshake_worker(server: ConsoleServer, queue: asyncio.Queue, target_key: Ed25519PrivateKey, token: str,
                           report: Report, counter: list) -> None:
    while True:
        case = await queue.get()
        if case is None:
            return
        counter[0] += 1
        new_uid = f"fz-new-{counter[0]}"
        new_key = Ed25519PrivateKey.generate()
        ws = await websockets.connect(server.ws_url, compression=None, max_size=None, open_timeout=30,
                                      ping_interval=None, close_timeout=5)
        outcome = "accepted"
        try:
            nonce = p.b64d(json.loads(await ws.recv())["nonce"])

            def fill(f: Fill, nonce=nonce, new_uid=new_uid, new_key=new_key):
                return {
                    "uid": lambda: AUTH_TARGET_UID,
                    "sig": lambda: p.b64e(target_key.sign(p.auth_message(nonce, AUTH_TARGET_UID))),
                    "token": lambda: token,
                    "new_uid": lambda: new_uid,
                    "public_key": lambda: p.b64e(public_bytes(new_key)),
                    "new_sig": lambda: p.b64e(new_key.sign(p.auth_message(nonce, new_uid))),
                    "now": lambda: p.now_ms() + f.delta,
                    "seq": lambda: 1 + f.delta,
                    "challenge": lambda: "00000000-0000-4000-8000-000000000000",
                }[f.what]()

            data, text = render(case, fill)
            await ws.send(data, text=text)
            while True:
                frame = json.loads(await asyncio.wait_for(ws.recv(), 60))
                kind = frame.get("type")
                if kind == "error":
                    code = check_error(report, f"handshake {case.label}", frame)
                    outcome = f"error:{code}"
                elif kind == "welcome":
                    outcome = "welcome"
                    if frame["device_uid"] != AUTH_TARGET_UID:
                        report.enrolled.add(frame["device_uid"])
                    break
                elif kind == "tpm.credential":
                    report.violation(f"tpm.credential without a TPM: {short(case)}")
                    break
                else:
                    report.violation(f"handshake: unexpected {frame!r:.200} after {short(case)}")
        except TimeoutError:
            report.violation(f"handshake: no answer within 60 s to {short(case)}")
            outcome = "hang"
        except websockets.ConnectionClosed as exc:
            code = close_code(exc)
            if code not in expected_closes(HANDSHAKE_CLOSES, data, text):
                report.violation(f"handshake: closed {code} after {short(case)}")
            outcome = f"close:{code}" + (f"/{outcome.removeprefix('error:')}" if outcome != "accepted" else "")
        finally:
            await ws.close()
        report.record(case, outcome)


# --- the control device --------------------------------------------------------------------
async def control_worker(server: ConsoleServer, key: Ed25519PrivateKey, stop: asyncio.Event, report: Report) -> None:
    device = Device(server, CONTROL_UID, key, report)
    await device.connect()
    base = p.now_ms() - 3_600_000
    seq = 0
    while not stop.is_set():
        seq += 1
        points = [[base + seq * 10 + j, "control.value", float(seq * 10 + j)] for j in range(5)]
        await device.ws.send(json.dumps(p.telemetry(seq, points)))
        report.control_sent += [tuple(pt) for pt in points]
        while True:
            try:
                frame = json.loads(await asyncio.wait_for(device.ws.recv(), 30))
            except (TimeoutError, websockets.ConnectionClosed) as exc:
                report.violation(f"control device disturbed: {exc!r}")
                return
            if frame.get("type") == "ack":
                report.control_acks.append(frame)
                break
            if frame.get("type") not in SERVER_PUSHES:
                report.violation(f"control device got {frame!r:.200}")
        await asyncio.sleep(0.02)
    await device.ws.close()


# --- the run -------------------------------------------------------------------------------
async def fuzz(server: ConsoleServer, *, count: int, seeds: tuple[int, ...], devices: list[Device],
               pending: Device, target_key: Ed25519PrivateKey, token: str, control_key: Ed25519PrivateKey,
               report: Report, handshake_workers: int = 3) -> None:
    loop = asyncio.get_running_loop()
    ctx = multiprocessing.get_context("spawn")
    out = ctx.Queue(maxsize=64)
    children = [ctx.Process(target=stream_corpus, args=(count // len(seeds), seed, out), daemon=True)
                for seed in seeds]
    for child in children:
        child.start()
    session_queues = [asyncio.Queue(maxsize=400) for _ in devices] + [asyncio.Queue(maxsize=400)]
    handshake_queue: asyncio.Queue = asyncio.Queue(maxsize=400)
    stop = asyncio.Event()
    control = asyncio.create_task(control_worker(server, control_key, stop, report))
    counter = [0]
    workers = [asyncio.create_task(session_worker(d, q, report)) for d, q in zip([*devices, pending], session_queues,
                                                                                    strict=True)]
    workers += [asyncio.create_task(handshake_worker(server, handshake_queue, target_key, token, report, counter))
                for _ in range(handshake_workers)]
    done, n = 0, 0
    try:
        while done < len(children):
            chunk = await loop.run_in_executor(None, out.get, True, 600)
            if chunk is None:
                done += 1
                continue
            for case in chunk:
                n += 1
                if case.phase == "handshake":
                    await handshake_queue.put(case)
                elif n % 20 == 0:
                    await session_queues[-1].put(case)  # the pending device gets one in twenty
                else:
                    await session_queues[n % len(devices)].put(case)
        report.timings["drawn"] = time.monotonic() - report.replay_started
        for q in session_queues:
            await q.put(None)
        for _ in range(handshake_workers):
            await handshake_queue.put(None)
        await asyncio.gather(*workers)
        report.timings["replayed"] = time.monotonic() - report.replay_started
    finally:
        stop.set()
        await control
        for child in children:
            child.join(10)


UVICORN_UTF8_REFUSAL = "ERROR:    Invalid UTF-8 sequence received from client."
RECORD_START = re.compile(r"^(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d+ |[A-Z]+:\s)")


def log_records(text: str) -> list[str]:
    """The server log as records: a first line (timestamped, or uvicorn's `LEVEL:`) and its
    continuation lines (tracebacks)."""
    records: list[str] = []
    for line in text.splitlines():
        if RECORD_START.match(line) or not records:
            records.append(line)
        else:
            records[-1] += "\n" + line
    return records


def stored(uid_sql: str, params: list) -> list[tuple]:
    with connection.cursor() as cursor:
        cursor.execute(uid_sql, params)
        return [tuple(row) for row in cursor.fetchall()]


def server_cpu(server: ConsoleServer) -> float:
    fields = open(f"/proc/{server.proc.pid}/stat").read().rsplit(")", 1)[1].split()  # noqa: SIM115
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def run_fuzz(server: ConsoleServer, count: int, seeds: tuple[int, ...], n_devices: int) -> Report:
    report = Report()
    auto = make_token(auto_approve=True)
    manual = make_token()

    async def setup_and_run() -> None:
        keys = {}
        for uid in [CONTROL_UID, AUTH_TARGET_UID, *[f"fz-dev-{i}" for i in range(n_devices)]]:
            agent = RawAgent(server.ws_url, uid)
            welcome = await agent.enroll(auto)
            assert welcome["type"] == "welcome" and welcome["status"] == "active", welcome
            await agent.close()
            keys[uid] = agent.key
        pending_agent = RawAgent(server.ws_url, "fz-pending")
        assert (await pending_agent.enroll(manual))["status"] == "pending"
        await pending_agent.close()
        report.replay_started = time.monotonic()
        devices = [Device(server, f"fz-dev-{i}", keys[f"fz-dev-{i}"], report) for i in range(n_devices)]
        pending = Device(server, "fz-pending", pending_agent.key, report)
        await fuzz(server, count=count, seeds=seeds, devices=devices, pending=pending,
                   target_key=keys[AUTH_TARGET_UID], token=auto, control_key=keys[CONTROL_UID], report=report)

    started, cpu = time.monotonic(), (time.process_time(), server_cpu(server))
    asyncio.run(setup_and_run())
    report.seconds = time.monotonic() - started
    report.timings["cpu s (test process, server)"] = (round(time.process_time() - cpu[0], 1),
                                                      round(server_cpu(server) - cpu[1], 1))
    return report


def check_properties(server: ConsoleServer, report: Report, count: int, n_devices: int) -> None:
    from fleet.models import Device as DeviceRow
    from fleet.models import UplinkCursor

    print(f"\ntimings {report.timings}\nlatency {report.latency}")
    print(f"\nframes sent {report.sent}; acks {report.acks}; outcomes {dict(report.outcomes.most_common())}")
    assert report.sent == count
    assert report.violations == [], "\n".join(report.violations)

    # (1) nothing unhandled on the server.
    records = log_records(server.log_path.read_text(errors="replace"))
    bad = [r for r in records if not r.startswith(UVICORN_UTF8_REFUSAL)
           and ("Traceback" in r or "ERROR" in r.split("\n", 1)[0] or "durable frame" in r)]
    assert bad == [], "server log:\n" + "\n".join(bad[:5])
    # uvicorn logs its own (handled) refusal of a non-UTF-8 text frame; each one closed with 1007.
    assert sum(r.startswith(UVICORN_UTF8_REFUSAL) for r in records) == report.outcomes["close:1007"]

    # (2) every reaction is a contract one (checked per frame above); every outcome kind is named.
    for outcome in report.outcomes:
        head = outcome.partition(":")[0]
        assert head in {"accepted", "error", "close", "attest.result", "welcome"}, outcome

    # (3) the control device is untouched: every point exactly once, cursor and status right.
    control_points = stored(
        "SELECT (extract(epoch FROM p.time) * 1000)::bigint, m.name, p.value FROM telemetry_point p "
        "JOIN telemetry_metric m ON m.id = p.metric_id JOIN fleet_device d ON d.id = p.device_id "
        "WHERE d.uid = %s ORDER BY p.time", [CONTROL_UID])
    assert len(report.control_acks) > 20
    assert all(a["accepted"] == 5 and a["rejected"] == [] for a in report.control_acks)
    assert [a["seq"] for a in report.control_acks] == list(range(1, len(report.control_acks) + 1))
    assert sorted(control_points) == sorted(report.control_sent)
    control = DeviceRow.objects.get(uid=CONTROL_UID)
    assert control.status == "active"
    assert UplinkCursor.objects.get(device=control).last_acked_seq == len(report.control_acks)
    # Fuzzed devices' data stays on fuzzed devices; the others got none.
    fuzzed = {f"fz-dev-{i}" for i in range(n_devices)}
    owners = stored("SELECT DISTINCT d.uid FROM telemetry_point p JOIN fleet_device d ON d.id = p.device_id", [])
    assert {uid for (uid,) in owners} <= fuzzed | {CONTROL_UID}
    control_names = stored("SELECT DISTINCT m.name FROM telemetry_point p JOIN telemetry_metric m ON m.id = p.metric_id "
                           "JOIN fleet_device d ON d.id = p.device_id WHERE d.uid = %s", [CONTROL_UID])
    assert control_names == [("control.value",)]
    event_owners = stored("SELECT DISTINCT d.uid FROM telemetry_deviceevent e JOIN fleet_device d ON d.id = e.device_id",
                          [])
    assert {uid for (uid,) in event_owners} <= fuzzed
    for uid in fuzzed:
        points = stored("SELECT m.name, p.value FROM telemetry_point p JOIN telemetry_metric m ON m.id = p.metric_id "
                        "JOIN fleet_device d ON d.id = p.device_id WHERE d.uid = %s", [uid])
        assert report.accepted_points[uid] <= len(points) <= report.points_bound[uid]
        assert all(p.METRIC_NAME_RE.fullmatch(name) and math.isfinite(value) for name, value in points)
    assert UplinkCursor.objects.filter(device__uid="fz-pending").values_list("last_acked_seq", flat=True).first() in (
        None, 0)
    assert DeviceRow.objects.get(uid="fz-pending").status == "pending"

    # The server is healthy and serves a fresh, valid session.
    with urllib.request.urlopen(f"{server.http_url}/healthz", timeout=10) as response:
        assert response.status == 200

    token = make_token(auto_approve=True)

    async def fresh() -> tuple[dict, dict]:
        agent = RawAgent(server.ws_url, "fz-fresh")
        welcome = await agent.enroll(token)
        await agent.telemetry(1, [[p.now_ms(), "fresh.metric", 1.0]])
        ack = await agent.recv_type("ack")
        await agent.close()
        return welcome, ack

    welcome, ack = asyncio.run(fresh())
    assert welcome["status"] == "active"
    assert ack == {"type": "ack", "seq": 1, "accepted": 1, "rejected": []}


@pytest.mark.timeout(900)  # ~90 s on a quiet 2-core box; far longer when eight runs share it
def test_ten_thousand_hostile_frames_get_contract_answers_and_leave_other_devices_untouched(fuzz_server):
    started = time.monotonic()
    report = run_fuzz(fuzz_server, count=10_000, seeds=(9, 10), n_devices=6)
    print(f"fuzz run: {report.sent} frames in {time.monotonic() - report.replay_started:.1f} s of replay, "
          f"{time.monotonic() - started:.1f} s with setup")
    check_properties(fuzz_server, report, 10_000, 6)


@pytest.mark.slow
@pytest.mark.timeout(3600)
def test_a_hundred_thousand_hostile_frames_get_contract_answers_and_leave_other_devices_untouched(fuzz_server):
    started = time.monotonic()
    report = run_fuzz(fuzz_server, count=100_000, seeds=(90, 91), n_devices=8)
    print(f"fuzz run: {report.sent} frames in {time.monotonic() - report.replay_started:.1f} s of replay, "
          f"{time.monotonic() - started:.1f} s with setup")
    check_properties(fuzz_server, report, 100_000, 8)


# --- regressions for what the fuzzing found ------------------------------------------------
def enroll_frame(agent: RawAgent, token: str, hardware) -> dict:
    sig = agent.sign() if agent.hello else p.b64e(bytes(64))
    return {"type": "enroll", "enrollment_token": token, "device_uid": agent.uid,
            "public_key": p.b64e(public_bytes(agent.key)), "sig": sig, "hardware": hardware, "tpm": None}


@pytest.mark.parametrize("hardware", [
    {"ram_mb": ""}, {"cpu_cores": "4"}, {"storage_mb": 1.5}, {"ram_mb": True}, {"cpu_cores": 0},
    {"ram_mb": 2**63}, {"accelerator": "quantum"}, {"os": ["linux"]}, {"model": "m" * 257}, [], "x",
])
def test_enroll_with_wrong_typed_hardware_is_refused_as_a_protocol_error_and_creates_nothing(hardware):
    with pytest.raises(p.ProtocolError) as refused:
        p.validate_enroll(enroll_frame(RawAgent("ws://unused", "hw-1"), "fet_x", hardware))
    assert refused.value.code == "bad_frame"
    assert "hardware" in refused.value.message


def test_enroll_hardware_keeps_known_fields_drops_nulls_and_ignores_unknown_keys():
    frame = enroll_frame(RawAgent("ws://unused", "hw-2"), "fet_x",
                         {"ram_mb": 4096, "cpu_cores": 2, "accelerator": "npu", "os": None, "colour": "blue"})
    assert p.validate_enroll(frame).hardware == {"ram_mb": 4096, "cpu_cores": 2, "accelerator": "npu",
                                                 "colour": "blue"}


def test_a_live_server_refuses_an_enroll_with_a_non_numeric_ram_size_with_4400_and_logs_no_traceback(fuzz_server):
    from fleet.models import Device as DeviceRow

    token = make_token(auto_approve=True)

    async def scenario() -> tuple[dict, int]:
        agent = RawAgent(fuzz_server.ws_url, "hw-live")
        await agent.open()
        await agent.send(enroll_frame(agent, token, {"model": "box", "ram_mb": "", "cpu_cores": 4}))
        error = await agent.recv()
        return error, await agent.closed_code()

    error, code = asyncio.run(scenario())
    assert error["type"] == "error" and error["code"] == "bad_frame" and "hardware.ram_mb" in error["message"]
    assert code == p.Close.PROTOCOL_ERROR
    assert not DeviceRow.objects.filter(uid="hw-live").exists()
    assert "Traceback" not in fuzz_server.log_path.read_text(errors="replace")


def test_an_event_time_beyond_year_9999_is_a_bad_frame_not_a_storage_failure_and_the_device_carries_on(fuzz_server):
    token = make_token(auto_approve=True)
    now = p.now_ms()

    async def scenario() -> tuple[dict, dict, int]:
        agent = RawAgent(fuzz_server.ws_url, "ev-far")
        assert (await agent.enroll(token))["status"] == "active"
        await agent.send(p.event(1, [p.event_item(2**63 - 1, "log", "info", "far future")]))
        refused = await agent.recv_type("error", "ack")
        await agent.send(p.event(1, [p.event_item(now, "log", "info", "now")]))
        ack = await agent.recv_type("error", "ack")
        await agent.close()
        return refused, ack

    refused, ack = asyncio.run(scenario())
    assert refused["code"] == "bad_frame" and refused["seq"] == 1 and "events[0].t" in refused["message"]
    assert ack == {"type": "ack", "seq": 1, "accepted": 1, "rejected": []}
    assert "Traceback" not in fuzz_server.log_path.read_text(errors="replace")


def test_an_unknown_frame_type_is_named_in_the_error_without_echoing_all_of_it(fuzz_server):
    token = make_token(auto_approve=True)
    huge_type = "x" * 200_000

    async def scenario() -> tuple[dict, dict, int]:
        agent = RawAgent(fuzz_server.ws_url, "echo-1")
        assert (await agent.enroll(token))["status"] == "active"
        await agent.send({"type": huge_type})
        unknown = await agent.recv_type("error")
        await agent.close()
        fresh = RawAgent(fuzz_server.ws_url, "echo-2")
        await fresh.open()
        await fresh.send({"type": huge_type})
        refused = await fresh.recv()
        return unknown, refused, await fresh.closed_code()

    unknown, refused, code = asyncio.run(scenario())
    assert unknown["code"] == "unknown_type" and len(unknown["message"]) < 200
    assert refused["code"] == "bad_frame" and len(refused["message"]) < 200
    assert code == p.Close.PROTOCOL_ERROR


def test_a_frame_answered_after_the_connection_was_closed_by_another_task_is_dropped_not_a_crash():
    # Found at 100,000 frames: `attest.evidence` awaited its appraisal while the acker closed
    # the connection (4409); sending the `attest.result` afterwards raised in uvicorn and
    # killed the connection task with a traceback.
    from console.agent_consumer import AgentConsumer

    sent: list[dict] = []

    async def scenario() -> None:
        consumer = AgentConsumer()
        consumer.closed = False

        async def base_send(message: dict) -> None:
            if sent and sent[-1]["type"] == "websocket.close":
                raise RuntimeError("Unexpected ASGI message after sending 'websocket.close'")  # as uvicorn does
            sent.append(message)

        consumer.base_send = base_send
        await consumer.close_with(p.Close.REPLACED, p.error(code="replaced", message="newer connection"))
        await consumer.send_frame(p.attest_result("c-1", "warning"))

    asyncio.run(scenario())
    assert [m["type"] for m in sent] == ["websocket.send", "websocket.close"]
    assert json.loads(sent[0]["text"])["code"] == "replaced"
    assert sent[1]["code"] == p.Close.REPLACED
