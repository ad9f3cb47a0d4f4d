"""Campaign lifecycle against real PostgreSQL: waves, gates, pause/resume/abort, revert."""

from __future__ import annotations

import pytest

from agent_stub import protocol as p
from fleet.models import Device
from rollouts import services
from rollouts.models import Campaign, Execution
from rollouts.tests.helpers import (
    fail,
    make_artifact,
    make_campaign,
    make_fleet,
    offered,
    refresh,
    report,
    states,
    succeed,
    tick,
)
from security.models import AuditEntry

pytestmark = pytest.mark.django_db
S = Execution.State
CS = Campaign.State

CANARY = [
    {"size": "10%", "soak_s": 0, "gates": [{"type": "success_ratio", "min_ratio": 0.9},
                                           {"type": "failure", "max_pct": 20, "min_sample": 1}]},
    {"size": "50%", "soak_s": 0, "gates": [{"type": "success_ratio", "min_ratio": 0.9}]},
    {"size": "100%", "soak_s": 0, "gates": [{"type": "success_ratio", "min_ratio": 0.9}]},
]


def test_canary_wave_passes_its_gates_and_the_campaign_expands_to_completion(pushed,
                                                                             django_capture_on_commit_callbacks):
    devices = make_fleet(20)
    campaign = make_campaign(make_artifact(), waves=CANARY)
    assert campaign.state == CS.RUNNING and campaign.eligible_count == 20
    waves_seen = []
    for _ in range(10):
        with django_capture_on_commit_callbacks(execute=True):
            tick()
        campaign = refresh(campaign)
        if campaign.state != CS.RUNNING:
            break
        batch = offered(campaign)
        waves_seen.append((campaign.current_wave, len(batch)))
        for execution in batch:
            succeed(execution)
    assert campaign.state == CS.COMPLETED
    # 10% of 20 = 2 canaries, then up to 50% (8 more), then the rest (10).
    assert waves_seen[:3] == [(0, 2), (1, 8), (2, 10)]
    assert states(campaign) == {"committed": 20}
    assert len(pushed) == 20 and {frame["type"] for _, frame in pushed} == {"rollout.offer"}
    assert {Device.objects.get(pk=d.pk).installed_versions["model"] for d in devices} == {"1.1.0"}
    actions = list(AuditEntry.objects.filter(action__startswith="campaign.").values_list("action", flat=True))
    assert actions.count("campaign.wave") == 2 and "campaign.complete" in actions
    assert campaign.gate_results["0"]["success_ratio"]["ok"] is True


def test_failing_self_test_rolls_back_and_the_failure_gate_pauses_the_campaign():
    make_fleet(20)
    campaign = make_campaign(make_artifact(), waves=CANARY)
    tick()
    first, second = offered(campaign)
    succeed(first)
    fail(second, "rolled_back", "self_test_failed")
    assert Execution.objects.get(pk=second.pk).state == S.ROLLED_BACK
    tick()
    campaign = refresh(campaign)
    assert campaign.state == CS.PAUSED
    assert "gate failure failed in wave 1" in campaign.state_reason
    assert campaign.gate_results["0"]["failure"]["value"] == 50.0
    # Paused: no new offers.
    tick()
    assert Execution.objects.filter(campaign=campaign, state=S.OFFERED).count() == 0
    # Resume overrides the tripped gate for this wave; the campaign moves on only after soak + other gates.
    services.campaign_resume(actor="test", campaign=campaign, reason="looked at the logs: flaky sensor")
    campaign = refresh(campaign)
    assert campaign.state == CS.RUNNING and campaign.gate_overrides == {"0": ["failure", "success_ratio"]}
    tick()
    assert refresh(campaign).current_wave == 1  # the operator accepted wave 1 as it is


def test_the_failure_gate_waits_for_its_minimum_sample():
    make_fleet(40)
    waves = [{"size": "25%", "soak_s": 3600, "gates": [{"type": "failure", "max_pct": 10, "min_sample": 5}]},
             {"size": "100%", "soak_s": 0, "gates": []}]
    campaign = make_campaign(make_artifact(), waves=waves)
    tick()
    batch = offered(campaign)
    fail(batch[0], "failed", "install_error")
    tick()
    assert refresh(campaign).state == CS.RUNNING  # 1 decided < 5
    for execution in batch[1:5]:
        succeed(execution)
    tick()
    campaign = refresh(campaign)
    assert campaign.state == CS.PAUSED and campaign.gate_results["0"]["failure"]["value"] == 20.0


