"""The one-statement path for a rollout's common reports (`services.execution_progress`, used by the
agent connection's `apply_durable`) gives the same result as the general path, or stays out of the way.

These tests run outside a test transaction (the fast path runs in autocommit only, as in production)."""

from __future__ import annotations

import datetime as dt

import pytest
from django.db import transaction
from django.utils import timezone

from agent_stub import protocol as p
from console.agent_consumer import apply_durable
from fleet.models import UplinkCursor
from rollouts import services
from rollouts.models import Execution
from rollouts.tests.helpers import make_artifact, make_campaign, make_fleet, offered, report, tick

pytestmark = pytest.mark.django_db(transaction=True)
S = Execution.State


def status(execution: Execution, state: str, *, seq: int, progress: int = 0) -> p.RolloutStatus:
    return p.RolloutStatus(seq=seq, execution_id=execution.id, state=state, progress=progress, error=None)


def cursor(device_id: int) -> int:
    return UplinkCursor.objects.get(device_id=device_id).last_acked_seq


@pytest.fixture
def two_offered():
    devices = make_fleet(2)
    for device in devices:
        UplinkCursor.objects.get_or_create(device=device)
    campaign = make_campaign(make_artifact())
    tick()
    first, second = offered(campaign)
    return first, second


def test_a_forward_report_moves_the_execution_and_the_cursor_in_one_statement_like_the_general_path(
        two_offered, django_assert_num_queries):
    fast, general = two_offered
    before = timezone.now()
    with django_assert_num_queries(1):
        assert services.execution_progress(device_id=fast.device_id, report=status(fast, "acked", seq=1, progress=5),
                                           cursor_from=0, cursor_to=1)
    with transaction.atomic():
        report(general, "acked", progress=5)
    fast.refresh_from_db()
    general.refresh_from_db()
    assert (fast.state, fast.progress) == (general.state, general.progress) == (S.ACKED, 5)
    assert cursor(fast.device_id) == 1
    timeout = dt.timedelta(seconds=fast.campaign.download_timeout_s)
    assert before + timeout <= fast.deadline_at <= timezone.now() + timeout
    assert abs(fast.deadline_at - general.deadline_at) < dt.timedelta(seconds=5)
    assert fast.delivered_at == Execution.objects.get(pk=fast.pk).offered_at  # delivered at the offer, kept


def test_a_whole_rollout_through_apply_durable_commits_and_records_the_installed_version(two_offered):
    execution, _ = two_offered
    for seq, state in enumerate(("acked", "downloading", "downloaded", "installing", "verifying", "committed"), 1):
        assert apply_durable(execution.device_id, seq, "rollout.status", status(execution, state, seq=seq)) == "stored"
    execution.refresh_from_db()
    assert execution.state == S.COMMITTED and execution.progress == 100
    assert cursor(execution.device_id) == 6
    assert execution.device.__class__.objects.get(pk=execution.device_id).installed_versions["model"] == "1.1.0"


def test_a_resent_frame_is_a_duplicate_and_changes_nothing(two_offered):
    execution, _ = two_offered
    assert apply_durable(execution.device_id, 1, "rollout.status", status(execution, "acked", seq=1)) == "stored"
    assert apply_durable(execution.device_id, 2, "rollout.status", status(execution, "downloading", seq=2,
                                                                          progress=40)) == "stored"
    assert not services.execution_progress(device_id=execution.device_id, report=status(execution, "acked", seq=1),
                                           cursor_from=0, cursor_to=1)
    assert apply_durable(execution.device_id, 1, "rollout.status", status(execution, "acked", seq=1)) == "duplicate"
    execution.refresh_from_db()
    assert (execution.state, execution.progress, cursor(execution.device_id)) == (S.DOWNLOADING, 40, 2)


