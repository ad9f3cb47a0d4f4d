"""Query benchmark: dashboard and API reads over N telemetry rows (50M by default).

    .venv/bin/python -m benchmarks.queries [--rows 50000000] [--devices 10000] [--metrics 2] [--hours 24] [--runs 50]

1. A scratch database (DATABASE_URL's server) seeded with --devices devices over 50 sites
   (`benchmarks.overview.seed`: labels, statuses, presence, trust rows, open alerts).
2. A generator loads --rows telemetry points fast: --metrics series per device, evenly spaced over
   the last --hours (time-ordered, as ingest writes them), as binary COPY built with numpy, into
   the daily partitions, with the series btree dropped during the load and rebuilt after (the
   bulk-load recipe; BRIN stays), then ANALYZE.
3. `telemetry.rollups.refresh()` until the rollups are caught up (the Celery beat task's code).
4. Times, --runs times each after a warm-up, p50/p95, through the real read paths:
   - device chart: `telemetry.selectors.series` for one random device, one metric, 24 h at
     1-minute buckets (the device page chart / `GET /api/v1/telemetry/series`); target p95 ≤ 50 ms;
   - fleet overview: the dashboard's overview page rendered by Django's test client as an admin
     (target p95 ≤ 200 ms), and `selectors.fleet_aggregate` by site over 24 h;
   - fleet chart over 7 days: `selectors.fleet_aggregate` by site and by tier over 7 days (the
     fleet-level hourly rollup; target p95 ≤ 200 ms), and for comparison the same over the
     per-device 1-hour rollups (the path used before the fleet rollup existed);
   - latest values for the fleet: `selectors.latest` for every device, one metric (the catalog
     table the flusher maintains; target p95 ≤ 50 ms), and for comparison the former one
     LATERAL index probe per device over the raw points. The load bypasses the flusher, so the
     catalog's latest values are filled once from the raw rows (as migration 0003 does).
   Use --hours 168 to give the 7-day figures a week of data.
Prints load and rollup times and the table sizes (disk). Drops the scratch database at the end.
"""

from __future__ import annotations

import argparse
import datetime as dt
import random
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks import pct, result, row, scratch_database

CHUNK = 1_000_000  # rows per COPY transaction


def _copy_dtype():
    import numpy as np

    # One binary COPY tuple, as telemetry.ingest._ROW (">hiqiiihid"), as a packed big-endian record.
    return np.dtype([("n", ">i2"), ("l1", ">i4"), ("t", ">i8"), ("l2", ">i4"), ("d", ">i4"), ("l3", ">i4"),
                     ("m", ">i2"), ("l4", ">i4"), ("v", ">f8")])


