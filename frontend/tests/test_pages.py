"""Every page and action, per role, through Django's test client (no browser)."""

from __future__ import annotations

import pytest
from django.urls import reverse

from security.models import AttestationPolicy, AuditEntry
from telemetry.models import Alert, AlertRule
from tests.factories import make_device, make_site

pytestmark = pytest.mark.django_db


@pytest.fixture
def world(roles):
    site = make_site(slug="plant-7")
    active = make_device(uid="cam-001", site=site, labels={"env": "prod"},
                         installed_versions={"model": "1.0.0", "agent": "1.2.0"})
    pending = make_device(uid="cam-002", status="pending")
    rule = AlertRule.objects.create(name="hot", metric="temperature_c", threshold=80)
    from telemetry import services

    alert = services.alert_open(rule=rule, device_id=active.id, value=91.5)
    policy = AttestationPolicy.objects.create(name="base", state="pending_approval",
                                              golden_pcrs={"sha256": {"0": "0" * 64}})
    return {"active": active, "pending": pending, "rule": rule, "alert": alert, "policy": policy}


PAGES = [
    ("overview", {}),
    ("devices", {}),
    ("device", {"uid": "cam-001"}),
    ("device-series", {"uid": "cam-001"}),
    ("security", {}),
    ("audit", {}),
    ("alerts", {}),
    ("rule-create", {}),
    ("rollouts", {}),
]
# Expected status per role; rule-create needs telemetry.add_alertrule (operator and admin).
EXPECTED = {"viewer": {"rule-create": 403}, "operator": {}, "admin": {}}


@pytest.mark.parametrize(("name", "kwargs"), PAGES)
def test_anonymous_is_sent_to_login(client, world, name, kwargs):
    response = client.get(reverse(name, kwargs=kwargs))
    if name == "device-series":
        assert response.status_code == 403  # a JSON read: no redirect for scripts
    else:
        assert response.status_code == 302
        assert response.url.startswith("/login/?next=")


@pytest.mark.parametrize("role", ["viewer", "operator", "admin"])
@pytest.mark.parametrize(("name", "kwargs"), PAGES)
def test_each_role_gets_the_expected_status(client, world, request, role, name, kwargs):
    user = request.getfixturevalue(f"{role}_user")
    client.force_login(user)
    response = client.get(reverse(name, kwargs=kwargs))
    assert response.status_code == EXPECTED[role].get(name, 200), response.content[:500]


def test_outsider_without_a_role_is_refused(client, world, outsider_user):
    client.force_login(outsider_user)
    assert client.get(reverse("overview")).status_code == 403
    assert client.get(reverse("devices")).status_code == 403


def test_viewer_sees_no_action_buttons(client, world, viewer_user):
    client.force_login(viewer_user)
    html = client.get(reverse("device", kwargs={"uid": "cam-002"})).content.decode()
    for word in ("Approve", "Quarantine", "Attest now", "Reboot", ">Pin<"):
        assert word not in html
    html = client.get(reverse("devices")).content.decode()
    assert "Bulk action" not in html
    html = client.get(reverse("security")).content.decode()
    assert "Create token" not in html and "Approve baseline" not in html
    html = client.get(reverse("alerts")).content.decode()
    assert "Acknowledge" not in html and "New rule" not in html


def test_operator_sees_actions_but_not_admin_only_ones(client, world, operator_user):
    client.force_login(operator_user)
    html = client.get(reverse("device", kwargs={"uid": "cam-002"})).content.decode()
    assert "Approve" in html and "Quarantine" in html
    html = client.get(reverse("security")).content.decode()
    assert "Create token" in html
    assert "Approve baseline" not in html  # policies are admin-only (security.change_attestationpolicy)


ACTIONS = [
    ("device-action", {"uid": "cam-002", "name": "approve"}, {}),
    ("device-action", {"uid": "cam-001", "name": "quarantine"}, {"reason": "test"}),
    ("device-action", {"uid": "cam-001", "name": "attest"}, {}),
    ("device-action", {"uid": "cam-001", "name": "pin"}, {"component": "model"}),
    ("device-action", {"uid": "cam-001", "name": "reboot"}, {}),
    ("devices-bulk", {}, {"action": "label", "uid": "cam-001", "label_key": "x", "label_value": "y"}),
    ("devices-bulk", {}, {"action": "approve", "uid": "cam-002"}),
    ("token-create", {}, {"expires_in_hours": 1, "max_uses": 1}),
    ("alert-ack", "alert", {}),
    ("policy-approve", "policy", {}),
]


