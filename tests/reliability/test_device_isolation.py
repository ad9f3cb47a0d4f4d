"""Device isolation over real agent sockets: a device can never read or write another device's
data, and a quarantined device never receives a rollout offer.

Device A is a real, authenticated agent connection (`RawAgent` against a uvicorn `ConsoleServer`)
that sends well-formed frames naming device B's command, execution, challenge, uid and id. The
connection's identity decides: every such frame is refused or ignored as the protocol says, and
B's rows stay exactly as they were — while B itself can still do each of those things (the
positive control that shows the test would see a change).
"""

from __future__ import annotations

import asyncio
import time

import pytest
from django.core import signing as dj_signing
from django.core.files.uploadedfile import SimpleUploadedFile

from agent_stub import protocol as p
from fleet import services as fleet_services
from fleet.models import Device, DeviceCommand, UplinkCursor
from rollouts import orchestrator
from rollouts import services as rollouts
from rollouts.models import Campaign, Execution
from security.models import AttestationChallenge, AttestationResult
from tests.agent.rawagent import RawAgent, enroll_active, fetch, frames_for, in_db, run

pytestmark = pytest.mark.django_db(transaction=True)

CLAIMS = {"agent_sha256": "a" * 64, "model_sha256": "b" * 64, "boot_id": "boot-1"}


@pytest.fixture
def server(ota_server):
    """The console with download URLs pointing at itself (tests/agent/conftest.py)."""
    return ota_server


async def connect(url: str, uid: str, token: str) -> RawAgent:
    return await enroll_active(url, uid, token, model="iso-box")


def labelled(uids_labels: dict[str, str]) -> None:
    for uid, value in uids_labels.items():
        fleet_services.device_set_labels(actor="test", devices=Device.objects.filter(uid=uid),
                                         set_labels={"iso": value})


def campaign_for(selector: str, content: bytes = b"model v2", version: str = "2.0.0") -> Campaign:
    artifact = rollouts.artifact_create(
        actor="test", name="iso-model", kind="model", version=version,
        variants=[rollouts.VariantUpload(name="default", tiers=[], file=SimpleUploadedFile("m.onnx", content))])
    campaign = rollouts.campaign_create(actor="test", artifact=artifact, name=f"iso {version}",
                                        target_selector=selector, waves=[{"size": "100%", "soak_s": 0, "gates": []}],
                                        rate_per_min=60_000)
    return rollouts.campaign_start(actor="test", campaign=campaign, reason="test")


# --- writes naming another device -----------------------------------------------------------

def test_a_device_cannot_complete_another_devices_command(server, enrollment_token):
    token = enrollment_token(auto_approve=True)

    async def scenario():
        a = await connect(server.ws_url, "iso-a", token)
        b = await connect(server.ws_url, "iso-b", token)
        device_b = await in_db(Device.objects.get, uid="iso-b")
        command = await in_db(fleet_services.command_issue, actor="test", device=device_b, name="sync_state")
        delivered = await b.recv_type("command")
        assert delivered["command_id"] == str(command.id)
        # A answers B's command, naming B as well for good measure.
        await a.send({**p.command_result(1, str(command.id), True, "forged by A"), "device_uid": "iso-b"})
        ack = await a.recv_type("ack", "error")
        state_after_forgery = await in_db(lambda: DeviceCommand.objects.values("state", "output").get(pk=command.pk))
        # B answers its own command: that one counts.
        await b.send(p.command_result(1, str(command.id), True, "done by B"))
        await b.recv_type("ack")
        await a.close()
        await b.close()
        return ack, state_after_forgery, command.pk

    ack, forged, pk = run(scenario())
    assert ack["seq"] == 1  # acked, so A's outbox moves on; nothing of B's changed
    assert forged == {"state": "sent", "output": ""}
    assert DeviceCommand.objects.values("state", "output").get(pk=pk) == {"state": "succeeded", "output": "done by B"}
    assert UplinkCursor.objects.get(device__uid="iso-b").last_acked_seq == 1  # only B's own frame


