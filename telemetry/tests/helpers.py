"""Small readers and writers used by several telemetry tests."""

from __future__ import annotations

import datetime as dt
import time

from django.db import connection

from telemetry import storage


def now_ms() -> int:
    return int(time.time() * 1000)


def ms(when: dt.datetime) -> int:
    return int(when.timestamp() * 1000)


def count_points(device_id: int | None = None) -> int:
    with connection.cursor() as cursor:
        if device_id is None:
            cursor.execute("SELECT count(*) FROM telemetry_point")
        else:
            cursor.execute("SELECT count(*) FROM telemetry_point WHERE device_id = %s", [device_id])
        return cursor.fetchone()[0]


def cursor_of(device_id: int) -> int:
    with connection.cursor() as cursor:
        cursor.execute("SELECT last_acked_seq FROM fleet_uplinkcursor WHERE device_id = %s", [device_id])
        return cursor.fetchone()[0]


def insert_points(rows: list[tuple[dt.datetime, int, str, float]]) -> None:
    """Write raw points directly (no flusher, no late markers): (time, device_id, metric, value); the
    (device, metric) catalog and its latest values are brought up to date as the flusher would."""
    from telemetry.models import Metric

    days = {r[0].astimezone(dt.UTC).date() for r in rows}
    for day in days:
        storage.ensure_partitions(days_ahead=0, days_back=0, start=day)
    ids = {}
    for name in {r[2] for r in rows}:
        ids[name] = Metric.objects.get_or_create(name=name)[0].id
    pairs = sorted({(d, ids[m]) for _, d, m, _ in rows})
    with connection.cursor() as cursor:
        cursor.executemany(
            "INSERT INTO telemetry_point (time, device_id, metric_id, value) VALUES (%s, %s, %s, %s)",
            [(t, d, ids[m], v) for t, d, m, v in rows],
        )
        # What the flusher does for what it stores: the (device, metric) catalog and its latest point.
        cursor.execute(
            "INSERT INTO telemetry_devicemetric (device_id, metric_id, first_seen, last_time, last_value) "
            "SELECT DISTINCT ON (p.device_id, p.metric_id) p.device_id, p.metric_id, now(), p.time, p.value "
            "FROM telemetry_point p JOIN fleet_device d ON d.id = p.device_id "
            "WHERE (p.device_id, p.metric_id) IN (SELECT * FROM unnest(%s::bigint[], %s::smallint[])) "
            "ORDER BY p.device_id, p.metric_id, p.time DESC, p.value DESC "
            "ON CONFLICT (device_id, metric_id) DO UPDATE SET last_time = EXCLUDED.last_time, "
            "last_value = EXCLUDED.last_value",
            [[d for d, _ in pairs], [m for _, m in pairs]],
        )
