"""Time series: ingest, storage (TimescaleDB or partitioned PostgreSQL), rollups, queries, alerts."""
