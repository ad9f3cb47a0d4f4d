"""Query benchmark: dashboard and API reads over N telemetry rows (50M by default).

    .venv/bin/python -m benchmarks.queries [--rows 50000000] [--devices 10000] [--metrics 2] [--hours 24] [--runs 50]
                                           [--workers 2] [--keep NAME | --reuse NAME]

Re-measuring without reloading (a 50M load takes 11-15 min and ~9 GB):
    .venv/bin/python -m benchmarks.queries --keep bench_queries_50m    # load into that database, measure, keep it
    .venv/bin/python -m benchmarks.queries --reuse bench_queries_50m   # measure only (~1 min), after a sanity check
--reuse applies any migration added since the load, checks device/catalog counts exactly and raw/rollup
row counts by the planner's estimates against what --keep recorded (table bench_queries_meta), moves the
catalog's latest times forward by the time since the load (as the flusher would keep them), and ends the
charts where the loading run ended them (the raw data does not move). Drop the database when done:
    psql "$DATABASE_URL" -c 'DROP DATABASE bench_queries_50m'

1. A scratch database (DATABASE_URL's server) seeded with --devices devices over 50 sites
   (`benchmarks.overview.seed`: labels, statuses, presence, trust rows, open alerts).
2. A generator loads --rows telemetry points fast: --metrics series per device, evenly spaced over
   the last --hours (time-ordered, as ingest writes them), as binary COPY built with numpy, in
   1M-row chunks on --workers parallel connections, into the daily partitions with their indexes
   dropped; then the per-partition indexes are built in parallel and attached to the parent
   indexes (the bulk-load recipe), then ANALYZE.
3. The rollups are built in bulk with the product's SQL (`telemetry.rollups`' aggregates over the
   raw rows): 1-minute rollups per 15-minute range on parallel connections into the table with its
   primary key and indexes dropped (rebuilt after), 1-hour rollups from them, the fleet rollup
   with `rollups.refresh_fleet`; the watermark is set, and `rollups.refresh()` (the Celery beat
   task's code) rolls up the last minutes.
4. Times, --runs times each after a warm-up, p50/p95, through the real read paths:
   - device chart: `telemetry.selectors.series` for one random device, one metric, 24 h at
     1-minute buckets (the device page chart / `GET /api/v1/telemetry/series`); target p95 ≤ 50 ms;
   - fleet overview: the dashboard's overview page rendered by Django's test client as an admin
     (target p95 ≤ 200 ms), and `selectors.fleet_aggregate` by site over 24 h;
   - fleet chart over 7 days: `selectors.fleet_aggregate` by site and by tier over 7 days (the
     fleet-level hourly rollup; target p95 ≤ 200 ms), and for comparison the same over the
     per-device 1-hour rollups (the path used before the fleet rollup existed);
   - latest values for the fleet: `selectors.latest` for every device, one metric (the catalog
     table the flusher maintains; target p95 ≤ 50 ms), for comparison the former one LATERAL
     index probe per device over the raw points, and `GET /api/v1/telemetry/latest/` (the first
     TELEMETRY_LATEST_MAX_DEVICES devices, through the test client as an admin). The load
     bypasses the flusher, so the catalog's latest values are filled once from the raw rows of
     the last two steps (every series has a point in the last step).
   Use --hours 168 to give the 7-day figures a week of data.
Prints load and rollup times and the table and index sizes (disk). Drops the scratch database at the end
(unless --keep), as `benchmarks.run` (make bench) uses it.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import json
import os
import random
import sys
import time
from collections.abc import Iterator
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks import pct, result, row, scratch_database, setup_django

CHUNK = 1_000_000  # rows per COPY transaction
WORKERS = 2  # parallel COPY / rollup connections (the machine has 2 cores)
ROLLUP_CHUNK = dt.timedelta(minutes=15)  # raw time range per rollup INSERT … SELECT
POINT_INDEXES = [  # as in telemetry.storage; built after the load
    "CREATE INDEX telemetry_point_time_brin ON telemetry_point USING brin (time)",
    "CREATE INDEX telemetry_point_series ON telemetry_point (device_id, metric_id, time)",
]
ROLLUP_1M_INDEXES = [  # as in telemetry.storage; built after the bulk rollup
    "ALTER TABLE telemetry_rollup_1m ADD PRIMARY KEY (device_id, metric_id, bucket) "
    "INCLUDE (count, sum, min, max, last, last_time)",  # covering: migration 0004
    "CREATE INDEX telemetry_rollup_1m_metric_bucket ON telemetry_rollup_1m (metric_id, bucket)",
    "CREATE INDEX telemetry_rollup_1m_bucket_brin ON telemetry_rollup_1m USING brin (bucket)",
]


def _copy_dtype():
    import numpy as np

    # One binary COPY tuple, as telemetry.ingest._ROW (">hiqiiihid"), as a packed big-endian record.
    return np.dtype([("n", ">i2"), ("l1", ">i4"), ("t", ">i8"), ("l2", ">i4"), ("d", ">i4"), ("l3", ">i4"),
                     ("m", ">i2"), ("l4", ">i4"), ("v", ">f8")])


def _parallel(jobs: list, work, workers: int = WORKERS) -> None:
    """Run work(conn, job) for every job on `workers` threads, each with its own psycopg
    connection to the scratch database (each job commits on its own). The first error stops the
    remaining jobs and is raised."""
    import threading

    import psycopg
    from django.db import connection

    from telemetry.ingest import connection_kwargs

    kwargs = connection_kwargs(connection.settings_dict)
    todo, lock, errors = list(reversed(jobs)), threading.Lock(), []

    def worker() -> None:
        try:
            with psycopg.connect(**kwargs) as conn:
                conn.execute("SET work_mem = '256MB'")
                conn.commit()
                while not errors:
                    with lock:
                        if not todo:
                            return
                        job = todo.pop()
                    with conn.transaction():
                        work(conn, job)
        except BaseException as exc:  # noqa: BLE001 -- handed to the caller below
            errors.append(exc)

    threads = [threading.Thread(target=worker, name=f"bench-load-{i}") for i in range(max(1, min(workers, len(jobs))))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if errors:
        raise errors[0]


def _ddl(statements: list[str], workers: int = WORKERS) -> None:
    """Independent DDL statements (index builds) on parallel connections, with a large
    maintenance_work_mem, each in its own transaction."""
    def work(conn, sql: str) -> None:
        conn.execute("SET LOCAL maintenance_work_mem = '1GB'")
        conn.execute(sql)

    _parallel(statements, work, workers)


def generate(*, rows: int, device_ids: list[int], metric_ids: list[int], end: dt.datetime, hours: float,
             workers: int = WORKERS) -> dict:
    """Load `rows` points with binary COPY in parallel chunks, then build the indexes and ANALYZE;
    returns timings. The point indexes are dropped for the load and built after it (the bulk-load
    recipe), each partition's on its own connection, then attached to the parent index."""
    import numpy as np
    from django.db import connection

    from telemetry.ingest import _COPY_HEADER, _COPY_TRAILER, _PG_EPOCH_MS

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
    with connection.cursor() as cursor:
        day = start.date()
        while day <= end.date():
            cursor.execute("SELECT telemetry_ensure_partition(%s)", [day])
            day += dt.timedelta(days=1)
        cursor.execute("DROP INDEX IF EXISTS telemetry_point_series")
        cursor.execute("DROP INDEX IF EXISTS telemetry_point_time_brin")
        cursor.execute("SELECT c.relname FROM pg_inherits i JOIN pg_class c ON c.oid = i.inhrelid "
                       "WHERE i.inhparent = 'telemetry_point'::regclass ORDER BY 1")
        partitions = [r[0] for r in cursor.fetchall()]
    connection.close()

    def copy_chunk(conn, first: int) -> None:
        n_slots = min(slots_per_chunk, slots - first)
        rng = np.random.default_rng(first)  # values depend on the chunk, not on which thread loads it
        rec = np.empty(n_slots * per_slot, dtype=dtype)
        rec["n"], rec["l1"], rec["l2"], rec["l3"], rec["l4"] = 4, 8, 4, 2, 8
        slot_idx = np.arange(first, first + n_slots, dtype=np.int64)
        rec["t"] = (start_us + slot_idx[:, None] * step_us + jitter[None, :]).ravel()
        rec["d"] = np.tile(slot_dev, n_slots)
        rec["m"] = np.tile(slot_met, n_slots)
        rec["v"] = 20 + 5 * rng.standard_normal(n_slots * per_slot)
        with conn.cursor() as cur, cur.copy(
            "COPY telemetry_point (time, device_id, metric_id, value) FROM STDIN (FORMAT BINARY)"
        ) as copy:
            copy.write(_COPY_HEADER + rec.tobytes() + _COPY_TRAILER)

    t0 = time.monotonic()
    slots_per_chunk = max(1, CHUNK // per_slot)
    _parallel(list(range(0, slots, slots_per_chunk)), copy_chunk, workers)
    copy_s = time.monotonic() - t0
    t1 = time.monotonic()
    # Per-partition indexes in parallel, then the parent indexes (ON ONLY) with them attached.
    _ddl([f"CREATE INDEX {p}_series ON {p} (device_id, metric_id, time)" for p in partitions]
         + [f"CREATE INDEX {p}_time_brin ON {p} USING brin (time)" for p in partitions], workers)
    with connection.cursor() as cursor:
        for sql in POINT_INDEXES:
            cursor.execute(sql.replace(" ON telemetry_point ", " ON ONLY telemetry_point "))
        for p in partitions:
            cursor.execute(f"ALTER INDEX telemetry_point_series ATTACH PARTITION {p}_series")
            cursor.execute(f"ALTER INDEX telemetry_point_time_brin ATTACH PARTITION {p}_time_brin")
        index_s = time.monotonic() - t1
        t2 = time.monotonic()
        cursor.execute("ANALYZE telemetry_point")
    analyze_s = time.monotonic() - t2
    return {"rows": rows, "copy_s": copy_s, "index_s": index_s, "analyze_s": analyze_s, "step_s": step_us / 1e6,
            "start": start}


def backfill_rollups(start: dt.datetime, workers: int = WORKERS) -> dict:
    """Build the rollups of the loaded points in bulk, with the product's SQL (telemetry.rollups'
    aggregate expressions over the raw rows), then hand over to `rollups.refresh()`.

    1-minute rollups: the raw rows of [floor_hour(start), upper) in ROLLUP_CHUNK ranges, INSERT …
    SELECT … GROUP BY on parallel connections into the table with its primary key and indexes
    dropped, which are then rebuilt (upper = the closed-minute limit `refresh()` uses). 1-hour
    rollups: one INSERT … SELECT from the 1-minute rows. Fleet rollup: `rollups.refresh_fleet`
    for every hour. The rollup watermark is set to `upper`; `rollups.refresh()` then rolls up the
    rest (the last minutes) as the beat task does."""
    from django.db import connection, transaction

    from telemetry import conf, rollups
    from telemetry.models import RollupState

    lag = dt.timedelta(seconds=conf.get("ROLLUP_CLOSE_LAG_S"))
    upper = rollups.floor_minute(rollups._db_now() - lag)
    lo = rollups.floor_hour(start)
    chunks, at = [], lo
    while at < upper:
        chunks.append((at, min(at + ROLLUP_CHUNK, upper)))
        at += ROLLUP_CHUNK
    with connection.cursor() as cursor:
        cursor.execute("ALTER TABLE telemetry_rollup_1m DROP CONSTRAINT telemetry_rollup_1m_pkey")
        cursor.execute("DROP INDEX telemetry_rollup_1m_metric_bucket, telemetry_rollup_1m_bucket_brin")
    connection.close()

    def minute_rollup(conn, chunk: tuple[dt.datetime, dt.datetime]) -> None:
        conn.execute(
            f"INSERT INTO telemetry_rollup_1m {rollups._COLUMNS} "  # noqa: S608 -- constant SQL fragments
            f"SELECT date_trunc('minute', time), device_id, metric_id, {rollups._RAW_AGG} "
            "FROM telemetry_point WHERE time >= %s AND time < %s GROUP BY 1, 2, 3", list(chunk))

    t0 = time.monotonic()
    _parallel(chunks, minute_rollup, workers)
    minute_s = time.monotonic() - t0
    t1 = time.monotonic()
    _ddl(ROLLUP_1M_INDEXES[:1], workers)  # the primary key first: the secondary indexes after, in parallel
    _ddl(ROLLUP_1M_INDEXES[1:], workers)
    index_s = time.monotonic() - t1
    t2 = time.monotonic()
    hours = rollups._hours(lo, upper)
    with transaction.atomic(), connection.cursor() as cursor:
        cursor.execute("SET LOCAL work_mem = '256MB'")
        cursor.execute(
            f"INSERT INTO telemetry_rollup_1h {rollups._COLUMNS} "  # noqa: S608 -- constant SQL fragments
            f"SELECT date_trunc('hour', bucket), device_id, metric_id, {rollups._ROLLUP_AGG} "
            "FROM telemetry_rollup_1m WHERE bucket >= %s AND bucket < %s GROUP BY 1, 2, 3",
            [lo, upper])
        cursor.execute("ANALYZE telemetry_rollup_1h")
        t_fleet = time.monotonic()
        rollups.refresh_fleet(cursor, hours)
        fleet_s = time.monotonic() - t_fleet
        RollupState.objects.update_or_create(name=rollups.STATE, defaults={"watermark": upper})
    with connection.cursor() as cursor:
        # VACUUM as autovacuum would after such an insert volume: sets hint bits and the
        # visibility map (the device chart's index-only scans need it).
        for table in ("telemetry_rollup_1m", rollups.FLEET_TABLE):
            cursor.execute(f"VACUUM ANALYZE {table}")
    hour_s = time.monotonic() - t2
    print(f"[queries] 1-minute rollups {minute_s:.1f}s, their indexes {index_s:.1f}s, 1-hour and fleet rollups "
          f"{hour_s:.1f}s (fleet {fleet_s:.1f}s)", flush=True)
    t3 = time.monotonic()
    out = rollups.refresh()  # the tail, up to the real now, with the product's incremental path
    return {"rollup_s": time.monotonic() - t0, "rollup_1m_s": minute_s, "rollup_index_s": index_s,
            "rollup_1h_fleet_s": hour_s, "rollup_tail_s": time.monotonic() - t3,
            "watermark": str(out.get("watermark"))}


def fill_latest(end: dt.datetime, step_s: float) -> None:
    """The load bypassed the flusher: set each series' latest value from the raw rows (every
    series has a point in the last step, so only the last two steps are read)."""
    from django.db import connection

    with connection.cursor() as cursor:
        cursor.execute(
            "INSERT INTO telemetry_devicemetric (device_id, metric_id, first_seen, last_time, last_value) "
            "SELECT DISTINCT ON (device_id, metric_id) device_id, metric_id, now(), time, value FROM telemetry_point "
            "WHERE time >= %s ORDER BY device_id, metric_id, time DESC, value DESC "
            "ON CONFLICT (device_id, metric_id) DO UPDATE "
            "SET last_time = EXCLUDED.last_time, last_value = EXCLUDED.last_value",
            [end - dt.timedelta(seconds=2 * step_s + 1)])
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
    """Disk use: raw points (heap and indexes apart), rollups, the whole scratch database."""
    from django.db import connection

    with connection.cursor() as cursor:
        cursor.execute("""
            SELECT coalesce(sum(pg_table_size(c.oid)) FILTER (WHERE c.relname LIKE 'telemetry_point_p%%'), 0),
                   coalesce(sum(pg_indexes_size(c.oid)) FILTER (WHERE c.relname LIKE 'telemetry_point_p%%'), 0),
                   coalesce(sum(pg_total_relation_size(c.oid)) FILTER (WHERE c.relname = 'telemetry_rollup_1m'), 0),
                   coalesce(sum(pg_total_relation_size(c.oid)) FILTER (WHERE c.relname = 'telemetry_rollup_1h'), 0),
                   pg_database_size(current_database())
            FROM pg_class c WHERE c.relkind = 'r'""")
        raw, raw_idx, m1, h1, db = cursor.fetchone()
        cursor.execute("SELECT count(*) FROM telemetry_rollup_1m")
        m1_rows = cursor.fetchone()[0]
    gb = 2**30
    return {"raw_table_gb": round(float(raw) / gb, 2), "raw_indexes_gb": round(float(raw_idx) / gb, 2),
            "rollup_1m_gb": round(float(m1) / gb, 2), "rollup_1h_gb": round(float(h1) / gb, 2),
            "database_gb": round(float(db) / gb, 2), "rollup_1m_rows": m1_rows}


def timed(fn, runs: int, warmup: int = 3) -> list[float]:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(runs):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1000)
    return times


