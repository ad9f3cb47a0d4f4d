"""The dashboard in a real browser (Debian's chromium via Playwright) against a real uvicorn
process serving the test database. Screenshots of each main page go to test-artifacts/."""

from __future__ import annotations

import asyncio
import datetime as dt
import re
import threading
import time

from playwright.sync_api import expect

from frontend.tests.conftest import shot
from security.models import AttestationResult
from security.services import enrollment_token_create
from telemetry import services as telemetry_services
from telemetry import tasks as telemetry_tasks
from telemetry.models import DeviceEvent, DeviceMetric, Metric
from telemetry.tests.helpers import insert_points
from tests.agent.rawagent import RawAgent
from tests.factories import make_device, make_site


def _seed(roles_fixture=None):
    site = make_site(slug="plant-7")
    devices = [make_device(uid=f"cam-{i:03d}", site=site, labels={"env": "prod" if i % 2 else "lab"},
                           installed_versions={"model": "1.0.0", "agent": "1.2.0"}) for i in range(12)]
    make_device(uid="new-001", status="pending")
    return devices


def test_login_overview_and_role_aware_nav(page_for, operator_user, viewer_user):
    _seed()
    page = page_for("oscar-operator")
    expect(page.get_by_role("heading", name="Fleet overview")).to_be_visible()
    expect(page.locator('[data-k="total"]')).to_have_text("13")
    expect(page.get_by_role("link", name="Security")).to_be_visible()
    expect(page.locator("#live-status.up")).to_be_visible()  # the dashboard socket is connected
    shot(page, "overview")
    page.set_viewport_size({"width": 820, "height": 1180})  # tablet
    shot(page, "overview-tablet")
    page.get_by_role("button", name="Log out").click()
    expect(page.get_by_role("heading", name="Sign in")).to_be_visible()


def test_devices_filter_by_selector_and_show_inline_error(page_for, viewer_user):
    _seed()
    page = page_for("vera-viewer")
    page.get_by_role("link", name="Devices", exact=True).click()
    expect(page.locator("#device-table tbody tr")).to_have_count(13)
    page.get_by_label("Label selector").fill("env=prod,site=plant-7")
    page.get_by_role("button", name="Apply").click()
    expect(page.locator("#device-table tbody tr")).to_have_count(6)
    expect(page.locator("#device-table")).not_to_contain_text("cam-000")
    shot(page, "devices")
    page.get_by_label("Label selector").fill("env=prod,tier in (1,")
    page.get_by_role("button", name="Apply").click()
    error = page.locator("#selector-error")
    expect(error).to_contain_text("expected a value, found end of selector at column 21")
    expect(error.locator("pre.caret")).to_contain_text("^")
    expect(page.get_by_label("Label selector")).to_have_attribute("aria-invalid", "true")
    shot(page, "devices-selector-error")


def test_device_page_draws_telemetry_with_plotly(page_for, operator_user):
    devices = _seed()
    device = devices[1]
    now = dt.datetime.now(dt.UTC)
    rows = [(now - dt.timedelta(seconds=30 * i), device.id, "temperature_c", 40 + (i % 7)) for i in range(100)]
    rows += [(now - dt.timedelta(seconds=30 * i), device.id, "inference.anomaly_score", (i % 10) / 10) for i in range(100)]
    insert_points(rows)
    for name in ("temperature_c", "inference.anomaly_score"):
        DeviceMetric.objects.get_or_create(device=device, metric=Metric.objects.get(name=name))
    DeviceEvent.objects.create(device=device, time=now, kind="inference", severity="warning",
                               message="anomaly score 0.93 above threshold 0.80")
    AttestationResult.objects.create(device=device, format="software-claims", status="warning", self_reported=True,
                                     warnings=["claims.self_reported"], verifier_version="test", evidence_sha256="0" * 64)
    page = page_for("oscar-operator")
    page.goto(page.url + f"devices/{device.uid}/")
    plot = page.locator('.plot[data-metric="temperature_c"]')
    expect(plot).to_have_attribute("data-points", re.compile(r"^[1-9]\d*$"))
    expect(plot.locator("g.trace.scatter path.js-line")).to_have_count(1)
    assert int(plot.get_attribute("data-points")) >= 50
    expect(page.locator("#chart-meta")).to_contain_text("raw points")
    expect(page.locator("#attestation")).to_contain_text("self-reported")
    expect(page.locator("#attestation")).to_contain_text("the device has no TPM")
    expect(page.get_by_text("1 anomaly")).to_be_visible()
    expect(page.get_by_role("button", name="Quarantine")).to_be_visible()
    shot(page, "device")
    page.get_by_role("button", name="24h").click()
    expect(page.locator("#charts")).to_have_attribute("data-loaded", "24h")
    expect(page.locator("#chart-meta")).to_contain_text("1-minute rollups")
    expect(plot).to_have_attribute("data-points", re.compile(r"^[1-9]\d*$"))
    # Quarantine with a reason, confirmed.
    page.once("dialog", lambda d: d.accept())
    page.get_by_label("Reason (required)").fill("test quarantine")
    page.get_by_role("button", name="Quarantine").click()
    expect(page.locator(".messages")).to_contain_text("quarantined")
    expect(page.locator("#dev-status")).to_have_text("quarantined")


