import pytest
from django.db import connection
from django.test.utils import CaptureQueriesContext

from fleet.models import Device, DeviceStatus
from security.models import AuditEntry
from tests.factories import make_device, make_site

pytestmark = pytest.mark.django_db


def test_anonymous_requests_get_401(anon_api):
    response = anon_api.get("/api/v1/devices/")
    assert response.status_code == 401
    assert response.json()["detail"]


def test_a_user_without_a_role_sees_nothing(outsider_api):
    assert outsider_api.get("/api/v1/devices/").status_code == 403


def test_viewer_can_read_but_not_write(viewer_api):
    device = make_device(status=DeviceStatus.PENDING)
    assert viewer_api.get("/api/v1/devices/").status_code == 200
    assert viewer_api.get(f"/api/v1/devices/{device.uid}/").status_code == 200
    assert viewer_api.post(f"/api/v1/devices/{device.uid}/approve/", {}).status_code == 403
    assert viewer_api.post(f"/api/v1/devices/{device.uid}/quarantine/", {"reason": "x"}).status_code == 403
    assert viewer_api.patch(f"/api/v1/devices/{device.uid}/", {"name": "x"}, format="json").status_code == 403
    assert viewer_api.post("/api/v1/sites/", {"name": "S", "slug": "s"}).status_code == 403
    device.refresh_from_db()
    assert device.status == DeviceStatus.PENDING


def test_operator_approves_a_pending_device_and_it_is_audited(operator_api, operator_user):
    device = make_device(status=DeviceStatus.PENDING)
    response = operator_api.post(f"/api/v1/devices/{device.uid}/approve/", {"reason": "checked serial"})
    assert response.status_code == 200, response.content
    assert response.json()["status"] == "active"
    entry = AuditEntry.objects.filter(action="device.approve").get()
    assert entry.actor == operator_user.username
    assert entry.data["reason"] == "checked serial"
    assert entry.source_ip == "127.0.0.1"


def test_approving_an_active_device_is_a_conflict_with_a_message(operator_api):
    device = make_device(status=DeviceStatus.ACTIVE)
    response = operator_api.post(f"/api/v1/devices/{device.uid}/approve/", {})
    assert response.status_code == 409
    assert "is active; cannot approve" in response.json()["detail"]


def test_quarantine_needs_a_reason(operator_api):
    device = make_device()
    response = operator_api.post(f"/api/v1/devices/{device.uid}/quarantine/", {})
    assert response.status_code == 400
    assert "reason" in response.json()["detail"]


def test_operator_registers_edits_and_pins_a_device(operator_api):
    site = make_site(slug="plant-7")
    response = operator_api.post("/api/v1/devices/", {
        "uid": "gw-001", "name": "Gateway 1", "site": site.slug, "labels": {"env": "prod"},
        "capabilities": {"ram_mb": 32768, "accelerator": "gpu", "cpu_cores": 8},
    }, format="json")
    assert response.status_code == 201, response.content
    assert response.json()["tier"] == 1
    response = operator_api.patch("/api/v1/devices/gw-001/", {"labels": {"env": "lab"}, "capabilities": {"ram_mb": 2048}},
                                  format="json")
    assert response.status_code == 200, response.content
    assert response.json()["labels"] == {"env": "lab"}
    assert response.json()["tier"] == 3
    response = operator_api.post("/api/v1/devices/gw-001/pin/", {"component": "model", "version": "1.2.0"})
    assert response.json()["pinned_versions"] == {"model": "1.2.0"}


def test_bad_labels_are_refused_with_a_readable_message(operator_api):
    device = make_device()
    response = operator_api.patch(f"/api/v1/devices/{device.uid}/", {"labels": {"bad key!": "x"}}, format="json")
    assert response.status_code == 400
    assert "invalid label key 'bad key!'" in response.json()["detail"]


def test_filters_by_status_site_tier_and_selector(viewer_api):
    plant = make_site(slug="plant-7")
    make_device(uid="a", site=plant, labels={"env": "prod"}, ram_mb=32768, accelerator="gpu")
    make_device(uid="b", site=plant, labels={"env": "lab"}, status=DeviceStatus.PENDING)
    make_device(uid="c", labels={"env": "prod"}, ram_mb=1024)

    def uids(query):
        response = viewer_api.get(f"/api/v1/devices/?{query}")
        assert response.status_code == 200, response.content
        return {d["uid"] for d in response.json()["results"]}

    assert uids("status=pending") == {"b"}
    assert uids("site=plant-7") == {"a", "b"}
    assert uids("tier=1&tier=3") == {"a", "c"}
    assert uids("selector=env%3Dprod%2Ctier%20in%20(1%2C2)") == {"a"}
    assert uids("search=b") == {"b"}


def test_a_bad_selector_is_a_400_that_points_at_the_error(viewer_api):
    response = viewer_api.get("/api/v1/devices/?selector=env%3Dprod%2C%2Ctier")
    assert response.status_code == 400
    body = response.json()
    assert body["code"] == "invalid_selector"
    assert "expected a label key" in body["detail"] and "column 10" in body["detail"]


def test_cursor_pagination_walks_every_device_once(viewer_api):
    for _ in range(25):
        make_device()
    seen, url = [], "/api/v1/devices/?page_size=10&ordering=uid"
    while url:
        page = viewer_api.get(url).json()
        seen += [d["uid"] for d in page["results"]]
        url = page["next"]
    assert len(seen) == 25 and seen == sorted(seen)


def test_device_list_query_count_does_not_grow_with_the_fleet(viewer_api):
    site = make_site()
    make_device(site=site)

    def queries():
        with CaptureQueriesContext(connection) as ctx:
            assert viewer_api.get("/api/v1/devices/?page_size=200").status_code == 200
        return len(ctx.captured_queries)

    few = queries()
    for i in range(30):
        make_device(site=make_site() if i % 3 else site)
    assert queries() == few


def test_bulk_labels_by_selector_change_only_the_selected_devices(operator_api):
    make_device(uid="a", labels={"env": "prod", "old": "1"})
    make_device(uid="b", labels={"env": "lab", "old": "1"})
    response = operator_api.post("/api/v1/devices/labels/", {"selector": "env=prod", "set": {"canary": "true"},
                                                             "remove": ["old"]}, format="json")
    assert response.json() == {"updated": 1}
    assert Device.objects.get(uid="a").labels == {"env": "prod", "canary": "true"}
    assert Device.objects.get(uid="b").labels == {"env": "lab", "old": "1"}


def test_groups_hold_static_members(operator_api, viewer_api):
    make_device(uid="a")
    assert operator_api.post("/api/v1/groups/", {"name": "Canaries", "slug": "canaries"}).status_code == 201
    response = operator_api.post("/api/v1/groups/canaries/members/", {"add": ["a"]}, format="json")
    assert response.json()["device_count"] == 1
    assert {d["uid"] for d in viewer_api.get("/api/v1/devices/?group=canaries").json()["results"]} == {"a"}
    response = operator_api.post("/api/v1/groups/canaries/members/", {"add": ["nope"]}, format="json")
    assert response.status_code == 400 and "nope" in response.json()["detail"]


def test_sites_validate_timezones(operator_api):
    response = operator_api.post("/api/v1/sites/", {"name": "X", "slug": "x", "timezone": "Mars/Olympus"})
    assert response.status_code == 400
    assert "IANA" in response.json()["detail"]


def test_openapi_schema_is_served(anon_api):
    response = anon_api.get("/api/v1/schema/?format=json")
    assert response.status_code == 200
    assert "/api/v1/devices/" in response.json()["paths"]
