"""Latest values: the flusher keeps each series' newest point on the (device, metric) catalog, in
one statement per interval, never backwards; `selectors.latest` answers from that table."""

from __future__ import annotations

import asyncio
import datetime as dt
import random
import time

import psycopg
import pytest
from django.db import connection
from django.test.utils import CaptureQueriesContext

from telemetry import selectors
from telemetry.ingest import Flusher, connection_kwargs
from telemetry.models import DeviceMetric, Metric
from telemetry.tests.helpers import now_ms
from tests.factories import make_device

pytestmark = [pytest.mark.django_db(transaction=True), pytest.mark.usefixtures("clean_series")]


def at(t_ms: int) -> dt.datetime:
    return dt.datetime.fromtimestamp(t_ms / 1000, tz=dt.UTC)


def stored_latest(device_id: int, metric: str) -> tuple[dt.datetime | None, float | None]:
    row = DeviceMetric.objects.get(device_id=device_id, metric__name=metric)
    return row.last_time, row.last_value


def ingest(frames: list[tuple[int, int, list]], **flusher_kwargs) -> Flusher:
    """Submit the frames (all at once) and close the flusher; returns it for its stats."""
    async def main() -> Flusher:
        flusher = Flusher(flush_interval_ms=5, **flusher_kwargs)
        results = await asyncio.gather(*[flusher.submit(device_id=d, seq=s, points=p) for d, s, p in frames])
        assert {r.status for r in results} == {"stored"}
        await flusher.close()
        return flusher

    return asyncio.run(main())


def test_the_flusher_writes_the_newest_point_of_each_series_shortly_after_its_commit():
    device = make_device()
    t0 = now_ms() - 10_000
    seen: dict[str, tuple] = {}

    async def main() -> tuple[int, float]:
        started = time.monotonic()
        flusher = Flusher(flush_interval_ms=5, latest_flush_ms=200)
        points = [(t0 + i * 100, "cpu.temp", float(i)) for i in range(10)] + [(t0 + 50, "mem.used", 7.5)]
        random.Random(3).shuffle(points)  # order within a frame does not matter
        assert (await flusher.submit(device_id=device.id, seq=1, points=points)).status == "stored"
        deadline = time.monotonic() + 5
        async with await psycopg.AsyncConnection.connect(autocommit=True,
                                                         **connection_kwargs(connection.settings_dict)) as other:
            while time.monotonic() < deadline:  # written by the periodic writer, not by close()
                cur = await other.execute(
                    "SELECT m.name, dm.last_time, dm.last_value FROM telemetry_devicemetric dm "
                    "JOIN telemetry_metric m ON m.id = dm.metric_id WHERE dm.device_id = %s AND dm.last_time IS NOT NULL",
                    [device.id])
                rows = {name: (t, v) for name, t, v in await cur.fetchall()}
                if len(rows) == 2:
                    seen.update(rows)
                    break
                await asyncio.sleep(0.05)
        # Keep ingesting for ~1 s: the writer runs at most once per interval.
        for seq in range(2, 12):
            await flusher.submit(device_id=device.id, seq=seq, points=[(t0 + 1000 * seq, "cpu.temp", float(seq))])
            await asyncio.sleep(0.1)
        writes, elapsed = flusher.stats["latest_writes"], time.monotonic() - started
        await flusher.close()
        return writes, elapsed

    writes_while_running, elapsed = asyncio.run(main())
    assert seen == {"cpu.temp": (at(t0 + 900), 9.0), "mem.used": (at(t0 + 50), 7.5)}
    assert 2 <= writes_while_running <= elapsed / 0.2  # at most one write per 200 ms interval
    assert stored_latest(device.id, "cpu.temp") == (at(t0 + 11_000), 11.0)


def test_late_points_never_move_the_latest_value_backwards():
    device = make_device()
    t0 = now_ms() - 60_000
    ingest([(device.id, 1, [(t0, "cpu.temp", 1.0)])])
    assert stored_latest(device.id, "cpu.temp") == (at(t0), 1.0)

    # A replayed offline buffer: older points, stored after the newer one.
    ingest([(device.id, 2, [(t0 - 30_000, "cpu.temp", 99.0), (t0 - 1, "cpu.temp", 98.0)])])
    assert stored_latest(device.id, "cpu.temp") == (at(t0), 1.0)

    # The same time again with a smaller value does not win either; a newer point does.
    ingest([(device.id, 3, [(t0, "cpu.temp", 0.5)])])
    assert stored_latest(device.id, "cpu.temp") == (at(t0), 1.0)
    ingest([(device.id, 4, [(t0 + 1, "cpu.temp", -3.0)])])
    assert stored_latest(device.id, "cpu.temp") == (at(t0 + 1), -3.0)


