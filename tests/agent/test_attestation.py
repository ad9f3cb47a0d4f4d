"""TPM enrollment and attestation through the real server, with a real software TPM."""

import asyncio

import pytest

from agent_stub import protocol as p
from agent_stub.tpm import Tpm
from fleet.models import Device
from security import attestation
from security.models import AttestationResult, DeviceTrust, TpmIdentity, TrustAnchor
from security.tpm.verify import make_challenge_qualifying_data
from tests.agent.rawagent import RawAgent, in_db, public_bytes, run

pytestmark = pytest.mark.django_db(transaction=True)


def trust_swtpm_ca(swtpm) -> None:
    TrustAnchor.objects.create(name="swtpm local root", tier="test", certificate_pem=swtpm.root_ca_pem.decode())
    TrustAnchor.objects.create(name="swtpm issuer", tier="intermediate", certificate_pem=swtpm.issuer_ca_pem.decode())


async def tpm_enroll(agent: RawAgent, token: str, tpm: Tpm, *, answer=None) -> dict:
    await agent.open()
    await agent.send(p.enroll(token, agent.uid, public_bytes(agent.key), agent.key.sign(p.auth_message(agent.nonce,
                                                                                                       agent.uid)),
                              hardware={"model": "tpm-box", "ram_mb": 4096},
                              tpm=p.tpm_info(tpm.ek_public(), tpm.ek_certificate(), tpm.ak_public())))
    credential = await agent.recv()
    if credential["type"] != "tpm.credential":
        return credential
    secret = await asyncio.to_thread(tpm.activate_credential, p.b64d(credential["credential_blob"]),
                                     p.b64d(credential["encrypted_secret"]))
    await agent.send(p.tpm_activate(answer if answer is not None else secret))
    return await agent.recv()


async def answer_challenge(agent: RawAgent, tpm: Tpm) -> dict:
    challenge = await agent.recv_type("attest.challenge")
    qualifying = make_challenge_qualifying_data(p.b64d(challenge["nonce"]), public_bytes(agent.key))
    attest, signature, pcrs = await asyncio.to_thread(tpm.quote, qualifying, challenge["pcrs"])
    await agent.send(p.attest_evidence_tpm(challenge["challenge_id"], attest, signature, pcrs))
    return await agent.recv_type("attest.result")


def test_tpm_enrollment_binds_ek_and_ak_and_a_quote_is_affirming_under_policy(console_server, enrollment_token, swtpm, tpm):
    trust_swtpm_ca(swtpm)
    token = enrollment_token(auto_approve=True)
    golden = tpm.read_pcrs(list(range(8)))
    attestation.policy_save(actor="test", name="tpm-box baseline", hardware_model="tpm-box", golden_pcrs=golden)

    async def scenario():
        agent = RawAgent(console_server.ws_url, "tpm-1")
        welcome = await tpm_enroll(agent, token, tpm)
        assert welcome["type"] == "welcome" and welcome["status"] == "active"
        result = await answer_challenge(agent, tpm)
        await agent.close()
        return result

    assert run(scenario())["status"] == "affirming"
    identity = TpmIdentity.objects.get(device__uid="tpm-1")
    assert identity.ek_tier == "test" and identity.ek_approved
    result = AttestationResult.objects.get(device__uid="tpm-1")
    assert result.failed_checks == [] and result.policy_version == 1 and result.pcrs["sha256"]
    assert DeviceTrust.objects.get(device__uid="tpm-1").state == "trusted"


def test_a_wrong_credential_activation_answer_is_refused_and_creates_nothing(console_server, enrollment_token, swtpm,
                                                                              tpm):
    trust_swtpm_ca(swtpm)
    token = enrollment_token(auto_approve=True)

    async def scenario():
        agent = RawAgent(console_server.ws_url, "tpm-2")
        reply = await tpm_enroll(agent, token, tpm, answer=b"\x00" * 32)
        assert reply["code"] == "auth_failed" and "activation" in reply["message"]
        return await agent.closed_code()

    assert run(scenario()) == 4401
    assert not Device.objects.filter(uid="tpm-2").exists()