META_TABLE = "bench_queries_meta"  # in a kept database: what was loaded, for --reuse


@contextlib.contextmanager
def kept_database(name: str) -> Iterator[None]:
    """A fresh, migrated database `name` (an existing one of that name is dropped first) that is
    left in place after the block, for `--reuse name`."""
    setup_django()
    from django.conf import settings
    from django.db import connection

    settings.DATABASES["default"].setdefault("TEST", {})["NAME"] = name
    print(f"[queries] database {name}: creating and migrating (kept afterwards) …", flush=True)
    connection.creation.create_test_db(verbosity=0, autoclobber=True, keepdb=False)
    try:
        yield
    finally:
        connection.close()
        print(f"[queries] database {name} kept: re-measure with --reuse {name}; drop it with DROP DATABASE {name}",
              flush=True)


@contextlib.contextmanager
def reused_database(name: str) -> Iterator[None]:
    """Point Django's default connection at the existing database `name` (loaded by --keep),
    applying any migration added since the load. Left in place."""
    setup_django()
    from django.conf import settings
    from django.core.management import call_command
    from django.db import connection

    connection.close()
    settings.DATABASES["default"]["NAME"] = name
    connection.settings_dict["NAME"] = name
    try:
        connection.ensure_connection()
    except Exception as exc:
        raise SystemExit(f"[queries] --reuse {name}: cannot connect ({exc}); load it first with --keep {name}") from exc
    call_command("migrate", verbosity=1, interactive=False)  # a migration added since the load (e.g. an index)
    try:
        yield
    finally:
        connection.close()


