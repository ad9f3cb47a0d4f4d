"""Rollups and retention on the plain PostgreSQL backend (TimescaleDB does both with policies).

Rollup rule (docs/telemetry.md): `refresh()` aggregates raw points into 1-minute buckets
(count, sum, min, max, last value and its time) for every *closed* minute since the watermark —
a minute is closed once it ended TELEMETRY_ROLLUP_CLOSE_LAG_S ago (the late-data window: points
arriving up to that late are simply included) — then recomputes the 1-hour buckets touched from
the 1-minute ones (the current hour included, so hours are complete up to the watermark).

Fleet rollup: `telemetry_rollup_fleet_1h` holds one row per (hour, metric, dimension, key) — the
dimension is site, tier or group, the key the site slug ('' for none), tier or group slug — with
the same columns as the per-device rollups plus `devices` (devices that reported in that hour).
Each refresh step recomputes it for the hours whose 1-hour rows it recomputed, and the late-data
path for the hours it re-aggregated, from `telemetry_rollup_1h` joined to the devices' site, tier
and groups at that moment (so a closed hour keeps the membership it was rolled up with). It is
what `selectors.fleet_aggregate` reads for long ranges over the whole fleet.

Later points: the flusher marks (device, hour) in `telemetry_late`, in the same transaction as
the points, for every point older than TELEMETRY_LATE_MARK_S when it arrives. `refresh()` then
re-aggregates those devices' hours from raw data (bounded batches), so rollups converge to the
raw data however late it comes (within raw retention). LATE_MARK_S < CLOSE_LAG_S -
FLUSH_TIMEOUT_S leaves a margin so no point can fall between the two mechanisms.
"""

from __future__ import annotations

import datetime as dt
import logging
import time
from typing import Any

from django.db import connection, transaction
from django.utils import timezone

from telemetry import conf, storage
from telemetry.models import DeviceEvent, RollupState

log = logging.getLogger(__name__)

STATE = "rollup"

# `last` without TimescaleDB's last(): the max of [epoch, value] arrays is the latest point
# (ties on time broken by the larger value) and needs no per-group sort.
_RAW_AGG = """
    count(*), sum(value), min(value), max(value),
    (max(ARRAY[extract(epoch FROM time)::float8, value]))[2], max(time)
"""
_ROLLUP_AGG = """
    sum(count), sum(sum), min(min), max(max),
    (max(ARRAY[extract(epoch FROM last_time)::float8, last]))[2], max(last_time)
"""
_UPSERT = """
    ON CONFLICT (device_id, metric_id, bucket) DO UPDATE SET
        count = EXCLUDED.count, sum = EXCLUDED.sum, min = EXCLUDED.min, max = EXCLUDED.max,
        last = EXCLUDED.last, last_time = EXCLUDED.last_time
"""
_COLUMNS = "(bucket, device_id, metric_id, count, sum, min, max, last, last_time)"


FLEET_TABLE = "telemetry_rollup_fleet_1h"
FLEET_SETUP_SQL = [
    f"""CREATE TABLE {FLEET_TABLE} (
        bucket timestamptz NOT NULL,
        metric_id smallint NOT NULL,
        dim text NOT NULL,
        key text NOT NULL,
        devices integer NOT NULL,
        count bigint NOT NULL,
        sum double precision NOT NULL,
        min double precision NOT NULL,
        max double precision NOT NULL,
        last double precision NOT NULL,
        last_time timestamptz NOT NULL,
        PRIMARY KEY (metric_id, dim, bucket, key)
    )""",
]
FLEET_TEARDOWN_SQL = [f"DROP TABLE IF EXISTS {FLEET_TABLE}"]
# The fleet rollup is complete from this time on (migration 0003 backfilled it from there).
FLEET_SINCE_STATE = "fleet_rollup_since"

_FLEET_KEYS = {
    "site": ("coalesce(s.slug, '')", "JOIN fleet_device d ON d.id = r.device_id LEFT JOIN fleet_site s ON s.id = d.site_id"),
    "tier": ("d.tier::text", "JOIN fleet_device d ON d.id = r.device_id"),
    "group": ("g.slug", "JOIN fleet_devicegroup_devices gd ON gd.device_id = r.device_id "
                        "JOIN fleet_devicegroup g ON g.id = gd.devicegroup_id"),
}


