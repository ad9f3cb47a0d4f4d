"""The time-series tables and their upkeep: backend choice, daily partitions, retention.

Backend is chosen once, at migrate time (`create_storage`): TimescaleDB when the extension is
available (all its SQL lives in telemetry/timescale.py), otherwise native PostgreSQL
partitioning:

    telemetry_point (time timestamptz, device_id int, metric_id smallint, value float8)
        PARTITION BY RANGE (time), one partition per UTC day: telemetry_point_pYYYYMMDD
        BRIN (time) + btree (device_id, metric_id, time), declared on the parent so every
        partition gets them.
    telemetry_rollup_1m / telemetry_rollup_1h  (bucket, device_id, metric_id, count, sum, min,
        max, last, last_time), primary key (device_id, metric_id, bucket), btree (metric_id, bucket)
    telemetry_late (device_id, hour): hours that received points after their minutes may
        already have been rolled up (see telemetry/rollups.py).

There is no DEFAULT partition: a row for a day without a partition would make creating that
day's partition later fail. Instead partitions are created ahead (migrate, Celery beat) and the
ingest flusher creates a missing day's partition on demand, before its transaction, through the
SQL function `telemetry_ensure_partition(date)` (idempotent, serialized by an advisory lock).

Vacuum: a day's partition only receives inserts, and PostgreSQL's insert-triggered autovacuum
would scan the partition being written again and again as it grows (each pass competing with
ingest for the cores: at 100,000 points/s on two cores, the ack latency's p99 went from ~200 ms to
~500 ms while one ran). Partitions are created with that trigger off
(`autovacuum_vacuum_insert_threshold = -1`; autoanalyze, dead-row vacuum and anti-wraparound
vacuum still run), and each partition is vacuumed once, with FREEZE and ANALYZE, after its day
has ended (`vacuum_closed_partitions`, from the hourly partitions task): that sets its
visibility map for index-only reads and freezes it, so it is never rewritten again.
"""

from __future__ import annotations

import datetime as dt
import logging
import re
from typing import Any

from django.db import OperationalError, transaction
from django.db import connection as default_connection

from telemetry import conf, timescale

POINT_TABLE = "telemetry_point"
log = logging.getLogger(__name__)
PARTITION_RE = re.compile(r"^telemetry_point_p(\d{8})$")

ENSURE_PARTITION_FUNCTION = r"""
CREATE OR REPLACE FUNCTION telemetry_ensure_partition(day date) RETURNS boolean
LANGUAGE plpgsql AS $fn$
DECLARE
    part text := 'telemetry_point_p' || to_char(day, 'YYYYMMDD');
BEGIN
    IF to_regclass(part) IS NOT NULL THEN
        RETURN false;
    END IF;
    -- Two processes may want the same day at once: serialize, then look again.
    PERFORM pg_advisory_xact_lock(hashtext('telemetry_point_partitions'));
    IF to_regclass(part) IS NOT NULL THEN
        RETURN false;
    END IF;
    EXECUTE format(
        'CREATE TABLE %I PARTITION OF telemetry_point FOR VALUES FROM (%L) TO (%L) '
        'WITH (autovacuum_vacuum_insert_threshold = -1)',
        part, (day::timestamp AT TIME ZONE 'UTC'), ((day + 1)::timestamp AT TIME ZONE 'UTC'));
    RETURN true;
END
$fn$
"""

_ROLLUP_TABLE = """
CREATE TABLE {name} (
    bucket timestamptz NOT NULL,
    device_id integer NOT NULL,
    metric_id smallint NOT NULL,
    count bigint NOT NULL,
    sum double precision NOT NULL,
    min double precision NOT NULL,
    max double precision NOT NULL,
    last double precision NOT NULL,
    last_time timestamptz NOT NULL,
    PRIMARY KEY (device_id, metric_id, bucket)
)
"""


