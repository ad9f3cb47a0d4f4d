"""`manage.py telemetry_status`: backend, partitions or chunks, row estimates, rollup watermark."""

from __future__ import annotations

from typing import Any

from django.core.management.base import BaseCommand
from django.db import connection

from telemetry import storage, timescale
from telemetry.models import Metric, RollupState


class Command(BaseCommand):
    help = "Show the telemetry store: backend, partitions/chunks, row estimates, rollup watermark."

    def handle(self, *args: Any, **options: Any) -> None:
        backend = storage.backend()
        self.stdout.write(f"backend: {backend}")
        self.stdout.write(f"metrics in catalog: {Metric.objects.count()}")
        with connection.cursor() as cursor:
            if backend == "postgres":
                parts = storage.partitions()
                total = sum(p["rows_estimate"] for p in parts)
                self.stdout.write(f"partitions: {len(parts)} (raw rows ≈ {total:,})")
                for p in parts:
                    self.stdout.write(f"  {p['name']}  rows≈{p['rows_estimate']:,}  {p['bytes'] / 1e6:,.1f} MB")
                state = RollupState.objects.filter(name="rollup").first()
                self.stdout.write(f"rollup watermark: {state.watermark.isoformat() if state else 'never refreshed'}")
                cursor.execute("SELECT count(*) FROM telemetry_late")
                self.stdout.write(f"late hours waiting for re-aggregation: {cursor.fetchone()[0]}")
            else:
                cursor.execute(timescale.chunks_sql())
                chunks = cursor.fetchall()
                self.stdout.write(f"chunks: {len(chunks)}")
                for name, start, end, compressed in chunks:
                    self.stdout.write(f"  {name}  {start:%Y-%m-%d %H:%M} → {end:%Y-%m-%d %H:%M}"
                                      f"{'  compressed' if compressed else ''}")
                cursor.execute(timescale.watermark_sql())
                row = cursor.fetchone()
                self.stdout.write(f"rollup watermark (1 min aggregate): {row[0].isoformat() if row else 'unknown'}")
                cursor.execute(timescale.jobs_sql())
                for proc, table, status, finished, next_start in cursor.fetchall():
                    self.stdout.write(f"  job {proc} on {table}: {status or 'not run'}, last ok {finished}, "
                                      f"next {next_start}")
            for table in ("telemetry_point", "telemetry_rollup_1m", "telemetry_rollup_1h"):
                cursor.execute(
                    "SELECT coalesce(sum(c.reltuples) FILTER (WHERE c.reltuples > 0), 0)::bigint FROM pg_class c "
                    "WHERE c.oid = %s::regclass "
                    "OR c.oid IN (SELECT inhrelid FROM pg_inherits WHERE inhparent = %s::regclass)",
                    [table, table],
                )
                self.stdout.write(f"{table}: rows ≈ {cursor.fetchone()[0]:,}")