def test_abort_action_cancels_queued_and_offered_and_lets_installing_finish(pushed,
                                                                           django_capture_on_commit_callbacks):
    make_fleet(10)
    campaign = make_campaign(make_artifact(), waves=[{"size": "100%", "soak_s": 0, "gates": []}], rate_per_min=60,
                             max_concurrent=10)
    with django_capture_on_commit_callbacks(execute=True):
        tick()
    a, b, *rest = offered(campaign)
    for state in ("acked", "downloading", "downloaded", "installing"):
        report(a, state)
    pushed.clear()
    with django_capture_on_commit_callbacks(execute=True):
        services.campaign_abort(actor="test", campaign=campaign, reason="wrong artifact")
    by_state = states(campaign)
    assert by_state["installing"] == 1 and by_state["canceled"] == 9
    assert sorted(f["execution_id"] for _, f in pushed) == sorted(e.id for e in [b, *rest])
    assert {f["type"] for _, f in pushed} == {"rollout.cancel"}
    report(a, "committed")  # the installing one finishes and reports truthfully
    assert Execution.objects.get(pk=a.pk).state == S.COMMITTED


def test_abort_and_revert_sends_committed_devices_back_to_their_previous_version():
    make_artifact(version="1.0.0")
    make_fleet(6)
    waves = [{"size": "50%", "soak_s": 0, "gates": [{"type": "failure", "max_pct": 0, "min_sample": 3,
                                                     "action": "abort_and_revert"}]},
             {"size": "100%", "soak_s": 0, "gates": []}]
    campaign = make_campaign(make_artifact(version="1.1.0"), waves=waves)
    tick()
    x, y, z = offered(campaign)
    succeed(x)
    succeed(y)
    fail(z)
    tick()
    campaign = refresh(campaign)
    assert campaign.state == CS.ABORTED
    revert = campaign.reverts.get()
    assert revert.state == CS.RUNNING
    tick()
    reverts = offered(revert)
    assert sorted(e.device_id for e in reverts) == sorted([x.device_id, y.device_id])
    assert {e.target_version for e in reverts} == {"1.0.0"}
    assert {e.variant.artifact.version for e in reverts} == {"1.0.0"}
    for execution in reverts:
        succeed(execution)
    tick()
    assert refresh(revert).state == CS.COMPLETED
    assert Device.objects.get(pk=x.device_id).installed_versions["model"] == "1.0.0"


def test_reports_never_move_an_execution_backwards_and_foreign_reports_are_refused():
    one, other = make_fleet(2)
    campaign = make_campaign(make_artifact())
    tick()
    execution = Execution.objects.get(campaign=campaign, device=one)
    report(execution, "downloaded")
    report(execution, "acked")  # late, out of order: a silent no-op
    assert Execution.objects.get(pk=execution.pk).state == S.DOWNLOADED
    with pytest.raises(services.UnknownExecution, match="not an execution of this device"):
        report(execution, "installing", device_id=other.id)  # not this device's execution
    assert Execution.objects.get(pk=execution.pk).state == S.DOWNLOADED
    with pytest.raises(services.UnknownExecution, match="not an execution of this device"):
        services.execution_report(device_id=one.id, report=p.RolloutStatus(  # unknown execution
            seq=1, execution_id=999_999_999, state="committed", progress=100, error=None))
    report(execution, "committed")
    report(execution, "rolled_back")  # after a final outcome: ignored
    assert Execution.objects.get(pk=execution.pk).state == S.COMMITTED


def test_retryable_failures_go_back_to_the_queue_with_backoff():
    make_fleet(1)
    campaign = make_campaign(make_artifact(), max_retries=2, retry_backoff_s=30)
    tick()
    (execution,) = offered(campaign)
    report(execution, "acked")
    report(execution, "failed", error=("download_failed", True))
    execution.refresh_from_db()
    assert execution.state == S.PENDING and execution.attempt == 1 and execution.next_attempt_at is not None
    tick()
    assert offered(campaign) == []  # backoff not over
    import datetime as dt

    from django.utils import timezone

    tick(now=timezone.now() + dt.timedelta(seconds=31))
    assert [e.id for e in offered(campaign)] == [execution.id]


