"""Reads of telemetry used by the API, the dashboard, alerts and rollouts' telemetry gate.

Resolution rule (docs/telemetry.md): a series has at most TELEMETRY_MAX_SERIES_POINTS
(~2,000) points. `bucket=auto` picks step = ceil(span / 2000) seconds and reads
  raw points       when the range is at most TELEMETRY_RAW_MAX_SPAN_S (6 h) and step < 60 s,
  1-minute rollups when step < 3600 s (step rounded up to whole minutes),
  1-hour rollups   otherwise (step rounded up to whole hours),
re-bucketing the source to the step with date_bin. Rollup reads add the not-yet-rolled-up tail
(after the rollup watermark) from raw data for the requested devices only. p95 needs raw points
and so is limited to TELEMETRY_P95_MAX_SPAN_S and explicit devices. Selector (fleet) queries
never read raw data beyond that tail, and are capped at TELEMETRY_MAX_SERIES_PER_REQUEST series.
"""

from __future__ import annotations

import datetime as dt
import math
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import psycopg
from django.db import connection

from fleet.errors import InvalidInput
from telemetry import conf, storage
from telemetry.models import Metric, RollupState

AGGS = ("avg", "min", "max", "last", "count", "p95")
ORIGIN = dt.datetime(2000, 1, 1, tzinfo=dt.UTC)

_LAST_RAW = "(max(ARRAY[extract(epoch FROM time)::float8, value]))[2]"
_RAW_AGG = {
    "avg": "avg(value)", "min": "min(value)", "max": "max(value)", "count": "count(*)::float8",
    "last": _LAST_RAW, "p95": "percentile_cont(0.95) WITHIN GROUP (ORDER BY value)", "sum": "sum(value)",
}
_ROLLUP_AGG = {
    "avg": "sum(sum) / nullif(sum(count), 0)", "min": "min(min)", "max": "max(max)", "count": "sum(count)::float8",
    "last": "(max(ARRAY[extract(epoch FROM last_time)::float8, last]))[2]", "sum": "sum(sum)",
}
# One rollup row's value, when a bucket is exactly one rollup row (`_ROLLUP_AGG` over that row alone).
_ROW_VALUE = {
    "avg": "sum / nullif(count, 0)", "min": "min", "max": "max", "count": "count::float8", "last": "last", "sum": "sum",
}
_TO_ROLLUP_ROWS = (
    "count(*) AS count, sum(value) AS sum, min(value) AS min, max(value) AS max, "
    f"{_LAST_RAW} AS last, max(time) AS last_time"
)


@dataclass(frozen=True)
class Resolution:
    source: str  # "raw", "1m" or "1h"
    step_s: int | None  # None: raw points, not bucketed


def metric_ids(names: Iterable[str]) -> dict[str, int]:
    names = list(dict.fromkeys(names))
    found = dict(Metric.objects.filter(name__in=names).values_list("name", "id"))
    unknown = [n for n in names if n not in found]
    if unknown:
        raise InvalidInput(f"no device has reported metric {', '.join(map(repr, unknown))}", code="unknown_metric")
    return found


def rollup_watermark() -> dt.datetime | None:
    """Rollups are complete before this time; None on TimescaleDB (real-time aggregates)."""
    if storage.backend() != "postgres":
        return None
    return RollupState.objects.filter(name="rollup").values_list("watermark", flat=True).first() or ORIGIN


def resolve(*, start: dt.datetime, end: dt.datetime, bucket: str = "auto", agg: str = "avg",
            fleet: bool = False) -> Resolution:
    """Pick the data source and step for a query (the rule in the module docstring)."""
    if agg not in AGGS:
        raise InvalidInput(f"agg must be one of {', '.join(AGGS)}, not {agg!r}")
    if end <= start:
        raise InvalidInput("end must be after start")
    span = (end - start).total_seconds()
    max_points = conf.get("MAX_SERIES_POINTS")
    p95_span = conf.get("P95_MAX_SPAN_S")
    if agg == "p95" or bucket == "raw":
        what = "p95" if agg == "p95" else "bucket=raw"
        if fleet:
            raise InvalidInput(f"{what} reads raw points: name the devices (device=…) instead of a selector")
        if span > p95_span:
            raise InvalidInput(f"{what} reads raw points: use a range of at most {p95_span // 3600} hours")
    if bucket == "raw":
        return Resolution("raw", None)
    if bucket == "auto":
        step = max(1, math.ceil(span / max_points))
        if agg == "p95":
            return Resolution("raw", step)
        if step < 60 and not fleet and span <= conf.get("RAW_MAX_SPAN_S"):
            return Resolution("raw", step)
        if step < 3600:
            return Resolution("1m", 60 * math.ceil(step / 60))
        return Resolution("1h", 3600 * math.ceil(step / 3600))
    step = parse_bucket(bucket)
    if span / step > conf.get("MAX_RAW_POINTS"):
        raise InvalidInput(f"bucket {bucket} gives {math.ceil(span / step):,} points per series; "
                           f"at most {conf.get('MAX_RAW_POINTS'):,}: use a larger bucket or bucket=auto")
    if agg == "p95":
        return Resolution("raw", step)
    if step % 3600 == 0:
        return Resolution("1h", step)
    if step % 60 == 0:
        return Resolution("1m", step)
    if fleet:
        raise InvalidInput("a selector query reads rollups: use a bucket that is a whole number of minutes")
    return Resolution("raw", step)