def generate(*, rows: int, device_ids: list[int], metric_ids: list[int], end: dt.datetime, hours: float) -> dict:
    """Load `rows` points with binary COPY; returns timings."""
    import numpy as np
    import psycopg
    from django.db import connection

    from telemetry.ingest import _COPY_HEADER, _COPY_TRAILER, _PG_EPOCH_MS, connection_kwargs

    devices = np.asarray(device_ids, dtype=np.int64)
    metrics = np.asarray(metric_ids, dtype=np.int64)
    per_slot = len(devices) * len(metrics)
    slots = max(1, rows // per_slot)
    rows = slots * per_slot
    span_us = int(hours * 3600 * 1_000_000)
    step_us = span_us // slots
    end_us = (int(end.timestamp() * 1000) - _PG_EPOCH_MS) * 1000
    start_us = end_us - slots * step_us
    start = end - dt.timedelta(microseconds=slots * step_us)
    dtype = _copy_dtype()
    slot_dev = np.repeat(devices, len(metrics))
    slot_met = np.tile(metrics, len(devices))
    # Per-device jitter inside the step so devices do not all report at the same microsecond.
    jitter = (np.arange(per_slot, dtype=np.int64) * 7919) % max(1, step_us)
    rng = np.random.default_rng(7)
    with connection.cursor() as cursor:
        day = start.date()
        while day <= end.date():
            cursor.execute("SELECT telemetry_ensure_partition(%s)", [day])
            day += dt.timedelta(days=1)
        cursor.execute("DROP INDEX IF EXISTS telemetry_point_series")
    connection.close()
    t0 = time.monotonic()
    slots_per_chunk = max(1, CHUNK // per_slot)
    with psycopg.connect(**connection_kwargs(connection.settings_dict)) as conn:
        for first in range(0, slots, slots_per_chunk):
            n_slots = min(slots_per_chunk, slots - first)
            rec = np.empty(n_slots * per_slot, dtype=dtype)
            rec["n"], rec["l1"], rec["l2"], rec["l3"], rec["l4"] = 4, 8, 4, 2, 8
            slot_idx = np.arange(first, first + n_slots, dtype=np.int64)
            rec["t"] = (start_us + slot_idx[:, None] * step_us + jitter[None, :]).ravel()
            rec["d"] = np.tile(slot_dev, n_slots)
            rec["m"] = np.tile(slot_met, n_slots)
            rec["v"] = 20 + 5 * rng.standard_normal(n_slots * per_slot)
            with conn.transaction(), conn.cursor() as cur, cur.copy(
                "COPY telemetry_point (time, device_id, metric_id, value) FROM STDIN (FORMAT BINARY)"
            ) as copy:
                copy.write(_COPY_HEADER + rec.tobytes() + _COPY_TRAILER)
        copy_s = time.monotonic() - t0
        t1 = time.monotonic()
        conn.execute("SET maintenance_work_mem = '512MB'")
        conn.execute("CREATE INDEX telemetry_point_series ON telemetry_point (device_id, metric_id, time)")
        conn.execute("ANALYZE telemetry_point")
        conn.commit()
        index_s = time.monotonic() - t1
    return {"rows": rows, "copy_s": copy_s, "index_s": index_s, "step_s": step_us / 1e6, "start": start}


def refresh_rollups(start: dt.datetime, end: dt.datetime) -> dict:
    """Catch the rollups up hour by hour with `rollups.refresh(now=…)` (what the beat task does
    every minute), with ANALYZE of the growing rollup tables in between as autovacuum would
    (without it the planner keeps the empty-table statistics and seq-scans rollup_1m every step)."""
    from django.db import connection

    from telemetry import conf, rollups

    lag = dt.timedelta(seconds=conf.get("ROLLUP_CLOSE_LAG_S"))
    t0 = time.monotonic()
    at = start.replace(minute=0, second=0, microsecond=0) + dt.timedelta(hours=1)
    while True:
        out = rollups.refresh(now=min(at, end) + lag)
        with connection.cursor() as cursor:
            cursor.execute("ANALYZE telemetry_rollup_1m")
            cursor.execute("ANALYZE telemetry_rollup_1h")
        if at >= end and out.get("steps", 0) == 0:
            break
        at += dt.timedelta(hours=1)
    out = rollups.refresh()  # and up to the real now
    return {"rollup_s": time.monotonic() - t0, "watermark": str(out.get("watermark"))}


def fill_latest() -> None:
    """The load bypassed the flusher: set each series' latest value from the raw rows."""
    from django.db import connection

    with connection.cursor() as cursor:
        cursor.execute(
            "INSERT INTO telemetry_devicemetric (device_id, metric_id, first_seen, last_time, last_value) "
            "SELECT DISTINCT ON (device_id, metric_id) device_id, metric_id, now(), time, value FROM telemetry_point "
            "ORDER BY device_id, metric_id, time DESC, value DESC ON CONFLICT (device_id, metric_id) DO UPDATE "
            "SET last_time = EXCLUDED.last_time, last_value = EXCLUDED.last_value")
        cursor.execute("VACUUM ANALYZE telemetry_devicemetric")


def latest_from_raw(metric_id: int, device_ids: list[int], window_s: int = 86400) -> dict:
    """The former `selectors.latest`: one LATERAL index probe per device over the raw points."""
    from django.db import connection

    with connection.cursor() as cursor:
        cursor.execute(
            "SELECT d.id, p.time, p.value FROM unnest(%s::int[]) AS d(id) CROSS JOIN LATERAL ("
            " SELECT time, value FROM telemetry_point WHERE device_id = d.id AND metric_id = %s"
            " AND time >= now() - %s * interval '1 second' ORDER BY time DESC LIMIT 1) AS p",
            [device_ids, metric_id, window_s])
        return {r[0]: r[1:] for r in cursor.fetchall()}


def timed_without_fleet_rollup(fn, runs: int) -> list[float]:
    """Time `fn` with the fleet rollup marked as starting tomorrow: fleet_aggregate then reads the
    per-device rollups, as it did before the fleet rollup existed."""
    from django.utils import timezone

    from telemetry.models import RollupState
    from telemetry.rollups import FLEET_SINCE_STATE

    state = RollupState.objects.filter(name=FLEET_SINCE_STATE).first()
    RollupState.objects.update_or_create(name=FLEET_SINCE_STATE,
                                         defaults={"watermark": timezone.now() + dt.timedelta(days=1)})
    try:
        return timed(fn, runs, warmup=1)
    finally:
        if state is None:
            RollupState.objects.filter(name=FLEET_SINCE_STATE).delete()
        else:
            state.save()


def sizes() -> dict:
    from django.db import connection

    with connection.cursor() as cursor:
        cursor.execute("""
            SELECT coalesce(sum(pg_total_relation_size(c.oid)) FILTER (WHERE c.relname LIKE 'telemetry_point_p%%'), 0),
                   coalesce(sum(pg_total_relation_size(c.oid)) FILTER (WHERE c.relname = 'telemetry_rollup_1m'), 0),
                   coalesce(sum(pg_total_relation_size(c.oid)) FILTER (WHERE c.relname = 'telemetry_rollup_1h'), 0),
                   pg_database_size(current_database())
            FROM pg_class c WHERE c.relkind = 'r'""")
        raw, m1, h1, db = cursor.fetchone()
        cursor.execute("SELECT count(*) FROM telemetry_rollup_1m")
        m1_rows = cursor.fetchone()[0]
    gb = 2**30
    return {"raw_gb": round(float(raw) / gb, 2), "rollup_1m_gb": round(float(m1) / gb, 2),
            "rollup_1h_gb": round(float(h1) / gb, 2), "database_gb": round(float(db) / gb, 2), "rollup_1m_rows": m1_rows}


def timed(fn, runs: int, warmup: int = 3) -> list[float]:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(runs):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1000)
    return times


def run(*, rows: int = 50_000_000, devices: int = 10_000, metrics: int = 2, hours: float = 24.0,
        runs: int = 50) -> dict:
    from django.test import Client
    from django.utils import timezone

    from benchmarks import overview
    from fleet.models import Device
    from security.services import operator_upsert
    from telemetry import selectors
    from telemetry.models import Metric

    with scratch_database("bench_queries"):
        t0 = time.monotonic()
        overview.seed(devices)
        seed_s = time.monotonic() - t0
        device_ids = list(Device.objects.order_by("id").values_list("id", flat=True))
        metric_ids = [Metric.objects.create(name=f"bench.metric_{i}").id for i in range(metrics)]
        end = timezone.now().replace(microsecond=0)
        print(f"[queries] seeded {devices:,} devices in {seed_s:.1f}s; loading {rows:,} points …", flush=True)
        load = generate(rows=rows, device_ids=device_ids, metric_ids=metric_ids, end=end, hours=hours)
        print(f"[queries] COPY {load['rows']:,} rows in {load['copy_s']:.1f}s, index rebuilt in "
              f"{load['index_s']:.1f}s; refreshing rollups …", flush=True)
        roll = refresh_rollups(load["start"], end)
        fill_latest()
        disk = sizes()
        print(f"[queries] rollups in {roll['rollup_s']:.1f}s; sizes {disk}", flush=True)

        rng = random.Random(11)
        metric = metric_ids[0]
        now = timezone.now()

        def chart():
            d = rng.choice(device_ids)
            out = selectors.series(device_ids=[d], metric_ids=[metric], start=now - dt.timedelta(hours=24), end=now,
                                   bucket="1m")
            assert out["resolution"].source == "1m"
            return out

        points = sum(len(v) for v in chart()["series"].values())
        chart_ms = timed(chart, runs)
        latest_n = len(selectors.latest(metric_id=metric, device_ids=device_ids))
        latest_ms = timed(lambda: selectors.latest(metric_id=metric, device_ids=device_ids), runs)
        agg_ms = timed(lambda: selectors.fleet_aggregate(metric_id=metric, by="site", start=now - dt.timedelta(hours=24),
                                                          end=now), runs)
        week = now - dt.timedelta(days=7)
        week_site_ms = timed(lambda: selectors.fleet_aggregate(metric_id=metric, by="site", start=week, end=now), runs)
        week_tier_ms = timed(lambda: selectors.fleet_aggregate(metric_id=metric, by="tier", start=week, end=now), runs)
        week_before_ms = timed_without_fleet_rollup(
            lambda: selectors.fleet_aggregate(metric_id=metric, by="site", start=week, end=now), min(runs, 10))
        latest_before_ms = timed(lambda: latest_from_raw(metric, device_ids), min(runs, 10), warmup=1)
        user, _, _ = operator_upsert(actor="bench", username="bench-admin", role="admin", password="x" * 16)
        client = Client(HTTP_HOST="localhost")
        client.force_login(user)
        page_error = None
        try:
            page_ms, page_queries = overview.measure(client, "/", runs)
        except Exception as exc:  # noqa: BLE001 -- the other figures stand; the failure is reported
            page_ms, page_queries, page_error = [], "?", f"{exc.__class__.__name__}: {exc}"[:300]

    def rows_for(label: str, times: list[float], target: float | None) -> list[dict]:
        p95 = pct(times, 0.95)
        return [row(f"{label} p50", pct(times, 0.5), "ms"),
                row(f"{label} p95", p95, "ms", f"≤ {target:g} ms" if target else "", p95 <= target if target else None)]

    full = load["rows"] >= 50_000_000 and devices >= 10_000
    out_rows = [
        row("telemetry rows loaded", load["rows"], "", "50,000,000 (full run)", None if not full else True),
        row("COPY load rate", load["rows"] / load["copy_s"], "rows/s"),
        *rows_for(f"device chart 24 h at 1 min ({points} points)", chart_ms, 50),
        *rows_for(f"fleet overview page ({devices:,} devices, {page_queries} SQL queries)", page_ms, 200),
        *rows_for("fleet aggregate by site, 24 h", agg_ms, None),
        *rows_for("fleet chart 7 d by site (fleet rollup)", week_site_ms, 200),
        *rows_for("fleet chart 7 d by tier (fleet rollup)", week_tier_ms, 200),
        *rows_for("fleet chart 7 d by site, per-device 1 h rollups (before)", week_before_ms, None),
        *rows_for(f"latest values for the fleet ({latest_n:,} devices)", latest_ms, 50),
        *rows_for("latest values, one LATERAL probe per device on raw points (before)", latest_before_ms, None),
    ]
    return result("queries", out_rows, telemetry_rows=load["rows"], devices=devices, metrics=metrics, hours=hours, runs=runs,
                  point_every_s=round(load["step_s"], 2), seed_s=round(seed_s, 1), copy_s=round(load["copy_s"], 1),
                  index_s=round(load["index_s"], 1), rollup_s=round(roll["rollup_s"], 1), overview_page_error=page_error,
                  **disk)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=50_000_000)
    parser.add_argument("--devices", type=int, default=10_000)
    parser.add_argument("--metrics", type=int, default=2)
    parser.add_argument("--hours", type=float, default=24.0)
    parser.add_argument("--runs", type=int, default=50)
    args = parser.parse_args()
    from benchmarks import setup_django
    from benchmarks.run import print_results

    setup_django()
    print_results([run(rows=args.rows, devices=args.devices, metrics=args.metrics, hours=args.hours, runs=args.runs)])


if __name__ == "__main__":
    main()
