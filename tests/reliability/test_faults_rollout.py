"""Issue #9 fault: the Celery worker is killed mid-campaign and beat is restarted; the campaign
continues with no device offered twice and no gate skipped.

Everything is real: a uvicorn console (`ConsoleServer`), a Celery worker and beat started as
subprocesses with the command lines of `scripts/run.sh` (against the test database, with this
run's Redis as broker), and protocol-level fake devices (`RawAgent`) that answer each
`rollout.offer` with the contract's `rollout.status` sequence, holding a while between
`downloaded` and `installing` so a wave is visibly in flight. The test only creates and
starts the campaign; beat ticks and report-driven steps (through the worker) do the rest.

Faults: SIGKILL of the worker's whole process group while wave 1 soaks, beat stopped and
started again, worker started again. The slow variant (`make soak`) adds a third wave and a
second SIGKILL of the worker while wave 2's installs are in flight (their reports kick steps
into the broker with nobody to run them).

Afterwards, from the devices' side and from the rows and the audit log: the campaign
completed, every device got exactly one offer and committed on the first attempt, each wave
started only after the previous one drained, soaked its full `soak_s` and had every gate
judge it `ok` at the end of the soak, and nothing was paused, aborted, retried or skipped.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import os
import signal
import subprocess
import time
from collections import Counter
from pathlib import Path

import pytest
import websockets
from django.core.files.uploadedfile import SimpleUploadedFile
from django.db import connection

from agent_stub import protocol as p
from tests.agent.rawagent import RawAgent, in_db
from tests.harness import ROOT, ConsoleServer, _die_with_parent, database_url_for

pytestmark = pytest.mark.django_db(transaction=True)

CELERY = ROOT / ".venv" / "bin" / "celery"
GATES = [{"type": "success_ratio", "min_ratio": 1.0}, {"type": "failure", "max_pct": 0, "min_sample": 1}]
IN_FLIGHT_S = 2.5  # a device holds between downloaded and installing
LIVE = ("offered", "acked", "downloading", "downloaded", "installing", "verifying")


class CeleryProcess:
    """`celery -A console worker|beat` in its own process group (so SIGKILL reaches the
    prefork children too), logging to a file, dying with the test process."""

    def __init__(self, role: str, env: dict, log_dir: Path) -> None:
        self.role, self.env, self.log_dir = role, env, log_dir
        self.proc: subprocess.Popen | None = None
        self.starts = 0

    def start(self) -> None:
        assert CELERY.exists(), f"{CELERY} is missing: the fault test needs Celery in the virtualenv"
        self.starts += 1
        self.log_path = self.log_dir / f"{self.role}-{self.starts}.log"
        if self.role == "worker":
            args = ["worker", "--loglevel", "INFO", "--concurrency", "2", "-n", f"h5fault{self.starts}@%h",
                    "--without-mingle", "--without-gossip"]
        else:
            args = ["beat", "--loglevel", "INFO", "--schedule", str(self.log_dir / "celerybeat-schedule")]
        with self.log_path.open("ab") as log:
            self.proc = subprocess.Popen([str(CELERY), "-A", "console", *args], cwd=ROOT, env=self.env, stdout=log,
                                         stderr=subprocess.STDOUT, start_new_session=True,
                                         preexec_fn=_die_with_parent)

    async def ready(self, marker: str, timeout: float = 45) -> float:
        """Seconds until `marker` shows in the log."""
        t0 = time.monotonic()
        while time.monotonic() - t0 < timeout:
            if self.proc.poll() is not None:
                raise RuntimeError(f"celery {self.role} exited with {self.proc.returncode}:\n{self.tail()}")
            if marker in self.log_path.read_text(errors="replace"):
                return time.monotonic() - t0
            await asyncio.sleep(0.1)
        raise RuntimeError(f"celery {self.role} not ready after {timeout}s:\n{self.tail()}")

    def signal_group(self, sig: int) -> int | None:
        if self.proc is None or self.proc.poll() is not None:
            return None if self.proc is None else self.proc.returncode
        os.killpg(self.proc.pid, sig)  # the group of the process this test started
        try:
            return self.proc.wait(15)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            return self.proc.wait(15)

    def tail(self, lines: int = 30) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no log)"


class FakeDevice:
    """A device that installs whatever it is offered, after the contract, and counts offers."""

    def __init__(self, url: str, uid: str) -> None:
        self.agent = RawAgent(url, uid)
        self.uid = uid
        self.offers: Counter[int] = Counter()  # execution id → offer frames received
        self.errors: list[dict] = []
        self.closed: int | None = None  # close code if the server closed this connection
        self.sent: list[tuple[int, str]] = []  # (seq, state) of the rollout.status frames sent
        self.acked = 0  # highest seq the server acked
        self.failures: list[BaseException] = []
        self.seq = 0
        self.tasks: set[asyncio.Task] = set()
        self.send_lock = asyncio.Lock()

    async def enroll(self, token: str) -> None:
        welcome = await self.agent.enroll(token)
        assert welcome["type"] == "welcome" and welcome["status"] == "active", welcome
        self.seq = welcome["last_acked_seq"]

    async def status(self, execution_id, state: str, progress: int) -> None:
        async with self.send_lock:
            self.seq += 1
            await self.agent.send(p.rollout_status(self.seq, execution_id, state, progress))
            self.sent.append((self.seq, state))

    async def install(self, execution_id) -> None:
        for state, progress in (("acked", 0), ("downloading", 50), ("downloaded", 100)):
            await self.status(execution_id, state, progress)
        await asyncio.sleep(IN_FLIGHT_S)
        for state in ("installing", "verifying", "committed"):
            await self.status(execution_id, state, 100)

    def installed(self, task: asyncio.Task) -> None:
        self.tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            self.failures.append(task.exception())

    def __repr__(self) -> str:
        return (f"<{self.uid} offers={dict(self.offers)} sent={self.sent} acked={self.acked} closed={self.closed} "
                f"errors={self.errors} failures={self.failures}>")

    async def serve(self, stop: asyncio.Event) -> None:
        last_beat = time.monotonic()
        while not stop.is_set():
            try:
                frame = await self.agent.recv(timeout=0.5)
            except TimeoutError:
                frame = None
            except websockets.ConnectionClosed as exc:
                self.closed = exc.rcvd.code if exc.rcvd else 1006
                return
            if time.monotonic() - last_beat > 10:
                await self.agent.send(p.heartbeat(int(time.time() * 1000), 0, 0))
                last_beat = time.monotonic()
            if frame is None:
                continue
            if frame["type"] == "rollout.offer":
                execution_id = frame["execution_id"]
                self.offers[int(execution_id)] += 1
                if self.offers[int(execution_id)] == 1:
                    task = asyncio.create_task(self.install(execution_id))
                    self.tasks.add(task)
                    task.add_done_callback(self.installed)
            elif frame["type"] == "ack":
                self.acked = max(self.acked, frame["seq"])
            elif frame["type"] == "error":
                self.errors.append(frame)
        await self.agent.close()


def campaign_snapshot(campaign_id: int) -> dict:
    from rollouts.models import Campaign, Execution

    campaign = Campaign.objects.get(pk=campaign_id)
    states = Counter(Execution.objects.filter(campaign_id=campaign_id).values_list("wave", "state"))
    return {"state": campaign.state, "wave": campaign.current_wave, "drained_at": campaign.wave_drained_at,
            "states": dict(states)}


def busy_backends() -> list:
    with connection.cursor() as cursor:
        cursor.execute("SELECT pid, state, wait_event_type, wait_event, now() - xact_start, left(query, 160) "
                       "FROM pg_stat_activity WHERE datname = current_database() AND pid <> pg_backend_pid() "
                       "AND state <> 'idle'")
        return cursor.fetchall()


async def wait_for(predicate, timeout: float, what: str, *, every: float = 0.2, describe=None):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = await in_db(predicate)
        if value:
            return value
        await asyncio.sleep(every)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}; {await describe() if describe else ''}")


@pytest.fixture
def celery_env(transactional_db, settings, tmp_path):
    settings.MEDIA_ROOT = str(tmp_path / "media")
    env = {**os.environ, "DATABASE_URL": database_url_for(connection.settings_dict), "DB_CONN_MAX_AGE": "0",
           "MEDIA_ROOT": str(tmp_path / "media")}
    # A private broker queue: what an earlier run left in this Redis db must not run here.
    import redis

    broker = redis.Redis.from_url(settings.CELERY_BROKER_URL)
    broker.delete("celery", "unacked", "unacked_index", "unacked_mutex")
    broker.close()
    return env


@pytest.fixture
def fault_rig(celery_env, tmp_path):
    server = ConsoleServer(connection.settings_dict, extra_env={"MEDIA_ROOT": celery_env["MEDIA_ROOT"]})
    server.start()
    worker = CeleryProcess("worker", celery_env, tmp_path)
    beat = CeleryProcess("beat", celery_env, tmp_path)
    yield server, worker, beat
    worker.signal_group(signal.SIGKILL)
    beat.signal_group(signal.SIGKILL)
    server.stop()


def run_campaign_through_faults(fault_rig, token: str, *, waves: list[dict], per_wave: list[int],
                                kill_in_flight: bool) -> dict:
    """Run a campaign over `sum(per_wave)` fake devices; SIGKILL the worker and restart beat
    while wave 1 soaks (and, with `kill_in_flight`, SIGKILL the worker again while wave 2's
    installs are in flight); assert the campaign's outcome; return the measured figures."""
    from rollouts import services
    from rollouts.models import Campaign, Execution
    from security.models import AuditEntry

    server, worker, beat = fault_rig
    uids = [f"fault-{i}" for i in range(sum(per_wave))]
    devices = [FakeDevice(server.ws_url, uid) for uid in uids]
    figures: dict[str, float | int | str | None] = {}

    def create_campaign() -> int:
        artifact = services.artifact_create(
            actor="test", name="anomaly", kind="model", version="2.0.0",
            variants=[services.VariantUpload(name="default", tiers=[],
                                             file=SimpleUploadedFile("model.onnx", b"model-2.0.0"))])
        campaign = services.campaign_create(actor="test", artifact=artifact, name="fault run", target_uids=uids,
                                            waves=waves, rate_per_min=6000, on_gate_failure="pause")
        return services.campaign_start(actor="test", campaign=campaign, reason="fault test").id

    async def main() -> int:
        stop = asyncio.Event()
        await asyncio.gather(*(d.enroll(token) for d in devices))
        serving = [asyncio.create_task(d.serve(stop)) for d in devices]
        worker.start()
        beat.start()
        figures["worker_start_s"] = round(await worker.ready(" ready."), 1)
        await beat.ready("beat: Starting")
        t0 = time.monotonic()
        campaign_id = await in_db(create_campaign)

        async def describe() -> str:
            snapshot = await in_db(campaign_snapshot, campaign_id)
            backends = await in_db(busy_backends)
            return (f"campaign {snapshot}; devices {devices}; "
                    f"busy backends {backends}; server log:\n{server.log_tail()}\nworker log:\n{worker.tail()}")

        # Fault 1: wave 1 has drained and soaks → SIGKILL the worker, restart beat, restart the worker.
        soaking = await wait_for(lambda: (s := campaign_snapshot(campaign_id))["drained_at"] and s["wave"] == 0 and s,
                                 40, "wave 1 to drain", describe=describe)
        figures["kill1_at_s"] = round(time.monotonic() - t0, 1)
        figures["kill1_snapshot"] = str(soaking["states"])
        figures["worker_exit1"] = worker.signal_group(signal.SIGKILL)
        beat.signal_group(signal.SIGTERM)
        beat.start()
        await beat.ready("beat: Starting")
        worker.start()
        figures["worker_restart_s"] = round(await worker.ready(" ready."), 1)

        if kill_in_flight:
            # Fault 2: wave 2 is in flight (offered, not yet committed) → SIGKILL the worker again;
            # wave 2 commits while no worker runs (its report-driven kicks wait in the broker).
            in_flight = await wait_for(
                lambda: (s := campaign_snapshot(campaign_id))["wave"] == 1
                and any(state in LIVE for (wave, state) in s["states"] if wave == 1) and s, 40, "wave 2 in flight",
                every=0.1, describe=describe)
            figures["kill2_at_s"] = round(time.monotonic() - t0, 1)
            figures["kill2_snapshot"] = str(in_flight["states"])
            figures["worker_exit2"] = worker.signal_group(signal.SIGKILL)
            await asyncio.sleep(IN_FLIGHT_S + 0.5)
            worker.start()
            await worker.ready(" ready.")

        await wait_for(lambda: Campaign.objects.filter(pk=campaign_id).exclude(state="running").exists(), 60,
                       "the campaign to finish", describe=describe)
        figures["campaign_s"] = round(time.monotonic() - t0, 1)
        await asyncio.sleep(1)  # a stray duplicate offer would arrive now
        stop.set()
        await asyncio.gather(*serving)
        return campaign_id

    campaign_id = asyncio.run(main())

    # The faults happened: the worker died by SIGKILL each time and came back, beat was restarted.
    kills = 2 if kill_in_flight else 1
    assert [figures.get(f"worker_exit{k + 1}") for k in range(kills)] == [-signal.SIGKILL] * kills, figures
    assert (worker.starts, beat.starts) == (kills + 1, 2)

    campaign = Campaign.objects.get(pk=campaign_id)
    executions = list(Execution.objects.filter(campaign=campaign).order_by("wave", "offered_at"))
    assert campaign.state == "completed", (campaign.state, campaign.state_reason, campaign.gate_results)

    # No device was offered twice: one offer frame each at the device, one attempt each in the rows.
    assert {d.uid: sum(d.offers.values()) for d in devices} == dict.fromkeys(uids, 1)
    assert sorted(eid for d in devices for eid in d.offers) == sorted(e.id for e in executions)
    assert [(e.state, e.attempt, e.error) for e in executions] == [("committed", 0, None)] * len(uids)
    assert not [e for d in devices for e in d.errors], [e for d in devices for e in d.errors]
    assert [d.closed for d in devices] == [None] * len(uids)  # all stayed connected: no reconnect re-offers

    # Nothing skipped: every wave had its devices, and every gate judged every wave at the end of its soak.
    assert Counter(e.wave for e in executions) == dict(enumerate(per_wave))
    assert campaign.gate_overrides == {}
    for wave in range(len(waves)):
        results = campaign.gate_results[str(wave)]
        assert {name: (r["ok"], r["final"]) for name, r in results.items()} == {
            "success_ratio": (True, True), "failure": (True, True)}, (wave, results)

    # Each wave started only after the previous one drained, soaked its soak_s and passed its gates.
    audit = list(AuditEntry.objects.filter(target_type="rollouts.campaign", target_id=str(campaign_id))
                 .order_by("id").values_list("action", "at", "data"))
    actions = [a for a, _, _ in audit]
    assert actions == ["campaign.create", "campaign.schedule", "campaign.start",
                       *["campaign.wave"] * (len(waves) - 1), "campaign.complete"], actions
    advanced = {data["wave"]: at for action, at, data in audit if action == "campaign.wave"}
    for wave in range(1, len(waves)):
        drained = max(e.finished_at for e in executions if e.wave < wave)
        started = min(e.offered_at for e in executions if e.wave == wave)
        soak_end = drained + dt.timedelta(seconds=waves[wave - 1]["soak_s"])
        judged = {name: dt.datetime.fromisoformat(r["at"]) for name, r in campaign.gate_results[str(wave - 1)].items()}
        assert all(soak_end <= at <= started for at in judged.values()), (wave, soak_end, judged, started)
        assert soak_end <= started <= advanced[wave], (wave, soak_end, started, advanced[wave])
        figures[f"wave{wave + 1}_offered_after_soak_end_s"] = round((started - soak_end).total_seconds(), 2)
    assert next(at for action, at, _ in audit if action == "campaign.complete") >= max(e.finished_at for e in executions)
    figures["offers_resent_after_lost_doorbells"] = sum(
        int(line.split(": ")[-1].split()[0]) for log in sorted(worker.log_dir.glob("worker-*.log"))
        for line in log.read_text(errors="replace").splitlines() if "offers re-sent to connected devices" in line)
    print("figures:", figures)
    return figures


def test_killing_the_worker_and_restarting_beat_while_a_wave_soaks_offers_no_device_twice_and_skips_no_gate(
        fault_rig, enrollment_token):
    waves = [{"size": 2, "soak_s": 3, "gates": GATES}, {"size": "100%", "soak_s": 0, "gates": GATES}]
    run_campaign_through_faults(fault_rig, enrollment_token(auto_approve=True), waves=waves, per_wave=[2, 2],
                                kill_in_flight=False)


@pytest.mark.slow
def test_a_campaign_survives_a_worker_kill_while_soaking_a_beat_restart_and_a_kill_while_installs_are_in_flight(
        fault_rig, enrollment_token):
    waves = [{"size": 2, "soak_s": 4, "gates": GATES}, {"size": 5, "soak_s": 4, "gates": GATES},
             {"size": "100%", "soak_s": 0, "gates": GATES}]
    run_campaign_through_faults(fault_rig, enrollment_token(auto_approve=True), waves=waves, per_wave=[2, 3, 3],
                                kill_in_flight=True)
