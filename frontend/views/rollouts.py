"""Rollout pages: artifacts (list, upload), campaigns (create → dry-run preview → start), the live
campaign page (waves, per-state counts, gate values vs thresholds, failing devices) and
pause / resume / abort — all through rollouts.services and rollouts.selectors.

rollouts/ was written in parallel with this dashboard; these pages use only what it had
when they were written: artifact_create, campaign_create, campaign_start, campaign_pause,
campaign_resume, campaign_abort, selectors.campaign_counts and selectors.campaign_preview.
"""

from __future__ import annotations

from typing import Any

from django import forms
from django.contrib import messages
from django.core.exceptions import PermissionDenied
from django.db.models import Count, Q
from django.http import HttpRequest, HttpResponse
from django.shortcuts import get_object_or_404, redirect, render

from fleet.errors import DomainError
from fleet.selector import SelectorError
from frontend.access import action, page
from frontend.rollouts_bridge import rollouts_ready

FAILED_STATES = ("failed", "rolled_back", "timed_out", "rejected")
IN_FLIGHT = ("offered", "acked", "downloading", "downloaded", "installing", "verifying")


def _models() -> Any:
    from rollouts import models

    return models


def active_campaigns() -> list[dict]:
    """Running/paused/scheduled campaigns with progress (committed / executions), one GROUP BY."""
    m = _models()
    rows = (m.Campaign.objects.filter(state__in=["scheduled", "running", "paused"])
            .annotate(total=Count("executions"), done=Count("executions", filter=Q(executions__state="committed")),
                      bad=Count("executions", filter=Q(executions__state__in=FAILED_STATES)))
            .order_by("-created_at")[:10])
    return [{"id": c.id, "name": c.name, "state": c.state, "total": c.total, "done": c.done, "failed": c.bad,
             "pct": round(100 * c.done / c.total) if c.total else 0} for c in rows]


class ArtifactForm(forms.Form):
    name = forms.CharField(max_length=100)
    kind = forms.ChoiceField(choices=())
    version = forms.CharField(max_length=64, help_text="Semantic version, e.g. 1.4.0")
    file = forms.FileField()
    min_tier = forms.TypedChoiceField(choices=[(3, "3 (all devices)"), (2, "2"), (1, "1")], coerce=int, initial=3,
                                      label="Minimum tier")
    description = forms.CharField(required=False, widget=forms.Textarea(attrs={"rows": 2}))
    variant_file = forms.FileField(required=False, label="Second variant (optional)",
                                   help_text="E.g. a quantized model for less capable devices.")
    variant_tier = forms.TypedChoiceField(choices=[(2, "tier 2"), (3, "tier 3"), (1, "tier 1")], coerce=int,
                                          initial=2, required=False, empty_value=2, label="Second variant serves",
                                          help_text="The first file serves the other tiers up to the minimum tier.")

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.fields["kind"].choices = _models().Kind.choices

    def variants(self) -> list:
        """One variant for every allowed tier, or two when a second file serves one tier."""
        from rollouts.services import VariantUpload

        data = self.cleaned_data
        if not data.get("variant_file"):
            return [VariantUpload(name="default", tiers=[], file=data["file"])]
        other = data["variant_tier"]
        main_tiers = [t for t in range(1, data["min_tier"] + 1) if t != other]
        variants = [VariantUpload(name=f"tier-{other}", tiers=[other], file=data["variant_file"])]
        if main_tiers:
            variants.insert(0, VariantUpload(name="default", tiers=main_tiers, file=data["file"]))
        return variants


