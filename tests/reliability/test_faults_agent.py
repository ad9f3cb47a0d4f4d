"""Faults on the agent side (issue #9): an agent SIGKILLed in the middle of an install, and an
outbox on a disk that fills up.

The agent is its own OS process (``python -m agent_stub run``) talking to a real console
(uvicorn subprocess, ``tests.harness.ConsoleServer``) that runs a real campaign. The kill points
are reached deterministically through the OTA test hook (``AGENT_STUB_OTA_PAUSE_AT`` in
``agent_stub/ota.py``): the agent writes a marker file there and blocks until it is killed.
The full disk is a real tmpfs of a few MB, filled with a file until ``write`` says ENOSPC;
mounting it needs root (CAP_SYS_ADMIN) and the test fails, never skips, without it.
"""

from __future__ import annotations

import errno
import io
import json
import os
import signal
import sqlite3
import subprocess
import sys
import time
import zipfile
from pathlib import Path
from typing import Any

import pytest
from django.core.files.uploadedfile import SimpleUploadedFile
from django.db import connection

from agent_stub import protocol as P
from agent_stub.client import Agent
from agent_stub.inference import DEFAULT_MODEL
from agent_stub.outbox import Outbox
from tests.agent_stub.test_ota import TRUSTED, offer
from tests.harness import ROOT, ConsoleServer, free_port

SHIPPED_MODEL = json.loads(DEFAULT_MODEL.with_suffix(".json").read_text())["version"]


# --- helpers -----------------------------------------------------------------------------

def wait_for(what: str, predicate, timeout: float = 60.0, every: float = 0.3, on_timeout=lambda: "") -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(every)
    raise AssertionError(f"timed out after {timeout:.0f}s waiting for {what}\n{on_timeout()}")


class AgentProcess:
    """``python -m agent_stub run`` as a child process (so it can be SIGKILLed)."""

    def __init__(self, server_url: str, state_dir: Path, uid: str, *, token: str | None = None,
                 log: Path, env: dict[str, str] | None = None) -> None:
        argv = [sys.executable, "-m", "agent_stub", "--log-level", "INFO", "run", "--server", server_url,
                "--state-dir", str(state_dir), "--uid", uid]
        if token:
            argv += ["--enroll-token", token]
        self.log = log
        with log.open("ab") as out:
            self.proc = subprocess.Popen(argv, cwd=ROOT, stdout=out, stderr=subprocess.STDOUT,
                                         env={**os.environ, "PYTHONPATH": str(ROOT), **(env or {})})

    def kill(self) -> None:
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(10)

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                self.kill()
        return self.proc.returncode

    def tail(self, lines: int = 30) -> str:
        return "\n".join(self.log.read_text(errors="replace").splitlines()[-lines:])


def read_outbox(path: Path) -> dict[str, Any]:
    """What an outbox file holds, read by a NEW process (plain sqlite3, read-only): integrity,
    frames in production order, counters. Works on a full disk."""
    script = r"""
import json, sqlite3, sys
db = sqlite3.connect(f"file:{sys.argv[1]}?mode=ro", uri=True)
rows = db.execute("SELECT id, seq, kind, body FROM frames ORDER BY id").fetchall()
print(json.dumps({
    "integrity": db.execute("PRAGMA integrity_check").fetchone()[0],
    "frames": [[i, s, k, json.loads(b)] for i, s, k, b in rows],
    "meta": dict(db.execute("SELECT key, value FROM meta").fetchall()),
}))
"""
    done = subprocess.run([sys.executable, "-c", script, str(path)], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)


@pytest.fixture
def small_disk(tmp_path):
    """Mount a tmpfs of the given size (real ENOSPC when full); unmounted afterwards."""
    mounts: list[Path] = []

    def mount(size: str) -> Path:
        point = tmp_path / f"disk{len(mounts)}"
        point.mkdir()
        done = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size},mode=0755", "tmpfs", str(point)],
                              capture_output=True, text=True)
        assert done.returncode == 0, (f"this test needs to mount a tmpfs (root / CAP_SYS_ADMIN) to get a real "
                                      f"full disk: {done.stderr.strip()}")
        mounts.append(point)
        return point

    yield mount
    for point in mounts:
        subprocess.run(["umount", "-l", str(point)], capture_output=True)


def write_until_it_fails(fd: int, block: int) -> int:
    """Append zeros until ``write`` fails; the errno it failed with."""
    try:
        while True:
            os.write(fd, b"\0" * block)
    except OSError as exc:
        return exc.errno


