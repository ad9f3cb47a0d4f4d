"""The ingest flusher: exactly-once storage with the uplink cursor, failures, backpressure, caps."""

from __future__ import annotations

import asyncio
import datetime as dt
import gc
import time

import psycopg
import pytest
from django.db import connection

from fleet.models import UplinkCursor
from telemetry import ingest, storage
from telemetry.ingest import Flusher, FlushFailed, IngestResult, Overloaded, connection_kwargs
from telemetry.models import DeviceMetric
from telemetry.tests.helpers import count_points, cursor_of, now_ms
from tests.factories import make_device

pytestmark = [pytest.mark.django_db(transaction=True), pytest.mark.usefixtures("clean_series")]


def frame_points(seq: int, n: int = 10, *, t0: int | None = None, metric: str = "cpu.temp") -> list:
    t0 = t0 or now_ms() - 5_000
    return [(t0 + seq * 1000 + i, metric, float(seq * 100 + i)) for i in range(n)]


def run(coro):
    return asyncio.run(coro)


def test_frames_are_stored_once_and_the_cursor_advances_in_the_same_commit():
    device = make_device()
    seen_before_commit = {}

    async def main() -> list[IngestResult]:
        flusher = Flusher(flush_interval_ms=20)

        async def peek() -> None:
            # Another connection sees neither the rows nor the new cursor before the commit.
            kwargs = connection_kwargs(connection.settings_dict)
            async with await psycopg.AsyncConnection.connect(autocommit=True, **kwargs) as other:
                cur = await other.execute("SELECT count(*) FROM telemetry_point WHERE device_id = %s", [device.id])
                seen_before_commit["rows"] = (await cur.fetchone())[0]
                cur = await other.execute("SELECT last_acked_seq FROM fleet_uplinkcursor WHERE device_id = %s",
                                          [device.id])
                seen_before_commit["cursor"] = (await cur.fetchone())[0]

        flusher._before_commit = peek
        results = await asyncio.gather(*[
            flusher.submit(device_id=device.id, seq=seq, points=frame_points(seq)) for seq in (1, 2, 3)
        ])
        await flusher.close()
        return results

    results = run(main())
    assert [r.status for r in results] == ["stored"] * 3
    assert all(r.rejected == [] for r in results)
    assert seen_before_commit == {"rows": 0, "cursor": 0}
    assert count_points(device.id) == 30
    assert cursor_of(device.id) == 3


def test_a_resent_frame_is_a_duplicate_and_stores_nothing():
    device = make_device()

    async def main() -> tuple[list, IngestResult]:
        flusher = Flusher(flush_interval_ms=5)
        first = [await flusher.submit(device_id=device.id, seq=s, points=frame_points(s)) for s in (1, 2)]
        again = await flusher.submit(device_id=device.id, seq=2, points=frame_points(2))
        await flusher.close()
        return first, again

    first, again = run(main())
    assert [r.status for r in first] == ["stored", "stored"]
    assert again.status == "duplicate"
    assert count_points(device.id) == 20
    assert cursor_of(device.id) == 2


def test_when_another_writer_moved_the_cursor_frames_are_duplicates_or_conflicts():
    device = make_device()
    # Another connection (another process) stored frames up to 5 in the meantime.
    UplinkCursor.objects.filter(device=device).update(last_acked_seq=5)

    async def main() -> list[IngestResult]:
        flusher = Flusher(flush_interval_ms=5)
        results = [
            await flusher.submit(device_id=device.id, seq=3, points=frame_points(3)),
            await flusher.submit(device_id=device.id, seq=5, points=frame_points(5)),
            await flusher.submit(device_id=device.id, seq=8, points=frame_points(8)),
        ]
        await flusher.close()
        return results

    results = run(main())
    assert [r.status for r in results] == ["duplicate", "duplicate", "conflict"]
    assert count_points(device.id) == 0
    assert cursor_of(device.id) == 5


def test_the_same_frame_twice_in_one_batch_is_stored_once():
    device = make_device()

    async def main() -> list[IngestResult]:
        flusher = Flusher(flush_interval_ms=50)
        results = await asyncio.gather(
            flusher.submit(device_id=device.id, seq=1, points=frame_points(1)),
            flusher.submit(device_id=device.id, seq=1, points=frame_points(1)),
            flusher.submit(device_id=device.id, seq=2, points=frame_points(2)),
        )
        await flusher.close()
        return results

    results = run(main())
    assert sorted(r.status for r in results) == ["duplicate", "stored", "stored"]
    assert count_points(device.id) == 20