def test_many_devices_over_many_flushes_are_written_in_one_statement_per_interval():
    devices = [make_device() for _ in range(300)]
    t0 = now_ms() - 20_000
    frames = [(d.id, 1, [(t0 + i, "cpu.temp", float(i)) for i in range(5)] + [(t0, "mem.used", 1.0)])
              for d in devices]
    # Small batches: many ingest transactions; a long interval: the only write is the one at close.
    flusher = ingest(frames, max_batch_rows=120, latest_flush_ms=60_000)
    assert flusher.stats["flushes"] >= 10
    assert flusher.stats["latest_writes"] == 1
    assert flusher.stats["latest_rows"] == 600
    with connection.cursor() as cursor:
        # Every row carries the id of the one transaction (autocommit statement) that updated it.
        cursor.execute("SELECT count(*), count(last_time), count(DISTINCT xmin::text) FROM telemetry_devicemetric")
        assert cursor.fetchone() == (600, 600, 1)


def test_latest_answers_from_the_catalog_in_one_query_within_the_window():
    fresh, stale, silent = make_device(), make_device(), make_device()
    metric = Metric.objects.create(name="cpu.temp")
    now = dt.datetime.now(dt.UTC).replace(microsecond=0)
    # No raw points at all: the values can only come from the catalog.
    DeviceMetric.objects.create(device=fresh, metric=metric, last_time=now - dt.timedelta(minutes=5), last_value=42.0)
    DeviceMetric.objects.create(device=stale, metric=metric, last_time=now - dt.timedelta(days=3), last_value=1.0)
    DeviceMetric.objects.create(device=silent, metric=metric)  # reported, but its value not written yet
    with CaptureQueriesContext(connection) as queries:
        values = selectors.latest(metric_id=metric.id, device_ids=[fresh.id, stale.id, silent.id])
    assert len(queries) == 1
    assert values == {fresh.id: (now - dt.timedelta(minutes=5), 42.0)}
    assert set(selectors.latest(metric_id=metric.id, device_ids=[fresh.id, stale.id], window_s=4 * 86400)) == {
        fresh.id, stale.id}


def test_latest_equals_a_distinct_on_over_the_raw_rows_after_a_mixed_ingest():
    rng = random.Random(8)
    devices = [make_device() for _ in range(12)]
    now = now_ms()
    frames, seqs = [], {d.id: 0 for d in devices}
    for _round in range(4):
        for device in devices:
            points = []
            for _ in range(rng.randint(1, 15)):
                # Mostly recent, some late (minutes to hours old), some at equal times.
                t = now - rng.choice([rng.randint(0, 60_000), rng.randint(60_000, 3 * 3600_000), 30_000])
                points.append((t, rng.choice(["cpu.temp", "mem.used", "disk.io"]), float(rng.randint(-50, 50))))
            seqs[device.id] += 1
            frames.append((device.id, seqs[device.id], points))
    rng.shuffle(frames)
    frames.sort(key=lambda f: f[1])  # each device's frames in seq order; devices interleaved
    for lo in range(0, len(frames), 12):  # several flushers (processes), each its own writes
        ingest(frames[lo:lo + 12], latest_flush_ms=rng.choice([10, 60_000]), max_batch_rows=40)

    for name in ("cpu.temp", "mem.used", "disk.io"):
        metric = Metric.objects.get(name=name)
        with connection.cursor() as cursor:
            cursor.execute(
                "SELECT DISTINCT ON (device_id) device_id, time, value FROM telemetry_point WHERE metric_id = %s "
                "AND time >= now() - interval '1 day' ORDER BY device_id, time DESC, value DESC", [metric.id])
            expected = {d: (t, v) for d, t, v in cursor.fetchall()}
        assert expected  # the comparison is not vacuous
        assert selectors.latest(metric_id=metric.id, device_ids=[d.id for d in devices]) == expected
