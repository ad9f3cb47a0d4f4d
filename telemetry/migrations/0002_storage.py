"""Time-series tables: TimescaleDB hypertable or native daily partitions, chosen now.

See telemetry/storage.py and docs/telemetry.md. The choice is made once; switching backends
later means migrating data, not re-running this.
"""

from django.db import migrations


def forwards(apps, schema_editor):
    from telemetry import storage

    storage.create_storage(schema_editor.connection)


def backwards(apps, schema_editor):
    from telemetry import storage

    storage.drop_storage(schema_editor.connection)


class Migration(migrations.Migration):
    dependencies = [("telemetry", "0001_initial")]

    operations = [migrations.RunPython(forwards, backwards)]