class CampaignForm(forms.Form):
    artifact = forms.ModelChoiceField(queryset=None)
    name = forms.CharField(max_length=200)
    target_selector = forms.CharField(required=False, max_length=4096, label="Target selector",
                                      help_text="Label selector; empty targets every device.")
    waves = forms.CharField(initial="5%, 25%, 100%", help_text="Cumulative sizes, comma-separated (percent or counts).")
    soak_s = forms.IntegerField(min_value=0, initial=600, label="Soak per wave (seconds)")
    min_success = forms.FloatField(min_value=0, max_value=1, required=False, initial=0.95,
                                   label="Success-ratio gate (0–1)",
                                   help_text="Judged at the end of each soak. Empty: none.")
    max_failure_pct = forms.FloatField(min_value=0, max_value=100, required=False, label="Failure gate (max %)",
                                       help_text="Checked continuously once the sample is reached. Empty: none.")
    failure_min_sample = forms.IntegerField(min_value=1, initial=5, label="Failure gate: minimum sample (devices)")
    telemetry_metric = forms.CharField(required=False, max_length=100, label="Telemetry gate: metric",
                                       help_text="E.g. inference_latency_ms; wave devices vs untouched ones. Empty: none.")
    telemetry_direction = forms.ChoiceField(choices=[("increase", "an increase is bad"), ("decrease", "a decrease is bad")],
                                            initial="increase", label="Telemetry gate: direction")
    telemetry_tolerance_pct = forms.FloatField(min_value=0, initial=10, label="Telemetry gate: tolerance (%)")
    attestation_max_age_s = forms.IntegerField(min_value=1, required=False, label="Attestation gate: max age (s)",
                                               help_text="Offer only to devices attested affirming within this age. "
                                                         "Empty: no gate.")
    on_gate_failure = forms.ChoiceField(choices=(), label="When a gate fails")
    rate_per_min = forms.IntegerField(min_value=1, initial=600, label="Offers per minute")
    max_concurrent = forms.IntegerField(min_value=1, initial=1000, label="Concurrent downloads (max)")
    window_cron = forms.CharField(required=False, max_length=100, label="Install window (cron)",
                                  help_text="5-field cron for when a window opens, e.g. 0 2 * * *. Empty: any time. "
                                            "Downloads happen any time; installs only inside.")
    window_tz = forms.CharField(max_length=64, initial="UTC", label="Window time zone (IANA)")
    window_duration_min = forms.IntegerField(min_value=1, required=False, initial=120, label="Window length (minutes)")

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.fields["artifact"].queryset = _models().Artifact.objects.order_by("-created_at")
        self.fields["on_gate_failure"].choices = _models().Campaign.Action.choices
        if not self.is_bound:
            self.fields["artifact"].initial = self.fields["artifact"].queryset.values_list("pk", flat=True).first()

    def waves_spec(self) -> list[dict]:
        data = self.cleaned_data
        gates: list[dict] = []
        if data.get("min_success") is not None:
            gates.append({"type": "success_ratio", "min_ratio": data["min_success"]})
        if data.get("max_failure_pct") is not None:
            gates.append({"type": "failure", "max_pct": data["max_failure_pct"], "min_sample": data["failure_min_sample"]})
        if data.get("telemetry_metric"):
            gates.append({"type": "telemetry", "metric": data["telemetry_metric"],
                          "bad_direction": data["telemetry_direction"], "tolerance_pct": data["telemetry_tolerance_pct"]})
        out = []
        for part in data["waves"].split(","):
            part = part.strip()
            if not part:
                continue
            size: Any = part if part.endswith("%") else (int(part) if part.isdigit() else part)
            out.append({"size": size, "soak_s": data["soak_s"], "gates": [dict(g) for g in gates]})
        return out

    def campaign_fields(self) -> dict[str, Any]:
        """Everything but the artifact and name, as `rollouts.services.campaign_create` takes it."""
        data = self.cleaned_data
        fields: dict[str, Any] = {
            "target_selector": data["target_selector"], "waves": self.waves_spec(),
            "on_gate_failure": data["on_gate_failure"], "rate_per_min": data["rate_per_min"],
            "max_concurrent": data["max_concurrent"],
            "offer_gates": ([{"type": "attestation", "max_age_s": data["attestation_max_age_s"]}]
                            if data.get("attestation_max_age_s") else []),
        }
        if data.get("window_cron"):
            fields.update(window_cron=data["window_cron"], window_tz=data["window_tz"] or "UTC",
                          window_duration_min=data.get("window_duration_min") or 120)
        return fields


@page()
def rollouts_home(request: HttpRequest) -> HttpResponse:
    if not rollouts_ready():
        return render(request, "frontend/rollouts.html", {"nav": "rollouts", "ready": False})
    if not request.user.has_perm("rollouts.view_campaign"):
        raise PermissionDenied("your role may not see rollouts")
    m = _models()
    artifacts = list(m.Artifact.objects.annotate(n_variants=Count("variants")).order_by("-created_at")[:50])
    campaigns = list(m.Campaign.objects.annotate(
        total=Count("executions"), done=Count("executions", filter=Q(executions__state="committed")),
        bad=Count("executions", filter=Q(executions__state__in=FAILED_STATES))).order_by("-created_at")[:50])
    return render(request, "frontend/rollouts.html", {
        "nav": "rollouts", "ready": True, "artifacts": artifacts, "campaigns": campaigns,
        "artifact_form": ArtifactForm(), "campaign_form": CampaignForm(),
    })


