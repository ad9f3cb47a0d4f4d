"""Authorization matrix: every URL route × method × persona (anonymous, viewer, operator, admin)
answers with the status written in the table below, checked with real requests in process.

The table is the contract. A route that appears in the URLconf without an entry fails
`test_every_route_has_an_entry_in_the_matrix` (and names what to add); an entry whose route is
gone fails too. DRF routes are expanded to the methods their router maps, so a new action or a
new method on a viewset also needs its row.

Statuses: API anonymous → 401 (token auth announces itself); a role without the permission →
403; a role with it, sent an empty body → 400 from validation, i.e. *allowed past
authorization* (or 2xx/404/409 when an empty body is a complete request). Pages: anonymous →
302 to the login page (`LOGIN`), missing permission → 403. Admin: staff only (`ADMIN_LOGIN`);
what a staff role may see there is bounded by its Django permissions.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import re
from functools import cached_property

import pytest
from django.urls import URLPattern, URLResolver, get_resolver

ANON, VIEWER, OPERATOR, ADMIN = "anonymous", "viewer", "operator", "admin"
PERSONAS = (ANON, VIEWER, OPERATOR, ADMIN)
LOGIN = "302→/login/"  # a redirect to the dashboard's login page
ADMIN_LOGIN = "302→/admin/login/"  # a redirect to the admin's login page
REDIRECT = "302"  # a redirect anywhere but a login page (an action done, or refused with a message)


def S(anonymous, viewer, operator, admin) -> dict:
    return {ANON: anonymous, VIEWER: viewer, OPERATOR: operator, ADMIN: admin}


# --- shorthand rows -------------------------------------------------------------------------
API_READ = S(401, 200, 200, 200)           # every role reads
API_ADMIN_READ = S(401, 403, 403, 200)     # admin-only reads
API_OPERATE = S(401, 403, 400, 400)        # operator and admin write (empty body → validation 400)
API_ADMIN_WRITE = S(401, 403, 403, 400)    # admin-only write (empty body → validation 400)
PAGE = S(LOGIN, 200, 200, 200)             # a page every role sees
PUBLIC = S(200, 200, 200, 200)

# {route: {method: {persona: status}}}. Routes are written as in the URLconf with regex groups and
# converters reduced to <name>; format-suffix twins (`.json`) share their route's entry.
MATRIX: dict[str, dict[str, dict]] = {
    # --- operations endpoints ---
    "healthz": {"GET": PUBLIC},
    "metrics": {"GET": PUBLIC},
    # --- REST API: schema and docs are public by design (they describe, never expose data) ---
    "api/v1/schema/": {"GET": PUBLIC},
    "api/v1/docs/": {"GET": PUBLIC},
    "api/v1/redoc/": {"GET": PUBLIC},
    "api/v1/": {"GET": API_READ},
    "api/v1/telemetry/": {"GET": API_READ},
    "api/v1/security/": {"GET": API_READ},
    "api/v1/rollouts/": {"GET": API_READ},
    # fleet
    "api/v1/sites/": {"GET": API_READ, "POST": API_OPERATE},
    "api/v1/sites/<slug>/": {"GET": API_READ, "PUT": API_OPERATE, "PATCH": S(401, 403, 200, 200),
                             "DELETE": S(401, 403, 403, 204)},
    "api/v1/devices/": {"GET": API_READ, "POST": API_OPERATE},
    "api/v1/devices/labels/": {"POST": API_OPERATE},
    "api/v1/devices/<uid>/": {"GET": API_READ, "PATCH": S(401, 403, 200, 200)},
    "api/v1/devices/<uid>/approve/": {"POST": S(401, 403, 409, 409)},
    "api/v1/devices/<uid>/quarantine/": {"POST": API_OPERATE},
    "api/v1/devices/<uid>/release/": {"POST": S(401, 403, 409, 409)},
    "api/v1/devices/<uid>/decommission/": {"POST": S(401, 403, 403, 200)},
    "api/v1/devices/<uid>/pin/": {"POST": API_OPERATE},
    "api/v1/devices/<uid>/unpin/": {"POST": API_OPERATE},
    "api/v1/devices/<uid>/commands/": {"GET": API_READ, "POST": API_OPERATE},
    "api/v1/groups/": {"GET": API_READ, "POST": API_OPERATE},
    "api/v1/groups/<slug>/": {"GET": API_READ, "PUT": API_OPERATE, "PATCH": S(401, 403, 200, 200),
                              "DELETE": S(401, 403, 204, 204)},
    "api/v1/groups/<slug>/members/": {"POST": S(401, 403, 200, 200)},
    # telemetry
    "api/v1/telemetry/series/": {"GET": S(401, 400, 400, 400)},
    "api/v1/telemetry/series.csv": {"GET": S(401, 400, 400, 400)},
    "api/v1/telemetry/latest/": {"GET": S(401, 400, 400, 400)},
    "api/v1/telemetry/fleet/": {"GET": S(401, 400, 400, 400)},
    "api/v1/telemetry/alert-rules/": {"GET": API_READ, "POST": API_OPERATE},
    "api/v1/telemetry/alert-rules/<pk>/": {"GET": API_READ, "PUT": API_OPERATE, "PATCH": S(401, 403, 200, 200),
                                           "DELETE": S(401, 403, 204, 204)},
    "api/v1/telemetry/alerts/": {"GET": API_READ},
    "api/v1/telemetry/alerts/<pk>/": {"GET": API_READ},
    "api/v1/telemetry/alerts/<pk>/acknowledge/": {"POST": S(401, 403, 200, 200)},
    "api/v1/telemetry/events/": {"GET": API_READ},
    # security
    "api/v1/security/enrollment-tokens/": {"GET": API_READ, "POST": S(401, 403, 201, 201)},  # defaults suffice
    "api/v1/security/enrollment-tokens/<pk>/": {"GET": API_READ},
    "api/v1/security/enrollment-tokens/<pk>/revoke/": {"POST": S(401, 403, 200, 200)},
    "api/v1/security/device-keys/": {"GET": API_READ},
    "api/v1/security/device-keys/<pk>/": {"GET": API_READ},
    "api/v1/security/device-keys/preauthorize/": {"POST": API_OPERATE},
    "api/v1/security/device-keys/devices/<uid>/rotate/": {"POST": API_ADMIN_WRITE},
    "api/v1/security/device-keys/devices/<uid>/revoke/": {"POST": API_ADMIN_WRITE},
    "api/v1/security/audit/": {"GET": API_READ},
    "api/v1/security/audit/export/": {"GET": API_READ},
    "api/v1/security/audit/<pk>/": {"GET": API_READ},
    "api/v1/security/attestation/results/": {"GET": API_READ},
    "api/v1/security/attestation/results/<pk>/": {"GET": API_READ},
    "api/v1/security/attestation/trust/": {"GET": API_READ},
    "api/v1/security/attestation/trust/<uid>/attest/": {"POST": S(401, 403, 202, 202)},
    "api/v1/security/attestation/trust/<uid>/approve-ek/": {"POST": S(401, 403, 200, 200)},
    "api/v1/security/attestation/policies/": {"GET": API_READ, "POST": API_ADMIN_WRITE},
    "api/v1/security/attestation/policies/<pk>/": {"GET": API_READ},
    "api/v1/security/attestation/policies/<pk>/approve/": {"POST": S(401, 403, 403, 409)},
    "api/v1/security/attestation/trust-anchors/": {"GET": API_READ, "POST": API_ADMIN_WRITE},
    "api/v1/security/attestation/trust-anchors/<pk>/": {"GET": API_READ, "PUT": API_ADMIN_WRITE,
                                                        "PATCH": S(401, 403, 403, 200),
                                                        "DELETE": S(401, 403, 403, 204)},
    # rollouts
    "api/v1/rollouts/download/<token>/": {"GET": PUBLIC},  # the signed token is the credential (see isolation tests)
    "api/v1/rollouts/artifacts/": {"GET": API_READ, "POST": API_OPERATE},
    "api/v1/rollouts/artifacts/<pk>/": {"GET": API_READ},
    "api/v1/rollouts/keys/": {"GET": API_READ, "POST": S(401, 403, 403, 201)},
    "api/v1/rollouts/keys/<key_id>/": {"GET": API_READ},
    "api/v1/rollouts/keys/<key_id>/activate/": {"POST": S(401, 403, 403, 200)},
    "api/v1/rollouts/keys/<key_id>/revoke/": {"POST": API_ADMIN_WRITE},
    "api/v1/rollouts/campaigns/": {"GET": API_READ, "POST": API_OPERATE},
    "api/v1/rollouts/campaigns/<pk>/": {"GET": API_READ, "PATCH": S(401, 403, 200, 200)},
    "api/v1/rollouts/campaigns/<pk>/preview/": {"GET": API_READ},
    "api/v1/rollouts/campaigns/<pk>/counts/": {"GET": API_READ},
    # the seeded campaign is running: schedule/start answer 409 (state), pause/resume want a reason
    "api/v1/rollouts/campaigns/<pk>/schedule/": {"POST": S(401, 403, 409, 409)},
    "api/v1/rollouts/campaigns/<pk>/start/": {"POST": S(401, 403, 409, 409)},
    "api/v1/rollouts/campaigns/<pk>/pause/": {"POST": API_OPERATE},
    "api/v1/rollouts/campaigns/<pk>/resume/": {"POST": API_OPERATE},
    "api/v1/rollouts/campaigns/<pk>/abort/": {"POST": API_OPERATE},
    "api/v1/rollouts/executions/": {"GET": API_READ},
    "api/v1/rollouts/executions/<pk>/": {"GET": API_READ},
    # --- dashboard pages (GET) and actions (POST) ---
    "login/": {"GET": S(200, REDIRECT, REDIRECT, REDIRECT), "POST": S(200, REDIRECT, REDIRECT, REDIRECT)},
    "logout/": {"POST": S(LOGIN, LOGIN, LOGIN, LOGIN)},  # logged out, back to the login page
    "": {"GET": PAGE},
    "devices/": {"GET": PAGE},
    "devices/_bulk/": {"POST": S(LOGIN, 403, REDIRECT, REDIRECT)},  # a bulk pin needs fleet.pin_device
    "devices/<uid>/": {"GET": PAGE},
    "devices/<uid>/series.json": {"GET": S(403, 200, 200, 200)},
    "devices/<uid>/do/<name>/": {"POST": S(LOGIN, 403, REDIRECT, REDIRECT)},
    "security/": {"GET": PAGE},
    "security/tokens/": {"POST": S(LOGIN, 403, REDIRECT, REDIRECT)},
    "security/tokens/<pk>/revoke/": {"POST": S(LOGIN, 403, REDIRECT, REDIRECT)},
    "security/policies/<pk>/approve/": {"POST": S(LOGIN, 403, 403, REDIRECT)},
    "security/quarantine/<uid>/release/": {"POST": S(LOGIN, 403, REDIRECT, REDIRECT)},
    "security/audit/": {"GET": PAGE},
    "alerts/": {"GET": PAGE},
    "alerts/<pk>/acknowledge/": {"POST": S(LOGIN, 403, REDIRECT, REDIRECT)},
    "alerts/rules/new/": {"GET": S(LOGIN, 403, 200, 200), "POST": S(LOGIN, 403, 200, 200)},
    "alerts/rules/<pk>/": {"GET": S(LOGIN, 403, 200, 200), "POST": S(LOGIN, 403, 200, 200)},
    "rollouts/": {"GET": PAGE},
    "rollouts/artifacts/": {"POST": S(LOGIN, 403, REDIRECT, REDIRECT)},
    "rollouts/campaigns/": {"POST": S(LOGIN, 403, REDIRECT, REDIRECT)},
    "rollouts/campaigns/<pk>/": {"GET": PAGE},
    "rollouts/campaigns/<pk>/<verb>/": {"POST": S(LOGIN, 403, REDIRECT, REDIRECT)},
    # --- admin site (staff only; every role is staff, bounded by its permissions) ---
    "admin/": {"GET": S(ADMIN_LOGIN, 200, 200, 200)},
    "admin/login/": {"GET": S(200, REDIRECT, REDIRECT, REDIRECT)},
    "admin/logout/": {"POST": S(REDIRECT, 200, 200, 200)},
    "admin/password_change/": {"GET": S(ADMIN_LOGIN, 200, 200, 200)},
    "admin/password_change/done/": {"GET": S(ADMIN_LOGIN, 200, 200, 200)},
    "admin/autocomplete/": {"GET": S(ADMIN_LOGIN, 403, 403, 403)},
    "admin/jsi18n/": {"GET": S(ADMIN_LOGIN, 200, 200, 200)},
    "admin/r/<content_type_id>/<object_id>/": {"GET": S(ADMIN_LOGIN, 404, 404, 404)},  # devices have no public URL
    "admin/auth/user/<id>/password/": {"GET": S(ADMIN_LOGIN, 403, 403, 200)},
    "admin/<app_label>/": {"GET": S(ADMIN_LOGIN, 200, 200, 200)},
    "admin/<url>": {"GET": S(ADMIN_LOGIN, 404, 404, 404)},
}

# Admin model pages: {app/model: {page: (viewer, operator, admin)}}; anonymous always → ADMIN_LOGIN.
# Pages: changelist, add, change (the change form, read-only without change permission),
# history, delete (GET = confirmation page); `<object_id>/` alone redirects to change.
_V = (200, 200, 200)           # everyone with the view permission
_NONE = (403, 403, 403)        # nobody (read-only models, or actions left to services)
_ADMIN = (403, 403, 200)
_OP = (403, 200, 200)
ADMIN_MODELS: dict[str, dict[str, tuple]] = {
    "auth/group": {"changelist": _ADMIN, "add": _ADMIN, "change": _ADMIN, "history": _ADMIN, "delete": _ADMIN},
    "auth/user": {"changelist": _ADMIN, "add": _ADMIN, "change": _ADMIN, "history": _ADMIN, "delete": _ADMIN},
    "authtoken/tokenproxy": {"changelist": _ADMIN, "add": _ADMIN, "change": _ADMIN, "history": _ADMIN,
                             "delete": _ADMIN},
    "fleet/site": {"changelist": _V, "add": _OP, "change": _V, "history": _V, "delete": _ADMIN},
    "fleet/device": {"changelist": _V, "add": _OP, "change": _V, "history": _V, "delete": _NONE},
    "fleet/devicegroup": {"changelist": _V, "add": _OP, "change": _V, "history": _V, "delete": _OP},
    "fleet/devicecommand": {"changelist": _V, "add": _NONE, "change": _V, "history": _V, "delete": _NONE},
    "fleet/presenceevent": {"changelist": _V, "add": _NONE, "change": _V, "history": _V, "delete": _NONE},
    "fleet/uplinkcursor": {"changelist": _V, "add": _NONE, "change": _V, "history": _V, "delete": _NONE},
    "security/auditentry": {"changelist": _V, "add": _NONE, "change": _V, "history": _V, "delete": _NONE},
    "security/enrollmenttoken": {"changelist": _V, "add": _OP, "change": _V, "history": _V, "delete": _ADMIN},
    "security/devicekey": {"changelist": _V, "add": _NONE, "change": _V, "history": _V, "delete": _NONE},
    "security/attestationresult": {"changelist": _V, "add": _NONE, "change": _V, "history": _V, "delete": _NONE},
    "security/devicetrust": {"changelist": _V, "add": _NONE, "change": _V, "history": _V, "delete": _ADMIN},
    "security/tpmidentity": {"changelist": _V, "add": _NONE, "change": _V, "history": _V, "delete": _ADMIN},
    "security/attestationpolicy": {"changelist": _V, "add": _ADMIN, "change": _V, "history": _V, "delete": _ADMIN},
    "security/trustanchor": {"changelist": _V, "add": _ADMIN, "change": _V, "history": _V, "delete": _ADMIN},
    "security/attestationchallenge": {"changelist": _V, "add": _NONE, "change": _V, "history": _V,
                                      "delete": _NONE},
    "telemetry/metric": {"changelist": _V, "add": _NONE, "change": _V, "history": _V, "delete": _ADMIN},
    "telemetry/deviceevent": {"changelist": _V, "add": _NONE, "change": _V, "history": _V, "delete": _ADMIN},
    "telemetry/alertrule": {"changelist": _V, "add": _OP, "change": _V, "history": _V, "delete": _OP},
    "telemetry/alert": {"changelist": _V, "add": _NONE, "change": _V, "history": _V, "delete": _ADMIN},
    "rollouts/signingkey": {"changelist": _V, "add": _NONE, "change": _V, "history": _V, "delete": _NONE},
    "rollouts/artifact": {"changelist": _V, "add": _NONE, "change": _V, "history": _V, "delete": _NONE},
    "rollouts/campaign": {"changelist": _V, "add": _NONE, "change": _V, "history": _V, "delete": _NONE},
    "rollouts/execution": {"changelist": _V, "add": _NONE, "change": _V, "history": _V, "delete": _NONE},
}
ADMIN_PAGES = {"changelist": "", "add": "add/", "change": "<object_id>/change/", "history": "<object_id>/history/",
               "delete": "<object_id>/delete/"}


def _admin_model_rows() -> dict[str, dict[str, dict]]:
    rows: dict[str, dict[str, dict]] = {}
    for model, pages in ADMIN_MODELS.items():
        for page, (viewer, operator, admin) in pages.items():
            rows[f"admin/{model}/{ADMIN_PAGES[page]}"] = {"GET": S(ADMIN_LOGIN, viewer, operator, admin)}
        # the bare object URL only redirects to its change page (same authorization as change)
        rows[f"admin/{model}/<object_id>/"] = {"GET": S(ADMIN_LOGIN, REDIRECT, REDIRECT, REDIRECT)}
    return rows


FULL_MATRIX = {**MATRIX, **_admin_model_rows()}

# Which seeded object fills a path parameter, by the longest matching route prefix.
OBJECT_FOR = {
    "api/v1/sites/": {"slug": "site"},
    "api/v1/devices/": {"uid": "device"},
    "api/v1/groups/": {"slug": "group"},
    "api/v1/telemetry/alert-rules/": {"pk": "alertrule"},
    "api/v1/telemetry/alerts/": {"pk": "alert"},
    "api/v1/security/enrollment-tokens/": {"pk": "enrollmenttoken"},
    "api/v1/security/device-keys/": {"pk": "devicekey", "uid": "device"},
    "api/v1/security/audit/": {"pk": "auditentry"},
    "api/v1/security/attestation/results/": {"pk": "attestationresult"},
    "api/v1/security/attestation/trust/": {"uid": "device"},
    "api/v1/security/attestation/policies/": {"pk": "attestationpolicy"},
    "api/v1/security/attestation/trust-anchors/": {"pk": "trustanchor"},
    "api/v1/rollouts/download/": {"token": "download_token"},
    "api/v1/rollouts/artifacts/": {"pk": "artifact"},
    "api/v1/rollouts/keys/": {"key_id": "signingkey"},
    "api/v1/rollouts/campaigns/": {"pk": "campaign"},
    "api/v1/rollouts/executions/": {"pk": "execution"},
    "devices/": {"uid": "device", "name": "device_action"},
    "security/tokens/": {"pk": "enrollmenttoken"},
    "security/policies/": {"pk": "attestationpolicy"},
    "security/quarantine/": {"uid": "quarantined_device"},
    "alerts/": {"pk": "alert"},
    "alerts/rules/": {"pk": "alertrule"},
    "rollouts/campaigns/": {"pk": "campaign", "verb": "campaign_verb"},
    "admin/auth/user/<id>/": {"id": "admin:auth/user"},
    "admin/r/": {"content_type_id": "device_content_type", "object_id": "device_pk"},
    "admin/": {"app_label": "admin_app_label", "url": "admin_unknown_url"},
    **{f"admin/{model}/": {"object_id": f"admin:{model}"} for model in ADMIN_MODELS},
}

# Bodies that are not simply empty: where an empty body would not reach the authorization
# decision the matrix is about, or where "allowed" should be shown by a real success.
BODIES: dict[tuple[str, str], dict] = {
    ("login/", "POST"): {"username": "nobody", "password": "wrong"},
    ("security/tokens/", "POST"): {},
    ("devices/_bulk/", "POST"): {"action": "pin", "uid": ["authz-dev"], "component": "model"},
}


# --- URLconf walking ------------------------------------------------------------------------

def _clean(piece: str) -> str:
    piece = piece.replace("^", "").replace("$", "")
    piece = re.sub(r"\(\?P<(\w+)>[^)]*\)", r"<\1>", piece)
    piece = re.sub(r"\(\?P<(\w+)>.*\)", r"<\1>", piece)
    piece = re.sub(r"<(?:\w+:)?(\w+)>", r"<\1>", piece)
    return piece.replace("\\.", ".")


def _walk(resolver: URLResolver, prefix: str = ""):
    for entry in resolver.url_patterns:
        if isinstance(entry, URLResolver):
            yield from _walk(entry, prefix + _clean(str(entry.pattern)))
        elif isinstance(entry, URLPattern):
            yield prefix + _clean(str(entry.pattern)), entry


def _methods(pattern: URLPattern) -> set[str] | None:
    """The methods a DRF route answers (None for plain Django views: the table says)."""
    callback = pattern.callback
    actions = getattr(callback, "actions", None)
    if actions:  # HEAD and OPTIONS follow GET's permission (RolePermission maps them to view_*)
        return {m.upper() for m in actions if m not in ("head", "options")}
    cls = getattr(callback, "cls", None)
    if cls is not None:  # a DRF APIView: the handlers it defines
        return {m.upper() for m in cls.http_method_names if m not in ("options", "head") and hasattr(cls, m)}
    return None


def url_routes() -> dict[str, set[str] | None]:
    """{route: methods} for every route, format-suffix twins folded into their route."""
    routes: dict[str, set[str] | None] = {}
    twins: list[str] = []
    for route, pattern in _walk(get_resolver()):
        if "<format>" in route:
            twins.append(route)
            continue
        methods = _methods(pattern)
        routes[route] = (routes.get(route) or set()) | methods if methods is not None else routes.get(route)
    for twin in twins:  # `sites.json` is `sites/` in another renderer: same view, same authorization
        base = twin.removesuffix(".<format>/?") + "/" if twin.endswith(".<format>/?") else twin.removesuffix("<format>")
        if base not in routes:
            routes[twin] = None
    return routes


def test_every_route_has_an_entry_in_the_matrix():
    routes = url_routes()
    problems = []
    for route, methods in sorted(routes.items()):
        if route not in FULL_MATRIX:
            hint = "add its model to ADMIN_MODELS (or the route to MATRIX)" if route.startswith("admin/") else (
                f'add  "{route}": {{{", ".join(f"{m!r}: S(...)" for m in sorted(methods or {"GET"}))}}}  to MATRIX')
            problems.append(f"route {route!r} has no entry in the authorization matrix — {hint}")
        elif methods is not None and set(FULL_MATRIX[route]) != methods:
            problems.append(f"route {route!r} answers {sorted(methods)} but the matrix lists "
                            f"{sorted(FULL_MATRIX[route])}: give every method its row")
    for route in sorted(set(FULL_MATRIX) - set(routes)):
        problems.append(f"the matrix has an entry for {route!r}, which is not in the URLconf any more: remove it")
    assert not problems, "\n".join(problems)


# --- seeded objects -------------------------------------------------------------------------

class Seed:
    """Real objects for path parameters, built through services on first use in a test."""

    @cached_property
    def site(self):
        from tests.factories import make_site

        return make_site(slug="authz-site")

    @cached_property
    def device(self):
        from fleet.models import Device
        from tests.factories import make_device

        device = make_device(uid="authz-dev", site=self.site, labels={"fleet": "authz"},
                             installed_versions={"model": "1.0.0"})
        Device.objects.filter(pk=device.pk).update(online=True)
        return device

    @cached_property
    def quarantined_device(self):
        from fleet import services
        from tests.factories import make_device

        device = make_device(uid="authz-quarantined")
        return services.device_quarantine(actor="test", device=device, reason="authz matrix")

    @cached_property
    def group(self):
        from fleet import services

        return services.group_create(actor="test", name="Authz group", slug="authz-group")

    @cached_property
    def alertrule(self):
        from telemetry.services import alert_rule_create

        return alert_rule_create(actor="test", name="hot", metric="cpu.temp", comparison=">", threshold=80.0)

    @cached_property
    def alert(self):
        from telemetry.services import alert_open

        return alert_open(rule=self.alertrule, device_id=self.device.id, value=91.0)

    @cached_property
    def enrollmenttoken(self):
        from security.services import enrollment_token_create

        return enrollment_token_create(actor="test", expires_in=dt.timedelta(hours=1))[0]

    @cached_property
    def devicekey(self):
        from security.models import DeviceKey

        return DeviceKey.objects.filter(device=self.keyed_device).first()

    @cached_property
    def keyed_device(self):
        from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

        from security.services import device_preauthorize
        from tests.agent.rawagent import public_bytes

        return device_preauthorize(actor="test", uid="authz-keyed", public_key=public_bytes(Ed25519PrivateKey.generate()),
                                   approve=True)

    @cached_property
    def auditentry(self):
        from security.models import AuditEntry

        self.site  # noqa: B018 -- its creation writes an audit entry
        return AuditEntry.objects.order_by("-id").first()

    @cached_property
    def attestationresult(self):
        from security.models import AttestationResult

        return AttestationResult.objects.create(device=self.device, format="tpm2-quote", status="affirming",
                                                verifier_version="test", evidence_sha256="0" * 64)

    @cached_property
    def devicetrust(self):
        from security.models import DeviceTrust

        return DeviceTrust.objects.get_or_create(device=self.device)[0]

    @cached_property
    def tpmidentity(self):
        from security.models import TpmIdentity

        return TpmIdentity.objects.create(device=self.device, ek_public=b"ek", ek_sha256="1" * 64, ak_public=b"ak",
                                          ak_name="000b" + "2" * 64)

    @cached_property
    def attestationpolicy(self):
        from security import attestation

        return attestation.policy_save(actor="test", name="authz", golden_pcrs={"sha256": {"0": "00" * 32}})

    @cached_property
    def trustanchor(self):
        from security.models import TrustAnchor

        return TrustAnchor.objects.create(name="authz CA", tier="test", certificate_pem=_self_signed_pem())

    @cached_property
    def attestationchallenge(self):
        from security import attestation
        from security.models import AttestationChallenge

        attestation.challenge_issue(device_id=self.device.id, reason="operator")
        return AttestationChallenge.objects.filter(device=self.device).first()

    @cached_property
    def artifact(self):
        from rollouts.tests.helpers import make_artifact

        return make_artifact(name="authz-model")

    @cached_property
    def signingkey(self):
        from rollouts import services

        return services.active_signing_key()

    @cached_property
    def campaign(self):
        from rollouts.tests.helpers import make_campaign

        self.device  # noqa: B018 -- the campaign targets it
        return make_campaign(self.artifact, selector="fleet=authz", start=False)

    @cached_property
    def execution(self):
        from rollouts import orchestrator, services
        from rollouts.models import Execution

        services.campaign_start(actor="test", campaign=self.campaign, reason="test")
        orchestrator.tick()
        return Execution.objects.get(campaign=self.campaign, device=self.device)

    @cached_property
    def download_token(self):
        from rollouts import services

        return services.download_token(self.execution)

    @cached_property
    def metric(self):
        from telemetry.models import Metric

        return Metric.objects.get_or_create(name="cpu.temp")[0]

    @cached_property
    def deviceevent(self):
        from django.utils import timezone

        from telemetry.models import DeviceEvent

        return DeviceEvent.objects.create(device=self.device, time=timezone.now(), kind="log", message="hello")

    @cached_property
    def devicecommand(self):
        from fleet import services

        return services.command_issue(actor="test", device=self.device, name="reboot")

    @cached_property
    def presenceevent(self):
        from django.utils import timezone

        from fleet.models import PresenceEvent

        return PresenceEvent.objects.create(device=self.device, kind="connect", session="authz", at=timezone.now())

    @property
    def devicegroup(self):
        return self.group

    @cached_property
    def uplinkcursor(self):
        from fleet.models import UplinkCursor

        return UplinkCursor.objects.get_or_create(device=self.device)[0]

    def value(self, kind: str):
        if kind.startswith("admin:"):
            return self.admin_object(kind.removeprefix("admin:"))
        simple = {
            "device_action": "attest", "campaign_verb": "pause", "admin_app_label": "fleet",
            "admin_unknown_url": "no/such/page/",
        }
        if kind in simple:
            return simple[kind]
        if kind == "device_content_type":
            from django.contrib.contenttypes.models import ContentType

            return ContentType.objects.get_for_model(type(self.device)).pk
        if kind == "device_pk":
            return self.device.pk
        obj = getattr(self, kind)
        if isinstance(obj, str):
            return obj
        natural_key = {"device": "uid", "quarantined_device": "uid", "site": "slug", "group": "slug",
                       "signingkey": "key_id"}
        return getattr(obj, natural_key.get(kind, "pk"))

    def admin_object(self, model: str):
        app, name = model.split("/")
        if app == "auth" and name == "user":
            return self.users[ADMIN].pk
        if app == "auth" and name == "group":
            from django.contrib.auth.models import Group

            return Group.objects.get(name="viewer").pk
        if app == "authtoken":
            return self.users[ADMIN].pk
        return getattr(self, name).pk

    users: dict
    tokens: dict
    sessions: dict


def _self_signed_pem() -> str:
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "authz test CA")])
    now = dt.datetime.now(dt.UTC)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
            .serial_number(1).not_valid_before(now).not_valid_after(now + dt.timedelta(days=1))
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True).sign(key, hashes.SHA256()))
    return cert.public_bytes(serialization.Encoding.PEM).decode()


def _fill(route: str, seed: Seed) -> str:
    params = re.findall(r"<(\w+)>", route)
    if not params:
        return "/" + route
    mapping = max((p for p in OBJECT_FOR if route.startswith(p)), key=len)
    path = route
    for name in params:
        path = path.replace(f"<{name}>", str(seed.value(OBJECT_FOR[mapping][name])), 1)
    return "/" + path


# The admin model pages every run checks (each model's list); the rest of the admin grid (change,
# add, delete, history and the bare object URL of every model: ~500 requests) runs with the slow suite.
QUICK_ADMIN_PAGES = ("",)


def _quick(route: str) -> bool:
    if route in MATRIX:
        return True
    model_page = route.split("/", 3)[3]
    return model_page in QUICK_ADMIN_PAGES


def _cells(*, quick: bool):
    for route, methods in FULL_MATRIX.items():
        if _quick(route) != quick:
            continue
        for method, row in methods.items():
            for persona in PERSONAS:
                expected = row[persona]
                refused = expected in (401, 403) or (persona == ANON and expected in (LOGIN, ADMIN_LOGIN))
                allowed = not refused
                verb = "may" if allowed else "may_not"
                yield pytest.param(route, method, persona, expected,
                                   id=f"{persona}_{verb}_{method}_{route or '/'}")


EAGER = ("site", "device", "quarantined_device", "group", "alertrule", "alert", "enrollmenttoken", "devicekey",
         "auditentry", "attestationresult", "devicetrust", "tpmidentity", "attestationpolicy", "trustanchor",
         "attestationchallenge", "artifact", "signingkey", "campaign", "execution", "download_token", "metric",
         "deviceevent", "devicecommand", "uplinkcursor", "presenceevent")


@pytest.fixture(scope="class")
def seed(django_db_setup, django_db_blocker):
    """Every object and persona the matrix needs, built once inside an outer transaction that
    is rolled back after the class (as Django's TestCase.setUpTestData does); each cell runs in
    its own savepoint, so what one request changes never reaches the next."""
    from django.db import transaction
    from django.test import Client
    from rest_framework.authtoken.models import Token

    from security.roles import sync_roles
    from security.services import operator_upsert

    with django_db_blocker.unblock():
        outer = transaction.atomic()
        outer.__enter__()
        try:
            sync_roles()
            s = Seed()
            s.users = {role: operator_upsert(actor="test", username=f"authz-{role}", role=role)[0]
                       for role in (VIEWER, OPERATOR, ADMIN)}
            s.tokens = {role: Token.objects.get_or_create(user=user)[0].key for role, user in s.users.items()}
            s.sessions = {}
            for role, user in s.users.items():
                client = Client()
                client.force_login(user)
                s.sessions[role] = client.cookies["sessionid"].value
            for kind in EAGER:
                getattr(s, kind)
            yield s
        finally:
            transaction.set_rollback(True)
            outer.__exit__(None, None, None)


def _client(persona: str, seed: Seed, route: str):
    from django.test import Client
    from rest_framework.test import APIClient

    if route.startswith("api/"):
        client = APIClient()
        if persona != ANON:
            client.credentials(HTTP_AUTHORIZATION=f"Token {seed.tokens[persona]}")
        return client
    client = Client()
    if persona != ANON:
        client.cookies["sessionid"] = seed.sessions[persona]
    return client


@pytest.mark.usefixtures("seed")
class TestMatrix:
    @pytest.fixture(autouse=True)
    def _no_throttle_carryover(self, seed):
        # DRF's throttles count in the cache; each cell starts from zero so the anonymous
        # rows say what authorization decides, not how many requests came before.
        from django.core.cache import cache

        cache.delete_many(["throttle_anon_127.0.0.1", *(f"throttle_user_{u.pk}" for u in seed.users.values())])

    @pytest.mark.parametrize(("route", "method", "persona", "expected"), list(_cells(quick=True)))
    def test_each_persona_gets_exactly_the_matrix_status(self, route, method, persona, expected, seed, db):
        self.check(route, method, persona, expected, seed)

    @pytest.mark.slow
    @pytest.mark.parametrize(("route", "method", "persona", "expected"), list(_cells(quick=False)))
    def test_each_persona_gets_exactly_the_matrix_status_on_every_admin_model_page(self, route, method, persona,
                                                                                    expected, seed, db):
        self.check(route, method, persona, expected, seed)

    @staticmethod
    def check(route: str, method: str, persona: str, expected: object, seed: Seed) -> None:
        path = _fill(route, seed)
        client = _client(persona, seed, route)
        body = BODIES.get((route, method), {})
        call = getattr(client, method.lower())
        if route.startswith("api/") and method != "GET":
            response = call(path, body, format="json")
        elif method == "GET":
            response = call(path)
        else:
            response = call(path, body)
        got: object = response.status_code
        if got == 302:
            location = response.headers.get("Location", "")
            got = (ADMIN_LOGIN if location.startswith("/admin/login/") else LOGIN if location.startswith("/login/")
                   else REDIRECT)
        detail = b"" if got == expected else getattr(response, "content", b"")[:300]
        assert got == expected, f"{persona} {method} {path}: expected {expected}, got {got} {detail!r}"


# --- the dashboard's WebSocket ---------------------------------------------------------------

@pytest.mark.django_db(transaction=True)
@pytest.mark.parametrize(("persona", "close_code"), [(ANON, 4401), ("outsider", 4403), (VIEWER, None),
                                                     (OPERATOR, None), (ADMIN, None)])
def test_the_dashboard_socket_refuses_anonymous_and_roleless_users_and_admits_every_role(persona, close_code):
    from django.contrib.auth import get_user_model
    from django.contrib.auth.models import AnonymousUser

    from console.asgi import application
    from security.roles import sync_roles
    from security.services import operator_upsert

    sync_roles()
    if persona == ANON:
        user = AnonymousUser()
    elif persona == "outsider":
        user = get_user_model().objects.create_user(username="authz-outsider")
    else:
        user = operator_upsert(actor="test", username=f"ws-{persona}", role=persona)[0]

    async def scenario():
        import json

        from asgiref.sync import sync_to_async
        from asgiref.testing import ApplicationCommunicator
        from django.test import Client

        headers = [(b"origin", b"http://localhost"), (b"host", b"localhost")]
        if not isinstance(user, AnonymousUser):
            def make_session() -> str:
                client = Client()
                client.force_login(user)  # a real login session, as the browser would hold
                return client.cookies["sessionid"].value

            headers.append((b"cookie", f"sessionid={await sync_to_async(make_session)()}".encode()))
        # channels.testing's WebsocketCommunicator is this same ASGI conversation, but importing
        # channels.testing needs daphne, which the project does not install.
        socket = ApplicationCommunicator(application, {
            "type": "websocket", "path": "/ws/ui/", "raw_path": b"/ws/ui/", "query_string": b"", "headers": headers,
            "subprotocols": [], "client": ["127.0.0.1", 50000], "server": ["localhost", 80]})
        await socket.send_input({"type": "websocket.connect"})
        accepted = await socket.receive_output(timeout=10)
        assert accepted["type"] == "websocket.accept", accepted
        if close_code is None:
            await socket.send_input({"type": "websocket.receive", "text": json.dumps({"subscribe": {"nav": {}}})})
            output = await socket.receive_output(timeout=10)
            result = json.loads(output["text"]) if output["type"] == "websocket.send" else output
        else:
            result = await socket.receive_output(timeout=10)
        await socket.send_input({"type": "websocket.disconnect", "code": 1000})
        await socket.wait(timeout=5)
        return result

    result = asyncio.run(scenario())
    if close_code is None:
        assert result.get("type") in ("delta", "refused"), result
    else:
        assert result == {"type": "websocket.close", "code": close_code}, result
