"""Latest value per series on the (device, metric) catalog, and the fleet-level hourly rollup.

Backfills both from existing data: each series' newest raw point, and the fleet rollup for the
last TELEMETRY_FLEET_MAX_SPAN_DAYS of 1-hour rollups (older fleet queries read the per-device
rollups; see selectors.fleet_aggregate). See docs/telemetry.md.
"""

import datetime as dt

from django.db import migrations, models

BACKFILL_LATEST = """
    UPDATE telemetry_devicemetric dm SET last_time = p.time, last_value = p.value
    FROM telemetry_devicemetric k CROSS JOIN LATERAL (
        SELECT time, value FROM telemetry_point WHERE device_id = k.device_id AND metric_id = k.metric_id
        ORDER BY time DESC, value DESC LIMIT 1) AS p
    WHERE dm.device_id = k.device_id AND dm.metric_id = k.metric_id
"""


def forwards(apps, schema_editor):
    from telemetry import conf, rollups

    with schema_editor.connection.cursor() as cursor:
        cursor.execute("ALTER TABLE telemetry_devicemetric SET (fillfactor = 70)")
        cursor.execute(BACKFILL_LATEST)
        for sql in rollups.FLEET_SETUP_SQL:
            cursor.execute(sql)
        cursor.execute("SELECT now(), min(bucket), max(bucket) FROM telemetry_rollup_1h")
        now, oldest, newest = cursor.fetchone()
        since = dt.datetime(2000, 1, 1, tzinfo=dt.UTC)
        if oldest is not None:
            since = max(oldest, rollups.floor_hour(now - dt.timedelta(days=conf.get("FLEET_MAX_SPAN_DAYS"))))
            hours = rollups._hours(since, newest + dt.timedelta(hours=1))
            for lo in range(0, len(hours), 24):
                rollups.refresh_fleet(cursor, hours[lo:lo + 24])
        cursor.execute(
            "INSERT INTO telemetry_rollupstate (name, watermark, updated_at) VALUES (%s, %s, now()) "
            "ON CONFLICT (name) DO UPDATE SET watermark = EXCLUDED.watermark, updated_at = now()",
            [rollups.FLEET_SINCE_STATE, since],
        )


def backwards(apps, schema_editor):
    from telemetry import rollups

    with schema_editor.connection.cursor() as cursor:
        for sql in rollups.FLEET_TEARDOWN_SQL:
            cursor.execute(sql)
        cursor.execute("DELETE FROM telemetry_rollupstate WHERE name = %s", [rollups.FLEET_SINCE_STATE])
        cursor.execute("ALTER TABLE telemetry_devicemetric RESET (fillfactor)")


class Migration(migrations.Migration):

    dependencies = [
        ('fleet', '0004_presence_history'),
        ('telemetry', '0002_storage'),
    ]

    operations = [
        migrations.AddField(
            model_name='devicemetric',
            name='last_time',
            field=models.DateTimeField(blank=True, null=True),
        ),
        migrations.AddField(
            model_name='devicemetric',
            name='last_value',
            field=models.FloatField(blank=True, null=True),
        ),
        migrations.AddIndex(
            model_name='devicemetric',
            index=models.Index(fields=['metric', 'device'], name='telemetry_dm_metric_device'),
        ),
        migrations.RunPython(forwards, backwards),
    ]
