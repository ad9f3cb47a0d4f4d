"""Device table (search, filters, label selector, sort, pages, bulk actions) and device detail."""

from __future__ import annotations

from typing import Any
from urllib.parse import urlencode

from django.contrib import messages
from django.core.exceptions import ValidationError
from django.db.models import F, Q, QuerySet
from django.http import HttpRequest, HttpResponse, JsonResponse
from django.shortcuts import get_object_or_404, redirect, render
from django.urls import reverse
from django.utils import timezone

from fleet import services as fleet_services
from fleet.errors import DomainError
from fleet.models import Device, DeviceCommand, DeviceStatus, PresenceEvent, Site
from fleet.selector import SelectorError, compile_selector
from frontend.access import action, json_page, page
from frontend.present import DEFAULT_RANGE, RANGES, check_text, metric_unit
from security import attestation
from security.models import AttestationResult, DeviceTrust, TpmIdentity
from telemetry import selectors as tsel
from telemetry.models import ACTIVE_STATES, Alert, DeviceEvent, DeviceMetric, Metric

PAGE_SIZE = 50
COUNT_CAP = 100_000  # counting is capped so a page stays cheap however large the fleet
BULK_ONE_BY_ONE_MAX = 1000  # approve/pin run one service call per device
PRESENCE_ROWS = 20  # presence changes shown on a device page
SORTS = {
    "uid": "uid", "name": "name", "status": "status", "tier": "tier", "site": "site__slug",
    "model": "hardware_model", "last_seen": "last_seen",
}
MAX_CHARTS = 8


class Filters:
    """The table's filters, parsed from the query string; `queryset()` applies them."""

    def __init__(self, params: Any) -> None:
        self.q = params.get("q", "").strip()[:200]
        self.status = [s for s in params.getlist("status") if s in DeviceStatus.values]
        self.site = params.get("site", "").strip()[:100]
        self.tier = [t for t in params.getlist("tier") if t in ("1", "2", "3")]
        self.online = params.get("online", "") if params.get("online") in ("true", "false") else ""
        self.selector = params.get("selector", "").strip()[:4096]
        sort = params.get("sort", "uid")
        self.sort = sort if sort.lstrip("-") in SORTS else "uid"
        self.selector_error: SelectorError | None = None

    def querystring(self, **override: Any) -> str:
        data = {"q": self.q, "status": self.status, "site": self.site, "tier": self.tier, "online": self.online,
                "selector": self.selector, "sort": self.sort}
        data.update(override)
        return urlencode({k: v for k, v in data.items() if v not in ("", [], None)}, doseq=True)

    def queryset(self) -> QuerySet[Device]:
        devices = Device.objects.all()
        if self.q:
            devices = devices.filter(Q(uid__icontains=self.q) | Q(name__icontains=self.q)
                                     | Q(serial__icontains=self.q) | Q(hardware_model__icontains=self.q))
        if self.status:
            devices = devices.filter(status__in=self.status)
        if self.site:
            devices = devices.filter(site__slug=self.site)
        if self.tier:
            devices = devices.filter(tier__in=[int(t) for t in self.tier])
        if self.online:
            devices = devices.filter(online=self.online == "true")
        if self.selector:
            try:
                devices = devices.filter(compile_selector(self.selector))
            except SelectorError as exc:
                self.selector_error = exc
                return Device.objects.none()
        return devices

    def ordered(self, devices: QuerySet[Device]) -> QuerySet[Device]:
        field = SORTS[self.sort.lstrip("-")]
        desc = self.sort.startswith("-")
        expr = F(field).desc(nulls_last=True) if desc else F(field).asc(nulls_last=True)
        return devices.order_by(expr, "-id" if desc else "id")


