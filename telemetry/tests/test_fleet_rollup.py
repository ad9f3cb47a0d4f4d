"""The fleet-level hourly rollup equals an aggregate of the per-device rollups, late data included,
and serves week-long fleet aggregates over the whole fleet."""

from __future__ import annotations

import datetime as dt

import pytest
from django.db import connection
from django.test.utils import CaptureQueriesContext
from django.utils import timezone

from fleet.models import DeviceGroup
from telemetry import rollups, selectors
from telemetry.models import Metric, RollupState
from telemetry.tests.helpers import insert_points
from tests.factories import make_device, make_site

pytestmark = pytest.mark.django_db

# The per-device 1-hour path of fleet_aggregate, with the per-hour device count the fleet rollup keeps.
PER_DEVICE = """
    SELECT k, {agg}, max(n), sum(c) FROM (
        SELECT {key} AS k, r.bucket, count(*) AS n, sum(r.count) AS c, {inner}
        FROM telemetry_rollup_1h r {joins} WHERE r.metric_id = %s AND r.bucket >= %s AND r.bucket < %s GROUP BY 1, 2
    ) AS r GROUP BY 1 ORDER BY 1
"""
INNER = ("sum(r.sum) AS sum, sum(r.count) AS count, min(r.min) AS min, max(r.max) AS max, "
         "(max(ARRAY[extract(epoch FROM r.last_time)::float8, r.last]))[2] AS last, max(r.last_time) AS last_time")


def per_device(metric_id: int, by: str, agg: str, start: dt.datetime, end: dt.datetime) -> list[dict]:
    key, joins = selectors.FLEET_GROUPINGS[by]
    outer = selectors._ROLLUP_AGG[agg].replace("sum(count)", "sum(r.count)")
    with connection.cursor() as cursor:
        cursor.execute(PER_DEVICE.format(agg=outer, key=key, joins=joins, inner=INNER), [metric_id, start, end])
        return [{"key": k, "value": v, "devices": n, "samples": int(c)} for k, v, n, c in cursor.fetchall()]


def same(got: list[dict], expected: list[dict]) -> bool:
    exact = [{k: v for k, v in r.items() if k != "value"} for r in got]
    return exact == [{k: v for k, v in r.items() if k != "value"} for r in expected] and all(
        g["value"] == pytest.approx(e["value"]) for g, e in zip(got, expected, strict=True))


@pytest.fixture
def week():
    now = timezone.now().replace(minute=0, second=0, microsecond=0)
    north, south = make_site(slug="north"), make_site(slug="south")
    devices = [make_device(site=north), make_device(site=north, accelerator="npu"), make_device(site=south),
               make_device()]
    group = DeviceGroup.objects.create(name="Canary", slug="canary")
    group.devices.add(devices[0], devices[2])
    rows = []
    for hour in range(0, 6 * 24, 5):  # six days, every fifth hour
        t = now - dt.timedelta(days=6) + dt.timedelta(hours=hour, minutes=7)
        for i, device in enumerate(devices):
            if (hour + i) % 3:
                rows += [(t, device.id, "cpu.temp", float((hour * 7 + i * 13) % 41)),
                         (t + dt.timedelta(minutes=20), device.id, "cpu.temp", float(i))]
    insert_points(rows)
    RollupState.objects.create(name="rollup", watermark=now - dt.timedelta(days=7))
    rollups.refresh(now=now + dt.timedelta(minutes=5))
    return now, devices, Metric.objects.get(name="cpu.temp").id


def test_week_long_fleet_aggregates_read_the_fleet_rollup_and_equal_the_per_device_rollups(week):
    now, _, metric_id = week
    start, end = now - dt.timedelta(days=7), now
    for by in ("site", "tier", "group"):
        for agg in ("avg", "min", "max", "last", "count"):
            with CaptureQueriesContext(connection) as queries:
                got = selectors.fleet_aggregate(metric_id=metric_id, by=by, start=start, end=end, agg=agg)
            assert any(rollups.FLEET_TABLE in q["sql"] for q in queries), (by, agg)
            assert not any("telemetry_rollup_1h r" in q["sql"] for q in queries)
            expected = per_device(metric_id, by, agg, start, end)
            assert expected, (by, agg)
            assert same(got, expected), (by, agg, got, expected)


def test_late_points_and_a_selection_of_devices_are_served_correctly(week):
    now, devices, metric_id = week
    start, end = now - dt.timedelta(days=7), now
    # A late point for an hour already rolled up: the flusher would mark it; so does this test.
    late_at = now - dt.timedelta(days=3, minutes=-11)
    insert_points([(late_at, devices[3].id, "cpu.temp", 500.0)])
    with connection.cursor() as cursor:
        cursor.execute("INSERT INTO telemetry_late (device_id, hour) VALUES (%s, date_trunc('hour', %s::timestamptz))",
                       [devices[3].id, late_at])
    before = selectors.fleet_aggregate(metric_id=metric_id, by="site", start=start, end=end, agg="max")
    assert 500.0 not in [r["value"] for r in before]
    rollups.refresh(now=now + dt.timedelta(minutes=6))
    after = selectors.fleet_aggregate(metric_id=metric_id, by="site", start=start, end=end, agg="max")
    assert {r["key"]: r["value"] for r in after}[""] == 500.0
    assert same(after, per_device(metric_id, "site", "max", start, end))

    # Restricted to some devices: the per-device rollups answer (exact distinct device counts).
    picked = [devices[0].id, devices[1].id]
    rows = selectors.fleet_aggregate(metric_id=metric_id, by="site", start=start, end=end, agg="count",
                                     device_ids=picked)
    assert [(r["key"], r["devices"]) for r in rows] == [("north", 2)]


def test_a_day_long_fleet_aggregate_reads_hourly_rollups_and_a_short_one_reads_minutes(week):
    now, _, metric_id = week
    day_start = now - dt.timedelta(days=1)
    with CaptureQueriesContext(connection) as queries:
        got = selectors.fleet_aggregate(metric_id=metric_id, by="site", start=day_start, end=now, agg="max")
    assert any(rollups.FLEET_TABLE in q["sql"] for q in queries)
    assert not any("telemetry_rollup_1m" in q["sql"] for q in queries)  # never devices × minutes rows
    assert same(got, per_device(metric_id, "site", "max", day_start, now))
    with CaptureQueriesContext(connection) as queries:
        selectors.fleet_aggregate(metric_id=metric_id, by="site", start=now - dt.timedelta(hours=5), end=now)
    assert any("telemetry_rollup_1m" in q["sql"] for q in queries)
