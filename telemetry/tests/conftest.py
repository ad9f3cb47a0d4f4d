"""Fixtures for telemetry tests: the time-series tables are not Django models, so transactional
tests empty them explicitly."""

from __future__ import annotations

import pytest
from django.db import connection


@pytest.fixture
def clean_series(transactional_db):
    yield
    with connection.cursor() as cursor:
        cursor.execute("TRUNCATE telemetry_point, telemetry_rollup_1m, telemetry_rollup_1h, telemetry_late, "
                       "telemetry_rollup_fleet_1h")
