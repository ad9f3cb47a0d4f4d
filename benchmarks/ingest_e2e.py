"""End-to-end ingest benchmark: real agents → WebSocket → consumer → flusher → ack.

    .venv/bin/python benchmarks/ingest_e2e.py [--devices 500] [--rate 100] [--batch 500] [--seconds 30]

Runs the real console (one uvicorn process, `tests.harness.ConsoleServer`) against a scratch
database created on DATABASE_URL's server, and N agent stubs (in-memory outboxes, one shared
ONNX session) in this process. Prints acked points/s over the steady part of the run, p50/p99
ack latency (a telemetry frame's send → its ack), and the CPU of the server and of the agents.
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


async def drive(url: str, token: str, args: argparse.Namespace, server_pid: int) -> dict:
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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--devices", type=int, default=500)
    parser.add_argument("--rate", type=float, default=100, help="points per second per device")
    parser.add_argument("--batch", type=int, default=500, help="points per telemetry frame")
    parser.add_argument("--seconds", type=float, default=30, help="measured window")
    parser.add_argument("--warmup", type=float, default=10, help="seconds after the ramp before measuring")
    args = parser.parse_args()

    import django
    from django.conf import settings

    django.setup()
    from datetime import timedelta

    from django.db import connection

    from security.services import enrollment_token_create
    from tests.harness import ConsoleServer

    scratch = f"bench_e2e_{os.getpid()}"
    settings.DATABASES["default"].setdefault("TEST", {})["NAME"] = scratch
    print(f"scratch database {scratch}: creating and migrating …", flush=True)
    original = connection.creation.create_test_db(verbosity=0, autoclobber=True, keepdb=False)
    server = None
    try:
        token = enrollment_token_create(actor="benchmark", expires_in=timedelta(hours=1), max_uses=args.devices,
                                        auto_approve=True)[1]
        connection.close()
        # Persistent connections, as in production (the test harness turns them off).
        server = ConsoleServer(connection.settings_dict, extra_env={"LOG_LEVEL": "WARNING", "DB_CONN_MAX_AGE": "60"}).start()
        offered = args.devices * args.rate
        print(f"{args.devices} agents × {args.rate:g} points/s in frames of {args.batch} (offered {offered:,.0f} "
              f"points/s), measuring {args.seconds:g}s after {args.warmup:g}s warm-up", flush=True)
        r = asyncio.run(drive(server.ws_url, token, args, server.proc.pid))
        print(f"connected {r['connected']}/{args.devices}; acked {r['points']:,} points in {r['wall']:.1f}s = "
              f"{r['points'] / r['wall']:,.0f} points/s ({r['frames']:,} frames)")
        print(f"ack latency (send → ack): p50 {r['p50'] * 1000:.0f} ms, p99 {r['p99'] * 1000:.0f} ms, "
              f"mean {r['mean'] * 1000:.0f} ms")
        server_pct, agents_pct = 100 * r["server_cpu"] / r["wall"], 100 * r["agents_cpu"] / r["wall"]
        print(f"CPU: server {server_pct:.0f}% of a core, agents {agents_pct:.0f}% of a core (PostgreSQL not counted)")
    finally:
        if server is not None:
            server.stop()
        connection.creation.destroy_test_db(original, verbosity=0)
        print(f"scratch database {scratch} dropped")


if __name__ == "__main__":
    main()