def refresh_fleet(cursor: Any, hours: list[dt.datetime]) -> None:
    """Recompute the fleet rollup rows of these hours from the 1-hour per-device rollups."""
    if not hours:
        return
    cursor.execute(f"DELETE FROM {FLEET_TABLE} WHERE bucket = ANY(%s::timestamptz[])", [hours])  # noqa: S608 -- constant
    selects = [
        f"SELECT r.bucket, r.metric_id, '{dim}', {key}, count(*), {_ROLLUP_AGG} FROM r {joins} GROUP BY 1, 2, 4"  # noqa: S608
        for dim, (key, joins) in _FLEET_KEYS.items()
    ]
    # The hours' 1-hour rows are read once (materialized), then grouped by each dimension.
    columns = "(bucket, metric_id, dim, key, devices, count, sum, min, max, last, last_time)"
    sql = f"INSERT INTO {FLEET_TABLE} {columns} WITH r AS MATERIALIZED ("
    sql += "SELECT * FROM telemetry_rollup_1h WHERE bucket = ANY(%(hours)s::timestamptz[])) "
    cursor.execute(sql + " UNION ALL ".join(selects), {"hours": hours})


def _hours(start: dt.datetime, end: dt.datetime) -> list[dt.datetime]:
    """The hours of [floor_hour(start), end) as a list."""
    out, at = [], floor_hour(start)
    while at < end:
        out.append(at)
        at += dt.timedelta(hours=1)
    return out


def floor_minute(t: dt.datetime) -> dt.datetime:
    return t.replace(second=0, microsecond=0)


def floor_hour(t: dt.datetime) -> dt.datetime:
    return t.replace(minute=0, second=0, microsecond=0)


def watermark() -> dt.datetime | None:
    """Everything before this is in the rollups (plain backend)."""
    return RollupState.objects.filter(name=STATE).values_list("watermark", flat=True).first()


def _initial_watermark(upper: dt.datetime) -> dt.datetime:
    days = [p["day"] for p in storage.partitions() if p["day"] is not None]
    oldest = upper - dt.timedelta(days=conf.get("RAW_RETENTION_DAYS"))
    if days:
        return max(min(dt.datetime.combine(min(days), dt.time(), tzinfo=dt.UTC), upper), floor_hour(oldest))
    return upper


def _db_now() -> dt.datetime:
    with connection.cursor() as cursor:
        cursor.execute("SELECT now()")
        return cursor.fetchone()[0]


def refresh(*, now: dt.datetime | None = None) -> dict[str, Any]:
    """Bring the 1-minute and 1-hour rollups up to date. Idempotent; safe to run concurrently
    (the watermark row lock serializes runs). Each step commits on its own."""
    if storage.backend() != "postgres":
        return {"backend": "timescale", "skipped": "continuous aggregates refresh themselves"}
    now = now or _db_now()
    upper = floor_minute(now - dt.timedelta(seconds=conf.get("ROLLUP_CLOSE_LAG_S")))
    max_step = dt.timedelta(seconds=conf.get("ROLLUP_MAX_STEP_S"))
    steps = 0
    deadline = time.monotonic() + conf.get("ROLLUP_MAX_RUN_S")
    RollupState.objects.get_or_create(name=STATE, defaults={"watermark": _initial_watermark(upper)})
    while time.monotonic() < deadline:  # a long backlog continues on the next run
        with transaction.atomic():
            state = RollupState.objects.select_for_update().get(name=STATE)
            start = state.watermark
            if start >= upper:
                break
            end = min(start + max_step, upper)
            with connection.cursor() as cursor:
                cursor.execute(
                    f"INSERT INTO telemetry_rollup_1m {_COLUMNS} "  # noqa: S608 -- constant SQL fragments
                    f"SELECT date_trunc('minute', time), device_id, metric_id, {_RAW_AGG} "
                    f"FROM telemetry_point WHERE time >= %s AND time < %s GROUP BY 1, 2, 3 {_UPSERT}",
                    [start, end],
                )
                cursor.execute(
                    f"INSERT INTO telemetry_rollup_1h {_COLUMNS} "  # noqa: S608 -- constant SQL fragments
                    f"SELECT date_trunc('hour', bucket), device_id, metric_id, {_ROLLUP_AGG} "
                    f"FROM telemetry_rollup_1m WHERE bucket >= %s AND bucket < %s GROUP BY 1, 2, 3 {_UPSERT}",
                    [floor_hour(start), floor_hour(end) + dt.timedelta(hours=1)],
                )
                refresh_fleet(cursor, _hours(start, floor_hour(end) + dt.timedelta(hours=1)))
            state.watermark = end
            state.save(update_fields=["watermark", "updated_at"])
            steps += 1
    late = refresh_late()
    return {"backend": "postgres", "steps": steps, "watermark": watermark(), "late_hours": late}