def test_two_flushers_racing_the_same_frames_store_them_exactly_once():
    devices = [make_device() for _ in range(8)]
    frames = 15
    points_per_frame = 40

    async def submit_all(flusher: Flusher, order: list[tuple[int, int]]) -> list[tuple[int, int, str]]:
        async def one(device_id: int, seq: int) -> tuple[int, int, str]:
            try:
                result = await flusher.submit(device_id=device_id, seq=seq,
                                              points=frame_points(seq, points_per_frame, t0=now_ms() - 60_000))
                return device_id, seq, result.status
            except FlushFailed:
                return device_id, seq, "failed"

        # Each "connection" submits its device's frames in order, pipelined.
        by_device: dict[int, list[int]] = {}
        for device_id, seq in order:
            by_device.setdefault(device_id, []).append(seq)
        tasks = []
        for device_id, seqs in by_device.items():
            for seq in seqs:
                tasks.append(asyncio.create_task(one(device_id, seq)))
                await asyncio.sleep(0)
        return await asyncio.gather(*tasks)

    async def main() -> tuple[list, list]:
        # Small batches: many interleaved transactions on two separate connections.
        a = Flusher(flush_interval_ms=2, max_batch_rows=200)
        b = Flusher(flush_interval_ms=3, max_batch_rows=320)
        order = [(d.id, s) for d in devices for s in range(1, frames + 1)]
        results = await asyncio.gather(submit_all(a, order), submit_all(b, list(reversed(order))))
        await a.close()
        await b.close()
        return results

    from_a, from_b = run(main())
    for device in devices:
        final = cursor_of(device.id)
        stored = [s for d, s, st in from_a + from_b if d == device.id and st == "stored"]
        # Every seq up to the cursor was stored by exactly one of the two; nothing beyond it.
        assert sorted(stored) == list(range(1, final + 1))
        assert count_points(device.id) == final * points_per_frame
        with connection.cursor() as cursor:
            cursor.execute("SELECT count(*) FROM (SELECT time, metric_id FROM telemetry_point WHERE device_id = %s "
                           "GROUP BY 1, 2 HAVING count(*) > 1) dup", [device.id])
            assert cursor.fetchone()[0] == 0
    assert sum(cursor_of(d.id) for d in devices) > 0


def test_a_crash_between_copy_and_commit_stores_nothing_and_fails_the_frames():
    device = make_device()

    async def crash() -> None:
        raise RuntimeError("process died after COPY")

    async def main() -> tuple[list, IngestResult]:
        flusher = Flusher(flush_interval_ms=20, down_backoff_s=0)
        flusher._before_commit = crash
        outcomes = await asyncio.gather(
            *[flusher.submit(device_id=device.id, seq=s, points=frame_points(s)) for s in (1, 2)],
            return_exceptions=True,
        )
        flusher._before_commit = None
        retried = await flusher.submit(device_id=device.id, seq=1, points=frame_points(1))
        await flusher.close()
        return outcomes, retried

    outcomes, retried = run(main())
    assert all(isinstance(o, FlushFailed) for o in outcomes)
    # Nothing of the failed transaction survived; the resent frame is stored normally.
    assert retried.status == "stored"
    assert count_points(device.id) == 10
    assert cursor_of(device.id) == 1


def test_submit_raises_overloaded_when_the_queue_is_full_and_enqueues_nothing():
    device = make_device()

    async def main() -> tuple[Overloaded, list]:
        flusher = Flusher(flush_interval_ms=300, max_queue_rows=100)
        first = asyncio.create_task(flusher.submit(device_id=device.id, seq=1, points=frame_points(1, 80)))
        await asyncio.sleep(0)
        with pytest.raises(Overloaded) as info:
            await flusher.submit(device_id=device.id, seq=2, points=frame_points(2, 30))
        assert flusher.queued_rows == 80
        await flusher.close()
        return info.value, [await first]

    error, done = run(main())
    assert error.retry_after_ms > 0
    assert done[0].status == "stored"
    assert count_points(device.id) == 80
    assert cursor_of(device.id) == 1


