"""Who gets offered what, when: offer gates, windows, pinning, offline devices, tiers, telemetry."""

from __future__ import annotations

import datetime as dt
import threading
import zoneinfo

import pytest
from django.db import connection
from django.utils import timezone

from agent_stub import protocol as p
from fleet import services as fleet_services
from fleet.models import Device
from rollouts import orchestrator, selectors, services
from rollouts.models import Campaign, Execution
from rollouts.tests.helpers import (
    make_artifact,
    make_campaign,
    make_fleet,
    offered,
    refresh,
    states,
    succeed,
    tick,
    upload,
)
from tests.factories import make_device

S = Execution.State
CS = Campaign.State


def _attest(device: Device, *, status: str = "affirming", age_s: float = 10) -> None:
    from security.models import AttestationResult, DeviceTrust

    result = AttestationResult.objects.create(device=device, format="tpm2-quote", status=status,
                                              verifier_version="test", evidence_sha256="0" * 64)
    when = timezone.now() - dt.timedelta(seconds=age_s)
    AttestationResult.objects.filter(pk=result.pk).update(created_at=when)
    DeviceTrust.objects.update_or_create(device=device, defaults={"last_attested_at": when, "last_status": status,
                                                                  "last_result": result})


@pytest.mark.django_db
def test_the_attestation_gate_withholds_offers_from_devices_without_fresh_affirming_attestation():
    fresh, stale, warning, never = make_fleet(4)
    _attest(fresh)
    _attest(stale, age_s=7200)
    _attest(warning, status="warning")
    campaign = make_campaign(make_artifact(), offer_gates=[{"type": "attestation", "max_age_s": 3600}])
    tick()
    assert [e.device_id for e in offered(campaign)] == [fresh.id]
    held = Execution.objects.filter(campaign=campaign, state=S.PENDING)
    assert {e.hold for e in held} == {"attestation"} and held.count() == 3
    # Held devices do not block the wave; once a device attests it gets its offer at the re-check.
    _attest(never)
    tick(now=timezone.now() + dt.timedelta(seconds=services.GATE_RECHECK_S + 1))
    assert sorted(e.device_id for e in offered(campaign)) == sorted([fresh.id, never.id])


@pytest.mark.django_db
def test_offers_carry_the_maintenance_window(pushed, django_capture_on_commit_callbacks):
    make_fleet(1)
    campaign = make_campaign(make_artifact(), window_cron="0 2 * * 1-5", window_tz="Europe/Berlin",
                             window_duration_min=120)
    with django_capture_on_commit_callbacks(execute=True):
        tick()
    (_, frame), = pushed
    window = frame["window"]
    start = dt.datetime.fromtimestamp(window["start"] / 1000, zoneinfo.ZoneInfo("Europe/Berlin"))
    assert (start.hour, start.minute) == (2, 0) and start.isoweekday() <= 5
    assert window["end"] - window["start"] == 2 * 3600 * 1000
    assert window["end"] > p.now_ms()
    assert frame["deadline"] > window["end"]
    assert campaign.window_cron == "0 2 * * 1-5"


@pytest.mark.django_db
def test_a_pinned_device_is_never_offered_and_is_reported_pinned():
    pinned, free, later = make_fleet(3)
    fleet_services.device_pin(actor="test", device=pinned, component="model", version="1.0.0")
    campaign = make_campaign(make_artifact(), rate_per_min=6, max_concurrent=1)
    execution = Execution.objects.get(campaign=campaign, device=pinned)
    assert execution.state == S.PINNED and execution.error["code"] == "pinned"
    # Pinned after the campaign started: caught at offer time.
    fleet_services.device_pin(actor="test", device=later, component="model", version="1.0.0")
    for minute in range(1, 4):
        tick(now=timezone.now() + dt.timedelta(minutes=minute))
        for e in offered(campaign):
            succeed(e)
    assert states(campaign) == {"pinned": 2, "committed": 1}
    assert Execution.objects.get(campaign=campaign, device=free).state == S.COMMITTED