def save_meta(meta: dict) -> None:
    from django.db import connection

    with connection.cursor() as cursor:
        cursor.execute(f"CREATE TABLE {META_TABLE} (data jsonb NOT NULL)")
        cursor.execute(f"INSERT INTO {META_TABLE} VALUES (%s::jsonb)", [json.dumps(meta, default=str)])  # noqa: S608 -- constant table name


def check_reused(name: str) -> dict:
    """The load description saved by --keep, checked against the database in seconds: device,
    metric and catalog rows counted exactly, raw and 1-minute rollup rows by the planner's
    estimates (counting 50M rows would take longer than the measurements)."""
    from django.db import connection

    with connection.cursor() as cursor:
        cursor.execute("SELECT to_regclass(%s) IS NOT NULL", [META_TABLE])
        if not cursor.fetchone()[0]:
            raise SystemExit(f"[queries] --reuse {name}: no {META_TABLE} table; load it with --keep {name}")
        cursor.execute(f"SELECT data FROM {META_TABLE}")  # noqa: S608 -- constant table name
        meta = cursor.fetchone()[0]
        if isinstance(meta, str):
            meta = json.loads(meta)
        cursor.execute("SELECT count(*) FROM fleet_device")
        devices = cursor.fetchone()[0]
        cursor.execute("SELECT count(*) FROM telemetry_devicemetric")
        catalog = cursor.fetchone()[0]
        cursor.execute("SELECT coalesce(sum(c.reltuples), 0)::bigint FROM pg_inherits i JOIN pg_class c "
                       "ON c.oid = i.inhrelid WHERE i.inhparent = 'telemetry_point'::regclass")
        raw = cursor.fetchone()[0]
        cursor.execute("SELECT reltuples::bigint FROM pg_class WHERE oid = 'telemetry_rollup_1m'::regclass")
        m1 = cursor.fetchone()[0]
    problems = []
    if devices != meta["devices"]:
        problems.append(f"{devices:,} devices, loaded {meta['devices']:,}")
    if catalog != meta["devices"] * len(meta["metric_ids"]):
        problems.append(f"{catalog:,} catalog rows, expected {meta['devices'] * len(meta['metric_ids']):,}")
    if abs(raw - meta["rows"]) > 0.05 * meta["rows"]:
        problems.append(f"~{raw:,} raw rows (estimate), loaded {meta['rows']:,}")
    if abs(m1 - meta["rollup_1m_rows"]) > 0.05 * max(1, meta["rollup_1m_rows"]):
        problems.append(f"~{m1:,} 1-minute rollup rows (estimate), built {meta['rollup_1m_rows']:,}")
    if problems:
        raise SystemExit(f"[queries] --reuse {name}: not the database that was loaded: {'; '.join(problems)}")
    print(f"[queries] reusing {name}: {devices:,} devices, ~{raw:,} raw rows, ~{m1:,} 1-minute rollup rows, "
          f"catalog {catalog:,} rows (loaded {meta['loaded_at']})", flush=True)
    return meta


