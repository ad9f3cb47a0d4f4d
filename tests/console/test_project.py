"""Project-level checks: deploy settings, migrations, health and metrics, settings parsing."""

import os
import secrets
import subprocess
import sys
from pathlib import Path

import pytest
from django.core.exceptions import ImproperlyConfigured

from console import env

ROOT = Path(__file__).resolve().parents[2]


def _manage(*args: str, **extra_env: str) -> subprocess.CompletedProcess:
    environment = {**os.environ, **extra_env}
    return subprocess.run([sys.executable, "manage.py", *args], cwd=ROOT, env=environment,
                          capture_output=True, text=True, timeout=120)


def test_production_settings_pass_check_deploy():
    result = _manage("check", "--deploy", "--fail-level", "WARNING",
                     DJANGO_SETTINGS_MODULE="console.settings.production",
                     SECRET_KEY=secrets.token_urlsafe(64), ALLOWED_HOSTS="console.example.com")
    assert result.returncode == 0, result.stdout + result.stderr


def test_production_refuses_a_weak_secret_key():
    result = _manage("check", DJANGO_SETTINGS_MODULE="console.settings.production", SECRET_KEY="short")
    assert result.returncode != 0
    assert "SECRET_KEY must be at least 50" in result.stderr


def test_migrations_are_complete():
    result = _manage("makemigrations", "--check", "--dry-run")
    assert result.returncode == 0, result.stdout + result.stderr


def test_a_bad_boolean_stops_start_up_with_a_clear_message():
    result = _manage("check", DEBUG="maybe")
    assert result.returncode != 0
    assert "DEBUG='maybe' is not a boolean" in result.stderr


def test_env_parsers_are_strict(monkeypatch):
    monkeypatch.setenv("X_INT", "12a")
    with pytest.raises(ImproperlyConfigured, match="X_INT='12a' is not an integer"):
        env.env_int("X_INT")
    monkeypatch.setenv("X_URL", "mysql://h/db")
    with pytest.raises(ImproperlyConfigured, match="scheme postgres or postgresql"):
        env.env_url("X_URL", schemes=("postgres", "postgresql"))
    monkeypatch.setenv("X_LIST", "a,,b")
    with pytest.raises(ImproperlyConfigured, match="empty item"):
        env.env_list("X_LIST")
    monkeypatch.delenv("X_MISSING", raising=False)
    with pytest.raises(ImproperlyConfigured, match="X_MISSING is required"):
        env.env_str("X_MISSING")


@pytest.mark.django_db
def test_healthz_reports_database_and_redis(client):
    response = client.get("/healthz")
    assert response.status_code == 200
    assert response.json()["checks"] == {"database": "ok", "redis": "ok"}


@pytest.mark.django_db
def test_healthz_is_503_when_redis_is_unreachable(client, settings):
    settings.REDIS_URL = "redis://127.0.0.1:1/0"
    response = client.get("/healthz")
    assert response.status_code == 503
    assert response.json()["checks"]["redis"] != "ok"


@pytest.mark.django_db
def test_metrics_expose_fleet_gauges(client):
    from tests.factories import make_device

    make_device(status="active")
    body = client.get("/metrics").content.decode()
    assert 'fleet_devices{online="false",status="active"} 1.0' in body


def test_every_console_model_has_an_admin_page():
    from django.apps import apps
    from django.contrib import admin

    # Internal bookkeeping without a meaningful admin: a composite-key table, the rollup
    # watermark, and artifact variants (shown inline on their artifact).
    internal = {"telemetry.DeviceMetric", "telemetry.RollupState", "rollouts.ArtifactVariant"}
    missing = [m._meta.label for m in apps.get_models()
               if m._meta.app_label in ("fleet", "security", "telemetry", "rollouts")
               and m not in admin.site._registry and m._meta.label not in internal]
    assert missing == []


@pytest.mark.django_db
def test_admin_pages_load_for_an_admin(client, admin_user):
    from django.contrib import admin

    client.force_login(admin_user)
    for model in admin.site._registry:
        url = f"/admin/{model._meta.app_label}/{model._meta.model_name}/"
        assert client.get(url).status_code == 200, url