def test_a_device_cannot_move_another_devices_execution(server, enrollment_token):
    token = enrollment_token(auto_approve=True)

    async def scenario():
        a = await connect(server.ws_url, "iso-a", token)
        b = await connect(server.ws_url, "iso-b", token)
        await in_db(labelled, {"iso-b": "target"})
        campaign = await in_db(campaign_for, "iso=target")
        await in_db(orchestrator.tick)
        offer = await b.recv_type("rollout.offer")
        execution_id = offer["execution_id"]
        before = await in_db(lambda: Execution.objects.values("state", "progress", "error").get(pk=execution_id))
        seq = 0
        for state, error in (("acked", None), ("downloading", None), ("committed", None),
                             ("failed", p.rollout_error("boom", retryable=False)),
                             ("rejected", p.rollout_error("signature_invalid", retryable=False))):
            seq += 1
            await a.send(p.rollout_status(seq, execution_id, state, 100, error))
            assert (await a.recv_type("ack"))["seq"] == seq
        # …and with B's execution id as a string and B's uid beside it.
        seq += 1
        await a.send({**p.rollout_status(seq, str(execution_id), "committed", 100), "device_uid": "iso-b"})
        assert (await a.recv_type("ack"))["seq"] == seq
        after = await in_db(lambda: Execution.objects.values("state", "progress", "error").get(pk=execution_id))
        # B's own report moves it.
        await b.send(p.rollout_status(1, execution_id, "acked"))
        await b.recv_type("ack")
        mine = await in_db(lambda: Execution.objects.values_list("state", flat=True).get(pk=execution_id))
        await a.close()
        await b.close()
        return campaign, before, after, mine

    campaign, before, after, mine = run(scenario())
    assert before["state"] == "offered" and after == before
    assert mine == "acked"
    assert rollouts_counts(campaign) == {"acked": 1}


def rollouts_counts(campaign: Campaign) -> dict[str, int]:
    counts: dict[str, int] = {}
    for state in Execution.objects.filter(campaign=campaign).values_list("state", flat=True):
        counts[state] = counts.get(state, 0) + 1
    return counts


def test_frames_naming_another_device_write_only_to_the_sender(server, enrollment_token):
    token = enrollment_token(auto_approve=True)
    now = p.now_ms()

    async def scenario():
        a = await connect(server.ws_url, "iso-a", token)
        b = await connect(server.ws_url, "iso-b", token)
        b_id = await in_db(lambda: Device.objects.get(uid="iso-b").id)
        foreign = {"device_uid": "iso-b", "device_id": b_id, "uid": "iso-b", "device": "iso-b"}
        await a.send({**p.event(1, [p.event_item(now, "log", "critical", "written by A")]), **foreign})
        await a.send({**p.state(2, {"agent": "9.9.9", "model": "evil"},
                                {"cpu_cores": 64, "ram_mb": 65536, "accelerator": "gpu", "storage_mb": 1,
                                 "arch": "x86_64", "os": "a-os"}), **foreign})
        await a.send({**p.heartbeat(now, 5, 0), **foreign})
        acks = [await a.recv_type("ack"), await a.recv_type("ack")]
        await a.close()
        await b.close()
        return acks

    acks = run(scenario())
    assert [ack["seq"] for ack in acks] == [1, 2]
    from telemetry.models import DeviceEvent

    assert list(DeviceEvent.objects.filter(device__uid="iso-b")) == []
    assert DeviceEvent.objects.get(device__uid="iso-a").message == "written by A"
    b = Device.objects.get(uid="iso-b")
    assert b.installed_versions.get("model") != "evil" and b.tier != 1
    assert Device.objects.get(uid="iso-a").installed_versions["model"] == "evil"
    assert UplinkCursor.objects.get(device=b).last_acked_seq == 0


def test_a_device_cannot_log_in_as_another_device_with_its_own_key(server, enrollment_token):
    token = enrollment_token(auto_approve=True)

    async def scenario():
        a = await connect(server.ws_url, "iso-a", token)
        await connect(server.ws_url, "iso-b", token)
        await a.close()
        impostor = RawAgent(server.ws_url, "iso-b", key=a.key)  # B's uid, A's key
        await impostor.open()
        await impostor.send({"type": "auth", "device_uid": "iso-b", "sig": impostor.sign(), "agent_version": "x"})
        auth_code = await impostor.closed_code()
        # Re-enrolling B's uid with A's key (and a valid token) is refused too.
        enrolled = RawAgent(server.ws_url, "iso-b", key=a.key)
        await enrolled.enroll(token)
        enroll_code = await enrolled.closed_code()
        return auth_code, enroll_code

    assert run(scenario()) == (4401, 4401)


def test_no_http_endpoint_takes_a_device_credential_for_another_devices_resources(enrollment_token):
    """Devices authenticate only on their socket. What a device holds (its enrollment token, its
    uid, a signature with its key) opens none of the REST API's device resources."""
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
    from rest_framework.test import APIClient

    from tests.factories import make_device

    make_device(uid="iso-b")
    secret = enrollment_token(auto_approve=True)
    key = Ed25519PrivateKey.generate()
    attempts = {
        "enrollment token as API token": {"HTTP_AUTHORIZATION": f"Token {secret}"},
        "enrollment token as bearer": {"HTTP_AUTHORIZATION": f"Bearer {secret}"},
        "device signature": {"HTTP_AUTHORIZATION": f"Signature {p.b64e(key.sign(b'iso-a'))}",
                             "HTTP_X_DEVICE_UID": "iso-a"},
    }
    for path in ("/api/v1/devices/iso-b/", "/api/v1/devices/iso-b/commands/", "/api/v1/rollouts/executions/",
                 "/api/v1/security/attestation/results/"):
        for what, headers in attempts.items():
            assert APIClient().get(path, **headers).status_code == 401, (what, path)
        assert APIClient().post("/api/v1/devices/iso-b/commands/", {"name": "reboot"}, format="json",
                                **attempts["enrollment token as API token"]).status_code == 401
    assert not DeviceCommand.objects.filter(device__uid="iso-b").exists()