def rebase_latest() -> dt.timedelta:
    """On reuse, move the catalog's latest times forward by the time since the load (20,000 rows:
    what the flusher would have kept current), so the fleet's latest values are inside
    TELEMETRY_LATEST_WINDOW_S as in the run that loaded them."""
    from django.db import connection

    with connection.cursor() as cursor:
        cursor.execute("SELECT now() - max(last_time) FROM telemetry_devicemetric")
        shift = cursor.fetchone()[0]
        cursor.execute("UPDATE telemetry_devicemetric SET last_time = last_time + %s", [shift])
        cursor.execute("VACUUM ANALYZE telemetry_devicemetric")
    return shift


def run(*, rows: int = 50_000_000, devices: int = 10_000, metrics: int = 2, hours: float = 24.0,
        runs: int = 50, workers: int = WORKERS, keep: str | None = None, reuse: str | None = None) -> dict:
    """Load and measure in a scratch database dropped at the end (the default); with `keep`, load
    into database `keep` and leave it; with `reuse`, only measure over database `reuse` (loaded by
    an earlier `keep` run; rows/devices/metrics/hours are then those of that load)."""
    if keep and reuse:
        raise SystemExit("--keep and --reuse exclude each other")
    if reuse:
        with reused_database(reuse):
            meta = check_reused(reuse)
            return measure(meta, runs=runs, reused=reuse)
    with kept_database(keep) if keep else scratch_database("bench_queries"):
        meta = load(rows=rows, devices=devices, metrics=metrics, hours=hours, workers=workers)
        if keep:
            save_meta(meta)
        return measure(meta, runs=runs)