def test_an_out_of_order_or_same_phase_report_takes_the_general_path(two_offered):
    execution, _ = two_offered
    apply_durable(execution.device_id, 1, "rollout.status", status(execution, "downloading", seq=1, progress=10))
    # Same phase, more progress: not the fast path's; the general path records the progress.
    assert not services.execution_progress(device_id=execution.device_id,
                                           report=status(execution, "downloading", seq=2, progress=60),
                                           cursor_from=1, cursor_to=2)
    assert apply_durable(execution.device_id, 2, "rollout.status",
                         status(execution, "downloading", seq=2, progress=60)) == "stored"
    # Backwards: ignored, the cursor still moves (a late report is legitimate).
    assert apply_durable(execution.device_id, 3, "rollout.status", status(execution, "acked", seq=3)) == "stored"
    execution.refresh_from_db()
    assert (execution.state, execution.progress, cursor(execution.device_id)) == (S.DOWNLOADING, 60, 3)


def test_another_devices_execution_is_refused_and_nothing_moves(two_offered):
    mine, theirs = two_offered
    result = apply_durable(mine.device_id, 1, "rollout.status", status(theirs, "acked", seq=1))
    assert result.rejected and "not an execution of this device" in result.rejected[0][1]
    theirs.refresh_from_db()
    assert theirs.state == S.OFFERED and cursor(mine.device_id) == 1 and cursor(theirs.device_id) == 0


def test_a_report_for_an_execution_canceled_meanwhile_is_ignored_and_stored(two_offered):
    execution, _ = two_offered
    Execution.objects.filter(pk=execution.pk).update(state=S.CANCELED)
    assert apply_durable(execution.device_id, 1, "rollout.status", status(execution, "acked", seq=1)) == "stored"
    execution.refresh_from_db()
    assert execution.state == S.CANCELED and cursor(execution.device_id) == 1


def test_downloaded_moves_in_one_statement_and_kicks_the_orchestrator_when_the_campaign_has_no_window(
        two_offered, no_kicks):
    execution, _ = two_offered
    for seq, state in enumerate(("acked", "downloading"), 1):
        apply_durable(execution.device_id, seq, "rollout.status", status(execution, state, seq=seq))
    kicked_before = len(no_kicks)  # the campaign's start kicked it
    before = timezone.now()
    assert services.execution_progress(device_id=execution.device_id, report=status(execution, "downloaded", seq=3),
                                       cursor_from=2, cursor_to=3)
    execution.refresh_from_db()
    assert execution.state == S.DOWNLOADED and no_kicks[kicked_before:] == [execution.campaign_id]
    install = dt.timedelta(seconds=execution.campaign.install_timeout_s)
    assert before + install <= execution.deadline_at <= timezone.now() + install


def test_downloaded_in_a_campaign_with_a_maintenance_window_takes_the_general_path_and_waits_for_the_window():
    device = make_fleet(1)[0]
    UplinkCursor.objects.get_or_create(device=device)
    campaign = make_campaign(make_artifact(), window_cron="0 3 * * *", window_tz="UTC", window_duration_min=60)
    tick()
    (execution,) = offered(campaign)
    for seq, state in enumerate(("acked", "downloading"), 1):
        apply_durable(execution.device_id, seq, "rollout.status", status(execution, state, seq=seq))
    assert not services.execution_progress(device_id=device.id, report=status(execution, "downloaded", seq=3),
                                           cursor_from=2, cursor_to=3)
    assert apply_durable(device.id, 3, "rollout.status", status(execution, "downloaded", seq=3)) == "stored"
    execution.refresh_from_db()
    window = services.current_window(campaign, timezone.now())
    assert execution.state == S.DOWNLOADED and cursor(device.id) == 3
    assert execution.deadline_at >= max(timezone.now(), window[1])


@pytest.mark.parametrize("execution_id", ["not-a-number", 2**63 + 5, 0])
def test_a_report_naming_an_impossible_execution_id_is_refused_by_the_general_path(two_offered, execution_id):
    execution, _ = two_offered
    frame = p.RolloutStatus(seq=1, execution_id=execution_id, state="acked", progress=0, error=None)
    result = apply_durable(execution.device_id, 1, "rollout.status", frame)
    assert result.rejected and "not an execution of this device" in result.rejected[0][1]
    assert cursor(execution.device_id) == 1
