"""The telemetry app's fixtures for these tests too (the time-series tables are emptied explicitly)."""

from telemetry.tests.conftest import clean_series  # noqa: F401