def load(*, rows: int, devices: int, metrics: int, hours: float, workers: int) -> dict:
    """Seed, load, roll up and fill the catalog; returns the description `measure` (and --reuse) needs."""
    from django.utils import timezone

    from benchmarks import overview
    from fleet.models import Device
    from telemetry.models import Metric

    t0 = time.monotonic()
    overview.seed(devices)
    seed_s = time.monotonic() - t0
    device_ids = list(Device.objects.order_by("id").values_list("id", flat=True))
    metric_ids = [Metric.objects.create(name=f"bench.metric_{i}").id for i in range(metrics)]
    end = timezone.now().replace(microsecond=0)
    print(f"[queries] seeded {devices:,} devices in {seed_s:.1f}s; loading {rows:,} points …", flush=True)
    loaded = generate(rows=rows, device_ids=device_ids, metric_ids=metric_ids, end=end, hours=hours, workers=workers)
    print(f"[queries] COPY {loaded['rows']:,} rows in {loaded['copy_s']:.1f}s, indexes built in "
          f"{loaded['index_s']:.1f}s, ANALYZE {loaded['analyze_s']:.1f}s; building rollups …", flush=True)
    roll = backfill_rollups(loaded["start"], workers)
    fill_latest(end, loaded["step_s"])
    load_s = time.monotonic() - t0 - seed_s
    disk = sizes()
    print(f"[queries] rollups in {roll['rollup_s']:.1f}s ({roll}); load total {load_s:.1f}s; sizes {disk}", flush=True)
    return {"rows": loaded["rows"], "devices": devices, "metric_ids": metric_ids, "hours": hours, "workers": workers,
            "end": end.isoformat(), "step_s": loaded["step_s"], "loaded_at": timezone.now().isoformat(),
            "seed_s": round(seed_s, 1), "copy_s": round(loaded["copy_s"], 1), "index_s": round(loaded["index_s"], 1),
            "analyze_s": round(loaded["analyze_s"], 1), "rollup_s": round(roll["rollup_s"], 1),
            "rollup_1m_s": round(roll["rollup_1m_s"], 1), "rollup_index_s": round(roll["rollup_index_s"], 1),
            "rollup_1h_fleet_s": round(roll["rollup_1h_fleet_s"], 1), "rollup_tail_s": round(roll["rollup_tail_s"], 1),
            "load_s": round(load_s, 1), **disk}