def postgres_setup_sql() -> list[str]:
    return [
        """CREATE TABLE telemetry_point (
            time timestamptz NOT NULL,
            device_id integer NOT NULL,
            metric_id smallint NOT NULL,
            value double precision NOT NULL
        ) PARTITION BY RANGE (time)""",
        "CREATE INDEX telemetry_point_time_brin ON telemetry_point USING brin (time)",
        "CREATE INDEX telemetry_point_series ON telemetry_point (device_id, metric_id, time)",
        ENSURE_PARTITION_FUNCTION,
        _ROLLUP_TABLE.format(name="telemetry_rollup_1m"),
        "CREATE INDEX telemetry_rollup_1m_metric_bucket ON telemetry_rollup_1m (metric_id, bucket)",
        "CREATE INDEX telemetry_rollup_1m_bucket_brin ON telemetry_rollup_1m USING brin (bucket)",
        _ROLLUP_TABLE.format(name="telemetry_rollup_1h"),
        "CREATE INDEX telemetry_rollup_1h_metric_bucket ON telemetry_rollup_1h (metric_id, bucket)",
        "CREATE INDEX telemetry_rollup_1h_bucket_brin ON telemetry_rollup_1h USING brin (bucket)",
    ]


def common_setup_sql() -> list[str]:
    return [
        """CREATE TABLE telemetry_late (
            device_id integer NOT NULL,
            hour timestamptz NOT NULL,
            PRIMARY KEY (device_id, hour)
        )""",
    ]


def postgres_teardown_sql() -> list[str]:
    return [
        "DROP TABLE IF EXISTS telemetry_rollup_1h",
        "DROP TABLE IF EXISTS telemetry_rollup_1m",
        "DROP TABLE IF EXISTS telemetry_point CASCADE",
        "DROP FUNCTION IF EXISTS telemetry_ensure_partition(date)",
    ]


def choose_backend(cursor: Any, setting: str | None = None) -> str:
    """"timescale" or "postgres", from TELEMETRY_BACKEND and what the server offers."""
    setting = (setting or conf.get("BACKEND")).lower()
    if setting not in ("auto", "timescale", "postgres"):
        raise ValueError(f"TELEMETRY_BACKEND must be auto, timescale or postgres, not {setting!r}")
    if setting == "postgres":
        return "postgres"
    if timescale.available(cursor):
        return "timescale"
    if setting == "timescale":
        raise RuntimeError("TELEMETRY_BACKEND=timescale but timescaledb is not in pg_available_extensions")
    return "postgres"


def create_storage(connection: Any = None) -> str:
    """Create the time-series tables for the chosen backend (called by migration 0002)."""
    connection = connection or default_connection
    with connection.cursor() as cursor:
        backend = choose_backend(cursor)
        if backend == "timescale":
            statements = timescale.setup_sql(
                compress_after_days=conf.get("COMPRESS_AFTER_DAYS"),
                raw_retention_days=conf.get("RAW_RETENTION_DAYS"),
                rollup_1m_retention_days=conf.get("ROLLUP_1M_RETENTION_DAYS"),
                rollup_1h_retention_days=conf.get("ROLLUP_1H_RETENTION_DAYS"),
            )
        else:
            statements = postgres_setup_sql()
        for sql in [*statements, *common_setup_sql()]:
            cursor.execute(sql)
    _backend_cache.clear()
    if backend == "postgres":
        ensure_partitions(days_ahead=conf.get("PARTITION_DAYS_AHEAD"), connection=connection)
    return backend


def drop_storage(connection: Any = None) -> None:
    connection = connection or default_connection
    with connection.cursor() as cursor:
        statements = timescale.teardown_sql() if timescale.in_use(cursor) else postgres_teardown_sql()
        for sql in ["DROP TABLE IF EXISTS telemetry_late", *statements]:
            cursor.execute(sql)
    _backend_cache.clear()


_backend_cache: dict[str, str] = {}


def backend(connection: Any = None) -> str:
    """The backend in use ("timescale" or "postgres"), looked up once per process."""
    connection = connection or default_connection
    key = connection.settings_dict["NAME"]
    if key not in _backend_cache:
        with connection.cursor() as cursor:
            _backend_cache[key] = "timescale" if timescale.in_use(cursor) else "postgres"
    return _backend_cache[key]


def partition_name(day: dt.date) -> str:
    return f"telemetry_point_p{day:%Y%m%d}"


def utc_today() -> dt.date:
    return dt.datetime.now(dt.UTC).date()


