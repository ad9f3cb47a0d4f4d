"""Telemetry knobs. Each reads `settings.TELEMETRY_<NAME>` with the default below; see docs/telemetry.md."""

from __future__ import annotations

from typing import Any

from django.conf import settings

DEFAULTS: dict[str, Any] = {
    # Storage backend: "auto" (TimescaleDB when `pg_available_extensions` has it), "timescale" or "postgres".
    "BACKEND": "auto",
    # Daily partitions (plain PostgreSQL) kept ready ahead of today.
    "PARTITION_DAYS_AHEAD": 7,
    # Retention: raw points (whole days), 1-minute and 1-hour rollups, device events.
    "RAW_RETENTION_DAYS": 30,
    "ROLLUP_1M_RETENTION_DAYS": 90,
    "ROLLUP_1H_RETENTION_DAYS": 730,
    "EVENT_RETENTION_DAYS": 90,
    # TimescaleDB only: compress chunks older than this (segment by device_id).
    "COMPRESS_AFTER_DAYS": 7,
    # Ingest flusher.
    "FLUSH_MAX_ROWS": 20_000,
    "FLUSH_INTERVAL_MS": 50,
    "QUEUE_MAX_ROWS": 200_000,
    # A frame that does not fit waits this long for room (its connection is not read
    # meanwhile), then the device is shed with 4503 `rate_limited`.
    "QUEUE_WAIT_MS": 3000,
    # Flush transactions in flight at once per process (each on its own connection).
    "FLUSH_CONNECTIONS": 2,
    "FLUSH_TIMEOUT_S": 15.0,
    "CONNECT_TIMEOUT_S": 3.0,
    "DOWN_BACKOFF_S": 2.0,
    "MAX_METRICS_PER_DEVICE": 200,
    # The flusher writes each series' newest committed point to telemetry_devicemetric at most
    # this often (one statement, after commit): how stale `selectors.latest` may be.
    "LATEST_FLUSH_MS": 2000,
    # Rollups: a 1-minute bucket is closed (and rolled up) once it ended this long ago; points
    # older than LATE_MARK_S when they arrive are marked so their hour is re-aggregated.
    "ROLLUP_CLOSE_LAG_S": 120,
    "LATE_MARK_S": 60,
    "ROLLUP_MAX_STEP_S": 3600,
    "ROLLUP_MAX_RUN_S": 50,
    "LATE_BATCH": 2000,
    # Queries.
    "MAX_SERIES_POINTS": 2000,
    "MAX_RAW_POINTS": 10_000,
    "RAW_MAX_SPAN_S": 6 * 3600,
    "MAX_SERIES_PER_REQUEST": 100,
    "P95_MAX_SPAN_S": 24 * 3600,
    "FLEET_MAX_SPAN_DAYS": 31,
    "LATEST_WINDOW_S": 24 * 3600,
    "LATEST_MAX_DEVICES": 1000,
    "RAW_TAIL_MAX_S": 3600,
    # Alerts.
    "WEBHOOK_TIMEOUT_S": 5.0,
    "WEBHOOK_MAX_RETRIES": 5,
}


def get(name: str) -> Any:
    default = DEFAULTS[name]
    value = getattr(settings, f"TELEMETRY_{name}", default)
    return _typed(f"TELEMETRY_{name}", value, default)


def _typed(setting: str, value: Any, default: Any) -> Any:
    if isinstance(default, bool) or value is None or default is None:
        return value
    if isinstance(default, (int, float)) and not isinstance(value, (int, float)):
        from django.core.exceptions import ImproperlyConfigured

        raise ImproperlyConfigured(f"{setting}={value!r} must be a number (default {default})")
    return type(default)(value) if isinstance(default, (int, float)) else value
