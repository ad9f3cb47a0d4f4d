"""Backend choice, TimescaleDB SQL generation (not runnable here), events, status command."""

from __future__ import annotations

import datetime as dt
import io

import pytest
from django.core.management import call_command

from telemetry import services, storage, timescale
from telemetry.models import DeviceEvent
from tests.factories import make_device


class FakeCursor:
    def __init__(self, rows: dict[str, object]) -> None:
        self.rows, self.sql = rows, []

    def execute(self, sql: str, params: object = None) -> None:
        self.sql.append(sql)

    def fetchone(self) -> object:
        last = self.sql[-1]
        return next((row for key, row in self.rows.items() if key in last), None)


def test_timescale_is_chosen_when_the_extension_is_available():
    assert storage.choose_backend(FakeCursor({"pg_available_extensions": (1,)}), "auto") == "timescale"
    assert storage.choose_backend(FakeCursor({}), "auto") == "postgres"
    assert storage.choose_backend(FakeCursor({"pg_available_extensions": (1,)}), "postgres") == "postgres"
    with pytest.raises(RuntimeError, match="not in pg_available_extensions"):
        storage.choose_backend(FakeCursor({}), "timescale")


def test_timescale_in_use_means_a_hypertable():
    assert not timescale.in_use(FakeCursor({}))
    assert timescale.in_use(FakeCursor({"pg_extension": (1,), "hypertables": (1,)}))


def test_timescale_sql_has_hypertable_compression_aggregates_and_retention():
    sql = timescale.setup_sql(compress_after_days=7, raw_retention_days=30, rollup_1m_retention_days=90,
                              rollup_1h_retention_days=730)
    text = "\n".join(sql)
    assert sql[0] == "CREATE EXTENSION IF NOT EXISTS timescaledb"
    assert "chunk_time_interval => INTERVAL '1 day'" in text
    assert "(device_id, metric_id, time DESC)" in text
    assert "timescaledb.compress_segmentby = 'device_id'" in text
    assert "add_compression_policy('telemetry_point', INTERVAL '7 days')" in text
    assert "CREATE MATERIALIZED VIEW telemetry_rollup_1m WITH (timescaledb.continuous" in text
    assert "time_bucket(INTERVAL '1 hour', bucket)" in text and "FROM telemetry_rollup_1m" in text
    assert "last(value, time) AS last" in text
    assert "add_retention_policy('telemetry_point', INTERVAL '30 days')" in text
    assert "add_retention_policy('telemetry_rollup_1h', INTERVAL '730 days')" in text
    with pytest.raises(ValueError, match="not a telemetry continuous aggregate"):
        timescale.watermark_sql("pg_class; drop")


@pytest.mark.django_db
def test_this_database_uses_native_partitions():
    assert storage.backend() == "postgres"
    names = {p["name"] for p in storage.partitions()}
    assert storage.partition_name(storage.utc_today() + dt.timedelta(days=7)) in names


@pytest.mark.django_db
def test_events_are_stored_with_their_time_and_attributes():
    device = make_device()
    count = services.events_store(device_id=device.id, events=[
        {"t": 1_700_000_000_000, "kind": "inference", "severity": "warning", "message": "anomaly", "attrs": {"p": 0.9}},
        {"t": 1_700_000_001_500, "kind": "boot", "severity": "info", "message": "", "attrs": {}},
    ])
    assert count == 2
    first = DeviceEvent.objects.filter(device=device).order_by("time").first()
    assert first.time == dt.datetime(2023, 11, 14, 22, 13, 20, tzinfo=dt.UTC)
    assert (first.kind, first.severity, first.attrs) == ("inference", "warning", {"p": 0.9})


@pytest.mark.django_db
def test_telemetry_status_prints_backend_partitions_and_watermark():
    out = io.StringIO()
    call_command("telemetry_status", stdout=out)
    text = out.getvalue()
    assert "backend: postgres" in text
    assert "partitions:" in text and "telemetry_point_p" in text
    assert "rollup watermark:" in text


@pytest.mark.django_db(transaction=True)  # VACUUM cannot run inside a transaction
def test_day_partitions_skip_insert_vacuum_and_each_is_vacuumed_once_after_its_day():
    from django.db import connection

    today = storage.utc_today()
    # A day of its own, long closed and never vacuumed (yesterday's may have been vacuumed by
    # autovacuum for rows other tests deleted).
    old_day = dt.date(2001, 1, 1)
    old, current = storage.partition_name(old_day), storage.partition_name(today)
    assert storage.ensure_partitions(start=old_day, days_ahead=0, days_back=0) == [old]
    try:
        with connection.cursor() as cursor:
            cursor.execute("SELECT relname, reloptions FROM pg_class WHERE relname = ANY(%s)", [[old, current]])
            options = dict(cursor.fetchall())
        assert options == {name: ["autovacuum_vacuum_insert_threshold=-1"] for name in (old, current)}

        first = storage.vacuum_closed_partitions(today=today)
        again = storage.vacuum_closed_partitions(today=today)
        assert old in first and current not in first  # today's partition is still being written
        assert old not in again
        with connection.cursor() as cursor:
            cursor.execute("SELECT last_vacuum IS NOT NULL FROM pg_stat_all_tables WHERE relname = %s", [old])
            assert cursor.fetchone() == (True,)
    finally:
        with connection.cursor() as cursor:
            cursor.execute(f'DROP TABLE IF EXISTS "{old}"')
