"""Latest values for a whole fleet: `selectors.latest` answers thousands of devices in one query on
a binary cursor that still is Django's (same connection and transaction, logged, errors wrapped),
with the same values, UTC times and window as before; the API keeps its documented shape."""

from __future__ import annotations

import datetime as dt
import random

import pytest
from django.db import DatabaseError, connection, transaction
from django.test.utils import CaptureQueriesContext
from django.utils import timezone

from fleet.models import Device
from telemetry import selectors
from telemetry.models import DeviceMetric, Metric

pytestmark = pytest.mark.django_db

FLEET = 3000


@pytest.fixture
def fleet():
    """FLEET devices with cpu.temp in the catalog: most fresh, some stale (outside the 24 h window),
    some reported but with no value yet; mem.used for every device, to be ignored."""
    rng = random.Random(5)
    now = timezone.now().replace(microsecond=0)
    devices = Device.objects.bulk_create([Device(uid=f"fl-{i:05d}", name=f"fleet {i}") for i in range(FLEET)])
    cpu, mem = Metric.objects.create(name="cpu.temp"), Metric.objects.create(name="mem.used")
    expected, rows = {}, []
    for device in devices:
        kind = rng.choices(["fresh", "stale", "no value"], weights=[90, 7, 3])[0]
        when = now - dt.timedelta(seconds=rng.randint(0, 86_000) if kind == "fresh" else rng.randint(90_000, 900_000),
                                  microseconds=rng.randint(0, 999_999))
        value = rng.uniform(-40, 120)
        if kind == "no value":
            rows.append(DeviceMetric(device=device, metric=cpu))
        else:
            rows.append(DeviceMetric(device=device, metric=cpu, last_time=when, last_value=value))
        if kind == "fresh":
            expected[device.id] = (when, value)
        rows.append(DeviceMetric(device=device, metric=mem, last_time=now, last_value=-1.0))
    DeviceMetric.objects.bulk_create(rows, batch_size=2000)
    return [d.id for d in devices], cpu, expected


def test_latest_for_thousands_of_devices_returns_exactly_the_fresh_values_in_one_logged_query(fleet):
    device_ids, cpu, expected = fleet
    assert 2000 < len(expected) < FLEET  # stale and value-less rows exist, so the filter is exercised
    with CaptureQueriesContext(connection) as queries:
        values = selectors.latest(metric_id=cpu.id, device_ids=device_ids)
    assert values == expected
    assert len(queries) == 1 and "telemetry_devicemetric" in queries[0]["sql"]


@pytest.mark.parametrize(("selection", "read_as"), [
    (lambda ids: ids, "BETWEEN"),  # the whole fleet: its id range
    (lambda ids: ids[::2], "BETWEEN"),  # every other device: still dense, the range's other rows dropped
    (lambda ids: ids[100:400][::-1] + ids[100:150], "BETWEEN"),  # a page, in any order, with repeats
    (lambda ids: ids[::3], "unnest"),  # sparse: the ids themselves
    (lambda ids: [ids[0], ids[-1]], "unnest"),  # two devices far apart
    (lambda ids: [ids[7]], "BETWEEN"),
])
def test_dense_and_sparse_selections_return_exactly_the_selected_devices_fresh_values(fleet, selection, read_as):
    device_ids, cpu, expected = fleet
    chosen = selection(device_ids)
    with CaptureQueriesContext(connection) as queries:
        values = selectors.latest(metric_id=cpu.id, device_ids=chosen)
    assert values == {d: v for d, v in expected.items() if d in set(chosen)}
    assert read_as in queries[0]["sql"]


def test_latest_times_are_aware_utc_datetimes_to_the_microsecond_and_values_plain_floats(fleet):
    device_ids, cpu, expected = fleet
    values = selectors.latest(metric_id=cpu.id, device_ids=device_ids)
    some = next(iter(values))
    when, value = values[some]
    assert when.utcoffset() == dt.timedelta(0) and when == expected[some][0]
    assert when.microsecond == expected[some][0].microsecond
    assert type(value) is float and type(some) is int


def test_latest_honours_the_window_and_repeated_or_unknown_device_ids(fleet):
    device_ids, cpu, expected = fleet
    wide = selectors.latest(metric_id=cpu.id, device_ids=device_ids, window_s=30 * 86400)
    assert set(expected) < set(wide)  # the stale ones come back with a wider window
    some = device_ids[:50]
    assert selectors.latest(metric_id=cpu.id, device_ids=some + some + [10**9]) == {
        d: v for d, v in expected.items() if d in some}
    assert selectors.latest(metric_id=cpu.id, device_ids=[]) == {}


def test_latest_reads_inside_the_callers_transaction_on_djangos_connection(fleet):
    device_ids, cpu, expected = fleet
    target = device_ids[0]
    moved = timezone.now().replace(microsecond=0)
    with transaction.atomic():
        DeviceMetric.objects.filter(device_id=target, metric=cpu).update(last_time=moved, last_value=1234.5)
        assert selectors.latest(metric_id=cpu.id, device_ids=[target]) == {target: (moved, 1234.5)}
        transaction.set_rollback(True)
    assert selectors.latest(metric_id=cpu.id, device_ids=[target]) == (
        {target: expected[target]} if target in expected else {})


def test_a_failing_binary_query_raises_djangos_database_error_and_the_connection_stays_usable(fleet):
    _, cpu, _ = fleet
    with pytest.raises(DatabaseError), transaction.atomic(), selectors._binary_cursor() as cursor:
        cursor.execute("SELECT 1 / (%s - %s)", [1, 1])
    assert selectors.latest(metric_id=cpu.id, device_ids=[]) == {}


def test_the_latest_api_keeps_its_shape_with_iso_utc_times_for_a_thousand_devices(fleet, viewer_api):
    device_ids, _, expected = fleet
    response = viewer_api.get("/api/v1/telemetry/latest/", {"metric": "cpu.temp"})
    assert response.status_code == 200, response.content
    body = response.json()
    assert set(body) == {"metric", "window_s", "truncated", "results"}
    assert body["metric"] == "cpu.temp" and body["window_s"] == 86400 and body["truncated"] is True
    assert len(body["results"]) == 1000  # TELEMETRY_LATEST_MAX_DEVICES, first by uid
    uid_to_id = dict(Device.objects.filter(id__in=device_ids).values_list("uid", "id"))
    assert [r["device"] for r in body["results"]] == sorted(uid_to_id)[:1000]
    for row in body["results"]:
        want = expected.get(uid_to_id[row["device"]])
        if want is None:
            assert row["time"] is None and row["value"] is None
        else:
            assert dt.datetime.fromisoformat(row["time"].replace("Z", "+00:00")) == want[0]
            assert row["time"].endswith("Z") and row["value"] == want[1]
