"""Schemathesis fuzzes every operation of the REST API, as an operator, against a real server.

The server is a real uvicorn process (tests/harness.ConsoleServer) on the test database, loaded
over HTTP from its own `/api/v1/schema/`: the requests go through the whole stack (uvicorn, ASGI,
middleware, authentication, throttling, DRF, PostgreSQL), as an integration would send them. An
in-process WSGI client would be a little faster but skips the ASGI server and its request parsing.

For each operation the test draws cases that conform to the schema (positive) and cases that
break it (negative), half of them aimed at the seeded objects' real ids so detail routes do more
than answer 404, sends them, and checks:
  - not_a_server_error: never a 5xx;
  - response_schema_conformance: a documented response's body matches its schema;
  - status_code_conformance: the status code is one the schema documents.
Every failure of every operation is collected and reported together.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import pytest
import requests
from django.db import connection

from tests.harness import ConsoleServer

pytestmark = pytest.mark.django_db(transaction=True)


@dataclass
class FuzzRun:
    operations: list[str] = field(default_factory=list)
    requests: int = 0
    statuses: dict[int, int] = field(default_factory=dict)
    failures: dict[str, str] = field(default_factory=dict)
    seconds: float = 0.0


def _seed(operator) -> dict[str, str]:
    """Objects for every detail route; returns real values for the schema's path parameters."""
    from django.core.files.base import ContentFile

    from fleet import services as fleet_services
    from rollouts import services as rollout_services
    from security import services as security_services
    from telemetry import services as telemetry_services
    from tests.factories import make_device, make_site

    site = make_site(slug="plant-7", region="eu")
    devices = [make_device(uid=f"fuzz-{i:02d}", site=site, labels={"env": "prod", "line": str(i % 3)})
               for i in range(6)]
    group = fleet_services.group_create(actor="test", name="Canaries", slug="canaries")
    fleet_services.group_set_members(actor="test", group=group, add=devices[:3], remove=[])
    fleet_services.command_issue(actor="test", device=devices[0], name="attest")
    artifact = rollout_services.artifact_create(
        actor="test", name="detector", kind="model", version="1.0.0",
        variants=[rollout_services.VariantUpload(name="default", tiers=[], file=ContentFile(b"weights" * 100,
                                                                                           name="m.onnx"))],
    )
    campaign = rollout_services.campaign_create(actor="test", artifact=artifact, name="detector 1.0",
                                                target_selector="env=prod")
    rule = telemetry_services.alert_rule_create(actor=operator, name="hot", metric="cpu_temp", threshold=80,
                                                comparison=">", for_duration_s=300, scope="selector",
                                                selector="site=plant-7,env=prod")
    token, _secret = security_services.enrollment_token_create(actor="test", name="line 3",
                                                               expires_in=__import__("datetime").timedelta(hours=1))
    key = rollout_services.active_signing_key()
    from security.models import AuditEntry
    from telemetry.models import Metric

    Metric.objects.create(name="cpu_temp")

    return {
        "uid": devices[1].uid, "slug": site.slug, "group_slug": group.slug, "artifact_id": str(artifact.pk),
        "campaign_id": str(campaign.pk), "rule_id": str(rule.pk), "token_id": str(token.pk), "key_id": key.key_id,
        "audit_id": str(AuditEntry.objects.order_by("id").values_list("id", flat=True).first()),
    }


def _real_path_parameters(path: str, names: list[str], seed: dict[str, str]) -> dict[str, str] | None:
    """The seeded object's id for a detail route's parameters, chosen by the route's prefix."""
    by_prefix = [
        ("/api/v1/sites/", {"slug": seed["slug"]}), ("/api/v1/groups/", {"slug": seed["group_slug"]}),
        ("/api/v1/devices/", {"uid": seed["uid"]}), ("/api/v1/rollouts/artifacts/", {"id": seed["artifact_id"]}),
        ("/api/v1/rollouts/campaigns/", {"id": seed["campaign_id"]}), ("/api/v1/rollouts/keys/", {"key_id": seed["key_id"]}),
        ("/api/v1/telemetry/alert-rules/", {"id": seed["rule_id"]}),
        ("/api/v1/security/enrollment-tokens/", {"id": seed["token_id"]}),
        ("/api/v1/security/audit/", {"id": seed["audit_id"]}),
        ("/api/v1/security/device-keys/devices/", {"uid": seed["uid"]}),
        ("/api/v1/security/attestation/trust/", {"uid": seed["uid"]}),
    ]
    for prefix, values in by_prefix:
        if path.startswith(prefix):
            chosen = {n: values[n] for n in names if n in values}
            return chosen if len(chosen) == len(names) else None
    return None


