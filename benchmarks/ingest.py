"""Ingest benchmark: the telemetry Flusher driven by N simulated devices, against raw binary COPY.

    .venv/bin/python benchmarks/ingest.py [--devices 2000] [--points 100] [--interval 1.0]
                                          [--seconds 15] [--window 4]

Every simulated device is an asyncio task that sends a `telemetry` frame of --points points
every --interval seconds (offered load = devices × points / interval), pipelining up to
--window unacked frames like the WebSocket consumer may, and counts a frame durable when
`submit()` returns. Prints durable points/s, p50/p99 submit→commit latency, this process's CPU,
then measures plain binary COPY of the same number of rows into the same table and prints the
ratio. Runs in a scratch database (created from DATABASE_URL's server, migrated, dropped).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import resource
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
os.environ.setdefault("DJANGO_SETTINGS_MODULE", "console.settings")


def _cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


async def drive(args: argparse.Namespace, device_ids: list[int]) -> dict:
    from telemetry.ingest import Flusher, FlushFailed, Overloaded

    flusher = Flusher()
    latencies: list[float] = []
    stored_points = 0
    overloaded = failed = 0
    names = [f"bench.metric_{i}" for i in range(10)]
    deadline = time.monotonic() + args.seconds
    loop = asyncio.get_running_loop()

    async def device(device_id: int, offset: float) -> None:
        nonlocal stored_points, overloaded, failed
        seq = 0
        window = asyncio.Semaphore(args.window)
        inflight: set[asyncio.Task] = set()
        await asyncio.sleep(offset)  # spread the devices over the interval

        async def send(s: int, points: list) -> None:
            nonlocal stored_points, overloaded, failed
            started = loop.time()
            try:
                result = await flusher.submit(device_id=device_id, seq=s, points=points)
            except Overloaded:
                overloaded += 1
                return
            except FlushFailed:
                failed += 1
                return
            finally:
                window.release()
            if result.status == "stored":
                latencies.append(loop.time() - started)
                stored_points += len(points)

        next_at = loop.time()
        while time.monotonic() < deadline:
            await window.acquire()
            seq += 1
            t0 = int(time.time() * 1000)
            points = [(t0 + i // 10, names[i % 10], float(i)) for i in range(args.points)]
            task = loop.create_task(send(seq, points))
            inflight.add(task)
            task.add_done_callback(inflight.discard)
            next_at += args.interval
            await asyncio.sleep(max(0.0, next_at - loop.time()))
            if overloaded or failed:  # a real agent would reconnect and resend; the benchmark stops this device
                break
        if inflight:
            await asyncio.gather(*inflight)

    cpu0, wall0 = _cpu(), time.monotonic()
    await asyncio.gather(*[device(d, i * args.interval / len(device_ids)) for i, d in enumerate(device_ids)])
    await flusher.close()
    wall, cpu = time.monotonic() - wall0, _cpu() - cpu0
    latencies.sort()
    return {
        "points": stored_points, "wall": wall, "cpu": cpu, "overloaded": overloaded, "failed": failed,
        "p50": statistics.median(latencies) if latencies else float("nan"),
        "p99": latencies[int(0.99 * (len(latencies) - 1))] if latencies else float("nan"),
        "frames": len(latencies), "flushes": flusher.stats["flushes"],
    }


async def raw_copy(rows: int, device_ids: list[int]) -> tuple[float, float]:
    """Plain binary COPY of `rows` rows into telemetry_point, 20k-row transactions on one connection:
    (seconds with psycopg write_row + set_types, seconds with the flusher's struct-packed rows)."""
    import datetime as dt

    import psycopg
    from django.db import connection

    from telemetry.ingest import _COPY_HEADER, _COPY_TRAILER, _PG_EPOCH_MS, _ROW, connection_kwargs

    base = dt.datetime.now(dt.UTC)
    data = [(base + dt.timedelta(microseconds=i), device_ids[i % len(device_ids)], 1 + i % 10, float(i))
            for i in range(rows)]
    async with await psycopg.AsyncConnection.connect(**connection_kwargs(connection.settings_dict)) as conn:
        started = time.monotonic()
        chunk = 20_000
        for lo in range(0, rows, chunk):
            async with conn.transaction(), conn.cursor() as cur, cur.copy(
                "COPY telemetry_point (time, device_id, metric_id, value) FROM STDIN (FORMAT BINARY)"
            ) as copy:
                copy.set_types(["timestamptz", "int4", "int2", "float8"])
                for row in data[lo:lo + chunk]:
                    await copy.write_row(row)
        write_row_s = time.monotonic() - started
        base_ms = int(base.timestamp() * 1000)
        started = time.monotonic()
        for lo in range(0, rows, chunk):
            payload = b"".join(_ROW.pack(4, 8, (base_ms + i - _PG_EPOCH_MS) * 1000, 4, device_ids[i % len(device_ids)],
                                         2, 1 + i % 10, 8, float(i)) for i in range(lo, min(rows, lo + chunk)))
            async with conn.transaction(), conn.cursor() as cur, cur.copy(
                "COPY telemetry_point (time, device_id, metric_id, value) FROM STDIN (FORMAT BINARY)"
            ) as copy:
                await copy.write(_COPY_HEADER + payload + _COPY_TRAILER)
        return write_row_s, time.monotonic() - started


def run(*, devices: int = 2000, points: int = 100, interval: float = 1.0, seconds: float = 15.0,
        window: int = 4) -> dict:
    """The flusher driven in-process, then raw COPY; returns the runner's rows."""
    from benchmarks import result, row, scratch_database
    from fleet.models import Device, UplinkCursor

    args = argparse.Namespace(devices=devices, points=points, interval=interval, seconds=seconds, window=window)
    with scratch_database("bench_telemetry"):
        objs = Device.objects.bulk_create([Device(uid=f"bench-{i:05d}", status="active") for i in range(devices)])
        UplinkCursor.objects.bulk_create([UplinkCursor(device=d) for d in objs])
        ids = [d.id for d in objs]
        offered = devices * points / interval
        print(f"{devices} devices × {points} points every {interval}s (offered {offered:,.0f} points/s), "
              f"{seconds}s, window {window}", flush=True)
        r = asyncio.run(drive(args, ids))
        rate = r["points"] / r["wall"]
        print(f"flusher: {r['points']:,} points durable in {r['wall']:.1f}s = {rate:,.0f} points/s; "
              f"{r['frames']:,} frames in {r['flushes']:,} flushes; "
              f"submit→commit p50 {r['p50'] * 1000:.0f} ms, p99 {r['p99'] * 1000:.0f} ms; "
              f"process CPU {r['cpu']:.1f}s ({100 * r['cpu'] / r['wall']:.0f}% of one core); "
              f"overloaded {r['overloaded']}, failed {r['failed']}")
        rows = max(r["points"], 100_000)
        write_row_s, packed_s = asyncio.run(raw_copy(rows, ids))
        for label, secs in (("write_row + set_types", write_row_s), ("struct-packed", packed_s)):
            print(f"raw binary COPY ({label}, 20k-row transactions, one connection): {rows:,} rows in "
                  f"{secs:.2f}s = {rows / secs:,.0f} rows/s; flusher / this = {rate * secs / rows:.2f}")
        print(f"(the flusher ran at an offered load of {offered:,.0f} points/s; raw COPY runs flat out)")
    return result("ingest-flusher", [
        row("durable points/s (flusher level)", rate, "points/s", "≥ 100,000/s", rate >= 100_000),
        row("submit→commit p50", r["p50"] * 1000, "ms"),
        row("submit→commit p99", r["p99"] * 1000, "ms", "≤ 250 ms", r["p99"] * 1000 <= 250),
        row("process CPU", 100 * r["cpu"] / r["wall"], "% of a core"),
        row("raw binary COPY (struct-packed)", rows / packed_s, "rows/s"),
    ], offered=offered, overloaded=r["overloaded"], failed=r["failed"], frames=r["frames"], flushes=r["flushes"])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--devices", type=int, default=2000)
    parser.add_argument("--points", type=int, default=100, help="points per frame")
    parser.add_argument("--interval", type=float, default=1.0, help="seconds between a device's frames")
    parser.add_argument("--seconds", type=float, default=15.0)
    parser.add_argument("--window", type=int, default=4, help="unacked frames a device may have in flight")
    args = parser.parse_args()

    import django

    django.setup()
    run(devices=args.devices, points=args.points, interval=args.interval, seconds=args.seconds, window=args.window)


if __name__ == "__main__":
    main()