def parse_bucket(bucket: str) -> int:
    units = {"s": 1, "m": 60, "h": 3600, "d": 86400}
    try:
        value, unit = int(bucket[:-1]), units[bucket[-1]]
    except (ValueError, KeyError, IndexError):
        raise InvalidInput(f"bucket must be auto, raw, or a duration like 30s, 1m, 5m, 1h; not {bucket!r}") from None
    if value <= 0:
        raise InvalidInput("bucket must be positive")
    if value * unit > 366 * 86400:
        raise InvalidInput(f"bucket {bucket[:40]!r} is longer than a year")
    return value * unit


# The rollup watermark, read inside the chart's statement (one round trip fewer than reading it
# first: under CPU contention every round trip waits for the server process to be scheduled).
# Truncated to the minute so the rollup rows and the raw tail never share a minute (the product's
# watermarks are whole minutes already). No row yet: ORIGIN, as `rollup_watermark`.
_WATERMARK_SQL = ("date_trunc('minute', coalesce((SELECT watermark FROM telemetry_rollupstate WHERE name = 'rollup'), "
                  "%(origin)s))")


def _rollup_rows_sql(source: str, start: dt.datetime, end: dt.datetime, params: dict) -> str:
    """Rows shaped like a rollup table for [start, end): rollup rows before the watermark, plus
    the raw tail after it aggregated per minute (for the requested devices only); each minute of
    a series is one row (1-minute source). The watermark is read by the statement itself; the
    raw tail starts at the latest of the watermark, `start` and `end - TELEMETRY_RAW_TAIL_MAX_S`
    (the last two as constants, for partition pruning at planning)."""
    table = "telemetry_rollup_1m" if source == "1m" else "telemetry_rollup_1h"
    floor = start.replace(second=0, microsecond=0) if source == "1m" else start.replace(minute=0, second=0,
                                                                                      microsecond=0)
    params.update(floor=floor, start=start, end=end, origin=ORIGIN)
    if storage.backend() != "postgres":  # TimescaleDB: real-time continuous aggregates include the tail
        return (f"SELECT bucket, device_id, metric_id, count, sum, min, max, last, last_time FROM {table} "  # noqa: S608 -- constant table name
                "WHERE device_id = ANY(%(devices)s) AND metric_id = ANY(%(metrics)s) "
                "AND bucket >= %(floor)s AND bucket < %(end)s")
    params["tail_floor"] = max(start, end - dt.timedelta(seconds=conf.get("RAW_TAIL_MAX_S")))
    return (
        f"SELECT bucket, device_id, metric_id, count, sum, min, max, last, last_time FROM {table} "  # noqa: S608 -- constant table name
        "WHERE device_id = ANY(%(devices)s) AND metric_id = ANY(%(metrics)s) "
        f"AND bucket >= %(floor)s AND bucket < %(end)s AND bucket < {_WATERMARK_SQL} "
        "UNION ALL "
        f"SELECT date_trunc('minute', time) AS bucket, device_id, metric_id, {_TO_ROLLUP_ROWS} FROM telemetry_point "
        "WHERE device_id = ANY(%(devices)s) AND metric_id = ANY(%(metrics)s) "
        f"AND time >= %(tail_floor)s AND time >= {_WATERMARK_SQL} AND time < %(end)s GROUP BY 1, 2, 3"
    )


