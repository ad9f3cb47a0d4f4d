"""The ingest flusher under load: its transactions run on their own thread's event loop (a busy
serving loop does not stall them), a batch of many devices' frames is stored exactly once, and
the column-wise (numpy) encoder writes byte for byte what the point-by-point encoder writes."""

from __future__ import annotations

import asyncio
import random
import time

import psycopg
import pytest
from django.db import connection

from telemetry.ingest import Flusher, _Frame, connection_kwargs
from telemetry.tests.helpers import count_points, cursor_of, now_ms
from tests.factories import make_device

METRICS = ("cpu.temp_c", "inference.latency_ms", "inference.score", "net.rx_kbps", "power.w")



def points(seq: int, n: int = 50) -> list[tuple[int, str, float]]:
    t0 = now_ms() - 10_000 + seq * n
    return [(t0 + i, METRICS[i % len(METRICS)], float(seq * 1000 + i)) for i in range(n)]


@pytest.mark.usefixtures("clean_series")
def test_a_flush_commits_while_the_serving_event_loop_is_blocked():
    device = make_device()
    kwargs = connection_kwargs(connection.settings_dict)
    seen_while_blocked = {}

    async def main() -> str:
        flusher = Flusher(flush_interval_ms=10)
        submitted = asyncio.ensure_future(flusher.submit(device_id=device.id, seq=1, points=points(1)))
        # Let the flusher hand the batch to its thread, then block this loop (as a burst of
        # frame parsing would) and watch the commit happen from outside.
        while not flusher._inflight:
            await asyncio.sleep(0.005)
        with psycopg.connect(autocommit=True, **kwargs) as other:
            deadline = time.monotonic() + 10
            while time.monotonic() < deadline:
                rows = other.execute("SELECT count(*) FROM telemetry_point WHERE device_id = %s",
                                     [device.id]).fetchone()[0]
                cursor = other.execute("SELECT last_acked_seq FROM fleet_uplinkcursor WHERE device_id = %s",
                                       [device.id]).fetchone()[0]
                if rows:
                    seen_while_blocked.update(rows=rows, cursor=cursor)
                    break
                time.sleep(0.02)  # blocking on purpose: the serving loop gets no turn
        result = await submitted
        await flusher.close()
        return result.status

    assert asyncio.run(main()) == "stored"
    # Points and cursor became visible together, without a single turn of the serving loop.
    assert seen_while_blocked == {"rows": 50, "cursor": 1}


@pytest.mark.usefixtures("clean_series")
def test_a_batch_of_many_devices_frames_is_stored_exactly_once_with_each_cursor():
    devices = [make_device() for _ in range(120)]

    async def main() -> list[str]:
        flusher = Flusher(flush_interval_ms=50, max_batch_rows=100_000)
        outcomes = await asyncio.gather(*[
            flusher.submit(device_id=d.id, seq=seq, points=points(seq)) for seq in (1, 2, 3) for d in devices
        ])
        # The same frames again: already stored, so duplicates, and nothing more is written.
        again = await asyncio.gather(*[flusher.submit(device_id=d.id, seq=2, points=points(2)) for d in devices])
        await flusher.close()
        assert flusher.stats["flushes"] >= 1
        return [o.status for o in outcomes] + [o.status for o in again]

    statuses = asyncio.run(main())
    assert statuses[:360] == ["stored"] * 360
    assert statuses[360:] == ["duplicate"] * 120
    assert {count_points(d.id) for d in devices} == {150}
    assert {cursor_of(d.id) for d in devices} == {3}


def _encode_point_by_point(flusher: Flusher, frame: _Frame) -> None:
    fast, flusher._encode_fast = flusher._encode_fast, lambda _frame: False
    try:
        flusher._encode(frame)
    finally:
        flusher._encode_fast = fast


def test_the_column_encoder_writes_the_same_rows_as_the_point_by_point_encoder():
    flusher = Flusher(settings_dict={})
    flusher._metric_ids = {name: i + 1 for i, name in enumerate(METRICS)}
    rng = random.Random(7)
    for _ in range(300):
        base = rng.choice([now_ms(), 946_684_800_000, 0, -10**12])
        frame_points = [(base + rng.randint(-3, 3), rng.choice(METRICS), rng.choice([0.0, -2.5, 1e300, rng.random()]))
                        for _ in range(rng.randint(1, 80))]
        device_id = rng.randint(1, 2**31 - 1)
        fast = _Frame(device_id=device_id, seq=1, points=frame_points, future=None)
        slow = _Frame(device_id=device_id, seq=1, points=frame_points, future=None)
        assert flusher._encode_fast(fast)
        _encode_point_by_point(flusher, slow)
        assert fast.payload == slow.payload
        assert (fast.rows, fast.min_t, fast.max_t, fast.newest) == (slow.rows, slow.min_t, slow.max_t, slow.newest)


@pytest.mark.parametrize("odd", [
    (1, "cpu.temp_c", 1),  # an int value
    (1.0, "cpu.temp_c", 1.0),  # a float time
    (True, "cpu.temp_c", 1.0),  # a bool time
    (1, "never.seen", 1.0),  # a name with no id
    (1, "cpu.temp_c", float("nan")),
    (2**70, "cpu.temp_c", 1.0),  # too large for int8
    (10**17, "cpu.temp_c", 1.0),  # fits int8, but not as µs since 2000
    (1, ["cpu.temp_c"], 1.0),
    (1, "cpu.temp_c"),
])
def test_the_column_encoder_leaves_odd_points_to_the_point_by_point_encoder(odd):
    flusher = Flusher(settings_dict={})
    flusher._metric_ids = {name: i + 1 for i, name in enumerate(METRICS)}
    frame = _Frame(device_id=1, seq=1, points=[(5, "power.w", 2.0), odd], future=None)
    assert not flusher._encode_fast(frame)
    assert frame.payload == b""
    flusher._encode(frame)  # decides point by point: the good point is kept either way
    assert frame.rows in (1, 2)
    assert frame.rows + len(frame.rejected) == 2