def test_viewer_sees_no_actions_and_a_forced_post_is_refused(page_for, viewer_user, console_server):
    devices = _seed()
    page = page_for("vera-viewer")
    page.goto(f"{console_server.http_url}/devices/new-001/")
    expect(page.get_by_role("heading", name=re.compile("new-001"))).to_be_visible()
    expect(page.locator("#actions")).to_have_count(0)
    expect(page.get_by_role("button", name="Approve")).to_have_count(0)
    page.goto(f"{console_server.http_url}/devices/")
    expect(page.get_by_text("Bulk action")).to_have_count(0)
    csrf = next(c["value"] for c in page.context.cookies() if c["name"] == "csrftoken")
    response = page.request.post(f"{console_server.http_url}/devices/new-001/do/approve/",
                                 form={"csrfmiddlewaretoken": csrf}, headers={"X-CSRFToken": csrf})
    assert response.status == 403
    assert "CSRF" not in response.text() and "does not allow" in response.text()
    response = page.request.post(f"{console_server.http_url}/devices/_bulk/",
                                 form={"csrfmiddlewaretoken": csrf, "action": "approve", "uid": "new-001"})
    assert response.status == 403
    devices[0].refresh_from_db()
    from fleet.models import Device

    assert Device.objects.get(uid="new-001").status == "pending"


def _device_reports(url: str, uid: str, token: str, points: list) -> dict:
    """A real agent connection (own thread: Playwright's loop owns this one): enroll, send one
    telemetry frame, return the server's ack once the points are committed."""
    result: dict = {}

    async def scenario():
        agent = RawAgent(url, uid)
        welcome = await agent.enroll(token)
        assert welcome["status"] == "active", welcome
        await agent.telemetry(1, points)
        result.update(await agent.recv_type("ack"))
        await agent.close()

    thread = threading.Thread(target=lambda: asyncio.run(scenario()))
    thread.start()
    thread.join(30)
    return result