def ensure_partitions(*, days_ahead: int | None = None, days_back: int = 1, start: dt.date | None = None,
                      connection: Any = None) -> list[str]:
    """Create the daily partitions from `start - days_back` to `start + days_ahead` (default today).
    Returns the names created. No-op on TimescaleDB (chunks are created by the extension)."""
    connection = connection or default_connection
    if backend(connection) != "postgres":
        return []
    days_ahead = conf.get("PARTITION_DAYS_AHEAD") if days_ahead is None else days_ahead
    start = start or utc_today()
    created = []
    with connection.cursor() as cursor:
        for offset in range(-days_back, days_ahead + 1):
            day = start + dt.timedelta(days=offset)
            cursor.execute("SELECT telemetry_ensure_partition(%s)", [day])
            if cursor.fetchone()[0]:
                created.append(partition_name(day))
    return created


def vacuum_closed_partitions(*, today: dt.date | None = None, connection: Any = None) -> list[str]:
    """VACUUM (FREEZE, ANALYZE) each partition whose day has ended and that was never vacuumed
    (see the module docstring). Returns the names vacuumed. Must run outside a transaction."""
    connection = connection or default_connection
    if backend(connection) != "postgres":
        return []
    today = today or utc_today()
    with connection.cursor() as cursor:
        cursor.execute(
            "SELECT c.relname FROM pg_inherits i JOIN pg_class c ON c.oid = i.inhrelid "
            "JOIN pg_stat_all_tables s ON s.relid = c.oid WHERE i.inhparent = 'telemetry_point'::regclass "
            "AND s.last_vacuum IS NULL AND s.last_autovacuum IS NULL ORDER BY c.relname")
        names = [name for (name,) in cursor.fetchall()]
    vacuumed = []
    for name in names:
        match = PARTITION_RE.match(name)
        if match is None or dt.datetime.strptime(match.group(1), "%Y%m%d").date() >= today:
            continue
        with connection.cursor() as cursor:
            cursor.execute(f'VACUUM (FREEZE, ANALYZE) "{name}"')
        vacuumed.append(name)
    return vacuumed


def partitions(connection: Any = None) -> list[dict]:
    """Partitions of telemetry_point (plain backend): name, day, estimated rows, bytes."""
    connection = connection or default_connection
    with connection.cursor() as cursor:
        cursor.execute(
            "SELECT c.relname, c.reltuples::bigint, pg_total_relation_size(c.oid) FROM pg_inherits i "
            "JOIN pg_class c ON c.oid = i.inhrelid WHERE i.inhparent = 'telemetry_point'::regclass ORDER BY c.relname"
        )
        rows = cursor.fetchall()
    out = []
    for name, estimate, size in rows:
        match = PARTITION_RE.match(name)
        day = dt.datetime.strptime(match.group(1), "%Y%m%d").date() if match else None
        out.append({"name": name, "day": day, "rows_estimate": max(int(estimate), 0), "bytes": size})
    return out


def drop_expired_partitions(*, retention_days: int | None = None, today: dt.date | None = None,
                            connection: Any = None) -> list[str]:
    """Drop whole daily partitions whose day ended more than `retention_days` ago."""
    connection = connection or default_connection
    if backend(connection) != "postgres":
        return []
    retention_days = conf.get("RAW_RETENTION_DAYS") if retention_days is None else retention_days
    cutoff = (today or utc_today()) - dt.timedelta(days=retention_days)
    dropped = []
    for part in partitions(connection):
        # A partition holds [day, day + 1): expired once day + 1 <= cutoff.
        if part["day"] is not None and part["day"] + dt.timedelta(days=1) <= cutoff:
            # Dropping a partition locks the parent briefly; do not queue behind a long reader
            # (and block ingest meanwhile): give up and try again on the next run.
            try:
                with transaction.atomic(using=connection.alias), connection.cursor() as cursor:
                    cursor.execute("SET LOCAL lock_timeout = '3s'")
                    cursor.execute(f'DROP TABLE IF EXISTS "{part["name"]}"')
            except OperationalError as exc:
                log.warning("could not drop %s now (%s); will retry", part["name"], exc)
                continue
            dropped.append(part["name"])
    return dropped
