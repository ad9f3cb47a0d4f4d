"""Telemetry API routes (series, latest values, fleet aggregates, alerts)."""

urlpatterns: list = []
