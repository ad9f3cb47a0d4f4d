"""/healthz (are PostgreSQL and Redis reachable?) and /metrics (Prometheus text format)."""

from __future__ import annotations

import time

from django.conf import settings
from django.db import connection
from django.http import HttpRequest, HttpResponse, JsonResponse
from django.views.decorators.cache import never_cache
from prometheus_client import CONTENT_TYPE_LATEST, REGISTRY, generate_latest
from prometheus_client.core import GaugeMetricFamily
from redis import Redis
from redis.exceptions import RedisError


def _check_db() -> str | None:
    try:
        with connection.cursor() as cursor:
            cursor.execute("SELECT 1")
        return None
    except Exception as exc:  # noqa: BLE001 -- any failure means "not healthy"; report it
        return f"{type(exc).__name__}: {exc}"


def _check_redis() -> str | None:
    try:
        Redis.from_url(settings.REDIS_URL, socket_timeout=2, socket_connect_timeout=2).ping()
        return None
    except RedisError as exc:
        return f"{type(exc).__name__}: {exc}"


@never_cache
def healthz(request: HttpRequest) -> JsonResponse:
    started = time.monotonic()
    checks = {"database": _check_db(), "redis": _check_redis()}
    ok = all(v is None for v in checks.values())
    body = {
        "status": "ok" if ok else "unhealthy",
        "checks": {k: ("ok" if v is None else v) for k, v in checks.items()},
        "elapsed_ms": round((time.monotonic() - started) * 1000, 1),
    }
    return JsonResponse(body, status=200 if ok else 503)


class FleetCollector:
    """Inventory gauges computed at scrape time with one grouped query."""

    def collect(self):
        from fleet.models import Device

        devices = GaugeMetricFamily("fleet_devices", "Devices by status and presence", labels=["status", "online"])
        tiers = GaugeMetricFamily("fleet_devices_by_tier", "Devices by capability tier", labels=["tier"])
        try:
            from django.db.models import Count

            for row in Device.objects.values("status", "online").annotate(n=Count("id")).order_by():
                devices.add_metric([row["status"], str(row["online"]).lower()], row["n"])
            for row in Device.objects.values("tier").annotate(n=Count("id")).order_by():
                tiers.add_metric([str(row["tier"])], row["n"])
        except Exception:  # noqa: BLE001 -- a scrape must not fail because the DB is down
            return
        yield devices
        yield tiers


_collector_registered = False


@never_cache
def metrics(request: HttpRequest) -> HttpResponse:
    global _collector_registered
    if not _collector_registered:
        REGISTRY.register(FleetCollector())
        _collector_registered = True
    return HttpResponse(generate_latest(REGISTRY), content_type=CONTENT_TYPE_LATEST)
