"""Telemetry API: series (JSON, CSV), latest, fleet aggregates, readable 400s, alert rules and alerts."""

from __future__ import annotations

import datetime as dt

import pytest
from django.utils import timezone

from security.models import AuditEntry
from telemetry import rollups, selectors, services
from telemetry.models import Alert, RollupState
from telemetry.tests.helpers import insert_points
from tests.factories import make_device, make_site

pytestmark = pytest.mark.django_db


@pytest.fixture
def recent():
    now = timezone.now().replace(microsecond=0)
    device = make_device(uid="cam-1", site=make_site(slug="plant-7"))
    other = make_device(uid="cam-2", labels={"env": "lab"})
    rows = []
    for i in range(30):
        t = now - dt.timedelta(minutes=30) + dt.timedelta(minutes=i)
        rows += [(t, device.id, "cpu.temp", float(i)), (t, other.id, "cpu.temp", 100.0 + i)]
    insert_points(rows)
    return now, device, other


def test_a_viewer_reads_a_series_from_raw_points_for_a_short_range(viewer_api, recent):
    now, _, _ = recent
    start = (now - dt.timedelta(minutes=30)).isoformat()
    response = viewer_api.get("/api/v1/telemetry/series/", {"device": "cam-1", "metric": "cpu.temp", "start": start,
                                                           "end": now.isoformat(), "agg": "max"})
    assert response.status_code == 200, response.content
    body = response.json()
    assert body["source"] == "raw" and body["bucket_s"] == 1
    [series] = body["series"]
    assert series["device"] == "cam-1" and series["metric"] == "cpu.temp"
    assert [v for _, v in series["points"]] == [float(i) for i in range(30)]


def test_series_as_csv(viewer_api, recent):
    now, _, _ = recent
    response = viewer_api.get("/api/v1/telemetry/series/", {"device": ["cam-1", "cam-2"], "metric": "cpu.temp",
                                                           "start": (now - dt.timedelta(minutes=5)).isoformat(),
                                                           "end": now.isoformat(), "format": "csv"})
    assert response.status_code == 200
    assert response["Content-Type"].startswith("text/csv")
    lines = response.content.decode().splitlines()
    assert lines[0] == "device,metric,time,value"
    assert len(lines) == 1 + 2 * 5
    assert viewer_api.get("/api/v1/telemetry/series.csv", {"device": "cam-1", "metric": "cpu.temp"}).status_code == 200


def test_long_ranges_read_rollups_with_the_raw_tail(viewer_api, recent):
    now, _, _ = recent
    RollupState.objects.create(name="rollup", watermark=now - dt.timedelta(hours=2))
    rollups.refresh(now=now - dt.timedelta(minutes=10))  # rollups up to ~12 minutes ago, the rest is tail
    response = viewer_api.get("/api/v1/telemetry/series/", {"device": "cam-1", "metric": "cpu.temp", "agg": "count",
                                                           "start": (now - dt.timedelta(days=2)).isoformat(),
                                                           "end": now.isoformat()})
    body = response.json()
    assert body["source"] == "1m" and body["bucket_s"] == 120
    assert sum(v for _, v in body["series"][0]["points"]) == 30  # every point once: rollups + tail


def test_bad_parameters_are_400_with_a_readable_detail(viewer_api, recent):
    url = "/api/v1/telemetry/series/"
    cases = [
        ({"device": "cam-1", "metric": "cpu.temp", "agg": "median"}, "agg must be one of"),
        ({"device": "cam-1", "metric": "nope"}, "no device has reported metric 'nope'"),
        ({"device": "cam-1", "metric": "cpu.temp", "start": "yesterday"}, "not a time"),
        ({"device": "ghost", "metric": "cpu.temp"}, "unknown devices: ghost"),
        ({"metric": "cpu.temp"}, "give device="),
        ({"selector": "env=lab", "metric": "cpu.temp", "agg": "p95"}, "name the devices"),
        ({"device": "cam-1", "metric": "cpu.temp", "bucket": "7x"}, "bucket must be"),
        ({"selector": "env in (", "metric": "cpu.temp"}, "invalid selector"),
    ]
    for params, message in cases:
        response = viewer_api.get(url, params)
        assert response.status_code == 400, (params, response.content)
        assert message in response.json()["detail"], (params, response.json())


