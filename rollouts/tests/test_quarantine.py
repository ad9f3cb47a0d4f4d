"""Quarantine and rollouts: a quarantined device's outstanding executions end at once, the
orchestrator never offers it anything, its late reports are still recorded, and a release hands
it back to the campaigns still running. (The same over real sockets, through attestation:
tests/rollouts/test_quarantine_e2e.py.)"""

from __future__ import annotations

import datetime as dt

import pytest
from django.utils import timezone

from fleet import services as fleet_services
from fleet.models import Device
from rollouts import services
from rollouts.models import Campaign, Execution
from rollouts.tests.helpers import make_artifact, make_campaign, make_fleet, offered, refresh, report, states, tick
from security.models import AuditEntry

pytestmark = pytest.mark.django_db

S = Execution.State
CS = Campaign.State


def quarantine(device: Device, actor: object = "test", reason: str = "failed attestation") -> None:
    fleet_services.device_quarantine(actor=actor, device=Device.objects.get(pk=device.pk), reason=reason)


def release(device: Device, actor: object = "test", reason: str = "re-imaged") -> None:
    fleet_services.device_release(actor=actor, device=Device.objects.get(pk=device.pk), reason=reason)


def execution_of(campaign: Campaign, device: Device) -> Execution:
    return Execution.objects.get(campaign=campaign, device=device)


def test_quarantine_cancels_queued_offered_and_in_flight_executions_with_reason_quarantined():
    queued, offered_dev, downloading, installing = make_fleet(4)
    campaign = make_campaign(make_artifact(), rate_per_min=60_000)
    tick()
    Execution.objects.filter(campaign=campaign, device=queued).update(
        state=S.PENDING, delivered_at=None, offered_at=None)  # still in the queue
    report(execution_of(campaign, downloading), "downloading", progress=40)
    report(execution_of(campaign, installing), "installing")
    for device in (queued, offered_dev, downloading, installing):
        quarantine(device)
    rows = {e.device_id: e for e in Execution.objects.filter(campaign=campaign)}
    assert {e.state for e in rows.values()} == {S.CANCELED}
    assert {e.error["code"] for e in rows.values()} == {"quarantined"}
    assert all(e.deadline_at is None and e.next_attempt_at is None and e.finished_at for e in rows.values())
    assert rows[downloading.id].error["detail"] == "the device was quarantined while downloading: failed attestation"
    assert rows[installing.id].error["detail"].startswith("the device was quarantined while installing")
    assert rows[queued.id].error["detail"].startswith("the device was quarantined while pending")


def test_quarantine_is_audited_per_campaign_with_actor_reason_and_the_executions_it_ended(operator_user,
                                                                                          operator_api):
    (device,) = make_fleet(1)
    first = make_campaign(make_artifact(name="a"))
    second = make_campaign(make_artifact(name="b", kind="firmware"))
    tick()
    response = operator_api.post(f"/api/v1/devices/{device.uid}/quarantine/", {"reason": "tampered enclosure"})
    assert response.status_code == 200, response.content
    entries = {e.target_id: e for e in AuditEntry.objects.filter(action="execution.cancel")}
    assert set(entries) == {str(first.id), str(second.id)}
    for campaign in (first, second):
        entry = entries[str(campaign.id)]
        assert entry.actor_user_id == operator_user.id
        assert entry.data["reason"] == "tampered enclosure" and entry.data["code"] == "quarantined"
        assert entry.data["device"] == device.uid
        assert entry.data["executions"] == {str(execution_of(campaign, device).id): "offered"}


def test_the_orchestrator_never_offers_to_a_quarantined_device_and_its_wave_is_not_held_back():
    healthy, suspect = make_fleet(2, online=False)
    campaign = make_campaign(make_artifact(), waves=[{"size": 1, "soak_s": 0, "gates": []},
                                                      {"size": "100%", "soak_s": 0, "gates": []}])
    quarantine(suspect)
    for minute in range(4):
        tick(now=timezone.now() + dt.timedelta(minutes=minute))
        for execution in offered(campaign):
            assert execution.device_id == healthy.id
            for state in ("acked", "downloading", "downloaded", "installing", "verifying", "committed"):
                report(execution, state)
    assert states(campaign) == {"committed": 1, "canceled": 1}
    assert refresh(campaign).state == CS.COMPLETED
    assert execution_of(campaign, suspect).offered_at is None
    assert services.pending_offers(device_id=suspect.id) == []


def test_a_device_quarantined_during_a_step_is_canceled_with_the_same_code_at_offer_time():
    (device,) = make_fleet(1)
    campaign = make_campaign(make_artifact())
    # Status changed without the service (as a step that read the device before a quarantine
    # committed would see it next time): the offer step itself refuses and marks it.
    Device.objects.filter(pk=device.pk).update(status="quarantined")
    tick()
    execution = execution_of(campaign, device)
    assert execution.state == S.CANCELED and execution.error["code"] == "quarantined"