def _url(world, name, kwargs):
    if kwargs == "alert":
        return reverse(name, kwargs={"pk": world["alert"].pk})
    if kwargs == "policy":
        return reverse(name, kwargs={"pk": world["policy"].pk})
    return reverse(name, kwargs=kwargs)


@pytest.mark.parametrize(("name", "kwargs", "data"), ACTIONS)
def test_viewer_forced_posts_are_refused(client, world, viewer_user, name, kwargs, data):
    client.force_login(viewer_user)
    before = AuditEntry.objects.count()
    response = client.post(_url(world, name, kwargs), data)
    assert response.status_code == 403
    assert AuditEntry.objects.count() == before  # nothing happened


def test_anonymous_post_goes_to_login_and_changes_nothing(client, world):
    response = client.post(reverse("device-action", kwargs={"uid": "cam-002", "name": "approve"}))
    assert response.status_code == 302 and response.url.startswith("/login/")
    world["pending"].refresh_from_db()
    assert world["pending"].status == "pending"


def test_operator_may_not_approve_a_policy(client, world, operator_user):
    client.force_login(operator_user)
    assert client.post(reverse("policy-approve", kwargs={"pk": world["policy"].pk})).status_code == 403


def test_operator_actions_go_through_services(client, world, operator_user):
    client.force_login(operator_user)
    url = reverse("device-action", kwargs={"uid": "cam-002", "name": "approve"})
    assert client.post(url).status_code == 302
    world["pending"].refresh_from_db()
    assert world["pending"].status == "active"
    assert AuditEntry.objects.filter(action="device.approve", actor=operator_user.username).exists()
    # A refused change is reported in words, not as a crash.
    response = client.post(url, follow=True)
    assert "is active; cannot approve it" in response.content.decode()
    # Quarantine requires a reason.
    response = client.post(reverse("device-action", kwargs={"uid": "cam-001", "name": "quarantine"}), follow=True)
    assert "a reason is required" in response.content.decode()


def test_admin_approves_a_learned_baseline(client, world, admin_user):
    client.force_login(admin_user)
    assert client.post(reverse("policy-approve", kwargs={"pk": world["policy"].pk})).status_code == 302
    world["policy"].refresh_from_db()
    assert world["policy"].state == "active"


def test_token_secret_is_shown_once(client, world, operator_user):
    client.force_login(operator_user)
    response = client.post(reverse("token-create"), {"name": "batch", "expires_in_hours": 2, "max_uses": 5,
                                                     "labels": "env=lab"}, follow=True)
    html = response.content.decode()
    assert "fet_" in html and "shown only once" in html
    assert "fet_" not in client.get(reverse("security")).content.decode().split("Enrollment tokens")[0]


def test_bulk_label_and_approve(client, world, operator_user):
    client.force_login(operator_user)
    client.post(reverse("devices-bulk"), {"action": "label", "scope": "matching", "filter_qs": "selector=env%3Dprod",
                                          "label_key": "ring", "label_value": "canary"})
    world["active"].refresh_from_db()
    assert world["active"].labels == {"env": "prod", "ring": "canary"}
    response = client.post(reverse("devices-bulk"), {"action": "approve", "uid": ["cam-001", "cam-002"]}, follow=True)
    assert "Approved 1 device(s). Skipped 1" in response.content.decode()


def test_selector_error_is_shown_with_its_column(client, world, viewer_user):
    client.force_login(viewer_user)
    html = client.get(reverse("devices"), {"selector": "env=prod,tier in (1,"}).content.decode()
    assert "Invalid selector" in html and "column 21" in html
    html = client.get(reverse("devices"), {"selector": "env=prod"}).content.decode()
    assert "cam-001" in html and "cam-002" not in html