def refresh_late(*, batch: int | None = None) -> int:
    """Re-aggregate the (device, hour) pairs that received points after being rolled up."""
    batch = batch or conf.get("LATE_BATCH")
    done = 0
    while True:
        with transaction.atomic():
            state = RollupState.objects.select_for_update().filter(name=STATE).first()
            if state is None:
                return done
            limit = state.watermark
            with connection.cursor() as cursor:
                cursor.execute(
                    "DELETE FROM telemetry_late WHERE (device_id, hour) IN ("
                    " SELECT device_id, hour FROM telemetry_late WHERE hour < %s ORDER BY hour, device_id LIMIT %s"
                    " FOR UPDATE SKIP LOCKED) RETURNING device_id, hour",
                    [limit, batch],
                )
                marks = cursor.fetchall()
                if not marks:
                    return done
                devices, hours = [m[0] for m in marks], [m[1] for m in marks]
                # Buckets at or after the watermark are the normal path's job.
                cursor.execute(
                    f"INSERT INTO telemetry_rollup_1m {_COLUMNS} "  # noqa: S608 -- constant SQL fragments
                    f"SELECT date_trunc('minute', p.time), p.device_id, p.metric_id, {_RAW_AGG} "
                    "FROM unnest(%s::int[], %s::timestamptz[]) AS m(device_id, hour) "
                    "JOIN telemetry_point p ON p.device_id = m.device_id AND p.time >= m.hour "
                    " AND p.time < least(m.hour + interval '1 hour', %s) "
                    f"GROUP BY 1, 2, 3 {_UPSERT}",
                    [devices, hours, limit],
                )
                cursor.execute(
                    f"INSERT INTO telemetry_rollup_1h {_COLUMNS} "  # noqa: S608 -- constant SQL fragments
                    f"SELECT m.hour, r.device_id, r.metric_id, {_ROLLUP_AGG} "
                    "FROM unnest(%s::int[], %s::timestamptz[]) AS m(device_id, hour) "
                    "JOIN telemetry_rollup_1m r ON r.device_id = m.device_id AND r.bucket >= m.hour "
                    " AND r.bucket < m.hour + interval '1 hour' "
                    f"GROUP BY 1, 2, 3 {_UPSERT}",
                    [devices, hours],
                )
                refresh_fleet(cursor, sorted(set(hours)))
            done += len(marks)
        if len(marks) < batch:
            return done


def apply_retention(*, now: dt.datetime | None = None) -> dict[str, Any]:
    """Drop expired raw partitions; delete expired rollup rows, events and stale late markers."""
    now = now or timezone.now()
    raw_days = conf.get("RAW_RETENTION_DAYS")
    out: dict[str, Any] = {"dropped_partitions": storage.drop_expired_partitions(retention_days=raw_days,
                                                                                 today=now.date())}
    if storage.backend() == "postgres":
        with connection.cursor() as cursor:
            for table, days in (("telemetry_rollup_1m", conf.get("ROLLUP_1M_RETENTION_DAYS")),
                                ("telemetry_rollup_1h", conf.get("ROLLUP_1H_RETENTION_DAYS"))):
                cursor.execute(f"DELETE FROM {table} WHERE bucket < %s", [now - dt.timedelta(days=days)])  # noqa: S608 -- constant table names
                out[f"deleted_{table}"] = cursor.rowcount
            cursor.execute(f"DELETE FROM {FLEET_TABLE} WHERE bucket < %s",  # noqa: S608 -- constant table name
                           [now - dt.timedelta(days=conf.get("ROLLUP_1H_RETENTION_DAYS"))])
            out[f"deleted_{FLEET_TABLE}"] = cursor.rowcount
            cursor.execute("DELETE FROM telemetry_late WHERE hour < %s", [now - dt.timedelta(days=raw_days)])
    cutoff = now - dt.timedelta(days=conf.get("EVENT_RETENTION_DAYS"))
    out["deleted_events"] = DeviceEvent.objects.filter(time__lt=cutoff).delete()[0]
    return out