def fill(disk: Path) -> Path:
    """Write a file until the filesystem says ENOSPC (someone else filled the disk)."""
    filler = disk / "filler"
    fd = os.open(filler, os.O_WRONLY | os.O_CREAT, 0o600)
    try:
        for block in (65536, 512):  # big blocks, then the last partial ones
            assert write_until_it_fails(fd, block) == errno.ENOSPC
    finally:
        os.close(fd)
    assert os.statvfs(disk).f_bavail == 0
    return filler


def tel(n: int, points: int = 50) -> dict[str, Any]:
    return P.telemetry(None, [[1_700_000_000_000 + n, "test.n", n]] * points)


# --- a full disk: the outbox alone --------------------------------------------------------

def test_an_outbox_on_a_disk_someone_else_filled_drops_its_oldest_telemetry_and_stays_intact(small_disk) -> None:
    disk = small_disk("12m")
    path = disk / "outbox.sqlite"
    box = Outbox(path)
    box.append(P.state(None, {"agent": "1"}, {}))
    box.append(P.rollout_status(None, 5, "downloading", 25, None))
    for n in range(2000):  # about 4 MB of telemetry buffered while offline
        box.append(tel(n))
    filler = fill(disk)

    refused = [n for n in range(2000, 3000) if box.append(tel(n)) is None]
    result_row = box.append(P.command_result(None, "after-the-disk-filled", True, "ok"))
    dropped_frames, dropped_points = box.dropped_frames, box.dropped_points
    box.close()
    on_full_disk = read_outbox(path)
    filler.unlink()

    assert refused == [], "the newest telemetry must be kept; the oldest is what gets dropped"
    assert result_row is not None, "a command result must never be dropped for lack of space"
    assert dropped_frames > 0 and dropped_points == 50 * dropped_frames
    assert on_full_disk["integrity"] == "ok"
    kinds = [kind for _, _, kind, _ in on_full_disk["frames"]]
    assert kinds[:2] == ["state", "rollout.status"] and kinds[-1] == "command.result"
    kept = [body["points"][0][2] for _, _, kind, body in on_full_disk["frames"] if kind == "telemetry"]
    # exactly the oldest frames are gone: what is left is the newest, unbroken, in order
    assert kept == list(range(dropped_frames, 3000)), (kept[:3], kept[-3:], dropped_frames)
    assert on_full_disk["meta"]["dropped_frames"] == dropped_frames  # the count survived on disk too
    assert on_full_disk["meta"]["dropped_points"] == dropped_points

    # After the disk frees up, a new process reopens it and delivers every frame, seqs 1, 2, 3…
    script = r"""
import json, sys
from agent_stub.outbox import Outbox
box = Outbox(sys.argv[1])
seqs, kinds = [], []
while frames := box.take(100):
    seqs += [f.seq for f in frames]
    kinds += [f.kind for f in frames]
    box.ack(frames[-1].seq)
box.append({"type": "event", "events": []})
print(json.dumps({"seqs": seqs, "kinds": kinds, "left": box.buffered, "dropped": box.dropped_frames}))
box.close()
"""
    done = subprocess.run([sys.executable, "-c", script, str(path)], capture_output=True, text=True, timeout=120,
                          cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert done.returncode == 0, done.stderr
    resumed = json.loads(done.stdout)
    assert resumed["seqs"] == list(range(1, len(kinds) + 1))
    assert resumed["kinds"] == kinds and resumed["left"] == 1 and resumed["dropped"] == dropped_frames
    print(f"\nfull disk: {len(refused)} newest refused, {dropped_frames} oldest frames ({dropped_points} points) "
          f"dropped, {len(kept)} telemetry frames kept, all {len(kinds)} delivered after the disk freed up")


# --- a full disk: the agent process ---------------------------------------------------------

def stored_points(uid: str, metric: str) -> list[tuple[int, float]]:
    with connection.cursor() as cursor:
        cursor.execute(
            "SELECT (extract(epoch FROM p.time) * 1000)::bigint, p.value FROM telemetry_point p "
            "JOIN telemetry_metric m ON m.id = p.metric_id JOIN fleet_device d ON d.id = p.device_id "
            "WHERE d.uid = %s AND m.name = %s ORDER BY p.time", [uid, metric])
        return [(int(t), float(v)) for t, v in cursor.fetchall()]


@pytest.mark.slow  # `make test` keeps the outbox-level real-ENOSPC test above
@pytest.mark.flaky(reruns=1)
@pytest.mark.django_db(transaction=True)
def test_an_offline_agent_whose_disk_fills_up_keeps_its_newest_telemetry_and_reports_the_drops(
        console_server, enrollment_token, small_disk, tmp_path) -> None:
    from fleet.models import Device

    uid = "diskfull-1"
    state = small_disk("6m") / uid
    state.mkdir()
    # A fast producer so a few seconds of "offline" are many frames: 20 samples/s, 10 points a frame.
    (state / "config.json").write_text(json.dumps({"sample_hz": 20, "batch_points": 10, "batch_s": 0.2}))
    log = tmp_path / "agent.log"
    outbox = state / "outbox.sqlite"

    online = AgentProcess(console_server.ws_url, state, uid, token=enrollment_token(auto_approve=True), log=log)
    wait_for("enrollment", lambda: Device.objects.filter(uid=uid, status="active").exists(), on_timeout=online.tail)
    online.stop()

    nowhere = f"ws://127.0.0.1:{free_port()}/ws/agent/v1/"  # nothing listens: the agent buffers everything
    offline = AgentProcess(nowhere, state, uid, log=log)
    first = wait_for("20 buffered telemetry frames", lambda: (lambda f: f[0] if len(f) >= 20 else None)(
        [body["points"][0][0] for _, _, kind, body in read_outbox(outbox)["frames"] if kind == "telemetry"]),
        on_timeout=offline.tail)
    filler = fill(state.parent)
    full_at = P.now_ms()
    # Watched through the agent's log (on another disk), not by opening the outbox: a reader
    # holding a snapshot keeps SQLite from restarting the WAL, which a device never has to face.
    wait_for("telemetry dropped for lack of space", lambda: "dropping the oldest telemetry" in log.read_text(),
             timeout=60, on_timeout=offline.tail)
    time.sleep(2)  # keep producing on the full disk for a while
    offline.kill()  # and crash on it: SIGKILL, no clean close

    seen = read_outbox(outbox)  # a new process, the disk still full
    filler.unlink()
    telemetry = [body["points"] for _, _, kind, body in seen["frames"] if kind == "telemetry"]
    times = [t for points in telemetry for t, _, _ in points]
    dropped_points = seen["meta"]["dropped_points"]
    assert seen["integrity"] == "ok"
    numbered = [row[1] for row in seen["frames"] if row[1] is not None]  # sent before going offline
    assert numbered == sorted(set(numbered))
    assert times == sorted(times), "frames are kept in production order"
    assert times[0] > first, "the oldest telemetry was dropped first"
    assert times[-1] > full_at, "the newest telemetry, produced on the full disk, was kept"
    assert dropped_points > 0

    # Back online with room on the disk: everything kept is delivered, and the drops are reported
    # in the agent.buffer.dropped metric (PROTOCOL.md), not lost silently.
    again = AgentProcess(console_server.ws_url, state, uid, log=log)
    try:
        wait_for("the kept telemetry and the drop count on the server", lambda: (
            {t for t, _ in stored_points(uid, "sensor.temperature_c")} >= {
                t for points in telemetry for t, name, _ in points if name == "sensor.temperature_c"}
            and max((v for _, v in stored_points(uid, "agent.buffer.dropped")), default=0) >= dropped_points),
            timeout=90, on_timeout=again.tail)
    finally:
        again.stop()
    assert not {t for t, _ in stored_points(uid, "sensor.temperature_c") if t < times[0]} & set(range(first, times[0]))
    print(f"\nagent on a full disk: {len(telemetry)} frames kept ({len(times)} points), "
          f"{seen['meta']['dropped_frames']} frames / {dropped_points} points dropped, all kept ones delivered")


# --- an agent killed during an install -----------------------------------------------------

def model_zip(version: str) -> bytes:
    """The shipped ONNX model with a sidecar saying ``version``: the version the agent runs."""
    meta = {**json.loads(DEFAULT_MODEL.with_suffix(".json").read_text()), "version": version}
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        archive.writestr("anomaly.onnx", DEFAULT_MODEL.read_bytes())
        archive.writestr("anomaly.json", json.dumps(meta))
    return buffer.getvalue()


# kill point -> what the restarted agent must end with
KILL_POINTS = {
    "downloaded": "committed",    # downloaded, not verified: nothing installed; re-offered, finishes
    "unpacking": "rolled_back",   # half the files in the new slot: the previous version stays
    "switched": "rolled_back",    # new slot active and running, health window not over: back
    "committed": "committed",     # commit journaled, not reported: reported after the restart
}
# kill point -> the journal phase and active version on disk when the agent is killed there
AT_KILL = {
    "downloaded": {"journal": None, "active": None},
    "unpacking": {"journal": "installing", "active": None},
    "switched": {"journal": "verifying", "active": "2.0.0"},
    "committed": {"journal": "committed", "active": "2.0.0"},
}


@pytest.mark.django_db(transaction=True)
def test_an_agent_killed_after_the_switch_or_after_the_commit_rolls_back_or_finishes_and_reports_what_it_runs(
        ota_server, enrollment_token, tmp_path) -> None:
    kill_during_install(ota_server, enrollment_token, tmp_path, ["switched", "committed"])


@pytest.mark.slow  # four agent processes at once: 25-35 s on a busy 2-core box
@pytest.mark.django_db(transaction=True)
def test_an_agent_killed_at_any_point_of_an_install_finishes_or_rolls_back_and_reports_what_it_runs(
        ota_server, enrollment_token, tmp_path) -> None:
    kill_during_install(ota_server, enrollment_token, tmp_path, list(KILL_POINTS))


def kill_during_install(ota_server: ConsoleServer, enrollment_token, tmp_path: Path, points: list[str]) -> None:
    """One device per kill point, all in one campaign; each agent is SIGKILLed at its point,
    restarted, and must end committed or rolled back, saying so, and running what it says."""
    from fleet.models import Device
    from rollouts import orchestrator, services
    from rollouts.models import Execution

    # Labelled at enrollment: relabelling them here while their agents connect can deadlock
    # (device row lock vs the audit log's advisory lock; see the report of issue #9).
    token = enrollment_token(auto_approve=True, labels={"uid-group": "kill"})
    # The artifact first: its signing key must exist when the agents are welcomed (they learn
    # the trusted artifact keys from ``welcome``).
    artifact = services.artifact_create(
        actor="test", name="anomaly", kind="model", version="2.0.0",
        variants=[services.VariantUpload(name="default", tiers=[],
                                         file=SimpleUploadedFile("model.zip", model_zip("2.0.0")))])
    uids = {point: f"kill-{point}" for point in points}
    t0 = time.monotonic()
    agents, markers = {}, {}
    for point, uid in uids.items():
        markers[point] = tmp_path / f"{uid}.paused"
        agents[point] = AgentProcess(ota_server.ws_url, tmp_path / uid, uid, token=token, log=tmp_path / f"{uid}.log",
                                     env={"AGENT_STUB_OTA_PAUSE_AT": point,
                                          "AGENT_STUB_OTA_PAUSE_MARKER": str(markers[point])})
    try:
        wait_for("enrollment", lambda: Device.objects.filter(uid__in=uids.values(), status="active").count() == len(uids),
                 on_timeout=lambda: "\n".join(a.tail(10) for a in agents.values()))
        campaign = services.campaign_create(
            actor="test", artifact=artifact, name="kill test", target_selector="uid-group=kill",
            waves=[{"size": "100%", "soak_s": 0, "gates": []}], rate_per_min=6000)
        services.campaign_start(actor="test", campaign=campaign, reason="test")

        # Each agent reaches its kill point and is SIGKILLed there.
        print(f"\ncampaign started after {time.monotonic() - t0:.1f}s")
        at_kill: dict[str, dict] = {}
        pending = set(points)
        deadline = time.monotonic() + 90
        while pending and time.monotonic() < deadline:
            orchestrator.tick()
            for point in sorted(pending):
                if markers[point].exists():
                    agents[point].kill()
                    ota = tmp_path / uids[point] / "ota"
                    at_kill[point] = {
                        "journal": json.loads((ota / "journal.json").read_text()).get("phase")
                        if (ota / "journal.json").exists() else None,
                        "active": json.loads((ota / "slots/model/active.json").read_text()).get("version")
                        if (ota / "slots/model/active.json").exists() else None,
                    }
                    pending.discard(point)
            time.sleep(0.3)
        campaign.refresh_from_db()
        print(f"\nall killed after {time.monotonic() - t0:.1f}s")
        assert not pending, (campaign.state, campaign.gate_results, list(Execution.objects.filter(
            campaign=campaign).values("device__uid", "state", "hold", "error", "delivered_at")),
            {p: agents[p].tail(8) for p in pending})
        # The kill points are where they claim to be.
        for point in points:
            assert at_kill[point] == AT_KILL[point], (point, at_kill[point])

        # Restart every agent (no test hook this time) and let them settle.
        for point, uid in uids.items():
            agents[point] = AgentProcess(ota_server.ws_url, tmp_path / uid, uid, log=tmp_path / f"{uid}.log")

        def reported(uid: str) -> bool:
            """The final outcome is recorded and every rollout.status and state frame is acked."""
            final = Execution.objects.filter(campaign=campaign, device__uid=uid,
                                             state__in=["committed", "rolled_back", "failed"]).exists()
            try:
                db = sqlite3.connect(f"file:{tmp_path / uid / 'outbox.sqlite'}?mode=ro", uri=True)
                unacked = db.execute("SELECT COUNT(*) FROM frames WHERE kind IN ('rollout.status', 'state')"
                                     ).fetchone()[0]
                db.close()
            except sqlite3.Error:
                return False
            return final and unacked == 0

        wait_for("every agent to report its outcome", lambda: (orchestrator.tick() or True) and all(
            reported(uid) for uid in uids.values()), timeout=90,
            on_timeout=lambda: "\n".join(f"{p}: {agents[p].tail(12)}" for p in points))
        print(f"\nall reported after {time.monotonic() - t0:.1f}s")
    finally:
        for agent in agents.values():
            agent.stop()

    outcomes = {}
    for point, uid in uids.items():
        execution = Execution.objects.get(campaign=campaign, device__uid=uid)
        ota = tmp_path / uid / "ota"
        active = ota / "slots" / "model" / "active.json"
        on_disk = json.loads(active.read_text())["version"] if active.exists() else SHIPPED_MODEL
        if active.exists():  # the active slot really holds that model
            slot = ota / "slots" / "model" / json.loads(active.read_text())["slot"]
            assert json.loads((slot / "anomaly.json").read_text())["version"] == on_disk
        device = Device.objects.get(uid=uid)
        outcomes[point] = (execution.state, (execution.error or {}).get("code"), on_disk,
                           device.installed_versions.get("model"), (ota / "journal.json").exists())
    print("\n" + "\n".join(f"killed at {p:10}: {o}" for p, o in outcomes.items()))
    for point in points:
        expected = KILL_POINTS[point]
        state, code, on_disk, reported_model, journal_left = outcomes[point]
        assert state == expected, (point, outcomes[point])
        # What the agent says it runs (its state frame: the model object scoring telemetry)
        # is what is active on disk, and is the new version exactly when it reported committed.
        assert on_disk == reported_model == ("2.0.0" if expected == "committed" else SHIPPED_MODEL), (point,
                                                                                                      outcomes[point])
        assert not journal_left, point
        if expected == "rolled_back":
            assert code == "interrupted", (point, outcomes[point])


@pytest.fixture
def artifact_host(tmp_path):
    """A local HTTP server for artifacts: (directory, base URL), as ``offer`` expects."""
    import functools
    import http.server
    import threading

    root = tmp_path / "www"
    root.mkdir()
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(root))
    handler.log_message = lambda *args: None
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    yield root, f"http://127.0.0.1:{httpd.server_address[1]}"
    httpd.shutdown()


def test_a_first_install_rolled_back_after_the_hot_swap_puts_the_shipped_model_back_in_the_running_agent(
        tmp_path, artifact_host) -> None:
    """No kill needed to lie: the candidate was already hot-swapped when its health window
    failed. "rolled_back" must mean the agent runs the shipped model again, not the candidate."""
    import asyncio

    agent = Agent(f"ws://127.0.0.1:{free_port()}/ws/agent/v1/", tmp_path / "dev", device_uid="rollback-1")
    manager = agent.ota.manager
    manager.set_trusted_keys(TRUSTED)
    manager.health_window_s = 0.3
    manager.health_check = lambda: agent.model.version != "2.0.0"  # the candidate is unhealthy once running

    async def scenario() -> None:
        await agent.ota.on_offer(agent, offer(artifact_host, model_zip("2.0.0"), version="2.0.0"))
        await manager.wait()

    asyncio.run(scenario())
    statuses = [json.loads(f.text) for f in agent.outbox.take(100) if f.kind == "rollout.status"]
    agent.outbox.close()
    assert statuses[-1]["state"] == "rolled_back" and statuses[-1]["error"]["code"] == "health_check_failed"
    assert manager.active("model") == (None, {})
    assert agent.model.version == SHIPPED_MODEL