# --- attestation: answering another device's challenge --------------------------------------

def test_a_device_cannot_answer_another_devices_attestation_challenge(server, enrollment_token):
    token = enrollment_token(auto_approve=True)

    async def scenario():
        a = await connect(server.ws_url, "iso-a", token)
        b = await connect(server.ws_url, "iso-b", token)
        challenge = await b.recv_type("attest.challenge")
        nonce = p.b64d(challenge["nonce"])
        # A signs B's nonce with its own key, and also tries with B's challenge id alone.
        await a.send({**p.attest_evidence_software(challenge["challenge_id"], CLAIMS,
                                                   a.key.sign(p.claims_message(nonce, CLAIMS))),
                      "device_uid": "iso-b"})
        refused = await a.recv_type("error", "attest.result")
        unanswered = await in_db(lambda: AttestationChallenge.objects.get(pk=challenge["challenge_id"]).answered_at)
        results_b = await in_db(lambda: AttestationResult.objects.filter(device__uid="iso-b").count())
        # B answers its own challenge afterwards: still open, still single use.
        await b.send(p.attest_evidence_software(challenge["challenge_id"], CLAIMS,
                                                b.key.sign(p.claims_message(nonce, CLAIMS))))
        own = await b.recv_type("attest.result")
        await a.close()
        await b.close()
        return refused, unanswered, results_b, own

    refused, unanswered, results_b, own = run(scenario())
    assert refused["type"] == "error" and refused["code"] == "challenge_unknown"
    assert unanswered is None and results_b == 0
    assert own["status"] == "warning"  # software claims: the best they can be
    assert not AttestationResult.objects.filter(device__uid="iso-a", challenge__device__uid="iso-b").exists()


# --- download URLs ----------------------------------------------------------------------------

def _expired_token(execution: Execution) -> str:
    """A genuine token for `execution`, signed an hour ago (past ROLLOUTS_DOWNLOAD_TTL_S)."""
    signer = dj_signing.TimestampSigner(salt="rollouts.download")
    signer.timestamp = lambda: dj_signing.b62_encode(int(time.time()) - 3600)
    return signer.sign_object({"e": execution.id, "v": execution.variant_id, "a": execution.attempt})


def _tampered(token: str, execution_id: int) -> str:
    """The same signature over a payload naming another execution."""
    _payload, stamp, sig = token.rsplit(":", 2)
    forged = dj_signing.b64_encode(
        dj_signing.JSONSerializer().dumps({"e": execution_id, "v": 0, "a": 0})).decode()
    return f"{forged}:{stamp}:{sig}"


def test_download_urls_open_only_their_own_live_execution(server, enrollment_token):
    token = enrollment_token(auto_approve=True)

    async def scenario():
        a = await connect(server.ws_url, "iso-a", token)
        b = await connect(server.ws_url, "iso-b", token)
        await in_db(labelled, {"iso-a": "both", "iso-b": "both"})
        await in_db(campaign_for, "iso=both", b"the real model bytes")
        await in_db(orchestrator.tick)
        offers = {"a": await a.recv_type("rollout.offer"), "b": await b.recv_type("rollout.offer")}
        # A finishes its execution; its URL must stop working, B's keeps working for B.
        for seq, state in enumerate(("acked", "downloading", "downloaded", "installing", "verifying", "committed"), 1):
            await a.send(p.rollout_status(seq, offers["a"]["execution_id"], state, 100))
            await a.recv_type("ack")
        await a.close()
        await b.close()
        return offers

    offers = run(scenario())
    url_a, url_b = offers["a"]["artifact"]["url"], offers["b"]["artifact"]["url"]
    base, token_b = url_b.rstrip("/").rsplit("/", 1)
    execution_a = Execution.objects.get(pk=offers["a"]["execution_id"])
    execution_b = Execution.objects.get(pk=offers["b"]["execution_id"])

    status, body, _ = fetch(url_b)
    assert status == 200 and body == b"the real model bytes"  # the live URL works (positive control)
    assert fetch(url_a)[::2] == (410, "gone")  # A's execution is committed: its URL is dead
    assert fetch(f"{base}/{_tampered(token_b, execution_a.id)}/")[::2] == (403, "bad_token")
    assert fetch(f"{base}/{token_b[:-2]}xx/")[::2] == (403, "bad_token")
    assert fetch(f"{base}/{_expired_token(execution_b)}/")[::2] == (410, "expired")
    # A re-offer (new attempt) kills the older URL of the same execution.
    Execution.objects.filter(pk=execution_b.pk).update(attempt=execution_b.attempt + 1)
    assert fetch(url_b)[::2] == (410, "gone")
    assert Execution.objects.get(pk=execution_b.pk).state == "offered"