def test_alert_appears_live_when_a_device_reports_over_a_rule(page_for, viewer_user, console_server):
    _seed()
    telemetry_services.alert_rule_create(actor="test", name="Overheating", metric="temperature_c", comparison=">",
                                         threshold=80, for_duration_s=120, severity="critical")
    telemetry_tasks.refresh_rollups()  # beat has been rolling up all along
    page = page_for("vera-viewer")
    page.get_by_role("navigation", name="Main").get_by_role("link", name=re.compile("^Alerts")).click()
    expect(page.locator("#alerts-empty")).to_be_visible()
    expect(page.locator("#live-status.up")).to_be_visible()
    page.evaluate("window.__sameDocument = true")
    page.wait_for_timeout(1500)  # let the subscription take its cursor

    # A device ran hot for the last six minutes and reports it over its WebSocket (its outbox
    # delivers late: rollups close a minute only after TELEMETRY_ROLLUP_CLOSE_LAG_S = 120 s).
    first_minute = (int(time.time()) // 60 - 6) * 60_000
    points = [[first_minute + i * 10_000, "temperature_c", 91.0 + i % 3] for i in range(36)]
    _, token = enrollment_token_create(actor="test", expires_in=dt.timedelta(hours=1), auto_approve=True)
    ack = _device_reports(console_server.ws_url, "hot-cam-1", token, points)
    assert ack == {"type": "ack", "seq": 1, "accepted": 36, "rejected": []}

    # The beat jobs, as the Celery worker runs them: roll up the closed minutes, evaluate rules.
    telemetry_tasks.refresh_rollups()
    assert telemetry_tasks.evaluate_alerts()["opened"] == 1

    row = page.locator("#alerts-table tr[data-alert-id]").filter(has_text="hot-cam-1")
    expect(row).to_be_visible(timeout=6000)
    expect(row).to_contain_text("Overheating")
    expect(row).to_contain_text("temperature_c = 92.00")  # the last closed minute's average
    expect(page.locator("#active-count")).to_have_text("1")
    expect(page.locator("#nav-alerts")).to_have_text("1")
    assert page.evaluate("window.__sameDocument") is True  # no reload happened
    shot(page, "alerts")


def test_operator_creates_a_token_and_sees_the_secret_once(page_for, operator_user, console_server):
    _seed()
    page = page_for("oscar-operator")
    page.get_by_role("link", name="Security").click()
    if not page.locator("#tokens details").evaluate("d => d.open"):
        page.get_by_text("Create a token").click()
    page.get_by_label("Name").fill("batch 3")
    page.get_by_label("Maximum uses (devices)").fill("20")
    page.get_by_role("button", name="Create token").click()
    secret = page.locator("#token-secret")
    expect(secret).to_have_value(re.compile(r"^fet_"))
    expect(page.get_by_role("button", name="Copy")).to_be_visible()
    shot(page, "security")
    page.reload()
    expect(page.locator("#token-secret")).to_have_count(0)
    expect(page.locator("#tokens")).to_contain_text("batch 3")
    page.goto(f"{console_server.http_url}/security/audit/?action=enrollment_token.")
    expect(page.locator("table")).to_contain_text("enrollment_token.create")
    shot(page, "audit")
    page.goto(f"{console_server.http_url}/rollouts/")
    expect(page.locator("#campaigns, #rollouts-todo").first).to_be_visible()
    shot(page, "rollouts")


def test_ui_socket_rejects_anonymous_with_4401(browser, console_server):
    context = browser.new_context()
    page = context.new_page()
    page.goto(f"{console_server.http_url}/login/")
    code = page.evaluate("""() => new Promise((resolve) => {
        const ws = new WebSocket(location.origin.replace('http', 'ws') + '/ws/ui/');
        ws.onclose = (ev) => resolve(ev.code);
    })""")
    context.close()
    assert code == 4401


def test_operator_creates_a_campaign_from_the_preview_and_watches_it_live(page_for, operator_user, console_server,
                                                                         tmp_path):
    from rollouts import services as rollout_services
    from rollouts.models import Campaign

    _seed()
    rollout_services.signing_key_create(actor="test")
    page = page_for("oscar-operator")
    page.goto(f"{console_server.http_url}/rollouts/")
    # Upload an artifact through the page.
    model_file = tmp_path / "anomaly.onnx"
    model_file.write_bytes(b"\x08\x01" * 512)
    page.get_by_text("Upload an artifact", exact=True).click()
    page.locator("#artifacts").get_by_label("Name").fill("anomaly")
    page.locator("#artifacts").get_by_label("Kind").select_option("model")
    page.get_by_label("Version").fill("1.1.0")
    page.get_by_label("File").set_input_files(str(model_file))
    page.get_by_role("button", name="Upload and sign").click()
    expect(page.locator(".messages")).to_contain_text("stored and signed")
    # Create a draft: the dry-run preview shows the waves before anything is offered.
    page.get_by_text("New campaign", exact=True).click()
    page.get_by_label("Artifact").select_option(label="model:anomaly@1.1.0")
    page.locator("#campaigns").get_by_label("Name").fill("anomaly 1.1 to prod")
    page.get_by_label("Target selector").fill("env=prod")
    page.get_by_label("Waves").fill("50%, 100%")
    page.get_by_label("Failure gate (max %)").fill("20")
    page.get_by_label("When a gate fails").select_option("abort")
    page.get_by_label("Install window (cron)").fill("0 2 * * *")
    page.get_by_label("Window time zone (IANA)").fill("Europe/Berlin")
    page.get_by_role("button", name="Create draft and preview").click()
    preview = page.locator("#preview")
    expect(preview).to_contain_text("of 6 targeted devices would be updated")
    expect(preview).to_contain_text("failures ≤ 20.0 % (after 5)")
    policy = page.locator("#campaign-policy")
    expect(policy).to_contain_text("On a failed gate: abort.")
    expect(policy).to_contain_text("Installs only in the window 0 2 * * * (Europe/Berlin, 120 min)")
    shot(page, "campaign-preview")
    page.once("dialog", lambda d: d.accept())
    page.get_by_role("button", name="Start campaign").click()
    expect(page.locator("#c-state")).to_have_text("running")
    expect(page.locator("#c-progress")).to_contain_text("/ 6 committed")
    page.evaluate("window.__sameDocument = true")
    page.wait_for_timeout(1500)
    campaign = Campaign.objects.get(name="anomaly 1.1 to prod")
    rollout_services.campaign_pause(actor="test", campaign=campaign, reason="paused by the test")
    expect(page.locator("#c-state")).to_have_text("paused", timeout=6000)  # live, without reload
    assert page.evaluate("window.__sameDocument") is True
    shot(page, "campaign")