def test_an_ek_from_an_untrusted_ca_waits_for_an_operator(console_server, enrollment_token, tpm):
    token = enrollment_token(auto_approve=True)  # no trust anchors: the swtpm CA is unknown
    welcome = run(tpm_enroll(RawAgent(console_server.ws_url, "tpm-3"), token, tpm))
    assert welcome["status"] == "pending"
    identity = TpmIdentity.objects.get(device__uid="tpm-3")
    assert not identity.ek_approved and "ek_cert.chain" in identity.ek_cert_failed


def test_a_pcr_extended_away_from_golden_quarantines_the_device_and_it_gets_nothing_but_challenges(
    console_server, enrollment_token, swtpm_factory, tmp_path
):
    fresh = swtpm_factory()
    device_tpm = Tpm(fresh.spec)
    device_tpm.ensure_keys(tmp_path / "state")
    trust_swtpm_ca(fresh)
    token = enrollment_token(auto_approve=True)
    attestation.policy_save(actor="test", name="baseline", golden_pcrs=device_tpm.read_pcrs(list(range(8))))

    async def scenario():
        agent = RawAgent(console_server.ws_url, "tpm-4")
        assert (await tpm_enroll(agent, token, device_tpm))["status"] == "active"
        assert (await answer_challenge(agent, device_tpm))["status"] == "affirming"
        await asyncio.to_thread(device_tpm.extend_pcr, 7, b"unsigned bootloader")
        device = await in_db(Device.objects.get, uid="tpm-4")
        await in_db(attestation.attestation_request, actor="test", device=device)
        result = await answer_challenge(agent, device_tpm)
        welcome = await agent.recv_type("welcome")
        await agent.close()
        return result, welcome

    result, welcome = run(scenario())
    assert result["status"] == "contraindicated"
    assert welcome["status"] == "quarantined"
    device = Device.objects.get(uid="tpm-4")
    assert device.status == "quarantined"
    latest = AttestationResult.objects.filter(device=device).first()
    assert latest.failed_checks == ["pcr.sha256.7"]
    assert DeviceTrust.objects.get(device=device).state == "quarantined"
    # …and a quarantined device gets no rollout offer.
    from rollouts import orchestrator
    from rollouts import services as rollout_services
    from rollouts.models import Execution
    from rollouts.tests.helpers import make_artifact, make_campaign

    campaign = make_campaign(make_artifact(), selector="model=tpm-box")
    orchestrator.tick()
    assert Execution.objects.get(campaign=campaign, device=device).state == "canceled"  # ineligible: quarantined
    assert rollout_services.pending_offers(device_id=device.id) == []


def test_software_claims_are_never_better_than_warning(console_server, enrollment_token):
    token = enrollment_token(auto_approve=True)

    async def scenario():
        agent = RawAgent(console_server.ws_url, "soft-1")
        await agent.enroll(token)
        challenge = await agent.recv_type("attest.challenge")
        claims = {"agent_sha256": "a" * 64, "model_sha256": "b" * 64, "boot_id": "boot-1"}
        sig = agent.key.sign(p.claims_message(p.b64d(challenge["nonce"]), claims))
        await agent.send(p.attest_evidence_software(challenge["challenge_id"], claims, sig))
        first = await agent.recv_type("attest.result")
        # The same evidence again: the challenge was single use.
        await agent.send(p.attest_evidence_software(challenge["challenge_id"], claims, sig))
        second = await agent.recv_type("attest.result")
        await agent.close()
        return first, second

    first, second = run(scenario())
    assert first["status"] == "warning"
    assert second["status"] == "contraindicated"
    results = list(AttestationResult.objects.filter(device__uid="soft-1").order_by("id"))
    assert results[0].self_reported and results[0].warnings == ["claims.self_reported"]
    assert results[1].failed_checks == ["challenge.reused"]