def test_a_late_final_report_after_quarantine_is_recorded_but_nothing_is_retried_or_reoffered():
    installs, downloads = make_fleet(2)
    campaign = make_campaign(make_artifact(), max_retries=3)
    tick()
    report(execution_of(campaign, installs), "installing")
    report(execution_of(campaign, downloads), "downloading")
    quarantine(installs)
    quarantine(downloads)
    # The install could not be stopped: its outcome is the device's truth.
    report(execution_of(campaign, installs), "committed")
    done = execution_of(campaign, installs)
    assert done.state == S.COMMITTED
    assert Device.objects.get(pk=installs.pk).installed_versions["model"] == "1.1.0"
    # The refused download: a retryable failure leaves the quarantine as the outcome (no retry,
    # no failure for the gates), the device's error kept beside it.
    report(execution_of(campaign, downloads), "failed", error=("download_failed", True))
    stopped = execution_of(campaign, downloads)
    assert stopped.state == S.CANCELED and stopped.attempt == 0
    assert stopped.error["code"] == "quarantined" and stopped.error["device_error"]["code"] == "download_failed"
    # Progress reports after the cancel change nothing; ticks offer nothing.
    report(stopped, "downloaded")
    tick(now=timezone.now() + dt.timedelta(hours=2))
    assert execution_of(campaign, downloads).state == S.CANCELED
    assert offered(campaign) == []


def test_a_released_device_is_queued_again_in_the_current_wave_and_offered_by_the_next_step():
    devices = make_fleet(4)
    suspect = devices[0]
    campaign = make_campaign(make_artifact(), waves=[{"size": 2, "soak_s": 0, "gates": []},
                                                      {"size": "100%", "soak_s": 0, "gates": []}])
    quarantine(suspect)
    for minute in range(3):  # the others move on to the last wave
        tick(now=timezone.now() + dt.timedelta(minutes=minute))
        for execution in offered(campaign):
            for state in ("acked", "downloading", "downloaded", "installing", "verifying", "committed"):
                report(execution, state)
    campaign = refresh(campaign)
    assert states(campaign) == {"committed": 3, "canceled": 1} and campaign.state == CS.COMPLETED
    # A completed campaign does not take it back…
    release(suspect)
    assert execution_of(campaign, suspect).state == S.CANCELED

    # …a running one does, in its current wave.
    quarantine(suspect)
    other = make_campaign(make_artifact(version="1.2.0"), waves=[{"size": 1, "soak_s": 0, "gates": []},
                                                                  {"size": "100%", "soak_s": 0, "gates": []}])
    planned = execution_of(other, suspect)
    assert planned.state == S.CANCELED and planned.error["code"] == "quarantined"  # quarantined at start
    Campaign.objects.filter(pk=other.pk).update(current_wave=1)
    release(suspect, reason="attestation affirming again")
    again = execution_of(other, suspect)
    assert again.state == S.PENDING and again.error is None and again.wave == 1
    entry = AuditEntry.objects.get(action="execution.requeue", target_id=str(other.id))
    assert entry.data["reason"] == "attestation affirming again" and entry.data["executions"] == [again.id]
    tick()
    assert execution_of(other, suspect).state == S.OFFERED


def test_a_paused_campaign_takes_a_released_device_back_but_offers_only_after_resume():
    (device,) = make_fleet(1)
    campaign = make_campaign(make_artifact())
    quarantine(device)
    services.campaign_pause(actor="test", campaign=campaign, reason="look first")
    release(device)
    tick()
    assert execution_of(campaign, device).state == S.PENDING
    services.campaign_resume(actor="test", campaign=refresh(campaign), reason="go")
    tick()
    assert execution_of(campaign, device).state == S.OFFERED


def test_a_release_never_queues_an_older_version_next_to_a_newer_one():
    (device,) = make_fleet(1)
    old = make_campaign(make_artifact(version="1.1.0"))
    quarantine(device)
    new = make_campaign(make_artifact(version="1.2.0"))
    assert execution_of(new, device).error["code"] == "quarantined"
    release(device)
    assert execution_of(new, device).state == S.PENDING
    superseded = execution_of(old, device)
    assert superseded.state == S.SUPERSEDED and superseded.error["detail"] == f"superseded by campaign {new.id} (1.2.0)"
    tick()
    assert [e.campaign_id for e in Execution.objects.filter(device=device, state=S.OFFERED)] == [new.id]


def test_decommission_ends_outstanding_executions_so_they_never_time_out_as_failures():
    queued, installing = make_fleet(2)
    campaign = make_campaign(make_artifact(), rate_per_min=60_000)
    tick()
    Execution.objects.filter(campaign=campaign, device=queued).update(state=S.PENDING, delivered_at=None, offered_at=None)
    report(execution_of(campaign, installing), "installing")
    for device in (queued, installing):
        fleet_services.device_decommission(actor="test", device=Device.objects.get(pk=device.pk), reason="scrapped")
    rows = list(Execution.objects.filter(campaign=campaign))
    assert {e.state for e in rows} == {S.CANCELED}
    assert {e.error["code"] for e in rows} == {"decommissioned"}
    assert all(e.deadline_at is None for e in rows)  # nothing left for a timeout to fail
    assert execution_of(campaign, installing).error["detail"] == "the device was decommissioned while installing: scrapped"
    entry = AuditEntry.objects.filter(action="execution.cancel").latest("id")
    assert entry.data["code"] == "decommissioned" and entry.data["reason"] == "scrapped"