def test_a_frame_that_does_not_fit_waits_for_room_in_arrival_order_and_is_stored():
    device, other = make_device(), make_device()

    async def main() -> tuple[list, list[str]]:
        flusher = Flusher(flush_interval_ms=200, max_queue_rows=100)
        admitted: list[str] = []

        async def send(name: str, device_id: int, seq: int, rows: int) -> IngestResult:
            future = await flusher.enqueue(device_id=device_id, seq=seq, points=frame_points(seq, rows), wait_s=5)
            admitted.append(name)
            return await future

        first = asyncio.create_task(send("first", device.id, 1, 80))
        await asyncio.sleep(0.01)
        assert admitted == ["first"]
        # Neither fits while the first is queued; they wait, and enter in the order they came.
        second = asyncio.create_task(send("second", device.id, 2, 60))
        await asyncio.sleep(0.01)
        third = asyncio.create_task(send("third", other.id, 1, 10))
        await asyncio.sleep(0.01)
        assert admitted == ["first"] and flusher.queued_rows == 80
        results = [await first, await second, await third]
        await flusher.close()
        return results, admitted

    results, admitted = run(main())
    assert [r.status for r in results] == ["stored", "stored", "stored"]
    assert admitted == ["first", "second", "third"]
    assert count_points(device.id) == 140 and count_points(other.id) == 10
    assert cursor_of(device.id) == 2


def test_a_frame_still_waiting_for_room_after_wait_s_is_refused_and_not_enqueued():
    device = make_device()

    async def main() -> tuple[float, list]:
        flusher = Flusher(flush_interval_ms=1500, max_queue_rows=100)
        first = asyncio.create_task(flusher.submit(device_id=device.id, seq=1, points=frame_points(1, 80)))
        await asyncio.sleep(0.01)
        started = time.monotonic()
        with pytest.raises(Overloaded):
            await flusher.enqueue(device_id=device.id, seq=2, points=frame_points(2, 30), wait_s=0.3)
        waited = time.monotonic() - started
        assert flusher.queued_rows == 80
        done = [await first]
        await flusher.close()
        return waited, done

    waited, done = run(main())
    assert 0.25 <= waited < 1.4  # gave up after wait_s, well before the first flush made room
    assert done[0].status == "stored"
    assert count_points(device.id) == 80 and cursor_of(device.id) == 1


def test_new_metrics_past_the_per_device_cap_are_rejected_point_by_point():
    device, other = make_device(), make_device()
    t = now_ms() - 1000

    async def main() -> list[IngestResult]:
        flusher = Flusher(flush_interval_ms=5, max_metrics_per_device=3)
        first = await flusher.submit(device_id=device.id, seq=1, points=[
            (t, "m.a", 1.0), (t, "m.b", 2.0), (t, "m.c", 3.0), (t, "m.d", 4.0), (t + 1, "m.a", 5.0), (t, "m.e", 6.0),
        ])
        second = await flusher.submit(device_id=device.id, seq=2, points=[(t + 2, "m.a", 1.0), (t + 2, "m.f", 2.0)])
        # A fresh flusher (another process) sees the same cap from the table.
        fresh = Flusher(flush_interval_ms=5, max_metrics_per_device=3)
        third = await fresh.submit(device_id=device.id, seq=3, points=[(t + 3, "m.g", 1.0), (t + 3, "m.b", 1.0)])
        unaffected = await fresh.submit(device_id=other.id, seq=1, points=[(t, "m.d", 1.0), (t, "m.e", 1.0)])
        await flusher.close()
        await fresh.close()
        return [first, second, third, unaffected]

    first, second, third, unaffected = run(main())
    assert first.status == "stored"
    assert first.rejected == [(3, "metric_cardinality_exceeded"), (5, "metric_cardinality_exceeded")]
    assert second.rejected == [(1, "metric_cardinality_exceeded")]
    assert third.rejected == [(0, "metric_cardinality_exceeded")]
    assert unaffected.rejected == []
    assert count_points(device.id) == 4 + 1 + 1
    assert DeviceMetric.objects.filter(device=device).count() == 3
    assert cursor_of(device.id) == 3