def series(*, device_ids: list[int], metric_ids: list[int], start: dt.datetime, end: dt.datetime,
           agg: str = "avg", bucket: str = "auto", fleet: bool = False) -> dict[str, Any]:
    """Time series per (device, metric): {"resolution": Resolution, "series": {(d, m): [(time, value)]},
    "truncated": bool}.

    One statement whatever the source (the rollup watermark is read inside it). At 1-minute
    buckets over the 1-minute rollups (the device chart) each point is one rollup row, so nothing
    is re-bucketed: at 50M raw rows that halved the server's CPU per 24 h chart (~4.7 → ~2.4 ms)
    and, with the watermark query gone, the client's (~3.1 → ~1.9 ms)."""
    if len(device_ids) * len(metric_ids) > conf.get("MAX_SERIES_PER_REQUEST"):
        raise InvalidInput(f"{len(device_ids) * len(metric_ids)} series requested; at most "
                           f"{conf.get('MAX_SERIES_PER_REQUEST')} per request: narrow the devices or metrics")
    res = resolve(start=start, end=end, bucket=bucket, agg=agg, fleet=fleet)
    params: dict[str, Any] = {"devices": list(device_ids), "metrics": list(metric_ids), "start": start, "end": end,
                              "origin": ORIGIN}
    truncated = False
    if res.step_s is None:
        limit = conf.get("MAX_RAW_POINTS") * max(1, len(device_ids) * len(metric_ids))
        params["limit"] = limit + 1
        sql = ("SELECT device_id, metric_id, time, value FROM telemetry_point WHERE device_id = ANY(%(devices)s) "
               "AND metric_id = ANY(%(metrics)s) AND time >= %(start)s AND time < %(end)s "
               "ORDER BY device_id, metric_id, time LIMIT %(limit)s")
    elif res.source == "raw":
        params["step"] = dt.timedelta(seconds=res.step_s)
        sql = (f"SELECT device_id, metric_id, date_bin(%(step)s, time, %(origin)s) AS b, {_RAW_AGG[agg]} "  # noqa: S608 -- agg from a fixed table
               "FROM telemetry_point WHERE device_id = ANY(%(devices)s) AND metric_id = ANY(%(metrics)s) "
               "AND time >= %(start)s AND time < %(end)s GROUP BY 1, 2, 3 ORDER BY 1, 2, 3")
    elif res.source == "1m" and res.step_s == 60:  # the device chart: one rollup row per point, nothing to re-bucket
        rows = _rollup_rows_sql(res.source, start, end, params)
        sql = f"SELECT device_id, metric_id, bucket, {_ROW_VALUE[agg]} FROM ({rows}) AS r ORDER BY 1, 2, 3"  # noqa: S608 -- agg from a fixed table
    else:
        params["step"] = dt.timedelta(seconds=res.step_s)
        rows = _rollup_rows_sql(res.source, start, end, params)
        sql = (f"SELECT device_id, metric_id, date_bin(%(step)s, bucket, %(origin)s) AS b, {_ROLLUP_AGG[agg]} "  # noqa: S608 -- agg from a fixed table
               f"FROM ({rows}) AS r GROUP BY 1, 2, 3 ORDER BY 1, 2, 3")
    with _binary_cursor() as cursor:  # up to 10,000 timestamps per series: decoded in C (see `latest`)
        cursor.execute(sql, params)
        rows_out = cursor.fetchall()
    if res.step_s is None and len(rows_out) > params["limit"] - 1:
        rows_out, truncated = rows_out[:-1], True
    out: dict[tuple[int, int], list[tuple[dt.datetime, float | None]]] = {
        (d, m): [] for d in device_ids for m in metric_ids
    }
    for device_id, metric_id, when, value in rows_out:
        out[(device_id, metric_id)].append((when, value))
    return {"resolution": res, "series": out, "truncated": truncated}


