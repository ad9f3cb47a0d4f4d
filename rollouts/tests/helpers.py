"""Builders and a device simulator for rollouts tests."""

from __future__ import annotations

from django.core.files.uploadedfile import SimpleUploadedFile
from django.test.utils import CaptureQueriesContext  # noqa: F401 -- re-exported for query-count checks

from agent_stub import protocol as p
from fleet.models import Device
from rollouts import orchestrator, services
from rollouts.models import Artifact, Campaign, Execution
from tests.factories import make_device

S = Execution.State


def upload(content: bytes = b"model-bytes", name: str = "model.onnx") -> SimpleUploadedFile:
    return SimpleUploadedFile(name, content, content_type="application/octet-stream")


def make_artifact(*, name: str = "anomaly", kind: str = "model", version: str = "1.1.0", content: bytes | None = None,
                  variants: list[services.VariantUpload] | None = None, **kwargs) -> Artifact:
    variants = variants or [services.VariantUpload(name="default", tiers=[],
                                                   file=upload(content or f"{name}-{version}".encode()))]
    return services.artifact_create(actor="test", name=name, kind=kind, version=version, variants=variants, **kwargs)


def make_fleet(n: int, *, prefix: str = "dev", online: bool = True, installed: str = "1.0.0", labels: dict | None = None,
               **kwargs) -> list[Device]:
    devices = [make_device(uid=f"{prefix}-{i:04d}", labels=labels or {"fleet": "test"},
                           installed_versions={"model": installed}, **kwargs) for i in range(n)]
    Device.objects.filter(id__in=[d.id for d in devices]).update(online=online)
    return devices


def make_campaign(artifact: Artifact, *, selector: str = "fleet=test", waves: list | None = None, start: bool = True,
                  **fields) -> Campaign:
    fields.setdefault("rate_per_min", 60_000)
    campaign = services.campaign_create(
        actor="test", artifact=artifact, name=f"roll out {artifact}", target_selector=selector,
        waves=waves or [{"size": "100%", "soak_s": 0, "gates": []}], **fields)
    if start:
        campaign = services.campaign_start(actor="test", campaign=campaign, reason="test")
    return campaign


def report(execution: Execution | int, state: str, *, progress: int = 0, error: tuple[str, bool] | None = None,
           device_id: int | None = None) -> None:
    if isinstance(execution, int):
        execution = Execution.objects.get(pk=execution)
    err = None if error is None else p.RolloutError(code=error[0], retryable=error[1], detail="test")
    services.execution_report(device_id=device_id or execution.device_id, report=p.RolloutStatus(
        seq=1, execution_id=execution.id, state=state, progress=progress, error=err))


def succeed(execution: Execution | int) -> None:
    for state in ("acked", "downloading", "downloaded", "installing", "verifying", "committed"):
        report(execution, state)


def fail(execution: Execution | int, state: str = "rolled_back", code: str = "self_test_failed") -> None:
    for s in ("acked", "downloading", "downloaded", "installing"):
        report(execution, s)
    report(execution, state, error=(code, False))


def states(campaign: Campaign) -> dict[str, int]:
    out: dict[str, int] = {}
    for state in Execution.objects.filter(campaign=campaign).values_list("state", flat=True):
        out[state] = out.get(state, 0) + 1
    return out


def tick(**kwargs) -> dict:
    return orchestrator.tick(**kwargs)


def offered(campaign: Campaign) -> list[Execution]:
    return list(Execution.objects.filter(campaign=campaign, state=S.OFFERED).order_by("id"))


def refresh(campaign: Campaign) -> Campaign:
    return Campaign.objects.get(pk=campaign.pk)
