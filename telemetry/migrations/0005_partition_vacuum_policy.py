"""Daily partitions no longer trigger autovacuum on inserts; each is vacuumed once after its day.

The partition function creates new partitions with `autovacuum_vacuum_insert_threshold = -1`,
and the existing ones get it too; `telemetry.storage.vacuum_closed_partitions` (hourly, with the
partitions task) vacuums each closed partition once with FREEZE and ANALYZE. Nothing to do on
TimescaleDB (its chunks and their compression are the extension's). See telemetry/storage.py.
"""

from django.db import migrations

# The function's reloption clause, as written in telemetry.storage.ENSURE_PARTITION_FUNCTION.
NO_INSERT_VACUUM = " '\n        'WITH (autovacuum_vacuum_insert_threshold = -1)'"


def forwards(apps, schema_editor):
    from telemetry import storage, timescale

    with schema_editor.connection.cursor() as cursor:
        if timescale.in_use(cursor):
            return
        cursor.execute(storage.ENSURE_PARTITION_FUNCTION)
        for part in storage.partitions(schema_editor.connection):
            cursor.execute(f'ALTER TABLE "{part["name"]}" SET (autovacuum_vacuum_insert_threshold = -1)')


def backwards(apps, schema_editor):
    from telemetry import storage, timescale

    with schema_editor.connection.cursor() as cursor:
        if timescale.in_use(cursor):
            return
        cursor.execute(storage.ENSURE_PARTITION_FUNCTION.replace(NO_INSERT_VACUUM, "'"))
        for part in storage.partitions(schema_editor.connection):
            cursor.execute(f'ALTER TABLE "{part["name"]}" RESET (autovacuum_vacuum_insert_threshold)')


class Migration(migrations.Migration):
    dependencies = [("telemetry", "0004_rollup_1m_covering_pk")]
    operations = [migrations.RunPython(forwards, backwards)]
