"""Agent footprint benchmark: one real agent process, its model loaded, 1 Hz inference.

    .venv/bin/python -m benchmarks.footprint [--seconds 60] [--warmup 20] [--inference auto|numpy|onnxruntime]

Starts a real console (uvicorn, `tests.harness.ConsoleServer`) on a scratch database and one
agent stub process exactly as a device runs it (`python -m agent_stub run`, state directory in a
temp dir, enrolling with an auto-approve token; default config: sampling and inference at
1 Hz, a telemetry frame every 5 s, heartbeats). After the agent is welcomed and --warmup seconds,
samples the agent's RSS/USS/PSS every second and its CPU time over --seconds, and counts the
inference points the server stored in that window (proof that it was inferring at 1 Hz).
``--inference`` picks the agent's inference backend (default: the agent's own default, auto:
the numpy backend for the shipped model); the details say whether onnxruntime's library was mapped.
Loopback only; stops the agent and the server and drops the scratch database.
"""

from __future__ import annotations

import argparse
import datetime as dt
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks import ROOT, cpu_seconds, memory, result, row, scratch_database

UID = "footprint-0001"


def _wait(predicate, timeout: float, what: str, proc: subprocess.Popen) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"agent exited with {proc.returncode} while waiting for {what}")
        if predicate():
            return
        time.sleep(0.5)
    raise RuntimeError(f"timed out waiting for {what}")


def run(*, seconds: float = 60.0, warmup: float = 20.0, inference: str | None = None) -> dict:
    from django.db import connection
    from django.utils import timezone

    from fleet.models import Device
    from security.services import enrollment_token_create
    from tests.harness import ConsoleServer

    server = agent = None
    with scratch_database("bench_footprint") as settings_dict, tempfile.TemporaryDirectory(prefix="bench-agent-") as state:
        try:
            token = enrollment_token_create(actor="benchmark", expires_in=dt.timedelta(hours=1), max_uses=1,
                                            auto_approve=True)[1]
            connection.close()
            server = ConsoleServer(settings_dict, extra_env={"LOG_LEVEL": "WARNING", "DB_CONN_MAX_AGE": "60",
                                                             "AGENT_PRESENCE_FLUSH_S": "1"}).start()
            log = Path(state) / "agent.log"
            with log.open("wb") as out:
                agent = subprocess.Popen(
                    [sys.executable, "-m", "agent_stub", "--log-level", "WARNING", "run", "--server", server.ws_url,
                     "--state-dir", str(Path(state) / "agent"), "--enroll-token", token, "--uid", UID,
                     *(["--inference", inference] if inference else [])],
                    cwd=ROOT, stdout=out, stderr=subprocess.STDOUT)

            def online() -> bool:
                found = Device.objects.filter(uid=UID, online=True).exists()
                connection.close()
                return found

            _wait(online, 60, "the agent's welcome", agent)
            time.sleep(warmup)
            from telemetry.models import Metric

            t_start = timezone.now()
            cpu0, w0 = cpu_seconds(agent.pid), time.monotonic()
            samples = []
            while time.monotonic() - w0 < seconds:
                samples.append(memory(agent.pid))
                time.sleep(1.0)
            cpu, window = cpu_seconds(agent.pid) - cpu0, time.monotonic() - w0
            t_end = timezone.now()
            time.sleep(7)  # the last frame (every 5 s) reaches the server
            metric = Metric.objects.filter(name="inference.latency_ms").values_list("id", flat=True).first()
            inferences = 0
            if metric is not None:
                with connection.cursor() as cursor:
                    cursor.execute("SELECT count(*) FROM telemetry_point p JOIN fleet_device d ON d.id = p.device_id "
                                   "WHERE d.uid = %s AND p.metric_id = %s AND p.time >= %s AND p.time < %s",
                                   [UID, metric, t_start, t_end])
                    inferences = cursor.fetchone()[0]
            connection.close()
            alive = agent.poll() is None
            ort_loaded = "onnxruntime" in Path(f"/proc/{agent.pid}/maps").read_text()
        finally:
            if agent is not None and agent.poll() is None:
                agent.terminate()
                try:
                    agent.wait(15)
                except subprocess.TimeoutExpired:
                    agent.kill()
                    agent.wait()
            if server is not None:
                server.stop()
    rss_max = max(s["rss"] for s in samples) / 2**20
    rss_mean = sum(s["rss"] for s in samples) / len(samples) / 2**20
    uss = samples[-1]["uss"] / 2**20
    pss = samples[-1]["pss"] / 2**20
    cpu_pct = 100 * cpu / window
    rate = inferences / window
    return result("footprint", [
        row("agent RSS (max over window)", rss_max, "MB", "≤ 60 MB", rss_max <= 60),
        row("agent RSS (mean)", rss_mean, "MB"),
        row("agent USS / PSS (end)", f"{uss:.1f} / {pss:.1f}", "MB"),
        row("agent CPU", cpu_pct, "% of a core", "≤ 2 %", cpu_pct <= 2),
        row("inferences stored by the server", rate, "/s", "≈ 1 Hz", 0.8 <= rate <= 1.2),
    ], window_s=round(window, 1), inferences=inferences, agent_alive=alive, samples=len(samples),
                  onnxruntime_loaded=ort_loaded)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seconds", type=float, default=60.0)
    parser.add_argument("--warmup", type=float, default=20.0, help="after the welcome; inference starts after 16 samples")
    parser.add_argument("--inference", choices=["auto", "numpy", "onnxruntime"], help="the agent's inference backend")
    args = parser.parse_args()
    from benchmarks import setup_django
    from benchmarks.run import print_results

    setup_django()
    print_results([run(seconds=args.seconds, warmup=args.warmup, inference=args.inference)])


if __name__ == "__main__":
    main()