def test_devices_sort_and_pages(client, world, viewer_user):
    for i in range(60):
        make_device(uid=f"zz-{i:03d}")
    client.force_login(viewer_user)
    response = client.get(reverse("devices"), {"sort": "-uid"})
    html = response.content.decode()
    assert "zz-059" in html and "cam-001" not in html and "Page 1 of 2" in html
    html = client.get(reverse("devices"), {"sort": "-uid", "page": 2}).content.decode()
    assert "cam-001" in html


def test_alert_rule_created_through_the_form(client, world, operator_user):
    client.force_login(operator_user)
    response = client.post(reverse("rule-create"), {
        "name": "too cold", "kind": "threshold", "metric": "temperature_c", "agg": "avg", "comparison": "<",
        "threshold": "5", "for_duration_s": "30", "scope": "all", "severity": "warning", "enabled": "on"})
    assert "at least 60" in response.content.decode()  # the service's words, on the form
    data = {"name": "too cold", "kind": "threshold", "metric": "temperature_c", "agg": "avg", "comparison": "<",
            "threshold": "5", "for_duration_s": "120", "scope": "selector", "selector": "env in (", "severity": "warning"}
    assert "column" in client.post(reverse("rule-create"), data).content.decode()
    data["selector"] = "env=prod"
    assert client.post(reverse("rule-create"), data).status_code == 302
    rule = AlertRule.objects.get(name="too cold")
    assert rule.created_by == operator_user
    data["threshold"] = "3"
    assert client.post(reverse("rule-edit", kwargs={"pk": rule.pk}), data).status_code == 302
    rule.refresh_from_db()
    assert rule.threshold == 3


def test_acknowledge(client, world, operator_user):
    client.force_login(operator_user)
    client.post(reverse("alert-ack", kwargs={"pk": world["alert"].pk}))
    assert Alert.objects.get(pk=world["alert"].pk).state == "acknowledged"


def test_audit_filters_and_export_link(client, world, viewer_user):
    client.force_login(viewer_user)
    html = client.get(reverse("audit"), {"action": "device.", "since": "2000-01-01"}).content.decode()
    assert "device.register" in html and "alert.open" not in html
    assert "/api/v1/security/audit/export/?action=device." in html
    assert client.get("/api/v1/security/audit/export/?action=device.").status_code == 200


def test_series_json_rejects_unknown_range(client, world, viewer_user):
    client.force_login(viewer_user)
    response = client.get(reverse("device-series", kwargs={"uid": "cam-001"}), {"range": "2y"})
    assert response.status_code == 400 and "range must be one of" in response.json()["detail"]


def test_rollout_control_is_refused_to_viewers(client, world, viewer_user):
    from rollouts import services as rollout_services

    rollout_services.signing_key_create(actor="test")
    from django.core.files.uploadedfile import SimpleUploadedFile

    artifact = rollout_services.artifact_create(
        actor="test", name="m", kind="model", version="1.0.0",
        variants=[rollout_services.VariantUpload(name="default", tiers=[], file=SimpleUploadedFile("m.onnx", b"x" * 64))])
    campaign = rollout_services.campaign_create(actor="test", artifact=artifact, name="c")
    client.force_login(viewer_user)
    html = client.get(reverse("campaign", kwargs={"pk": campaign.pk})).content.decode()
    assert "Dry-run preview" in html and "Start campaign" not in html
    for verb in ("start", "pause", "resume", "abort"):
        assert client.post(reverse("campaign-control", kwargs={"pk": campaign.pk, "verb": verb})).status_code == 403
    assert client.post(reverse("campaign-create"), {"name": "x"}).status_code == 403
    assert client.post(reverse("artifact-upload"), {"name": "x"}).status_code == 403


def _signed_artifact_through_the_form(client, **extra):
    from django.core.files.uploadedfile import SimpleUploadedFile

    from rollouts import services as rollout_services
    from rollouts.models import Artifact

    rollout_services.signing_key_create(actor="test")
    response = client.post(reverse("artifact-upload"), {
        "name": "detector", "kind": "model", "version": "2.1.0", "min_tier": 3,
        "file": SimpleUploadedFile("full.onnx", b"f" * 256), **extra})
    assert response.status_code == 302
    return Artifact.objects.get(name="detector")


