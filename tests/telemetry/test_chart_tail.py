"""A 1-minute device chart is one statement: the rollup rows before the watermark (read by the
statement itself) and the raw tail after it, one point per minute with nothing to re-bucket, and
every point equal to a direct per-minute aggregate of the raw points."""

from __future__ import annotations

import datetime as dt
from collections import defaultdict

import pytest
from django.db import connection
from django.test.utils import CaptureQueriesContext
from django.utils import timezone

from telemetry import conf, rollups, selectors, storage
from telemetry.models import Metric, RollupState
from telemetry.tests.helpers import insert_points
from tests.factories import make_device

pytestmark = pytest.mark.usefixtures("clean_series")

AGGS = ("avg", "min", "max", "last", "count")


def raw_minutes(rows: list[tuple[dt.datetime, int, str, float]], start: dt.datetime, end: dt.datetime,
                metric_of: dict[str, int]) -> dict[str, dict[tuple[int, int], list[tuple[dt.datetime, float]]]]:
    """Per agg, per (device, metric): [(minute, value)] straight from the raw points in [start, end)."""
    minutes: dict[tuple[int, int], dict[dt.datetime, list[tuple[dt.datetime, float]]]] = defaultdict(
        lambda: defaultdict(list))
    for when, device, metric, value in rows:
        if start <= when < end:
            minutes[(device, metric_of[metric])][when.replace(second=0, microsecond=0)].append((when, value))
    out: dict[str, dict] = {agg: {} for agg in AGGS}
    for key, by_minute in minutes.items():
        ordered = sorted(by_minute.items())
        values = {m: [v for _, v in pts] for m, pts in ordered}
        out["avg"][key] = [(m, sum(v) / len(v)) for m, v in values.items()]
        out["min"][key] = [(m, min(v)) for m, v in values.items()]
        out["max"][key] = [(m, max(v)) for m, v in values.items()]
        out["count"][key] = [(m, float(len(v))) for m, v in values.items()]
        out["last"][key] = [(m, max(pts)[1]) for m, pts in ordered]
    return out


@pytest.fixture
def three_hours():
    """Two devices, two metrics, a point every 20 s (values on a 0.5 grid: sums are exact) for the
    last three hours; rolled up to 40 minutes ago, so the last 40 minutes are the raw tail."""
    devices = [make_device(), make_device()]
    now = timezone.now()
    first = (now - dt.timedelta(hours=3)).replace(second=0, microsecond=0)
    rows, t, i = [], first, 0
    while t < now:
        for n, device in enumerate(devices):
            rows.append((t, device.id, "cpu.temp", ((i * 7 + n) % 23) * 0.5))
            rows.append((t + dt.timedelta(seconds=3), device.id, "mem.used", ((i * 5 + n) % 17) * 0.5))
        t += dt.timedelta(seconds=20)
        i += 1
    insert_points(rows)
    rollups.refresh(now=now - dt.timedelta(minutes=40) + dt.timedelta(seconds=conf.get("ROLLUP_CLOSE_LAG_S")))
    watermark = RollupState.objects.get(name="rollup").watermark
    assert now - dt.timedelta(minutes=41) <= watermark <= now - dt.timedelta(minutes=39)
    metric_of = dict(Metric.objects.values_list("name", "id"))
    return devices, metric_of, rows, first, now


def chart(devices, metric_of, start, end, agg):
    return selectors.series(device_ids=[d.id for d in devices], metric_ids=sorted(metric_of.values()), start=start,
                            end=end, agg=agg, bucket="1m")


def test_a_1_minute_chart_equals_a_per_minute_aggregate_of_the_raw_points_across_the_watermark(three_hours):
    devices, metric_of, rows, first, now = three_hours
    start = first + dt.timedelta(minutes=30)
    expected = raw_minutes(rows, start, now, metric_of)
    for agg in AGGS:
        out = chart(devices, metric_of, start, now, agg)
        assert out["resolution"] == selectors.Resolution("1m", 60)
        assert out["series"] == expected[agg], agg
    # both sides of the watermark are in the answer: ~110 rolled-up minutes and ~40 raw ones
    assert len(expected["avg"][(devices[0].id, metric_of["cpu.temp"])]) in range(149, 152)


def test_the_chart_is_one_statement_that_reads_the_watermark_itself(three_hours):
    devices, metric_of, _, _, now = three_hours
    storage.backend()  # looked up once per process: not part of the chart's cost
    with CaptureQueriesContext(connection) as queries:
        out = chart(devices[:1], metric_of, now - dt.timedelta(hours=2), now, "avg")
    assert len(queries) == 1, [q["sql"] for q in queries]
    assert "telemetry_rollupstate" in queries[0]["sql"] and "telemetry_point" in queries[0]["sql"]
    assert all(len(points) > 100 for points in out["series"].values())


def test_a_watermark_inside_a_minute_gives_that_minute_once_from_the_raw_points(three_hours):
    devices, metric_of, rows, first, now = three_hours
    watermark = RollupState.objects.get(name="rollup").watermark
    RollupState.objects.filter(name="rollup").update(watermark=watermark - dt.timedelta(seconds=30))
    start = first + dt.timedelta(minutes=90)
    expected = raw_minutes(rows, start, now, metric_of)
    for agg in ("avg", "count", "last"):
        out = chart(devices, metric_of, start, now, agg)
        for key, points in out["series"].items():
            minutes = [m for m, _ in points]
            assert len(minutes) == len(set(minutes)), (agg, key)
        assert out["series"] == expected[agg], agg


def test_the_chart_without_a_watermark_row_reads_only_the_last_hour_of_raw_points(three_hours):
    devices, metric_of, rows, _, now = three_hours
    RollupState.objects.filter(name="rollup").delete()  # as rollup_watermark(): ORIGIN, nothing rolled up
    out = chart(devices, metric_of, now - dt.timedelta(hours=3), now, "count")
    tail_floor = now - dt.timedelta(seconds=3600)
    expected = raw_minutes(rows, tail_floor, now, metric_of)["count"]
    assert out["series"] == expected  # the points from tail_floor on, the first minute partly
    assert all(points[0][0] >= tail_floor.replace(second=0, microsecond=0) for points in out["series"].values())
