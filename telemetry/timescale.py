"""Every piece of TimescaleDB SQL the console uses, in one place (see docs/timescale.md).

When `timescaledb` is in `pg_available_extensions` at migrate time (and TELEMETRY_BACKEND is
"auto" or "timescale"), `telemetry_point` becomes a hypertable with 1-day chunks, compressed
(segment by device_id) after TELEMETRY_COMPRESS_AFTER_DAYS, with continuous aggregates
`telemetry_rollup_1m` and `telemetry_rollup_1h` that have the same columns as the plain
PostgreSQL rollup tables, so queries do not care which backend is underneath. Retention is
Timescale policies; the console's own rollup and retention tasks do nothing on this backend.

This machine cannot install TimescaleDB: the tests check detection and the generated SQL only.
"""

from __future__ import annotations

from typing import Any

# Continuous aggregates re-materialize late data only inside their refresh window: keep it at
# least as long as agents buffer offline, or old late points stay out of the rollups.
ROLLUP_1M_REFRESH_START = "3 days"
ROLLUP_1H_REFRESH_START = "7 days"


def available(cursor: Any) -> bool:
    """Is the extension installable on this server?"""
    cursor.execute("SELECT 1 FROM pg_available_extensions WHERE name = 'timescaledb'")
    return cursor.fetchone() is not None


def in_use(cursor: Any) -> bool:
    """Is `telemetry_point` a hypertable?"""
    cursor.execute("SELECT 1 FROM pg_extension WHERE extname = 'timescaledb'")
    if cursor.fetchone() is None:
        return False
    cursor.execute(
        "SELECT 1 FROM timescaledb_information.hypertables WHERE hypertable_name = 'telemetry_point'"
    )
    return cursor.fetchone() is not None


def _rollup_columns(source_time: str, count: str, sum_: str, min_: str, max_: str,
                    last: str, last_time: str) -> str:
    return (f"{source_time} AS bucket, device_id, metric_id, {count} AS count, {sum_} AS sum, "
            f"{min_} AS min, {max_} AS max, {last} AS last, {last_time} AS last_time")


def setup_sql(*, compress_after_days: int = 7, raw_retention_days: int = 30, rollup_1m_retention_days: int = 90,
              rollup_1h_retention_days: int = 730) -> list[str]:
    """Statements that create the Timescale storage, in order."""
    m1 = _rollup_columns("time_bucket(INTERVAL '1 minute', time)", "count(*)", "sum(value)",
                         "min(value)", "max(value)", "last(value, time)", "max(time)")
    h1 = _rollup_columns("time_bucket(INTERVAL '1 hour', bucket)", "sum(count)", "sum(sum)",
                         "min(min)", "max(max)", "last(last, last_time)", "max(last_time)")
    return [
        "CREATE EXTENSION IF NOT EXISTS timescaledb",
        """CREATE TABLE telemetry_point (
            time timestamptz NOT NULL,
            device_id integer NOT NULL,
            metric_id smallint NOT NULL,
            value double precision NOT NULL
        )""",
        "SELECT create_hypertable('telemetry_point', 'time', chunk_time_interval => INTERVAL '1 day', "
        "create_default_indexes => false)",
        "CREATE INDEX telemetry_point_series ON telemetry_point (device_id, metric_id, time DESC)",
        "ALTER TABLE telemetry_point SET (timescaledb.compress, timescaledb.compress_segmentby = 'device_id', "
        "timescaledb.compress_orderby = 'metric_id, time DESC')",
        f"SELECT add_compression_policy('telemetry_point', INTERVAL '{int(compress_after_days)} days')",
        "CREATE MATERIALIZED VIEW telemetry_rollup_1m WITH (timescaledb.continuous, timescaledb.materialized_only = false) "  # noqa: S608 -- constants only
        f"AS SELECT {m1} FROM telemetry_point GROUP BY 1, 2, 3 WITH NO DATA",
        "CREATE INDEX telemetry_rollup_1m_metric_bucket ON telemetry_rollup_1m (metric_id, bucket)",
        "SELECT add_continuous_aggregate_policy('telemetry_rollup_1m', "
        f"start_offset => INTERVAL '{ROLLUP_1M_REFRESH_START}', end_offset => INTERVAL '1 minute', "
        "schedule_interval => INTERVAL '1 minute')",
        # Hierarchical continuous aggregate (TimescaleDB >= 2.9): hours from minutes.
        "CREATE MATERIALIZED VIEW telemetry_rollup_1h WITH (timescaledb.continuous, timescaledb.materialized_only = false) "  # noqa: S608 -- constants only
        f"AS SELECT {h1} FROM telemetry_rollup_1m GROUP BY 1, 2, 3 WITH NO DATA",
        "CREATE INDEX telemetry_rollup_1h_metric_bucket ON telemetry_rollup_1h (metric_id, bucket)",
        "SELECT add_continuous_aggregate_policy('telemetry_rollup_1h', "
        f"start_offset => INTERVAL '{ROLLUP_1H_REFRESH_START}', end_offset => INTERVAL '1 hour', "
        "schedule_interval => INTERVAL '30 minutes')",
        f"SELECT add_retention_policy('telemetry_point', INTERVAL '{int(raw_retention_days)} days')",
        f"SELECT add_retention_policy('telemetry_rollup_1m', INTERVAL '{int(rollup_1m_retention_days)} days')",
        f"SELECT add_retention_policy('telemetry_rollup_1h', INTERVAL '{int(rollup_1h_retention_days)} days')",
    ]


def teardown_sql() -> list[str]:
    return [
        "DROP MATERIALIZED VIEW IF EXISTS telemetry_rollup_1h",
        "DROP MATERIALIZED VIEW IF EXISTS telemetry_rollup_1m",
        "DROP TABLE IF EXISTS telemetry_point",
    ]


def chunks_sql() -> str:
    """One row per chunk: name, range start, range end, compressed?"""
    return (
        "SELECT chunk_name, range_start, range_end, is_compressed FROM timescaledb_information.chunks "
        "WHERE hypertable_name = 'telemetry_point' ORDER BY range_start"
    )


def jobs_sql() -> str:
    return (
        "SELECT j.proc_name, j.hypertable_name, s.last_run_status, s.last_successful_finish, s.next_start "
        "FROM timescaledb_information.jobs j LEFT JOIN timescaledb_information.job_stats s USING (job_id) "
        "WHERE j.hypertable_name IN ('telemetry_point', 'telemetry_rollup_1m', 'telemetry_rollup_1h') "
        "ORDER BY j.job_id"
    )


def watermark_sql(view: str = "telemetry_rollup_1m") -> str:
    """The continuous aggregate's materialization watermark (TimescaleDB >= 2.12 function names)."""
    if view not in ("telemetry_rollup_1m", "telemetry_rollup_1h"):
        raise ValueError(f"not a telemetry continuous aggregate: {view!r}")
    return (
        "SELECT _timescaledb_functions.to_timestamp(_timescaledb_functions.cagg_watermark(mat_hypertable_id)) "  # noqa: S608 -- view is a constant
        f"FROM _timescaledb_catalog.continuous_agg WHERE user_view_name = '{view}'"
    )