@action("rollouts.add_artifact")
def artifact_upload(request: HttpRequest) -> HttpResponse:
    from rollouts import services

    form = ArtifactForm(request.POST, request.FILES)
    if not form.is_valid():
        messages.error(request, "The artifact was not stored: " + "; ".join(
            f"{k}: {' '.join(v)}" for k, v in form.errors.items()))
        return redirect("rollouts")
    data = form.cleaned_data
    try:
        artifact = services.artifact_create(
            actor=request.user, name=data["name"], kind=data["kind"], version=data["version"],
            variants=form.variants(),
            min_tier=data["min_tier"], description=data["description"])
        messages.success(request, f"Artifact {artifact.name} {artifact.version} stored and signed.")
    except DomainError as exc:
        messages.error(request, f"The artifact was not stored: {exc.message}")
    return redirect("rollouts")


@action("rollouts.add_campaign")
def campaign_create(request: HttpRequest) -> HttpResponse:
    """Create a draft and show its dry-run preview; nothing is offered until it is started."""
    from rollouts import services

    form = CampaignForm(request.POST)
    if not form.is_valid():
        messages.error(request, "The campaign was not created: " + "; ".join(
            f"{k}: {' '.join(v)}" for k, v in form.errors.items()))
        return redirect("rollouts")
    data = form.cleaned_data
    try:
        campaign = services.campaign_create(actor=request.user, artifact=data["artifact"], name=data["name"],
                                            **form.campaign_fields())
    except SelectorError as exc:
        messages.error(request, f"Invalid target selector: {exc.reason} at column {exc.position + 1}")
        return redirect("rollouts")
    except DomainError as exc:
        messages.error(request, f"The campaign was not created: {exc.message}")
        return redirect("rollouts")
    messages.success(request, "Draft created: check the dry-run preview below, then start it.")
    return redirect("campaign", pk=campaign.pk)


def campaign_snapshot(campaign: Any) -> dict:
    """What the live page shows: state, per-wave/per-state counts, gates (cheap, indexed by campaign)."""
    from rollouts import selectors

    counts = selectors.campaign_counts(campaign)
    total = sum(counts["by_state"].values())
    done = counts["by_state"].get("committed", 0)
    gates = []
    for wave, results in sorted((campaign.gate_results or {}).items(), key=lambda kv: str(kv[0])):
        for name, r in (results or {}).items():
            if isinstance(r, dict):
                gates.append({"wave": str(wave), "gate": name, "ok": r.get("ok"), "value": r.get("value"),
                              "threshold": r.get("threshold"), "detail": r.get("detail", "")})
    return {"id": campaign.id, "state": campaign.state, "reason": campaign.state_reason,
            "current_wave": campaign.current_wave, "by_state": counts["by_state"], "by_wave": counts["by_wave"],
            "total": total, "committed": done, "pct": round(100 * done / total) if total else 0, "gates": gates}


@page("rollouts.view_campaign")
def campaign_detail(request: HttpRequest, pk: int) -> HttpResponse:
    if not rollouts_ready():
        return redirect("rollouts")
    from rollouts import selectors

    m = _models()
    campaign = get_object_or_404(m.Campaign.objects.select_related("artifact"), pk=pk)
    preview = None
    if campaign.state == "draft":
        try:
            preview = selectors.campaign_preview(campaign=campaign, sample=10)
        except DomainError as exc:
            preview = {"detail": exc.message}
    failing = list(m.Execution.objects.filter(campaign=campaign, state__in=FAILED_STATES).select_related("device")
                   .order_by("-updated_at")[:50])
    snap = campaign_snapshot(campaign)
    return render(request, "frontend/campaign.html", {
        "nav": "rollouts", "c": campaign, "preview": preview, "failing": failing, "snap": snap,
        "states": [s for s, _ in m.Execution.State.choices],
    })


@action("rollouts.control_campaign")
def campaign_control(request: HttpRequest, pk: int, verb: str) -> HttpResponse:
    from rollouts import services

    campaign = get_object_or_404(_models().Campaign, pk=pk)
    reason = request.POST.get("reason", "").strip()[:500] or f"{verb} from the dashboard"
    try:
        if verb == "start":
            services.campaign_start(actor=request.user, campaign=campaign, reason=reason)
        elif verb == "pause":
            services.campaign_pause(actor=request.user, campaign=campaign, reason=reason)
        elif verb == "resume":
            services.campaign_resume(actor=request.user, campaign=campaign, reason=reason)
        elif verb == "abort":
            services.campaign_abort(actor=request.user, campaign=campaign, reason=reason,
                                    revert=request.POST.get("revert") == "on")
        else:
            return HttpResponse(f"unknown verb {verb!r}", status=404)
        messages.success(request, f"Campaign {verb}: done.")
    except DomainError as exc:
        messages.error(request, exc.message)
    return redirect("campaign", pk=campaign.pk)
