"""Races between an orchestrator step and an agent connecting at the same moment.

The step reads device presence inside its transaction; an agent that connects meanwhile asks
for its pending offers (`services.pending_offers`) before the step commits. These tests hold
the step at that exact point (an offer gate that waits) and run the connection's side in
between, so the interleaving is deterministic rather than left to timing."""

from __future__ import annotations

import datetime as dt
import threading

import pytest
from django.db import connection, transaction
from django.utils import timezone

from fleet import services as fleet_services
from rollouts import gates, orchestrator, services
from rollouts.models import Campaign, Execution
from rollouts.tests.helpers import make_artifact, make_campaign, make_fleet, report

pytestmark = pytest.mark.django_db(transaction=True)


@pytest.fixture
def held_step(monkeypatch):
    """Run `step_campaign` in a thread that stops right after it has read device presence
    (at the offer gates) until the test releases it."""
    read, release = threading.Event(), threading.Event()
    errors: list[BaseException] = []

    def barrier(spec, campaign, device_ids):
        read.set()
        assert release.wait(20), "the test never released the step"
        return set(device_ids)

    monkeypatch.setitem(gates.OFFER_GATES, "barrier", gates.Gate("barrier", lambda spec: {}, barrier))

    def start(campaign: Campaign) -> threading.Thread:
        def run() -> None:
            try:
                orchestrator.step_campaign(campaign.id)
            except BaseException as exc:  # noqa: BLE001 -- surfaced by finish()
                errors.append(exc)
            finally:
                connection.close()

        thread = threading.Thread(target=run)
        thread.start()
        assert read.wait(20), "the step never reached the offer gates"
        return thread

    def finish(thread: threading.Thread) -> None:
        release.set()
        thread.join(20)
        assert not thread.is_alive() and not errors, errors

    return start, finish


def offers_to(pushed: list, device_id: int) -> list[int]:
    return [int(frame["execution_id"]) for d, frame in pushed if d == device_id and frame["type"] == "rollout.offer"]


def test_a_device_that_connects_while_a_step_offers_to_it_still_gets_its_offer_once(pushed, held_step):
    start, finish = held_step
    device = make_fleet(1, online=False)[0]
    campaign = make_campaign(make_artifact(), offer_gates=[{"type": "barrier"}])

    step = start(campaign)  # the step has read `online = false` and will record an offline offer
    fleet_services.presence_connected(device_id=device.id, session="s1")  # the agent connects…
    assert services.pending_offers(device_id=device.id) == []  # …and asks before the step commits
    finish(step)

    execution = Execution.objects.get(campaign=campaign)
    assert execution.state == Execution.State.OFFERED
    assert execution.delivered_at is not None, "the offer waits for a reconnect that may never come"
    assert offers_to(pushed, device.id) == [execution.id]


def test_a_wave_does_not_finish_while_an_offer_made_during_a_connect_is_unanswered(pushed, held_step):
    start, finish = held_step
    device = make_fleet(1, online=False)[0]
    campaign = make_campaign(make_artifact(), offer_gates=[{"type": "barrier"}])

    step = start(campaign)
    fleet_services.presence_connected(device_id=device.id, session="s1")
    services.pending_offers(device_id=device.id)
    finish(step)
    orchestrator.tick()

    campaign.refresh_from_db()
    assert campaign.state == Campaign.State.RUNNING, campaign.state_reason


def test_an_offer_to_a_device_that_stays_offline_is_not_pushed_and_waits_for_its_connect(pushed, held_step):
    start, finish = held_step
    device = make_fleet(1, online=False)[0]
    campaign = make_campaign(make_artifact(), offer_gates=[{"type": "barrier"}])

    finish(start(campaign))

    execution = Execution.objects.get(campaign=campaign)
    assert (execution.state, execution.delivered_at) == (Execution.State.OFFERED, None)
    assert offers_to(pushed, device.id) == []
    fleet_services.presence_connected(device_id=device.id, session="s1")
    assert [int(f["execution_id"]) for f in services.pending_offers(device_id=device.id)] == [execution.id]


def test_an_offer_whose_doorbell_was_lost_is_sent_again_once_to_the_connected_device_that_never_acked_it(pushed):
    answering, silent = make_fleet(2, online=True)
    campaign = make_campaign(make_artifact())
    t0 = timezone.now()
    orchestrator.tick(now=t0)
    assert sorted(d for d, _ in pushed) == sorted([answering.id, silent.id])
    with transaction.atomic():  # as the agent connection applies a report
        report(Execution.objects.get(campaign=campaign, device=answering), "acked")
    pushed.clear()  # the worker died after the commit: both doorbells are lost, one device had already acked

    orchestrator.tick(now=t0 + dt.timedelta(seconds=5))
    assert pushed == []  # too early to call it lost
    orchestrator.tick(now=t0 + dt.timedelta(seconds=orchestrator.REDELIVER_AFTER_S + 1))
    orchestrator.tick(now=t0 + dt.timedelta(seconds=orchestrator.REDELIVER_AFTER_S + 2))

    lost = Execution.objects.get(campaign=campaign, device=silent)
    assert offers_to(pushed, silent.id) == [lost.id] and offers_to(pushed, answering.id) == []
    assert (lost.state, lost.attempt) == (Execution.State.OFFERED, 0)


def test_an_offer_re_sent_on_reconnect_counts_as_delivered_so_the_step_sends_no_second_copy(pushed):
    (device,) = make_fleet(1, online=True)
    campaign = make_campaign(make_artifact())
    t0 = timezone.now()
    orchestrator.tick(now=t0)
    execution = Execution.objects.get(campaign=campaign)
    assert offers_to(pushed, device.id) == [execution.id]
    pushed.clear()
    # Long after the first push the agent reconnects and is sent its offer again (fresh URL).
    Execution.objects.filter(pk=execution.pk).update(
        delivered_at=timezone.now() - dt.timedelta(seconds=orchestrator.REDELIVER_AFTER_S + 30))
    assert [int(f["execution_id"]) for f in services.pending_offers(device_id=device.id)] == [execution.id]

    orchestrator.tick(now=timezone.now() + dt.timedelta(seconds=1))

    assert pushed == []  # the lost-push re-send counts from the reconnect's delivery: no second copy