@pytest.mark.django_db
def test_an_offline_device_gets_its_offer_through_pending_offers_when_it_reconnects(pushed,
                                                                                    django_capture_on_commit_callbacks):
    (device,) = make_fleet(1, online=False)
    campaign = make_campaign(make_artifact())
    with django_capture_on_commit_callbacks(execute=True):
        tick()
    assert pushed == []
    execution = Execution.objects.get(campaign=campaign)
    assert execution.state == S.OFFERED and execution.delivered_at is None
    # Offline offers do not hold the wave back.
    tick()
    assert refresh(campaign).wave_drained_at is not None
    frames = services.pending_offers(device_id=device.id)
    assert [f["execution_id"] for f in frames] == [execution.id]
    assert frames[0]["type"] == "rollout.offer" and "/api/v1/rollouts/download/" in frames[0]["artifact"]["url"]
    execution.refresh_from_db()
    assert execution.delivered_at is not None
    assert execution.deadline_at <= timezone.now() + dt.timedelta(seconds=campaign.ack_timeout_s)
    # A quarantined device gets nothing, even on reconnect.
    fleet_services.device_quarantine(actor="test", device=device, reason="test")
    assert services.pending_offers(device_id=device.id) == []


@pytest.mark.django_db
def test_quarantined_and_pending_devices_get_no_offers():
    ok, quarantined, waiting = make_fleet(3)
    fleet_services.device_quarantine(actor="test", device=quarantined, reason="failed attestation")
    Device.objects.filter(pk=waiting.pk).update(status="pending")
    campaign = make_campaign(make_artifact())
    tick()
    assert [e.device_id for e in offered(campaign)] == [ok.id]
    codes = dict(Execution.objects.filter(campaign=campaign).exclude(device=ok).values_list("device_id", "error__code"))
    assert codes == {quarantined.id: "quarantined", waiting.id: "pending_approval"}


@pytest.mark.django_db
def test_tier_variants_reach_the_right_devices(pushed, django_capture_on_commit_callbacks):
    t1 = make_device(uid="gpu-box", ram_mb=32768, accelerator="gpu", labels={"fleet": "test"})
    t2 = make_device(uid="cpu-box", ram_mb=8192, labels={"fleet": "test"})
    t3 = make_device(uid="tiny-box", ram_mb=1024, labels={"fleet": "test"})
    Device.objects.update(online=True)
    assert (t1.tier, t2.tier, t3.tier) == (1, 2, 3)
    artifact = make_artifact(variants=[
        services.VariantUpload(name="full", tiers=[1], file=upload(b"full precision model")),
        services.VariantUpload(name="int8", tiers=[2], file=upload(b"quantized")),
    ])
    campaign = make_campaign(artifact)
    with django_capture_on_commit_callbacks(execute=True):
        tick()
    by_device = dict(pushed)
    import json

    assert json.loads(p.b64d(by_device[t1.id]["artifact"]["manifest"]))["variant"] == "full"
    assert json.loads(p.b64d(by_device[t2.id]["artifact"]["manifest"]))["variant"] == "int8"
    assert by_device[t2.id]["artifact"]["size"] == len(b"quantized")
    assert t3.id not in by_device
    tiny = Execution.objects.get(campaign=campaign, device=t3)
    assert tiny.state == S.INCOMPATIBLE and tiny.error["code"] == "tier"


@pytest.mark.django_db
def test_the_dry_run_preview_lists_waves_left_out_devices_and_an_estimate():
    make_fleet(18)
    make_fleet(2, prefix="away", online=False)
    pinned = make_device(uid="pinned-1", labels={"fleet": "test"}, installed_versions={"model": "1.0.0"})
    fleet_services.device_pin(actor="test", device=pinned, component="model")
    make_device(uid="done-1", labels={"fleet": "test"}, installed_versions={"model": "1.1.0"})
    make_device(uid="tpu-box", labels={"fleet": "test"}, accelerator="tpu")
    artifact = make_artifact(accelerators=["none"])
    campaign = make_campaign(artifact, start=False, rate_per_min=10, waves=[
        {"size": "10%", "soak_s": 600, "gates": []}, {"size": "100%", "soak_s": 0, "gates": []}])
    preview = selectors.campaign_preview(campaign=campaign)
    assert preview["targeted"] == 23 and preview["eligible"] == 20
    assert [w["devices"] for w in preview["waves"]] == [2, 18]
    assert preview["ineligible"]["accelerator"]["sample"] == ["tpu-box"]
    assert preview["waves"][0]["sample"][0].keys() >= {"uid", "tier", "online", "variant"}
    assert preview["ineligible"]["pinned"]["sample"] == ["pinned-1"]
    assert preview["ineligible"]["already_installed"]["count"] == 1
    assert sum(w["offline"] for w in preview["waves"]) == 2 and "offline" in preview["notes"][0]
    assert preview["estimate_s"] >= 600 + 18 * 6  # the soak plus offering 18 devices at 10/min
    # Nothing was written.
    assert not Execution.objects.filter(campaign=campaign).exists()
    # The preview is exactly what starting does.
    services.campaign_start(actor="test", campaign=campaign, reason="test")
    wave0 = sorted(Execution.objects.filter(campaign=campaign, wave=0, state=S.PENDING)
                   .values_list("device__uid", flat=True))
    assert wave0 == sorted(d["uid"] for d in preview["waves"][0]["sample"])