def test_phase_timeouts_retry_and_then_time_out(pushed, django_capture_on_commit_callbacks):
    import datetime as dt

    from django.utils import timezone

    make_fleet(1)
    campaign = make_campaign(make_artifact(), max_retries=1, retry_backoff_s=1, ack_timeout_s=10)
    tick()
    later = timezone.now() + dt.timedelta(seconds=11)
    tick(now=later)  # ack timeout: back to pending (attempt 1), then re-offered after the backoff
    execution = Execution.objects.get(campaign=campaign)
    assert execution.attempt == 1 and execution.error["code"] == "offered_timeout"
    tick(now=later + dt.timedelta(seconds=3))
    assert Execution.objects.get(pk=execution.pk).state == S.OFFERED
    with django_capture_on_commit_callbacks(execute=True):
        tick(now=later + dt.timedelta(seconds=30))
    execution.refresh_from_db()
    assert execution.state == S.TIMED_OUT
    assert pushed[-1][1] == {"type": "rollout.cancel", "execution_id": execution.id}


def test_a_newer_campaign_supersedes_queued_executions_of_an_older_one():
    make_fleet(10)
    old = make_campaign(make_artifact(version="1.1.0"), rate_per_min=6, max_concurrent=1)
    tick()
    assert len(offered(old)) == 1
    new = make_campaign(make_artifact(version="1.2.0"))
    assert states(old) == {"offered": 1, "superseded": 9}
    assert Execution.objects.filter(campaign=old, state=S.SUPERSEDED).first().error["code"] == "superseded"
    # The device still busy with the old campaign waits; the others are offered.
    tick()
    assert len(offered(new)) == 9
    assert Execution.objects.get(campaign=new, device=offered(old)[0].device).hold == "busy"


def test_raising_a_percentage_only_adds_devices():
    make_fleet(50)
    artifact = make_artifact()
    small = make_campaign(artifact, waves=[{"size": "10%", "soak_s": 0, "gates": []},
                                           {"size": "100%", "soak_s": 0, "gates": []}], start=False)
    services.campaign_start(actor="test", campaign=small, reason="test")
    first = set(Execution.objects.filter(campaign=small, wave=0).values_list("device_id", flat=True))
    services.campaign_update(actor="test", campaign=small, waves=[{"size": "30%", "soak_s": 0, "gates": []},
                                                                  {"size": "100%", "soak_s": 0, "gates": []}])
    grown = set(Execution.objects.filter(campaign=small, wave=0).values_list("device_id", flat=True))
    assert len(first) == 5 and len(grown) == 15 and first < grown


def test_a_scheduled_campaign_starts_at_its_time_and_not_before():
    import datetime as dt

    from django.utils import timezone

    make_fleet(2)
    campaign = make_campaign(make_artifact(), start=False)
    later = timezone.now() + dt.timedelta(minutes=10)
    services.campaign_schedule(actor="test", campaign=campaign, start_at=later, reason="tonight")
    tick()
    assert refresh(campaign).state == CS.SCHEDULED
    tick(now=later + dt.timedelta(seconds=1))
    campaign = refresh(campaign)
    assert campaign.state == CS.RUNNING and len(offered(campaign)) == 2
    assert AuditEntry.objects.filter(action="campaign.start", actor="system:orchestrator").exists()


def test_the_rate_limit_and_the_concurrency_cap_bound_each_step():
    import datetime as dt

    from django.utils import timezone

    make_fleet(30)
    limited = make_campaign(make_artifact(), rate_per_min=60, max_concurrent=1000)
    tick()
    assert len(offered(limited)) == 10  # burst: 10 s worth at 60/min
    tick(now=timezone.now() + dt.timedelta(seconds=5))
    assert len(offered(limited)) == 15  # 5 s later: 5 more tokens
    services.campaign_abort(actor="test", campaign=limited, reason="next test")

    capped = make_campaign(make_artifact(version="1.2.0"), max_concurrent=8)
    tick()
    assert len(offered(capped)) == 8
    for execution in offered(capped)[:5]:
        succeed(execution)
    tick(now=timezone.now() + dt.timedelta(seconds=60))
    assert Execution.objects.filter(campaign=capped, state=S.OFFERED).count() == 8
    assert Execution.objects.filter(campaign=capped, state=S.COMMITTED).count() == 5