def measure(meta: dict, *, runs: int, reused: str | None = None) -> dict:
    """Time the reads (module docstring, step 4) over the loaded data. The charts end at the
    measurement time in a fresh load; over a reused database they end where they ended after the
    load (its end plus the load's duration), as the raw data does not move."""
    from django.test import Client
    from django.utils import timezone

    from benchmarks import overview
    from fleet.models import Device
    from security.services import operator_upsert
    from telemetry import selectors
    from telemetry.models import Metric

    device_ids = list(Device.objects.order_by("id").values_list("id", flat=True))
    metric_ids = meta["metric_ids"]
    if reused:
        shift = rebase_latest()
        now = dt.datetime.fromisoformat(meta["loaded_at"])
        print(f"[queries] charts end at {now} (the load's end); catalog latest times moved by {shift}", flush=True)
    else:
        now = timezone.now()
    rng = random.Random(11)
    metric = metric_ids[0]
    metric_name = Metric.objects.get(id=metric).name

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
    # No target: 24 h reads the per-device 1-minute rollups of the whole fleet (seconds at 50M rows).
    agg_ms = timed(lambda: selectors.fleet_aggregate(metric_id=metric, by="site", start=now - dt.timedelta(hours=24),
                                                      end=now), min(runs, 3), warmup=0)
    week = now - dt.timedelta(days=7)
    week_site_ms = timed(lambda: selectors.fleet_aggregate(metric_id=metric, by="site", start=week, end=now), runs)
    week_tier_ms = timed(lambda: selectors.fleet_aggregate(metric_id=metric, by="tier", start=week, end=now), runs)
    week_before_ms = timed_without_fleet_rollup(
        lambda: selectors.fleet_aggregate(metric_id=metric, by="site", start=week, end=now), min(runs, 10))
    latest_before_ms = timed(lambda: latest_from_raw(metric, device_ids, window_s=latest_raw_window(now)),
                             min(runs, 10), warmup=1)
    user, _, _ = operator_upsert(actor="bench", username=f"bench-admin-{os.getpid()}", role="admin",
                                 password="x" * 16)
    client = Client(HTTP_HOST="localhost")
    client.force_login(user)
    page_error = None
    try:
        page_ms, page_queries = overview.measure(client, "/", runs)
    except Exception as exc:  # noqa: BLE001 -- the other figures stand; the failure is reported
        page_ms, page_queries, page_error = [], "?", f"{exc.__class__.__name__}: {exc}"[:300]
    # The HTTP path: GET /api/v1/telemetry/latest/ for the default selection (all devices, the
    # first TELEMETRY_LATEST_MAX_DEVICES by uid), rendered as JSON.
    api_url = f"/api/v1/telemetry/latest/?metric={metric_name}"
    api_n = len(client.get(api_url).json()["results"])
    api_latest_ms = timed(lambda: client.get(api_url), runs)

    def rows_for(label: str, times: list[float], target: float | None) -> list[dict]:
        p95 = pct(times, 0.95)
        return [row(f"{label} p50", pct(times, 0.5), "ms"),
                row(f"{label} p95", p95, "ms", f"≤ {target:g} ms" if target else "", p95 <= target if target else None)]

    devices = meta["devices"]
    full = meta["rows"] >= 50_000_000 and devices >= 10_000
    copy_s = meta["copy_s"]
    out_rows = [
        row("telemetry rows loaded" + (f" (reused database {reused})" if reused else ""), meta["rows"], "",
            "50,000,000 (full run)", None if not full else True),
        row("COPY load rate", meta["rows"] / copy_s if copy_s else None, "rows/s"),
        *rows_for(f"device chart 24 h at 1 min ({points} points)", chart_ms, 50),
        *rows_for(f"fleet overview page ({devices:,} devices, {page_queries} SQL queries)", page_ms, 200),
        *rows_for("fleet aggregate by site, 24 h", agg_ms, None),
        *rows_for("fleet chart 7 d by site (fleet rollup)", week_site_ms, 200),
        *rows_for("fleet chart 7 d by tier (fleet rollup)", week_tier_ms, 200),
        *rows_for("fleet chart 7 d by site, per-device 1 h rollups (before)", week_before_ms, None),
        *rows_for(f"latest values for the fleet ({latest_n:,} devices)", latest_ms, 50),
        *rows_for("latest values, one LATERAL probe per device on raw points (before)", latest_before_ms, None),
        *rows_for(f"latest values API, GET latest/ ({api_n:,} devices per request)", api_latest_ms, None),
    ]
    details = {k: v for k, v in meta.items() if k not in ("metric_ids", "rows", "end", "loaded_at")}
    return result("queries", out_rows, telemetry_rows=meta["rows"], metrics=len(metric_ids), runs=runs,
                  point_every_s=round(meta["step_s"], 2), reused=reused, load_average=" ".join(
                      f"{x:.2f}" for x in os.getloadavg()), overview_page_error=page_error, **details)