def latest(*, metric_id: int, device_ids: list[int], window_s: int | None = None) -> dict[int, tuple[dt.datetime, float]]:
    """The latest value of one metric per device, within the last `window_s` seconds.

    Read from the (device, metric) catalog `telemetry_devicemetric`, whose `last_time`/`last_value`
    the ingest flusher keeps (at most TELEMETRY_LATEST_FLUSH_MS behind the stored points): one
    indexed query over one row per device, whatever the number of devices or the data volume.

    For the whole fleet (10,000 devices) the time went to the client, not the index: parsing
    10,000 timestamps through Django's Python timestamptz loader and quoting the id list into the
    SQL text. So the query runs on a binary cursor (`_binary_cursor`), and the ids are sent
    compactly: a dense id set (as a fleet or a page of it: max - min < 2 × count) as its id range,
    the rows read (at most two per device asked for) filtered here; a sparse one as one text array
    literal joined on unnest (a hash join; `device_id = ANY(array)` alone spent ~30-100 ms planning
    10,000 ids in per-element selectivity estimates).

    The rows come back as one row of three arrays (ids, times, values) rather than one row per
    device: psycopg decodes each array in one C call and the dict is zipped from them, without
    10,000 row tuples built and unpacked again (client CPU per call for 10,000 devices at 50M rows,
    on a loaded machine: 11.4 → 7.4 ms; the server's grows by ~0.5 ms). The window's cutoff is
    computed once (an InitPlan), not per row. A selection that is exactly its id range (a whole
    fleet without gaps) needs no filtering here."""
    window_s = window_s or conf.get("LATEST_WINDOW_S")
    wanted = list(dict.fromkeys(device_ids))
    if not wanted:
        return {}
    lo, hi = min(wanted), max(wanted)
    columns = ("SELECT array_agg(dm.device_id), array_agg(dm.last_time), array_agg(dm.last_value) "
               "FROM telemetry_devicemetric dm")
    recent = "dm.metric_id = %s AND dm.last_time >= (SELECT now() - %s * interval '1 second')"
    with _binary_cursor() as cursor:
        if hi - lo < 2 * len(wanted):
            cursor.execute(f"{columns} WHERE {recent} AND dm.device_id BETWEEN %s AND %s", [metric_id, window_s, lo, hi])
            ids, times, values = cursor.fetchone()
            if ids is None:
                return {}
            if hi - lo + 1 == len(wanted):  # every id of the range was asked for
                return dict(zip(ids, zip(times, values, strict=True), strict=True))
            keep = set(wanted)
            return {device: tv for device, tv in zip(ids, zip(times, values, strict=True), strict=True) if device in keep}
        cursor.execute(f"{columns} JOIN unnest(%s::text::bigint[]) AS d(id) ON d.id = dm.device_id WHERE {recent}",
                       ["{" + ",".join(map(str, wanted)) + "}", metric_id, window_s])
        ids, times, values = cursor.fetchone()
        return {} if ids is None else dict(zip(ids, zip(times, values, strict=True), strict=True))


def _binary_cursor() -> Any:
    """A Django cursor (query logging, execute wrappers and error wrapping as usual) over a psycopg
    cursor with server-side parameters and binary results: numbers and timestamps are decoded by
    psycopg's C loaders (timestamps aware, in the connection's time zone, UTC) instead of being
    parsed from text, and list parameters travel as binary arrays instead of quoted SQL literals.
    For reads returning thousands of rows; placeholders as psycopg takes them (%s or %(name)s)."""
    connection.ensure_connection()
    with connection.wrap_database_errors:
        raw = psycopg.Cursor(connection.connection)
        raw.format = psycopg.pq.Format.BINARY
        return connection._prepare_cursor(raw)  # what connection.cursor() does with its own cursor


FLEET_GROUPINGS = {
    "site": ("coalesce(s.slug, '')", "JOIN fleet_device d ON d.id = r.device_id LEFT JOIN fleet_site s ON s.id = d.site_id"),
    "tier": ("d.tier::text", "JOIN fleet_device d ON d.id = r.device_id"),
    "group": ("g.slug", "JOIN fleet_devicegroup_devices gd ON gd.device_id = r.device_id "
                        "JOIN fleet_devicegroup g ON g.id = gd.devicegroup_id"),
}


FLEET_HOURLY_OVER = dt.timedelta(hours=6)