def test_the_cap_rejects_the_same_points_when_every_name_already_has_an_id():
    # The names are in this flusher's id cache, so the frames are packed as they enter the queue
    # (not at their flush): the cap must still refuse exactly the points past it.
    warm, device = make_device(), make_device()
    t = now_ms() - 1000
    names = ["m.a", "m.b", "m.c", "m.d", "m.e"]

    async def main() -> list[IngestResult]:
        flusher = Flusher(flush_interval_ms=5, max_metrics_per_device=3)
        await flusher.submit(device_id=warm.id, seq=1, points=[(t, name, 0.0) for name in names])
        # Over the cap: m.c is the first new metric past it here, m.e the second; m.a repeats.
        first = await flusher.submit(device_id=device.id, seq=1, points=[
            (t, "m.b", 1.0), (t, "m.a", 2.0), (t, "m.d", 3.0), (t, "m.c", 4.0), (t + 1, "m.a", 5.0), (t, "m.e", 6.0),
        ])
        second = await flusher.submit(device_id=device.id, seq=2, points=[(t + 2, "m.e", 7.0), (t + 2, "m.d", 8.0)])
        await flusher.close()
        return [first, second]

    first, second = run(main())
    assert first.rejected == [(3, "metric_cardinality_exceeded"), (5, "metric_cardinality_exceeded")]
    assert second.rejected == [(0, "metric_cardinality_exceeded")]
    with connection.cursor() as cursor:
        cursor.execute("SELECT m.name, p.value FROM telemetry_point p JOIN telemetry_metric m ON m.id = p.metric_id "
                       "WHERE p.device_id = %s ORDER BY p.value", [device.id])
        assert cursor.fetchall() == [("m.b", 1.0), ("m.a", 2.0), ("m.d", 3.0), ("m.a", 5.0), ("m.d", 8.0)]
    with connection.cursor() as cursor:
        cursor.execute("SELECT m.name, dm.last_value FROM telemetry_devicemetric dm JOIN telemetry_metric m "
                       "ON m.id = dm.metric_id WHERE dm.device_id = %s ORDER BY m.name", [device.id])
        assert cursor.fetchall() == [("m.a", 5.0), ("m.b", 1.0), ("m.d", 8.0)]


def test_queued_frames_of_known_metrics_hold_no_object_per_point():
    # Points held as Python tuples are walked by the garbage collector's young-generation pass:
    # with a backlog of 500,000 queued points one pass stalled the server for 0.25-0.5 s.
    device = make_device()
    t = now_ms() - 60_000

    async def main() -> int:
        flusher = Flusher(flush_interval_ms=5)
        await flusher.submit(device_id=device.id, seq=1, points=frame_points(1, 5))
        gc.collect()
        gc.disable()  # a collection would untrack the points' tuples, as the server's rarely does
        try:
            before = len(gc.get_objects())
            # Nothing in between yields to the event loop: all 20 frames are queued when counted.
            futures = [await flusher.enqueue(device_id=device.id, seq=seq, points=[
                (t + seq * 1000 + i, "cpu.temp", float(i)) for i in range(500)]) for seq in range(2, 22)]
            held = len(gc.get_objects()) - before
        finally:
            gc.enable()
        assert flusher.queued_rows == 20 * 500
        assert {(await f).status for f in futures} == {"stored"}
        await flusher.close()
        return held

    held = run(main())
    assert held < 20 * 20, f"{held} objects held by 20 queued frames of 500 points"
    assert count_points(device.id) == 5 + 20 * 500
    assert cursor_of(device.id) == 21