# --- quarantine -------------------------------------------------------------------------------

def test_a_device_quarantined_mid_campaign_never_gets_an_offer_while_healthy_ones_do(server, enrollment_token):
    """Quarantined after the campaign planned it (so its execution is pending, not canceled at
    creation like the existing e2e test), connected the whole time and reconnecting: no offer
    frame ever reaches it, through any number of orchestrator ticks."""
    token = enrollment_token(auto_approve=True)
    healthy_uids = ["iso-h1", "iso-h2", "iso-h3"]

    async def scenario():
        healthy = [await connect(server.ws_url, uid, token) for uid in healthy_uids]
        quarantined = await connect(server.ws_url, "iso-q", token)
        await in_db(labelled, dict.fromkeys([*healthy_uids, "iso-q"], "fleet"))
        campaign = await in_db(lambda: campaign_for("iso=fleet"))
        q_execution = await in_db(lambda: Execution.objects.values("id", "state").get(campaign=campaign,
                                                                                      device__uid="iso-q"))
        device_q = await in_db(Device.objects.get, uid="iso-q")
        await in_db(fleet_services.device_quarantine, actor="test", device=device_q, reason="failed attestation")
        seen_by_q: list[dict] = []
        for _ in range(5):
            await in_db(orchestrator.tick)
            seen_by_q += await frames_for(quarantined, 0.6)
        offers = [await agent.recv_type("rollout.offer") for agent in healthy]
        # Reconnecting does not bring it an offer either.
        await quarantined.close()
        again = RawAgent(server.ws_url, "iso-q", key=quarantined.key)
        welcome = await again.auth()
        seen_by_q += [welcome, *await frames_for(again, 1.5)]
        await in_db(orchestrator.tick)
        seen_by_q += await frames_for(again, 1.0)
        for agent in [*healthy, again]:
            await agent.close()
        return campaign, q_execution, offers, seen_by_q

    campaign, q_execution, offers, seen_by_q = run(scenario())
    assert q_execution["state"] == "pending"  # planned while it was healthy
    assert sorted(o["execution_id"] for o in offers) == sorted(
        Execution.objects.filter(campaign=campaign, device__uid__in=healthy_uids).values_list("id", flat=True))
    kinds = {frame["type"] for frame in seen_by_q}
    assert "rollout.offer" not in kinds and kinds <= {"welcome", "attest.challenge"}, kinds
    assert any(f["type"] == "welcome" and f["status"] == "quarantined" for f in seen_by_q)
    execution = Execution.objects.get(pk=q_execution["id"])
    assert execution.state == "canceled" and execution.offered_at is None
    assert rollouts.pending_offers(device_id=Device.objects.get(uid="iso-q").id) == []


def test_an_outstanding_offer_dies_with_the_quarantine(server, enrollment_token):
    """Offered while healthy, then quarantined: the offer is not re-sent on reconnect, its
    download URL stops serving the artifact, and later ticks offer it nothing new."""
    token = enrollment_token(auto_approve=True)

    async def scenario():
        healthy = await connect(server.ws_url, "iso-h", token)
        device = await connect(server.ws_url, "iso-q", token)
        await in_db(labelled, {"iso-h": "fleet", "iso-q": "fleet"})
        campaign = await in_db(lambda: campaign_for("iso=fleet"))
        await in_db(orchestrator.tick)
        offer = await device.recv_type("rollout.offer")
        await healthy.recv_type("rollout.offer")
        device_q = await in_db(Device.objects.get, uid="iso-q")
        await in_db(fleet_services.device_quarantine, actor="test", device=device_q, reason="failed attestation")
        status_while_quarantined = await asyncio.to_thread(fetch, offer["artifact"]["url"])
        await device.close()
        again = RawAgent(server.ws_url, "iso-q", key=device.key)
        seen = [await again.auth()]
        for _ in range(3):
            await in_db(orchestrator.tick)
            seen += await frames_for(again, 0.6)
        await again.close()
        await healthy.close()
        return campaign, offer, status_while_quarantined, seen

    _campaign, _offer, fetched, seen = run(scenario())
    assert seen[0]["status"] == "quarantined"
    assert "rollout.offer" not in {frame["type"] for frame in seen}
    assert fetched[0] in (403, 410) and fetched[1] == b"", fetched
    assert rollouts.pending_offers(device_id=Device.objects.get(uid="iso-q").id) == []
