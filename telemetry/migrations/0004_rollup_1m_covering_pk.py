"""The 1-minute rollup's primary key covers the aggregate columns (plain PostgreSQL backend).

A device chart reads one series' 1-minute rows for 24 h: 1,440 rows, which the rollup job wrote
one minute at a time among every other series' rows, so each sits on its own heap page. At 50M
raw rows (10,000 devices, 2 metrics) that was ~1,420 heap pages per chart, mostly outside shared
buffers: 60 ms p50 / 153 ms p95 against a 50 ms target. With the aggregates in the key's leaf
pages (INCLUDE) the read is an index-only scan of ~30 pages. The table is insert-mostly, so
autovacuum is asked to run after 1 % new rows (instead of 20 %) to keep the visibility map set
(index-only scans fetch heap pages for rows not yet marked all-visible).

Rebuilding the key locks the table for the time of one index build (about two minutes for
~29M rows on two cores). TimescaleDB's rollups are continuous aggregates: nothing to do there.
See docs/telemetry.md.
"""

from django.db import migrations

COVERED = "count, sum, min, max, last, last_time"


def forwards(apps, schema_editor):
    from telemetry import timescale

    with schema_editor.connection.cursor() as cursor:
        if timescale.in_use(cursor):
            return
        cursor.execute("ALTER TABLE telemetry_rollup_1m DROP CONSTRAINT telemetry_rollup_1m_pkey")
        cursor.execute(f"ALTER TABLE telemetry_rollup_1m ADD PRIMARY KEY (device_id, metric_id, bucket) INCLUDE ({COVERED})")
        cursor.execute("ALTER TABLE telemetry_rollup_1m SET (autovacuum_vacuum_insert_scale_factor = 0.01)")


def backwards(apps, schema_editor):
    from telemetry import timescale

    with schema_editor.connection.cursor() as cursor:
        if timescale.in_use(cursor):
            return
        cursor.execute("ALTER TABLE telemetry_rollup_1m RESET (autovacuum_vacuum_insert_scale_factor)")
        cursor.execute("ALTER TABLE telemetry_rollup_1m DROP CONSTRAINT telemetry_rollup_1m_pkey")
        cursor.execute("ALTER TABLE telemetry_rollup_1m ADD PRIMARY KEY (device_id, metric_id, bucket)")


class Migration(migrations.Migration):

    dependencies = [
        ('telemetry', '0003_latest_and_fleet_rollup'),
    ]

    operations = [
        migrations.RunPython(forwards, backwards),
    ]
