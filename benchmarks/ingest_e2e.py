"""End-to-end ingest benchmark: real agents → WebSocket → consumer → flusher → ack.

    .venv/bin/python benchmarks/ingest_e2e.py [--devices 500] [--rate 100] [--batch 500] [--seconds 30]

Runs the real console (one uvicorn process, `tests.harness.ConsoleServer`) against a scratch
database created on DATABASE_URL's server, and N agent stubs (in-memory outboxes, one shared
ONNX session) in this process. Prints acked points/s over the steady part of the run, p50/p99
ack latency (a telemetry frame's send → its ack), and the CPU of the server and of the agents.
Then, in the same scratch database, raw binary COPY of as many rows into the same table (the
ceiling), and the ratio. CPU is reported for uvicorn, the agents' process and the PostgreSQL
backends serving the scratch database. `run(**params)` is what `python -m benchmarks.run` calls.
Loopback only; bounded in time; stops the server and drops the scratch database.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import re
import resource
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
os.environ.setdefault("DJANGO_SETTINGS_MODULE", "console.settings")

SEQ = re.compile(r'"seq":(\d+)')


def _cpu_self() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def _cpu_of(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


async def drive(url: str, token: str, args: argparse.Namespace, server_pid: int, on_measure_start=None) -> dict:
    from agent_stub.client import Agent, Config
    from agent_stub.inference import AnomalyModel, BatchScorer

    latencies: list[float] = []
    acked = [0]

    class TimedWs:
        def __init__(self, ws, sent: dict[int, float]) -> None:
            self._ws, self._sent = ws, sent

        async def send(self, text: str) -> None:
            if '"type":"telemetry"' in text[:80]:
                match = SEQ.search(text)
                if match:
                    self._sent[int(match.group(1))] = time.monotonic()
            await self._ws.send(text)

        def __getattr__(self, name: str):
            return getattr(self._ws, name)

    class TimedAgent(Agent):
        def __init__(self, *a, **kw) -> None:
            super().__init__(*a, **kw)
            self.sent: dict[int, float] = {}

        async def _sender(self, ws) -> None:
            await super()._sender(TimedWs(ws, self.sent))

        def _on_ack(self, frame: dict) -> None:
            started = self.sent.pop(frame.get("seq"), None)
            if started is not None and measuring[0]:
                latencies.append(time.monotonic() - started)
                acked[0] += frame.get("accepted", 0)
            super()._on_ack(frame)

    measuring = [False]
    scorer = BatchScorer(AnomalyModel())
    config = {"sample_hz": args.rate / 5, "batch_points": args.batch, "batch_s": max(1.0, args.batch / args.rate + 1)}
    agents = [TimedAgent(url, None, enroll_token=token, device_uid=f"e2e-{i:05d}", scorer=scorer,
                         config=Config(**config), backoff_start=0.5, backoff_cap=5) for i in range(args.devices)]
    tasks = []
    for i, agent in enumerate(agents):  # ramp connects over ~devices/100 s
        tasks.append(asyncio.create_task(agent.run()))
        if i % 100 == 99:
            await asyncio.sleep(1)
    await asyncio.sleep(args.warmup)
    if on_measure_start is not None:
        await asyncio.to_thread(on_measure_start)
    measuring[0] = True
    cpu0, srv0, t0 = _cpu_self(), _cpu_of(server_pid), time.monotonic()
    await asyncio.sleep(args.seconds)
    measuring[0] = False
    wall, cpu, srv = time.monotonic() - t0, _cpu_self() - cpu0, _cpu_of(server_pid) - srv0
    for agent in agents:
        agent.stop()
    await asyncio.gather(*tasks, return_exceptions=True)
    connected = sum(1 for a in agents if a.stats.welcomed)
    latencies.sort()

    def pct(q: float) -> float:
        return latencies[min(len(latencies) - 1, int(q * len(latencies)))] if latencies else float("nan")

    return {"points": acked[0], "wall": wall, "p50": pct(0.50), "p99": pct(0.99), "frames": len(latencies),
            "agents_cpu": cpu, "server_cpu": srv, "connected": connected,
            "mean": statistics.fmean(latencies) if latencies else float("nan")}


def run(*, devices: int = 1000, rate: float = 100, batch: int = 500, seconds: float = 60, warmup: float = 15,
        copy_rows: int | None = None) -> dict:
    """Real agents → one uvicorn → acks, then raw binary COPY into the same table in the same
    scratch database; returns the runner's rows (see benchmarks/__init__.py)."""
    from datetime import timedelta

    from django.db import connection

    from benchmarks import cpu_delta, cpu_of_pids, postgres_backend_pids, result, row, scratch_database
    from benchmarks.ingest import raw_copy
    from fleet.models import Device
    from security.services import enrollment_token_create
    from tests.harness import ConsoleServer

    args = argparse.Namespace(devices=devices, rate=rate, batch=batch, seconds=seconds, warmup=warmup)
    server = None
    with scratch_database("bench_e2e") as settings_dict:
        try:
            token = enrollment_token_create(actor="benchmark", expires_in=timedelta(hours=1), max_uses=devices,
                                            auto_approve=True)[1]
            connection.close()
            # Persistent connections, as in production (the test harness turns them off).
            server = ConsoleServer(settings_dict, extra_env={"LOG_LEVEL": "WARNING", "DB_CONN_MAX_AGE": "60"}).start()
            offered = devices * rate
            print(f"[ingest] {devices} agents × {rate:g} points/s in frames of {batch} (offered {offered:,.0f} "
                  f"points/s), measuring {seconds:g}s after {warmup:g}s warm-up", flush=True)
            database = settings_dict["NAME"]
            pg_pids: list[int] = []
            pg_before: dict[int, float] = {}

            def on_measure_start() -> None:
                pg_pids[:] = postgres_backend_pids(database)
                pg_before.update(cpu_of_pids(pg_pids))
                connection.close()

            r = asyncio.run(drive(server.ws_url, token, args, server.proc.pid, on_measure_start))
            pg_cpu = cpu_delta(pg_before, cpu_of_pids(list(pg_before)))
            ids = list(Device.objects.values_list("id", flat=True)) or [0]
            rows = copy_rows or max(r["points"], 100_000)
            write_row_s, packed_s = asyncio.run(raw_copy(rows, ids))
        finally:
            if server is not None:
                server.stop()
    rate_acked = r["points"] / r["wall"]
    copy_rate = rows / packed_s
    pct_of = {k: 100 * r[k] / r["wall"] for k in ("server_cpu", "agents_cpu")}
    return result("ingest", [
        row("agents connected", r["connected"], "", f"{devices:,}", r["connected"] == devices),
        row("points/s committed and acked", rate_acked, "points/s", "≥ 100,000/s", rate_acked >= 100_000),
        row("ack latency p50", r["p50"] * 1000, "ms"),
        row("ack latency p99", r["p99"] * 1000, "ms", "≤ 250 ms", r["p99"] * 1000 <= 250),
        row("CPU: uvicorn", pct_of["server_cpu"], "% of a core"),
        row("CPU: agents (load generator)", pct_of["agents_cpu"], "% of a core"),
        row("CPU: PostgreSQL backends of the scratch DB", 100 * pg_cpu / r["wall"], "% of a core"),
        row("raw binary COPY, same table", copy_rate, "rows/s"),
        row("acked ingest / raw COPY", rate_acked / copy_rate, "×"),
    ], devices=devices, rate=rate, batch=batch, offered=offered, window_s=round(r["wall"], 1), frames=r["frames"],
        ack_mean_ms=round(r["mean"] * 1000, 1), copy_rows=rows, copy_write_row_rows_per_s=round(rows / write_row_s),
        postgres_backends=len(pg_before))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--devices", type=int, default=500)
    parser.add_argument("--rate", type=float, default=100, help="points per second per device")
    parser.add_argument("--batch", type=int, default=500, help="points per telemetry frame")
    parser.add_argument("--seconds", type=float, default=30, help="measured window")
    parser.add_argument("--warmup", type=float, default=10, help="seconds after the ramp before measuring")
    parser.add_argument("--copy-rows", type=int, default=None, help="rows for the raw COPY comparison")
    args = parser.parse_args()

    from benchmarks import setup_django
    from benchmarks.run import print_results

    setup_django()
    print_results([run(devices=args.devices, rate=args.rate, batch=args.batch, seconds=args.seconds,
                       warmup=args.warmup, copy_rows=args.copy_rows)])


if __name__ == "__main__":
    main()