@page()
def device_list(request: HttpRequest) -> HttpResponse:
    filters = Filters(request.GET)
    devices = filters.queryset()
    try:
        number = max(1, int(request.GET.get("page", "1")))
    except ValueError:
        number = 1
    total = devices[: COUNT_CAP + 1].count()
    capped = total > COUNT_CAP
    last_page = max(1, -(-min(total, COUNT_CAP) // PAGE_SIZE))
    number = min(number, last_page)
    rows = list(filters.ordered(devices).select_related("site")[(number - 1) * PAGE_SIZE: number * PAGE_SIZE])
    sort_links = {}
    for key in SORTS:
        current = filters.sort.lstrip("-") == key
        nxt = f"-{key}" if current and not filters.sort.startswith("-") else key
        sort_links[key] = {"qs": filters.querystring(sort=nxt), "active": current,
                           "dir": ("desc" if filters.sort.startswith("-") else "asc") if current else ""}
    error = None
    if filters.selector_error is not None:
        exc = filters.selector_error
        error = {"reason": exc.reason, "column": exc.position + 1, "selector": exc.selector,
                 "before": exc.selector[: exc.position], "at": exc.selector[exc.position: exc.position + 1] or " ",
                 "after": exc.selector[exc.position + 1:]}
    return render(request, "frontend/devices.html", {
        "nav": "devices", "f": filters, "devices": rows, "total": total, "capped": capped, "page": number,
        "last_page": last_page, "prev_qs": filters.querystring(page=number - 1) if number > 1 else None,
        "next_qs": filters.querystring(page=number + 1) if number < last_page else None,
        "sort_links": sort_links, "selector_error": error, "statuses": DeviceStatus.choices,
        "sites": Site.objects.values_list("slug", "name").order_by("slug")[:500], "filter_qs": filters.querystring(),
        "first_row": (number - 1) * PAGE_SIZE + 1 if rows else 0, "last_row": (number - 1) * PAGE_SIZE + len(rows),
    })


BULK_PERMS = {"label": "fleet.change_device", "pin": "fleet.pin_device", "approve": "fleet.approve_device"}


@action()
def device_bulk(request: HttpRequest) -> HttpResponse:
    kind = request.POST.get("action", "")
    back = f"{reverse('devices')}?{request.POST.get('filter_qs', '')}"
    if kind not in BULK_PERMS:
        messages.error(request, "Choose a bulk action: label, pin or approve.")
        return redirect(back)
    if not request.user.has_perm(BULK_PERMS[kind]):
        from django.core.exceptions import PermissionDenied

        raise PermissionDenied(f"your role may not {kind} devices")
    if request.POST.get("scope") == "matching":
        from django.http import QueryDict

        filters = Filters(QueryDict(request.POST.get("filter_qs", "")))
        devices = filters.queryset()
        if filters.selector_error is not None:
            messages.error(request, f"The selector is invalid: {filters.selector_error}")
            return redirect(back)
    else:
        uids = request.POST.getlist("uid")
        if not uids:
            messages.error(request, "Select at least one device (tick its box), or choose “all matching”.")
            return redirect(back)
        devices = Device.objects.filter(uid__in=uids)
    try:
        if kind == "label":
            set_labels = {}
            key, value = request.POST.get("label_key", "").strip(), request.POST.get("label_value", "").strip()
            remove = [k.strip() for k in request.POST.get("label_remove", "").split(",") if k.strip()]
            if key:
                set_labels[key] = value
            if not set_labels and not remove:
                messages.error(request, "Give a label to set (key and value) or keys to remove.")
                return redirect(back)
            n = fleet_services.device_set_labels(actor=request.user, devices=devices, set_labels=set_labels,
                                                 remove=remove)
            messages.success(request, f"Labels changed on {n:,} device(s).")
            return redirect(back)
        targets = list(devices.order_by("id")[: BULK_ONE_BY_ONE_MAX + 1])
        if len(targets) > BULK_ONE_BY_ONE_MAX:
            messages.error(request, f"At most {BULK_ONE_BY_ONE_MAX:,} devices per bulk {kind}: narrow the filter.")
            return redirect(back)
        done, skipped = 0, []
        component = request.POST.get("component", "model")
        for device in targets:
            try:
                if kind == "approve":
                    fleet_services.device_approve(actor=request.user, device=device, reason="bulk approve")
                else:
                    fleet_services.device_pin(actor=request.user, device=device, component=component)
                done += 1
            except DomainError as exc:
                skipped.append(exc.message)
        verb = "Approved" if kind == "approve" else f"Pinned {component} on"
        text = f"{verb} {done:,} device(s)."
        if skipped:
            text += f" Skipped {len(skipped):,}: {'; '.join(skipped[:3])}{' …' if len(skipped) > 3 else ''}"
        (messages.success if done else messages.warning)(request, text)
    except DomainError as exc:
        messages.error(request, exc.message)
    except SelectorError as exc:
        messages.error(request, f"The selector is invalid: {exc}")
    return redirect(back)


# --- detail ---------------------------------------------------------------------------

def _device_metrics(device: Device) -> list[dict]:
    rows = (DeviceMetric.objects.filter(device=device).select_related("metric").order_by("metric__name")
            .values_list("metric__name", flat=True)[:50])
    return [{"name": n, "unit": metric_unit(n)} for n in rows]


@page()
def device_detail(request: HttpRequest, uid: str) -> HttpResponse:
    device = get_object_or_404(Device.objects.select_related("site"), uid=uid)
    trust = DeviceTrust.objects.filter(device=device).first()
    tpm = TpmIdentity.objects.filter(device=device).first()
    results = list(AttestationResult.objects.filter(device=device).select_related("policy").order_by("-created_at")[:15])
    for r in results:
        r.failed_text = [(c, check_text(c)) for c in r.failed_checks]
        r.warning_text = [(c, check_text(c)) for c in r.warnings]
    events = list(DeviceEvent.objects.filter(device=device).order_by("-time")[:30])
    anomalies = [e for e in events if e.severity in ("warning", "critical") or e.kind == "anomaly"]
    alerts = list(Alert.objects.filter(device=device).select_related("rule").order_by("-opened_at")[:10])
    commands = list(DeviceCommand.objects.filter(device=device).order_by("-created_at")[:10])
    presence = list(PresenceEvent.objects.filter(device=device).order_by("-at", "-id")[:PRESENCE_ROWS])
    until = timezone.now()
    for event in presence:  # newest first: each state lasted until the next change
        event.lasted_s = (until - event.at).total_seconds()
        until = event.at
    components = sorted({*device.installed_versions, *device.pinned_versions, "agent", "model", "firmware"})
    versions = [{"component": c, "installed": device.installed_versions.get(c), "pinned": device.pinned_versions.get(c)}
                for c in components]
    return render(request, "frontend/device_detail.html", {
        "nav": "devices", "d": device, "trust": trust, "tpm": tpm, "results": results, "events": events,
        "anomaly_count": len(anomalies), "alerts": alerts, "commands": commands, "versions": versions,
        "metrics": _device_metrics(device)[:MAX_CHARTS], "ranges": list(RANGES), "default_range": DEFAULT_RANGE,
        "active_alerts": sum(1 for a in alerts if a.state in ACTIVE_STATES), "presence": presence,
    })


@json_page("telemetry.view_metric")
def device_series(request: HttpRequest, uid: str) -> JsonResponse:
    """The device's metrics over a range, at the resolution telemetry.selectors.series picks."""
    device = get_object_or_404(Device, uid=uid)
    key = request.GET.get("range", DEFAULT_RANGE)
    if key not in RANGES:
        return JsonResponse({"detail": f"range must be one of {', '.join(RANGES)}"}, status=400)
    wanted = request.GET.getlist("metric") or [m["name"] for m in _device_metrics(device)[:MAX_CHARTS]]
    ids = dict(Metric.objects.filter(name__in=wanted[:MAX_CHARTS]).values_list("name", "id"))
    end = timezone.now()
    start = end - RANGES[key]
    if not ids:
        return JsonResponse({"range": key, "source": None, "bucket_s": None, "series": []})
    try:
        result = tsel.series(device_ids=[device.id], metric_ids=list(ids.values()), start=start, end=end)
    except DomainError as exc:
        return JsonResponse({"detail": exc.message}, status=400)
    name_of = {v: k for k, v in ids.items()}
    res = result["resolution"]
    return JsonResponse({
        "range": key, "start": int(start.timestamp() * 1000), "end": int(end.timestamp() * 1000),
        "source": res.source, "bucket_s": res.step_s, "truncated": result["truncated"],
        "series": [
            {"metric": name_of[m], "unit": metric_unit(name_of[m]),
             "points": [[int(t.timestamp() * 1000), v] for t, v in points]}
            for (_, m), points in sorted(result["series"].items(), key=lambda kv: name_of[kv[0][1]])
        ],
    })


# --- device actions -------------------------------------------------------------------

DEVICE_ACTIONS = {
    "approve": "fleet.approve_device",
    "quarantine": "fleet.quarantine_device",
    "release": "fleet.quarantine_device",
    "attest": "security.request_attestation",
    "pin": "fleet.pin_device",
    "unpin": "fleet.pin_device",
    "reboot": "fleet.send_command",
    "approve_ek": "security.approve_ek",
}


@action()
def device_action(request: HttpRequest, uid: str, name: str) -> HttpResponse:
    if name not in DEVICE_ACTIONS:
        return HttpResponse(f"unknown action {name!r}", status=404)
    if not request.user.has_perm(DEVICE_ACTIONS[name]):
        from django.core.exceptions import PermissionDenied

        raise PermissionDenied(f"your role may not {name} devices")
    device = get_object_or_404(Device, uid=uid)
    reason = request.POST.get("reason", "").strip()[:500]
    user = request.user
    try:
        if name == "approve":
            fleet_services.device_approve(actor=user, device=device, reason=reason)
            messages.success(request, f"{device.uid} approved: it may now connect and receive updates.")
        elif name == "quarantine":
            fleet_services.device_quarantine(actor=user, device=device, reason=reason)
            messages.success(request, f"{device.uid} quarantined.")
        elif name == "release":
            fleet_services.device_release(actor=user, device=device, reason=reason)
            messages.success(request, f"{device.uid} released from quarantine.")
        elif name == "attest":
            attestation.attestation_request(actor=user, device=device)
            messages.success(request, f"Attestation requested: {device.uid} gets a challenge "
                                      f"{'now' if device.online else 'when it is next online'}.")
        elif name == "pin":
            component = request.POST.get("component", "")
            version = request.POST.get("version", "").strip() or None
            device = fleet_services.device_pin(actor=user, device=device, component=component, version=version)
            messages.success(request, f"{component} pinned to {device.pinned_versions.get(component)}.")
        elif name == "unpin":
            component = request.POST.get("component", "")
            fleet_services.device_unpin(actor=user, device=device, component=component)
            messages.success(request, f"{component} unpinned.")
        elif name == "reboot":
            fleet_services.command_issue(actor=user, device=device, name=DeviceCommand.Name.REBOOT)
            messages.success(request, f"Reboot queued for {device.uid} (delivered "
                                      f"{'now' if device.online else 'when it reconnects'}, expires in 24 h).")
        elif name == "approve_ek":
            attestation.tpm_ek_approve(actor=user, device=device)
            messages.success(request, f"The TPM endorsement key of {device.uid} is now trusted.")
    except DomainError as exc:
        messages.error(request, exc.message)
    except ValidationError as exc:
        messages.error(request, "; ".join(exc.messages))
    return redirect("device", uid=device.uid)

