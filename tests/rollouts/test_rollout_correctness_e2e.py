"""Rollout correctness over real agent sockets (`RawAgent` against a uvicorn `ConsoleServer`).

1. A device quarantined by attestation in the middle of a download: its execution ends as
   `canceled` / `quarantined` at once, its download URL stops serving, no tick offers it
   anything, its later report is recorded without a retry; released by an operator, the next
   tick offers it the same execution again and it can finish.
2. A `rollout.status` naming another device's execution (or no execution at all) is refused in
   the frame's ack with a reason and changes nothing; late and out-of-order reports for the
   device's own execution stay silent no-ops (accepted, nothing changed).
"""

from __future__ import annotations

import asyncio

import pytest
from django.core.files.uploadedfile import SimpleUploadedFile

from agent_stub import protocol as p
from fleet import services as fleet_services
from fleet.models import Device
from rollouts import orchestrator
from rollouts import services as rollouts
from rollouts.models import Campaign, Execution
from security.models import AuditEntry
from tests.agent.rawagent import RawAgent, enroll_active, fetch, frames_for, in_db, run

pytestmark = pytest.mark.django_db(transaction=True)

CLAIMS = {"agent_sha256": "a" * 64, "model_sha256": "b" * 64, "boot_id": "boot-1"}
CONTENT = b"the model bytes of 2.0.0"
INSTALL = ("acked", "downloading", "downloaded", "installing", "verifying", "committed")


async def connect(url: str, uid: str, token: str) -> RawAgent:
    return await enroll_active(url, uid, token, model="rc-box")


async def report(agent: RawAgent, seq: int, execution_id: object, state: str, progress: int = 0,
                 error: dict | None = None) -> dict:
    """Send one `rollout.status` and return its ack."""
    await agent.send(p.rollout_status(seq, execution_id, state, progress, error))
    ack = await agent.recv_type("ack")
    assert ack["seq"] == seq, ack
    return ack


def campaign_for(uids: list[str]) -> Campaign:
    artifact = rollouts.artifact_create(
        actor="test", name="rc-model", kind="model", version="2.0.0",
        variants=[rollouts.VariantUpload(name="default", tiers=[], file=SimpleUploadedFile("m.onnx", CONTENT))])
    campaign = rollouts.campaign_create(actor="test", artifact=artifact, name="rc 2.0.0", target_uids=uids,
                                        waves=[{"size": "100%", "soak_s": 0, "gates": []}], rate_per_min=60_000)
    return rollouts.campaign_start(actor="test", campaign=campaign, reason="test")


def row(execution_id: int) -> dict:
    return Execution.objects.values("state", "progress", "error", "attempt", "updated_at").get(pk=execution_id)


def test_a_device_quarantined_by_attestation_mid_download_stops_and_gets_the_offer_again_once_released(
        ota_server, enrollment_token, operator_user):
    token = enrollment_token(auto_approve=True)

    async def scenario():
        out: dict = {}
        healthy = await connect(ota_server.ws_url, "rc-h", token)
        suspect = await connect(ota_server.ws_url, "rc-q", token)
        challenge = await suspect.recv_type("attest.challenge")
        campaign = await in_db(campaign_for, ["rc-h", "rc-q"])
        await in_db(orchestrator.tick)
        offer = await suspect.recv_type("rollout.offer")
        await healthy.recv_type("rollout.offer")
        execution_id = offer["execution_id"]
        assert await report(suspect, 1, execution_id, "acked") == p.ack(1, 1, [])
        assert await report(suspect, 2, execution_id, "downloading", 30) == p.ack(2, 1, [])

        # The connect challenge answered twice: the second answer is a reuse → contraindicated.
        nonce = p.b64d(challenge["nonce"])
        evidence = p.attest_evidence_software(challenge["challenge_id"], CLAIMS,
                                              suspect.key.sign(p.claims_message(nonce, CLAIMS)))
        await suspect.send(evidence)
        out["first_result"] = (await suspect.recv_type("attest.result"))["status"]
        await suspect.send(evidence)
        out["second_result"] = (await suspect.recv_type("attest.result"))["status"]
        out["after_quarantine"] = await frames_for(suspect, 1.5)
        out["quarantined_row"] = await in_db(row, execution_id)
        out["download_while_quarantined"] = await asyncio.to_thread(fetch, offer["artifact"]["url"])

        # Its download failed (refused): the report is recorded, nothing is retried or re-offered.
        out["failed_ack"] = await report(suspect, 3, execution_id, "failed", 30,
                                         p.rollout_error("download_failed", retryable=True, detail="HTTP 410"))
        for _ in range(3):
            await in_db(orchestrator.tick)
            out["after_quarantine"] += await frames_for(suspect, 0.5)
        out["before_release_row"] = await in_db(row, execution_id)

        # An operator releases it: the running campaign takes it back and the next tick offers it.
        device = await in_db(Device.objects.get, uid="rc-q")
        await in_db(fleet_services.device_release, actor=operator_user, device=device, reason="re-imaged")
        out["release_welcome"] = await suspect.recv_type("welcome")
        await in_db(orchestrator.tick)
        again = await suspect.recv_type("rollout.offer")
        out["again"] = again
        out["download_after_release"] = await asyncio.to_thread(fetch, again["artifact"]["url"])
        for seq, state in enumerate(INSTALL, 4):
            assert await report(suspect, seq, execution_id, state, 100 if state == "committed" else 50) == \
                p.ack(seq, 1, [])
        healthy_offer_id = await in_db(lambda: Execution.objects.get(campaign=campaign, device__uid="rc-h").id)
        for seq, state in enumerate(INSTALL, 1):
            await report(healthy, seq, healthy_offer_id, state)
        await in_db(orchestrator.tick)
        await suspect.close()
        await healthy.close()
        return campaign, execution_id, out

    campaign, execution_id, out = run(scenario())
    assert (out["first_result"], out["second_result"]) == ("warning", "contraindicated")
    kinds = [f["type"] for f in out["after_quarantine"]]
    assert "rollout.offer" not in kinds, kinds
    assert {"type": "welcome", "status": "quarantined"}.items() <= next(
        f for f in out["after_quarantine"] if f["type"] == "welcome").items()

    quarantined = out["quarantined_row"]
    assert quarantined["state"] == "canceled" and quarantined["attempt"] == 0
    assert quarantined["error"] == {
        "code": "quarantined", "retryable": False,
        "detail": "the device was quarantined while downloading: attestation contraindicated: challenge.reused"}
    assert out["download_while_quarantined"][:2] == (410, b"")
    entry = AuditEntry.objects.get(action="execution.cancel", target_id=str(campaign.id))
    assert entry.actor == "attestation" and entry.data["executions"] == {str(execution_id): "downloading"}
    assert entry.data["reason"] == "attestation contraindicated: challenge.reused"

    assert out["failed_ack"] == p.ack(3, 1, [])
    stopped = out["before_release_row"]
    assert stopped["state"] == "canceled" and stopped["attempt"] == 0
    assert stopped["error"]["code"] == "quarantined" and stopped["error"]["device_error"]["code"] == "download_failed"

    assert out["release_welcome"]["status"] == "active"
    assert out["again"]["execution_id"] == execution_id
    assert out["download_after_release"] == (200, CONTENT, "")
    requeue = AuditEntry.objects.get(action="execution.requeue", target_id=str(campaign.id))
    assert requeue.actor_user_id == operator_user.id and requeue.data["reason"] == "re-imaged"
    assert Execution.objects.get(pk=execution_id).state == "committed"
    assert Campaign.objects.get(pk=campaign.pk).state == "completed"