def fleet_aggregate(*, metric_id: int, by: str, start: dt.datetime, end: dt.datetime, agg: str = "avg",
                    device_ids: list[int] | None = None) -> list[dict[str, Any]]:
    """One value per site, tier or group over [start, end), from rollups only (1 h rollups for
    ranges over FLEET_HOURLY_OVER, i.e. whole hours from the first hour that starts at or after
    `start`). Optionally restricted to some devices.

    The 1-minute rollups hold devices × minutes rows: the default 24 h for 10,000 devices is
    14.4M rows, 30-40 s at 50M raw rows, where the hourly ones take well under a second.

    Over FLEET_HOURLY_OVER for the whole fleet (no `device_ids`) on the plain backend, the answer comes from
    the fleet-level hourly rollup (`rollups.FLEET_TABLE`, a few rows per hour and key, whatever
    the number of devices); there `devices` is the most devices that reported in any one hour of
    the range (distinct devices over the whole range are not kept). Otherwise from the per-device
    rollups, `devices` being the distinct devices that reported in the range."""
    if by not in FLEET_GROUPINGS:
        raise InvalidInput(f"by must be one of {', '.join(FLEET_GROUPINGS)}, not {by!r}")
    if agg not in _ROLLUP_AGG or agg == "sum":
        raise InvalidInput("fleet aggregates support agg avg, min, max, last or count (p95 needs raw points)")
    if end <= start:
        raise InvalidInput("end must be after start")
    if end - start > dt.timedelta(days=conf.get("FLEET_MAX_SPAN_DAYS")):
        raise InvalidInput(f"fleet aggregates cover at most {conf.get('FLEET_MAX_SPAN_DAYS')} days")
    table = "telemetry_rollup_1h" if end - start > FLEET_HOURLY_OVER else "telemetry_rollup_1m"
    if table == "telemetry_rollup_1h" and device_ids is None and _fleet_rollup_covers(start):
        return _fleet_rollup_aggregate(metric_id=metric_id, by=by, start=start, end=end, agg=agg)
    key, joins = FLEET_GROUPINGS[by]
    params: dict[str, Any] = {"metric": metric_id, "start": start, "end": end, "devices": device_ids}
    device_filter = "AND r.device_id = ANY(%(devices)s)" if device_ids is not None else ""
    sql = (f"SELECT {key} AS k, {_ROLLUP_AGG[agg]}, count(DISTINCT r.device_id), sum(r.count) "  # noqa: S608 -- fixed fragments
           f"FROM {table} r {joins} WHERE r.metric_id = %(metric)s AND r.bucket >= %(start)s AND r.bucket < %(end)s "
           f"{device_filter} GROUP BY 1 ORDER BY 1")
    with connection.cursor() as cursor:
        cursor.execute(sql, params)
        return [{"key": k, "value": v, "devices": n, "samples": int(c or 0)} for k, v, n, c in cursor.fetchall()]


def _fleet_rollup_covers(start: dt.datetime) -> bool:
    """Plain backend, and the fleet rollup holds every hour from `start` (see migration 0003)."""
    from telemetry.rollups import FLEET_SINCE_STATE

    if storage.backend() != "postgres":
        return False
    since = RollupState.objects.filter(name=FLEET_SINCE_STATE).values_list("watermark", flat=True).first()
    return since is None or start >= since


def _fleet_rollup_aggregate(*, metric_id: int, by: str, start: dt.datetime, end: dt.datetime,
                            agg: str) -> list[dict[str, Any]]:
    from telemetry.rollups import FLEET_TABLE

    sql = (f"SELECT key, {_ROLLUP_AGG[agg]}, max(devices), sum(count) FROM {FLEET_TABLE} "  # noqa: S608 -- fixed fragments
           "WHERE metric_id = %s AND dim = %s AND bucket >= %s AND bucket < %s GROUP BY 1 ORDER BY 1")
    with connection.cursor() as cursor:
        cursor.execute(sql, [metric_id, by, start, end])
        return [{"key": k, "value": v, "devices": n, "samples": int(c or 0)} for k, v, n, c in cursor.fetchall()]


@dataclass(frozen=True)
class WaveMetric:
    value: float | None  # None when the devices reported nothing in the range
    samples: int  # raw points behind the value
    devices: int  # devices that reported


def wave_metric(*, device_ids: Iterable[int], metric: str, start: dt.datetime, end: dt.datetime,
                agg: str = "avg") -> WaveMetric:
    """One number for a set of devices (e.g. a rollout wave, or the untouched devices) over a
    range: avg, min, max, count or sum of `metric`, from 1-minute rollups plus the raw tail after
    the rollup watermark. Cost is bounded by devices × minutes, never the fleet's raw data."""
    if agg not in ("avg", "min", "max", "count", "sum"):
        raise ValueError("wave_metric agg must be avg, min, max, count or sum")
    device_ids = list(device_ids)
    found = Metric.objects.filter(name=metric).values_list("id", flat=True).first()
    if found is None or not device_ids or end <= start:
        return WaveMetric(None, 0, 0)
    params: dict[str, Any] = {"devices": device_ids, "metrics": [found]}
    rows = _rollup_rows_sql("1m", start, end, params)
    with connection.cursor() as cursor:
        cursor.execute(f"SELECT {_ROLLUP_AGG[agg]}, sum(count), count(DISTINCT device_id) FROM ({rows}) AS r", params)  # noqa: S608 -- fixed fragments
        value, samples, devices = cursor.fetchone()
    return WaveMetric(None if samples is None else value, int(samples or 0), int(devices or 0))