@pytest.mark.django_db
def test_a_telemetry_regression_trips_the_telemetry_gate():
    from telemetry.tests.helpers import insert_points

    make_fleet(10)
    gate = {"type": "telemetry", "metric": "inference.latency_ms", "agg": "avg", "tolerance_pct": 20,
            "min_samples": 5, "action": "pause"}
    campaign = make_campaign(make_artifact(), waves=[{"size": "50%", "soak_s": 3600, "gates": [gate]},
                                                     {"size": "100%", "soak_s": 0, "gates": []}])
    tick()
    wave = offered(campaign)
    for e in wave:
        succeed(e)
    now = timezone.now()
    Campaign.objects.filter(pk=campaign.pk).update(wave_started_at=now - dt.timedelta(seconds=300),
                                                   wave_drained_at=now - dt.timedelta(seconds=240))
    untouched = Execution.objects.filter(campaign=campaign, state=S.PENDING).values_list("device_id", flat=True)
    rows = []
    for i in range(10):
        t = now - dt.timedelta(seconds=200 - i * 10)
        rows += [(t, e.device_id, "inference.latency_ms", 80.0) for e in wave]
        rows += [(t, d, "inference.latency_ms", 50.0) for d in untouched]
    insert_points(rows)
    tick(now=now + dt.timedelta(seconds=orchestrator.TELEMETRY_EVERY_S + 1))
    campaign = refresh(campaign)
    assert campaign.state == CS.PAUSED
    result = campaign.gate_results["0"]["telemetry"]
    assert result["ok"] is False and result["value"] == pytest.approx(80.0) and result["threshold"] == pytest.approx(50)
    assert "untouched devices" in result["detail"]


@pytest.mark.django_db
def test_telemetry_within_tolerance_lets_the_wave_pass():
    from telemetry.tests.helpers import insert_points

    make_fleet(4)
    gate = {"type": "telemetry", "metric": "inference.latency_ms", "tolerance_pct": 20, "min_samples": 3}
    campaign = make_campaign(make_artifact(), waves=[{"size": "50%", "soak_s": 60, "gates": [gate]},
                                                     {"size": "100%", "soak_s": 0, "gates": []}])
    tick()
    for e in offered(campaign):
        succeed(e)
    now = timezone.now()
    Campaign.objects.filter(pk=campaign.pk).update(wave_started_at=now - dt.timedelta(seconds=100),
                                                   wave_drained_at=now - dt.timedelta(seconds=90))
    rows = [(now - dt.timedelta(seconds=80 - i), d, "inference.latency_ms", 55.0 if i % 2 else 50.0)
            for i in range(10) for d in Execution.objects.filter(campaign=campaign).values_list("device_id", flat=True)]
    insert_points(rows)
    tick(now=now)
    campaign = refresh(campaign)
    assert campaign.state == CS.RUNNING and campaign.current_wave == 1
    assert campaign.gate_results["0"]["telemetry"]["ok"] is True


@pytest.mark.django_db(transaction=True)
def test_two_orchestrator_ticks_running_concurrently_never_offer_a_device_twice(pushed, settings):
    settings.ROLLOUTS_OFFER_BATCH = 15
    make_fleet(150)
    campaign = make_campaign(make_artifact(), max_concurrent=10_000)
    barrier = threading.Barrier(3)
    errors: list[BaseException] = []

    def worker() -> None:
        try:
            barrier.wait()
            for _ in range(25):
                orchestrator.tick()
                orchestrator.step_campaign(campaign.id)
        except BaseException as exc:  # noqa: BLE001 -- surfaced by the assertion below
            errors.append(exc)
        finally:
            connection.close()

    threads = [threading.Thread(target=worker) for _ in range(3)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    assert errors == []
    ids = [frame["execution_id"] for _, frame in pushed]
    assert len(ids) == 150 and len(set(ids)) == 150
    assert states(campaign) == {"offered": 150}