def test_a_report_on_another_devices_execution_is_refused_in_the_ack_and_changes_nothing(ota_server,
                                                                                         enrollment_token):
    token = enrollment_token(auto_approve=True)

    async def scenario():
        a = await connect(ota_server.ws_url, "rc-a", token)
        b = await connect(ota_server.ws_url, "rc-b", token)
        await in_db(campaign_for, ["rc-a", "rc-b"])
        await in_db(orchestrator.tick)
        mine = (await a.recv_type("rollout.offer"))["execution_id"]
        theirs = (await b.recv_type("rollout.offer"))["execution_id"]
        before = await in_db(row, theirs)
        acks = {
            "foreign": await report(a, 1, theirs, "committed", 100),
            "foreign_failure": await report(a, 2, theirs, "failed", 0, p.rollout_error("boom", retryable=False)),
            "foreign_as_text": await report(a, 3, str(theirs), "downloading", 50),
            "unknown": await report(a, 4, 987_654_321, "committed", 100),
        }
        after = await in_db(row, theirs)
        # Its own execution: a late or out-of-order report is legitimate and a silent no-op.
        acks["own_downloaded"] = await report(a, 5, mine, "downloaded", 60)
        acks["own_out_of_order"] = await report(a, 6, mine, "acked", 0)
        own_after_reorder = await in_db(row, mine)
        for seq, state in enumerate(("installing", "verifying", "committed"), 7):
            await report(a, seq, mine, state, 100)
        acks["own_late"] = await report(a, 10, mine, "rolled_back", 0, p.rollout_error("late", retryable=False))
        own_final = await in_db(row, mine)
        # B's own report still moves B's execution (the refusal above was not a broken path).
        acks["b_own"] = await report(b, 1, theirs, "acked")
        b_after = await in_db(row, theirs)
        await a.close()
        await b.close()
        return theirs, before, after, acks, own_after_reorder, own_final, b_after

    theirs, before, after, acks, own_after_reorder, own_final, b_after = run(scenario())
    refusal = f"execution {theirs} is not an execution of this device"
    assert acks["foreign"] == p.ack(1, 0, [{"index": 0, "reason": refusal}])
    assert acks["foreign_failure"] == p.ack(2, 0, [{"index": 0, "reason": refusal}])
    assert acks["foreign_as_text"] == p.ack(3, 0, [{"index": 0, "reason": refusal}])
    assert acks["unknown"] == p.ack(4, 0, [{"index": 0, "reason": "execution 987654321 is not an execution of this "
                                                                   "device"}])
    assert before["state"] == "offered" and after == before  # not even updated_at moved

    assert acks["own_downloaded"] == p.ack(5, 1, []) and acks["own_out_of_order"] == p.ack(6, 1, [])
    assert own_after_reorder["state"] == "downloaded" and own_after_reorder["progress"] == 60
    assert acks["own_late"] == p.ack(10, 1, []) and own_final["state"] == "committed"
    assert acks["b_own"] == p.ack(1, 1, []) and b_after["state"] == "acked"
    assert Device.objects.get(uid="rc-b").installed_versions.get("model") != "2.0.0"
