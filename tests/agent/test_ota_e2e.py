"""OTA end to end: a campaign on the real server, real agents downloading, verifying,
installing, self-testing and committing — or rolling back a broken model."""

from __future__ import annotations

import asyncio
import io
import subprocess
import sys
import time
import zipfile
from pathlib import Path

import pytest
from django.core.files.uploadedfile import SimpleUploadedFile

from agent_stub.client import Agent
from rollouts import orchestrator, services
from rollouts.models import Campaign, Execution
from tests.agent.rawagent import in_db
from tests.harness import ConsoleServer

pytestmark = pytest.mark.django_db(transaction=True)
MODEL_DIR = Path(__file__).resolve().parents[2] / "agent_stub" / "model"


def model_zip(tmp_path: Path, *, broken: str | None = None) -> bytes:
    onnx = MODEL_DIR / "anomaly-1.0.0.onnx"
    if broken:
        onnx = tmp_path / "broken.onnx"
        subprocess.run([sys.executable, "-m", "agent_stub", "build-model", "--out", str(onnx), "--broken", broken],
                       check=True, capture_output=True, timeout=120)
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        archive.write(onnx, "anomaly.onnx")
        archive.write(MODEL_DIR / "anomaly-1.0.0.json", "anomaly.json")
    return buffer.getvalue()


def roll_out(content: bytes, version: str, uids: list[str]) -> Campaign:
    artifact = services.artifact_create(
        actor="test", name="anomaly", kind="model", version=version,
        variants=[services.VariantUpload(name="default", tiers=[], file=SimpleUploadedFile("model.zip", content))])
    campaign = services.campaign_create(
        actor="test", artifact=artifact, name=f"anomaly {version}", target_selector=f"uid-group={version}",
        waves=[{"size": "100%", "soak_s": 0, "gates": []}], rate_per_min=6000)
    return services.campaign_start(actor="test", campaign=campaign, reason="test")


def run_agents(server: ConsoleServer, token: str, tmp_path: Path, uids: list[str], until) -> None:
    async def main() -> None:
        agents = [Agent(server.ws_url, tmp_path / uid, enroll_token=token, device_uid=uid, backoff_start=0.2,
                        backoff_cap=1) for uid in uids]
        tasks = [asyncio.create_task(a.run()) for a in agents]
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            await in_db(orchestrator.tick)  # Celery beat's job, done by the test
            if await in_db(until):
                break
            await asyncio.sleep(0.5)
        for agent in agents:
            agent.stop()
        await asyncio.gather(*tasks)

    asyncio.run(main())


def enroll(server: ConsoleServer, token: str, tmp_path: Path, uids: list[str], group: str) -> None:
    from fleet import services as fleet_services
    from fleet.models import Device

    run_agents(server, token, tmp_path, uids, lambda: Device.objects.filter(uid__in=uids).count() == len(uids))
    for device in Device.objects.filter(uid__in=uids):
        fleet_services.device_update(actor="test", device=device, labels={"uid-group": group})


def test_agents_install_a_signed_model_and_commit(ota_server, enrollment_token, tmp_path):
    token = enrollment_token(auto_approve=True)
    uids = ["ota-1", "ota-2"]
    enroll(ota_server, token, tmp_path, uids, "1.1.0")
    campaign = roll_out(model_zip(tmp_path), "1.1.0", uids)

    def finished() -> bool:
        return not Execution.objects.filter(campaign=campaign).exclude(state="committed").exists()

    run_agents(ota_server, token, tmp_path, uids, finished)
    executions = list(Execution.objects.filter(campaign=campaign).values("state", "hold", "error", "next_attempt_at"))
    campaign.refresh_from_db()
    assert {e["state"] for e in executions} == {"committed"}, (campaign.state, campaign.gate_results, executions)
    from fleet.models import Device

    assert {d.installed_versions.get("model") for d in Device.objects.filter(uid__in=uids)} == {"1.1.0"}
    active = (tmp_path / "ota-1" / "ota" / "slots")
    assert any(p.suffix == ".onnx" for p in active.rglob("*"))


def test_a_broken_model_fails_its_self_test_and_is_rolled_back(ota_server, enrollment_token, tmp_path):
    token = enrollment_token(auto_approve=True)
    uids = ["bad-1"]
    enroll(ota_server, token, tmp_path, uids, "1.2.0")
    campaign = roll_out(model_zip(tmp_path, broken="nan"), "1.2.0", uids)

    def finished() -> bool:
        return Execution.objects.filter(campaign=campaign, state="rolled_back").exists()

    run_agents(ota_server, token, tmp_path, uids, finished)
    execution = Execution.objects.get(campaign=campaign)
    assert execution.state == "rolled_back"
    assert execution.error["code"] == "self_test_failed"


def test_an_agent_connected_before_the_first_signing_key_existed_is_told_the_key_and_installs(
        ota_server, enrollment_token, tmp_path):
    from fleet.models import Device
    from rollouts.models import SigningKey

    token = enrollment_token(auto_approve=True)
    uids = ["keyless-1"]
    enroll(ota_server, token, tmp_path, uids, "1.2.0")
    assert not SigningKey.objects.exists()  # its welcome announced no artifact key
    made: dict = {}

    def until() -> bool:
        if "campaign" not in made:
            # The first upload creates the first signing key while the agent stays connected.
            if Device.objects.filter(uid__in=uids, online=True).count() == len(uids):
                made["campaign"] = roll_out(model_zip(tmp_path), "1.2.0", uids)
            return False
        return not Execution.objects.filter(campaign=made["campaign"]).exclude(state="committed").exists()

    run_agents(ota_server, token, tmp_path, uids, until)
    executions = list(Execution.objects.filter(campaign=made["campaign"]).values("state", "error", "attempt"))
    assert executions == [{"state": "committed", "error": None, "attempt": 0}]