def test_selector_queries_are_capped(viewer_api, recent, settings):
    settings.TELEMETRY_MAX_SERIES_PER_REQUEST = 1
    response = viewer_api.get("/api/v1/telemetry/series/", {"selector": "", "metric": "cpu.temp"})
    assert response.status_code == 400
    assert "at most 1 series" in response.json()["detail"]


def test_latest_value_per_device(viewer_api, recent):
    response = viewer_api.get("/api/v1/telemetry/latest/", {"metric": "cpu.temp", "device": ["cam-1", "cam-2"]})
    assert response.status_code == 200
    assert [(r["device"], r["value"]) for r in response.json()["results"]] == [("cam-1", 29.0), ("cam-2", 129.0)]


def test_fleet_aggregate_by_site_from_rollups(viewer_api, recent):
    now, _, _ = recent
    RollupState.objects.create(name="rollup", watermark=now - dt.timedelta(hours=1))
    rollups.refresh(now=now + dt.timedelta(minutes=5))
    response = viewer_api.get("/api/v1/telemetry/fleet/", {"metric": "cpu.temp", "by": "site", "agg": "max",
                                                          "start": (now - dt.timedelta(hours=1)).isoformat(),
                                                          "end": now.isoformat()})
    assert response.status_code == 200, response.content
    assert {r["key"]: r["value"] for r in response.json()["results"]} == {"": 129.0, "plant-7": 29.0}


def test_wave_metric_compares_sets_of_devices(recent):
    now, device, other = recent
    wave = selectors.wave_metric(device_ids=[device.id], metric="cpu.temp", start=now - dt.timedelta(hours=1),
                                 end=now, agg="avg")
    rest = selectors.wave_metric(device_ids=[other.id], metric="cpu.temp", start=now - dt.timedelta(hours=1),
                                 end=now, agg="avg")
    assert (wave.value, wave.samples, wave.devices) == (14.5, 30, 1)
    assert rest.value == 114.5
    assert selectors.wave_metric(device_ids=[], metric="cpu.temp", start=now, end=now).value is None


def test_anonymous_and_outsiders_cannot_read(anon_api, outsider_api):
    assert anon_api.get("/api/v1/telemetry/series/").status_code == 401
    assert outsider_api.get("/api/v1/telemetry/series/").status_code == 403


def test_operators_manage_rules_and_acknowledge_alerts_viewers_cannot(operator_api, viewer_api, operator_user):
    body = {"name": "hot", "metric": "cpu.temp", "comparison": ">", "threshold": 80, "for_duration_s": 300,
            "scope": "selector", "selector": "env=lab"}
    assert viewer_api.post("/api/v1/telemetry/alert-rules/", body, format="json").status_code == 403
    response = operator_api.post("/api/v1/telemetry/alert-rules/", body, format="json")
    assert response.status_code == 201, response.content
    assert AuditEntry.objects.filter(action="alertrule.create").exists()
    bad = operator_api.post("/api/v1/telemetry/alert-rules/", {**body, "selector": "env in ("}, format="json")
    assert bad.status_code == 400

    device = make_device()
    from telemetry.models import AlertRule

    alert = services.alert_open(rule=AlertRule.objects.get(pk=response.json()["id"]), device_id=device.id, value=91.0)
    assert viewer_api.get("/api/v1/telemetry/alerts/", {"state": "open"}).json()["results"][0]["id"] == alert.id
    assert viewer_api.post(f"/api/v1/telemetry/alerts/{alert.id}/acknowledge/", {}).status_code == 403
    ack = operator_api.post(f"/api/v1/telemetry/alerts/{alert.id}/acknowledge/", {"note": "on it"}, format="json")
    assert ack.status_code == 200, ack.content
    assert ack.json()["state"] == "acknowledged"
    assert ack.json()["acknowledged_by"] == operator_user.username
    again = operator_api.post(f"/api/v1/telemetry/alerts/{alert.id}/acknowledge/", {}, format="json")
    assert again.status_code == 409
    assert Alert.objects.get().state == "acknowledged"
