"""Rollups equal a direct aggregate of the raw points, late data included; retention drops whole days."""

from __future__ import annotations

import asyncio
import datetime as dt

import pytest
from django.db import connection

from telemetry import rollups, storage
from telemetry.ingest import Flusher
from telemetry.tests.helpers import insert_points, ms
from tests.factories import make_device

RAW_1M = """
    SELECT date_trunc('minute', time), device_id, metric_id, count(*), sum(value), min(value), max(value),
           (array_agg(value ORDER BY time DESC))[1], max(time)
    FROM telemetry_point WHERE time < %s GROUP BY 1, 2, 3 ORDER BY 2, 3, 1
"""
RAW_1H = RAW_1M.replace("'minute'", "'hour'")
ROLLUP = "SELECT bucket, device_id, metric_id, count, sum, min, max, last, last_time FROM {} ORDER BY 2, 3, 1"


# Late marks for hours that began before the watermark: the late-data refresh must consume them.
LATE_BEFORE = "SELECT count(*) FROM telemetry_late WHERE hour < %s"


def fetch(sql: str, params: list | None = None) -> list[tuple]:
    with connection.cursor() as cursor:
        cursor.execute(sql, params or [])
        return cursor.fetchall()


def assert_rollups_match_raw(until: dt.datetime) -> None:
    assert fetch(ROLLUP.format("telemetry_rollup_1m")) == fetch(RAW_1M, [until])
    assert fetch(ROLLUP.format("telemetry_rollup_1h")) == fetch(RAW_1H, [until])


def store(frames: list[tuple[int, int, list]]) -> None:
    async def main() -> None:
        flusher = Flusher(flush_interval_ms=5)
        results = await asyncio.gather(*[flusher.submit(device_id=d, seq=s, points=p) for d, s, p in frames])
        await flusher.close()
        assert {r.status for r in results} == {"stored"}

    asyncio.run(main())


def frames_for(devices: list, start: dt.datetime, end: dt.datetime, step_s: int, first_seq: int,
               salt: int = 0) -> list[tuple[int, int, list]]:
    frames = []
    for device in devices:
        points = []
        t, i = start, 0
        while t < end:
            for metric in ("cpu.temp", "mem.used"):
                points.append((ms(t), metric, ((i * 7 + salt + device.id) % 23) * 0.5))
            t += dt.timedelta(seconds=step_s)
            i += 1
        for n, lo in enumerate(range(0, len(points), 400)):
            frames.append((device.id, first_seq + n, points[lo:lo + 400]))
    return frames


@pytest.mark.django_db(transaction=True)
@pytest.mark.usefixtures("clean_series")
def test_rollups_equal_a_direct_aggregate_of_raw_points_including_late_data():
    devices = [make_device(), make_device()]
    now = dt.datetime.now(dt.UTC)
    base = rollups.floor_minute(now)
    first = frames_for(devices, base - dt.timedelta(minutes=150), base - dt.timedelta(minutes=1), 20, 1)
    store(first)

    result = rollups.refresh()
    watermark = rollups.watermark()
    assert watermark == rollups.floor_minute(now - dt.timedelta(seconds=120)) or watermark > now - dt.timedelta(minutes=4)
    assert result["steps"] >= 1
    assert fetch("SELECT count(*) FROM telemetry_rollup_1m")[0][0] > 0
    assert_rollups_match_raw(watermark)
    # Marks for hours that began before the watermark are consumed; an hour that begins at or
    # after it (a run in an hour's first two minutes) keeps its marks for the normal path.
    assert fetch(LATE_BEFORE, [watermark]) == [(0,)]

    # Late points for minutes already rolled up (a device replaying its offline buffer), and
    # extra points inside already-closed minutes.
    next_seq = {d: max(s for dd, s, _ in first if dd == d) + 1 for d, _, _ in first}
    late = frames_for(devices, base - dt.timedelta(minutes=100, seconds=5), base - dt.timedelta(minutes=95), 7, 0, 3)
    store([(d, next_seq[d] + s, p) for d, s, p in late])
    assert fetch("SELECT count(*) FROM telemetry_late")[0][0] > 0
    assert fetch(ROLLUP.format("telemetry_rollup_1m")) != fetch(RAW_1M, [watermark])  # stale until refreshed

    rollups.refresh()
    assert_rollups_match_raw(rollups.watermark())
    assert fetch(LATE_BEFORE, [rollups.watermark()]) == [(0,)]


@pytest.mark.django_db
def test_refresh_only_rolls_up_closed_minutes_and_advances_the_watermark():
    device = make_device()
    now = dt.datetime(2030, 1, 1, 12, 0, 30, tzinfo=dt.UTC)
    insert_points([
        (now - dt.timedelta(minutes=5), device.id, "x", 1.0),
        (now - dt.timedelta(minutes=5) + dt.timedelta(seconds=10), device.id, "x", 3.0),
        (now - dt.timedelta(seconds=30), device.id, "x", 100.0),  # its minute is not closed yet
    ])
    from telemetry.models import RollupState

    RollupState.objects.create(name="rollup", watermark=now - dt.timedelta(hours=1))
    rollups.refresh(now=now)
    assert rollups.watermark() == dt.datetime(2030, 1, 1, 11, 58, tzinfo=dt.UTC)
    rows = fetch("SELECT bucket, count, sum, min, max, last FROM telemetry_rollup_1m WHERE device_id = %s", [device.id])
    assert rows == [(dt.datetime(2030, 1, 1, 11, 55, tzinfo=dt.UTC), 2, 4.0, 1.0, 3.0, 3.0)]
    rollups.refresh(now=now + dt.timedelta(minutes=3))
    assert fetch("SELECT count(*) FROM telemetry_rollup_1m WHERE device_id = %s", [device.id]) == [(2,)]
    assert fetch("SELECT count, sum, last FROM telemetry_rollup_1h WHERE device_id = %s ORDER BY bucket",
                 [device.id]) == [(2, 4.0, 3.0), (1, 100.0, 100.0)]


@pytest.mark.django_db
def test_retention_drops_only_expired_partitions_and_old_rollup_rows(settings):
    settings.TELEMETRY_RAW_RETENTION_DAYS = 30
    settings.TELEMETRY_ROLLUP_1M_RETENTION_DAYS = 90
    device = make_device()
    today = dt.date(2031, 6, 15)
    now = dt.datetime.combine(today, dt.time(3), tzinfo=dt.UTC)
    for offset in (40, 31, 30, 29, 0):
        day = today - dt.timedelta(days=offset)
        insert_points([(dt.datetime.combine(day, dt.time(12), tzinfo=dt.UTC), device.id, "x", float(offset))])
    with connection.cursor() as cursor:
        for age_days in (100, 10):
            cursor.execute(
                "INSERT INTO telemetry_rollup_1m VALUES (%s, %s, 1, 1, 1, 1, 1, 1, %s)",
                [now - dt.timedelta(days=age_days), device.id, now - dt.timedelta(days=age_days)],
            )

    result = rollups.apply_retention(now=now)

    expected = {storage.partition_name(today - dt.timedelta(days=d)) for d in (40, 31)}
    assert expected <= set(result["dropped_partitions"])
    remaining = {p["name"] for p in storage.partitions()}
    for offset in (30, 29, 0):
        assert storage.partition_name(today - dt.timedelta(days=offset)) in remaining
    assert not expected & remaining
    assert fetch("SELECT value FROM telemetry_point WHERE device_id = %s ORDER BY value", [device.id]) == [
        (0.0,), (29.0,), (30.0,)
    ]
    assert result["deleted_telemetry_rollup_1m"] == 1
