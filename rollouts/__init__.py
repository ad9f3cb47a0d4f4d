"""OTA: signed artifacts, campaigns in waves with gates, per-device executions, rollback."""