def latest_raw_window(now: dt.datetime) -> int:
    """The former latest-values read looked back 24 h from the server's now; over a reused
    database the data ends earlier, so the window reaches back to 24 h before the charts' end."""
    from django.utils import timezone

    return int((timezone.now() - now).total_seconds()) + 86400


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=50_000_000)
    parser.add_argument("--devices", type=int, default=10_000)
    parser.add_argument("--metrics", type=int, default=2)
    parser.add_argument("--hours", type=float, default=24.0)
    parser.add_argument("--runs", type=int, default=50)
    parser.add_argument("--workers", type=int, default=WORKERS, help="parallel connections for the load")
    parser.add_argument("--keep", metavar="NAME", help="load into database NAME and leave it in place (for --reuse)")
    parser.add_argument("--reuse", metavar="NAME", help="measure over database NAME loaded by --keep, without loading "
                        "(after a sanity check of its row counts); --rows/--devices/--metrics/--hours are ignored")
    args = parser.parse_args()
    from benchmarks import setup_django
    from benchmarks.run import print_results

    setup_django()
    print_results([run(rows=args.rows, devices=args.devices, metrics=args.metrics, hours=args.hours, runs=args.runs,
                       workers=args.workers, keep=args.keep, reuse=args.reuse)])


if __name__ == "__main__":
    main()
