"""A device chart reads its 1-minute rollups from the primary key alone (migration 0004): the
aggregates are in the key's leaf pages, so 24 h of one series is an index-only scan of a few
pages, not one heap page per minute."""

from __future__ import annotations

import datetime as dt

import pytest
from django.db import connection
from django.utils import timezone

from telemetry import selectors
from telemetry.models import Metric, RollupState
from tests.factories import make_device

pytestmark = pytest.mark.usefixtures("clean_series")



def test_a_24_hour_device_chart_reads_the_1_minute_rollups_with_an_index_only_scan():
    devices = [make_device() for _ in range(3)]
    metric = Metric.objects.create(name="cpu.temp")
    now = timezone.now().replace(second=0, microsecond=0)
    RollupState.objects.update_or_create(name="rollup", defaults={"watermark": now})
    with connection.cursor() as cursor:
        # 24 h of 1-minute rows for 300 series, written minute by minute as the rollup job does
        # (so one series' rows are spread over the heap), then vacuumed as autovacuum would.
        cursor.execute(
            "INSERT INTO telemetry_rollup_1m (bucket, device_id, metric_id, count, sum, min, max, last, last_time) "
            "SELECT b, 1000000 + d, %s, 2, 2 * d, d, d, d, b + interval '30 seconds' "
            "FROM generate_series(%s - interval '24 hours', %s - interval '1 minute', interval '1 minute') AS b, "
            "generate_series(1, 297) AS f(d) "
            "UNION ALL SELECT b, dev, %s, 2, 2 * m, m, m, m, b + interval '30 seconds' "
            "FROM generate_series(%s - interval '24 hours', %s - interval '1 minute', interval '1 minute') AS b, "
            "unnest(%s::int[]) AS dev, LATERAL (SELECT (extract(epoch FROM b)::bigint %% 100)::float8 AS m) AS x "
            "ORDER BY 1",
            [metric.id, now, now, metric.id, now, now, [d.id for d in devices]])
        cursor.execute("VACUUM ANALYZE telemetry_rollup_1m")

    executed = []

    def record(execute, sql, params, many, context):
        executed.append((sql, params))
        return execute(sql, params, many, context)

    with connection.execute_wrapper(record):
        out = selectors.series(device_ids=[devices[1].id], metric_ids=[metric.id], start=now - dt.timedelta(hours=24),
                               end=now, bucket="1m")
    assert out["resolution"].source == "1m"
    points = out["series"][(devices[1].id, metric.id)]
    assert len(points) == 1440
    assert all(value == int(when.timestamp()) % 100 for when, value in points)  # the device's own rows

    [(chart_sql, params)] = [(sql, params) for sql, params in executed if "telemetry_rollup_1m" in sql]
    with selectors._binary_cursor() as cursor:  # the same statement, parameters and cursor kind
        cursor.execute("EXPLAIN (ANALYZE, BUFFERS, COSTS OFF) " + chart_sql, params)
        plan = "\n".join(r[0] for r in cursor.fetchall())
    assert "Index Only Scan using telemetry_rollup_1m_pkey" in plan, plan
    assert "Heap Fetches: 0" in plan, plan


def test_the_covering_key_still_serves_the_rollup_jobs_upserts():
    device = make_device()
    metric = Metric.objects.create(name="cpu.temp")
    bucket = timezone.now().replace(second=0, microsecond=0) - dt.timedelta(hours=1)
    upsert = ("INSERT INTO telemetry_rollup_1m (bucket, device_id, metric_id, count, sum, min, max, last, last_time) "
              "VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s) ON CONFLICT (device_id, metric_id, bucket) DO UPDATE SET "
              "count = EXCLUDED.count, sum = EXCLUDED.sum, last = EXCLUDED.last")
    with connection.cursor() as cursor:
        cursor.execute(upsert, [bucket, device.id, metric.id, 1, 5.0, 5.0, 5.0, 5.0, bucket])
        cursor.execute(upsert, [bucket, device.id, metric.id, 2, 9.0, 4.0, 5.0, 4.0, bucket])
        cursor.execute("SELECT count, sum, last FROM telemetry_rollup_1m WHERE device_id = %s", [device.id])
        assert cursor.fetchall() == [(2, 9.0, 4.0)]