def _fuzz(server: ConsoleServer, token: str, seed: dict[str, str], *, examples: int) -> FuzzRun:
    import schemathesis
    from hypothesis import HealthCheck, Phase, given, settings
    from hypothesis import strategies as st
    from schemathesis.checks import not_a_server_error
    from schemathesis.specs.openapi.checks import response_schema_conformance, status_code_conformance

    checks = [not_a_server_error, response_schema_conformance, status_code_conformance]
    schema = schemathesis.openapi.from_url(f"{server.http_url}/api/v1/schema/")
    session = requests.Session()
    auth = {"Authorization": f"Token {token}"}
    run = FuzzRun()
    started = time.monotonic()
    for result in schema.get_all_operations():
        operation = result.ok()
        run.operations.append(operation.label)
        names = [p.name for p in operation.path_parameters]
        strategies = [operation.as_strategy(schemathesis.GenerationMode.POSITIVE),
                      operation.as_strategy(schemathesis.GenerationMode.NEGATIVE)]
        real = _real_path_parameters(operation.path, names, seed) if names else None
        if real:
            strategies += [operation.as_strategy(mode, path_parameters=real)
                           for mode in (schemathesis.GenerationMode.POSITIVE, schemathesis.GenerationMode.NEGATIVE)]

        @given(case=st.one_of(strategies))
        @settings(max_examples=examples, deadline=None, database=None, phases=[Phase.explicit, Phase.generate],
                  suppress_health_check=list(HealthCheck))
        def check_operation(case) -> None:
            response = case.call(base_url=server.http_url, session=session, headers=auth, timeout=30)
            run.requests += 1
            run.statuses[response.status_code] = run.statuses.get(response.status_code, 0) + 1
            case.validate_response(response, checks=checks, headers=auth)

        try:
            check_operation()
        except (Exception, BaseExceptionGroup) as exc:  # noqa: BLE001 -- a check's FailureGroup or a transport error: reported below
            run.failures[operation.label] = f"{type(exc).__name__}: {exc}"[:3000]
    run.seconds = time.monotonic() - started
    return run


def _report(run: FuzzRun) -> str:
    lines = [f"{len(run.failures)} of {len(run.operations)} operations failed "
             f"({run.requests} requests, {run.seconds:.0f} s, statuses {dict(sorted(run.statuses.items()))}):"]
    for label, text in run.failures.items():
        lines += [f"--- {label}", text]
    return "\n".join(lines)


@pytest.fixture
def fuzz_target(operator_user, tmp_path):
    from rest_framework.authtoken.models import Token

    seed = _seed(operator_user)
    token, _ = Token.objects.get_or_create(user=operator_user)
    server = ConsoleServer(connection.settings_dict, extra_env={
        "MEDIA_ROOT": str(tmp_path / "media"), "API_THROTTLE_USER": "1000000/min",
    }).start()
    yield server, token.key, seed
    server.stop()


def _the_schema_covers_the_api(run: FuzzRun) -> None:
    # Every router is in the schema: a route missing from it would silently escape the fuzzing.
    for label in ["GET /api/v1/devices/", "POST /api/v1/rollouts/artifacts/", "GET /api/v1/telemetry/series/",
                  "GET /api/v1/security/audit/", "DELETE /api/v1/telemetry/alert-rules/{id}/"]:
        assert label in run.operations, f"{label} is missing from the schema"


def test_every_operation_answers_an_operator_without_5xx_and_as_its_schema_says(fuzz_target, capsys):
    server, token, seed = fuzz_target
    run = _fuzz(server, token, seed, examples=3)
    with capsys.disabled():
        print(f"\nschemathesis: {len(run.operations)} operations, {run.requests} requests in {run.seconds:.1f} s, "
              f"statuses {dict(sorted(run.statuses.items()))}")
    _the_schema_covers_the_api(run)
    assert run.requests >= 2 * len(run.operations)
    assert not run.failures, _report(run) + "\n" + server.log_tail(80)


@pytest.mark.slow
def test_every_operation_survives_many_more_fuzzed_requests_from_an_operator(fuzz_target, capsys):
    server, token, seed = fuzz_target
    run = _fuzz(server, token, seed, examples=150)
    with capsys.disabled():
        print(f"\nschemathesis: {len(run.operations)} operations, {run.requests} requests in {run.seconds:.1f} s, "
              f"statuses {dict(sorted(run.statuses.items()))}")
    _the_schema_covers_the_api(run)
    assert run.requests >= 50 * len(run.operations)
    assert not run.failures, _report(run) + "\n" + server.log_tail(80)