def test_late_points_of_a_packed_frame_mark_their_hours():
    device = make_device()
    now = now_ms()
    old = [now - 3 * 3_600_000, now - 3 * 3_600_000 + 1, now - 5 * 3_600_000]

    async def main() -> None:
        flusher = Flusher(flush_interval_ms=5)
        await flusher.submit(device_id=device.id, seq=1, points=[(now - 1000, "cpu.temp", 1.0)])
        result = await flusher.submit(device_id=device.id, seq=2, points=[(t, "cpu.temp", 2.0) for t in old]
                                      + [(now - 500, "cpu.temp", 3.0)])
        assert result.status == "stored"
        await flusher.close()

    run(main())
    with connection.cursor() as cursor:
        cursor.execute("SELECT hour FROM telemetry_late WHERE device_id = %s ORDER BY hour", [device.id])
        hours = [row[0] for row in cursor.fetchall()]
    expected = sorted({dt.datetime.fromtimestamp(t // 3_600_000 * 3600, dt.UTC) for t in old})
    assert hours == expected
    assert count_points(device.id) == 5


def test_partitions_are_created_ahead_and_rows_land_in_their_day():
    created = storage.ensure_partitions(days_ahead=3)
    today = storage.utc_today()
    names = {p["name"] for p in storage.partitions()}
    for offset in range(-1, 4):
        assert storage.partition_name(today + dt.timedelta(days=offset)) in names
    assert storage.ensure_partitions(days_ahead=3) == []  # idempotent
    assert isinstance(created, list)
    device = make_device()
    midnight = dt.datetime.combine(today + dt.timedelta(days=1), dt.time(), tzinfo=dt.UTC)
    t_today, t_tomorrow = int(midnight.timestamp() * 1000) - 1, int(midnight.timestamp() * 1000)

    async def main() -> IngestResult:
        flusher = Flusher(flush_interval_ms=5)
        result = await flusher.submit(device_id=device.id, seq=1, points=[(t_today, "x", 1.0), (t_tomorrow, "x", 2.0)])
        await flusher.close()
        return result

    assert run(main()).status == "stored"
    with connection.cursor() as cursor:
        cursor.execute("SELECT tableoid::regclass::text, value FROM telemetry_point WHERE device_id = %s ORDER BY value",
                       [device.id])
        assert cursor.fetchall() == [
            (storage.partition_name(today), 1.0), (storage.partition_name(today + dt.timedelta(days=1)), 2.0),
        ]


def test_a_point_for_a_day_without_a_partition_gets_its_partition_on_demand():
    device = make_device()
    day = storage.utc_today() - dt.timedelta(days=12)
    with connection.cursor() as cursor:
        cursor.execute(f'DROP TABLE IF EXISTS "{storage.partition_name(day)}"')
    t = int(dt.datetime.combine(day, dt.time(12), tzinfo=dt.UTC).timestamp() * 1000)

    async def main() -> IngestResult:
        flusher = Flusher(flush_interval_ms=5)
        result = await flusher.submit(device_id=device.id, seq=1, points=[(t, "x", 1.0)])
        await flusher.close()
        return result

    assert run(main()).status == "stored"
    assert storage.partition_name(day) in {p["name"] for p in storage.partitions()}
    assert count_points(device.id) == 1
    # It arrived long after its time: its hour is marked for re-aggregation by the rollup job.
    with connection.cursor() as cursor:
        cursor.execute("SELECT hour FROM telemetry_late WHERE device_id = %s", [device.id])
        assert cursor.fetchall() == [(dt.datetime.combine(day, dt.time(12), tzinfo=dt.UTC),)]


def test_while_the_database_is_down_submit_fails_fast():
    device = make_device()
    dead = {**connection.settings_dict, "HOST": "127.0.0.1", "PORT": 1}

    async def main() -> tuple[float, float]:
        flusher = Flusher(flush_interval_ms=5, connect_timeout_s=1, down_backoff_s=30, settings_dict=dead)
        started = time.monotonic()
        with pytest.raises(FlushFailed):
            await flusher.submit(device_id=device.id, seq=1, points=frame_points(1))
        first = time.monotonic() - started
        started = time.monotonic()
        with pytest.raises(FlushFailed, match="database unavailable"):
            await flusher.submit(device_id=device.id, seq=1, points=frame_points(1))
        second = time.monotonic() - started
        await flusher.close()
        return first, second

    first, second = run(main())
    assert first < 3
    assert second < 0.05
    assert cursor_of(device.id) == 0


def test_get_flusher_is_one_per_process_and_event_loop():
    async def main() -> tuple[bool, Flusher]:
        a, b = ingest.get_flusher(), ingest.get_flusher()
        await a.close()
        return a is b, a

    same, first = run(main())
    assert same

    async def again() -> bool:
        flusher = ingest.get_flusher()
        await flusher.close()
        return flusher is not first

    assert run(again())