def test_an_artifact_upload_can_route_a_second_variant_to_one_tier(client, world, operator_user):
    from django.core.files.uploadedfile import SimpleUploadedFile

    client.force_login(operator_user)
    artifact = _signed_artifact_through_the_form(
        client, variant_file=SimpleUploadedFile("int8.onnx", b"q" * 64), variant_tier=3)
    variants = {v.name: (v.tiers, v.size) for v in artifact.variants.all()}
    assert variants == {"default": ([1, 2], 256), "tier-3": ([3], 64)}


def test_a_campaign_form_sets_gates_rate_and_maintenance_window(client, world, operator_user):
    from rollouts.models import Campaign

    client.force_login(operator_user)
    artifact = _signed_artifact_through_the_form(client)
    response = client.post(reverse("campaign-create"), {
        "artifact": artifact.pk, "name": "night rollout", "target_selector": "env=prod", "waves": "10%, 100%",
        "soak_s": 300, "min_success": 0.9, "max_failure_pct": 20, "failure_min_sample": 3,
        "telemetry_metric": "inference_latency_ms", "telemetry_direction": "increase", "telemetry_tolerance_pct": 15,
        "attestation_max_age_s": 900, "on_gate_failure": "abort_and_revert", "rate_per_min": 120,
        "max_concurrent": 50, "window_cron": "0 2 * * *", "window_tz": "Europe/Berlin", "window_duration_min": 90,
    })
    campaign = Campaign.objects.get(name="night rollout")
    assert response.status_code == 302 and response["Location"] == reverse("campaign", kwargs={"pk": campaign.pk})
    assert [w["size"] for w in campaign.waves] == ["10%", "100%"]
    assert [g["type"] for g in campaign.waves[0]["gates"]] == ["success_ratio", "failure", "telemetry"]
    assert campaign.waves[1]["gates"][1] == {"type": "failure", "max_pct": 20.0, "min_sample": 3}
    assert campaign.offer_gates == [{"type": "attestation", "max_age_s": 900.0}]
    assert (campaign.on_gate_failure, campaign.rate_per_min, campaign.max_concurrent) == ("abort_and_revert", 120, 50)
    assert (campaign.window_cron, campaign.window_tz, campaign.window_duration_min) == ("0 2 * * *", "Europe/Berlin", 90)


def test_a_campaign_form_with_a_bad_window_says_why_and_creates_nothing(client, world, operator_user):
    from rollouts.models import Campaign

    client.force_login(operator_user)
    artifact = _signed_artifact_through_the_form(client)
    response = client.post(reverse("campaign-create"), {
        "artifact": artifact.pk, "name": "bad window", "waves": "100%", "soak_s": 0, "failure_min_sample": 5,
        "telemetry_direction": "increase", "telemetry_tolerance_pct": 10, "on_gate_failure": "pause",
        "rate_per_min": 600, "max_concurrent": 1000, "window_cron": "99 * * *", "window_tz": "Mars/Olympus",
    }, follow=True)
    assert not Campaign.objects.filter(name="bad window").exists()
    assert "The campaign was not created: maintenance window" in response.content.decode()


def test_the_device_page_shows_presence_history_with_how_long_each_state_lasted(client, world, viewer_user):
    import datetime as dt

    from django.utils import timezone

    from fleet.models import PresenceEvent

    now = timezone.now()
    for minutes_ago, kind in ((125, "connected"), (5, "timed_out")):
        PresenceEvent.objects.create(device=world["active"], kind=kind, at=now - dt.timedelta(minutes=minutes_ago))
    client.force_login(viewer_user)
    html = client.get(reverse("device", kwargs={"uid": "cam-001"})).content.decode()
    section = html[html.index('id="presence-history"'):]
    assert section.index("timed out (no goodbye)") < section.index("● connected")  # newest first
    assert "<td>5 min" in section and "so far</small>" in section and "<td>2 h</td>" in section
    empty = client.get(reverse("device", kwargs={"uid": "cam-002"})).content.decode()
    assert "Never connected." in empty
