"""The rollouts REST API: permissions per role, uploads, campaign commands, lists."""

from __future__ import annotations

import pytest
from django.core.files.uploadedfile import SimpleUploadedFile

from rollouts.models import Campaign, Execution
from rollouts.tests.helpers import make_artifact, make_campaign, make_fleet, tick

pytestmark = pytest.mark.django_db
BASE = "/api/v1/rollouts"


def _upload(api, version="2.0.0", **extra):
    data = {"name": "anomaly", "kind": "model", "version": version,
            "file": SimpleUploadedFile("m.onnx", b"0123456789" * 10), **extra}
    return api.post(f"{BASE}/artifacts/", data, format="multipart")


def test_a_viewer_reads_but_cannot_change_anything(viewer_api):
    make_fleet(2)
    campaign = make_campaign(make_artifact())
    assert viewer_api.get(f"{BASE}/campaigns/").status_code == 200
    assert viewer_api.get(f"{BASE}/campaigns/{campaign.id}/preview/").status_code == 200
    assert viewer_api.get(f"{BASE}/executions/?campaign={campaign.id}").status_code == 200
    assert viewer_api.get(f"{BASE}/artifacts/").status_code == 200
    assert _upload(viewer_api).status_code == 403
    assert viewer_api.post(f"{BASE}/campaigns/{campaign.id}/pause/", {"reason": "x"}).status_code == 403
    assert viewer_api.post(f"{BASE}/keys/").status_code == 403


def test_an_operator_uploads_creates_previews_starts_pauses_resumes_and_aborts(operator_api):
    make_fleet(5)
    response = _upload(operator_api, hardware_models=["x1"])
    assert response.status_code == 201, response.json()
    artifact = response.json()
    assert artifact["variants"][0]["size"] == 100 and len(artifact["variants"][0]["sha256"]) == 64
    body = {"name": "model 2.0", "artifact": artifact["id"], "target_selector": "fleet=test",
            "waves": [{"size": "20%", "soak_s": 0, "gates": [{"type": "failure", "max_pct": 10}]},
                      {"size": "100%"}]}
    created = operator_api.post(f"{BASE}/campaigns/", body, format="json")
    assert created.status_code == 201, created.json()
    cid = created.json()["id"]
    assert created.json()["state"] == "draft"
    preview = operator_api.get(f"{BASE}/campaigns/{cid}/preview/").json()
    assert preview["ineligible"]["hardware_model"]["count"] == 5
    patched = operator_api.patch(f"{BASE}/campaigns/{cid}/", {"target_selector": "fleet=test"}, format="json")
    assert patched.status_code == 200
    started = operator_api.post(f"{BASE}/campaigns/{cid}/start/", {"reason": "go"}, format="json")
    assert started.status_code == 200 and started.json()["state"] == "running"
    paused = operator_api.post(f"{BASE}/campaigns/{cid}/pause/", {"reason": "lunch"}, format="json")
    assert paused.json()["state"] == "paused"
    assert operator_api.post(f"{BASE}/campaigns/{cid}/pause/", {"reason": "again"}).status_code == 409
    assert operator_api.post(f"{BASE}/campaigns/{cid}/resume/", {}).status_code == 400  # a reason is required
    assert operator_api.post(f"{BASE}/campaigns/{cid}/resume/", {"reason": "back"}).json()["state"] == "running"
    aborted = operator_api.post(f"{BASE}/campaigns/{cid}/abort/", {"reason": "wrong build"}, format="json")
    assert aborted.json()["state"] == "aborted"
    counts = operator_api.get(f"{BASE}/campaigns/{cid}/counts/").json()
    assert counts["by_state"] == {"incompatible": 5}


def test_only_admins_manage_signing_keys(operator_api, admin_api):
    assert operator_api.post(f"{BASE}/keys/").status_code == 403
    created = admin_api.post(f"{BASE}/keys/")
    assert created.status_code == 201 and created.json()["active"] is True
    assert "private" not in str(created.json())
    key_id = created.json()["key_id"]
    assert operator_api.post(f"{BASE}/keys/{key_id}/revoke/", {"reason": "x"}).status_code == 403
    assert admin_api.post(f"{BASE}/keys/{key_id}/revoke/", {"reason": "rotated out"}).json()["revoked_at"]


def test_an_oversized_upload_is_refused_with_413(operator_api, settings):
    settings.ROLLOUTS_MAX_ARTIFACT_BYTES = 50
    response = _upload(operator_api)
    assert response.status_code == 413 and "artifact limit" in response.json()["detail"]


def test_invalid_input_gets_a_message_a_person_can_act_on(operator_api):
    assert "semantic versioning" in _upload(operator_api, version="v2").json()["detail"]
    artifact = make_artifact()
    bad = operator_api.post(f"{BASE}/campaigns/", {"name": "x", "artifact": artifact.id,
                                                   "waves": [{"size": "50%"}, {"size": "10%"}]}, format="json")
    assert bad.status_code == 400 and "never decreasing" in bad.json()["detail"]
    bad = operator_api.post(f"{BASE}/campaigns/", {"name": "x", "artifact": artifact.id, "window_cron": "0 25 * * *",
                                                   "window_duration_min": 60}, format="json")
    assert bad.status_code == 400 and "maintenance window" in bad.json()["detail"]
    bad = operator_api.post(f"{BASE}/campaigns/", {"name": "x", "artifact": artifact.id,
                                                   "target_selector": "tier in (1"}, format="json")
    assert bad.status_code == 400 and bad.json()["code"] == "invalid_selector"


def test_executions_are_listed_with_filters_in_a_constant_number_of_queries(operator_api,
                                                                           django_assert_max_num_queries):
    make_fleet(30)
    campaign = make_campaign(make_artifact())
    tick()
    with django_assert_max_num_queries(8):
        listed = operator_api.get(f"{BASE}/executions/?campaign={campaign.id}&state=offered&page_size=100")
    assert listed.status_code == 200 and len(listed.json()["results"]) == 30
    assert listed.json()["results"][0]["device"].startswith("dev-")
    assert Execution.objects.count() == 30 and Campaign.objects.count() == 1


def test_the_admin_lists_rollouts_and_offers_actions_that_call_services(admin_user, client):
    make_fleet(2)
    make_campaign(make_artifact())
    client.force_login(admin_user)
    for page in ("campaign", "execution", "artifact", "signingkey"):
        assert client.get(f"/admin/rollouts/{page}/").status_code == 200
    campaign = Campaign.objects.get()
    response = client.post("/admin/rollouts/campaign/", {"action": "action_pause", "_selected_action": [campaign.pk]})
    assert response.status_code == 302
    assert Campaign.objects.get().state == "paused"
