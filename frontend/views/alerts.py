"""Alerts: open and recent alerts, acknowledge, and alert rules (through telemetry.services)."""

from __future__ import annotations

from django import forms
from django.contrib import messages
from django.core.exceptions import ValidationError
from django.db.models import Count, Q
from django.http import HttpRequest, HttpResponse
from django.shortcuts import get_object_or_404, redirect, render

from fleet.errors import DomainError
from fleet.models import Device, DeviceGroup
from fleet.selector import SelectorError
from frontend.access import action, page
from telemetry import services
from telemetry.models import (
    ACTIVE_STATES,
    Alert,
    AlertRule,
    AlertState,
    Comparison,
    RuleAgg,
    RuleKind,
    RuleScope,
    Severity,
)


class RuleForm(forms.Form):
    name = forms.CharField(max_length=200)
    kind = forms.ChoiceField(choices=RuleKind.choices, initial=RuleKind.THRESHOLD)
    metric = forms.CharField(max_length=64, required=False, help_text="Metric name, e.g. temperature_c (threshold rules).")
    agg = forms.ChoiceField(choices=RuleAgg.choices, initial=RuleAgg.AVG, label="Per-minute aggregate")
    comparison = forms.ChoiceField(choices=Comparison.choices, initial=Comparison.GT)
    threshold = forms.FloatField(initial=0)
    clear_threshold = forms.FloatField(required=False, help_text="Resolve only once back past this (hysteresis).")
    for_duration_s = forms.IntegerField(min_value=1, initial=300, label="For (seconds)",
                                        help_text="How long the condition must hold (threshold) or the device be silent.")
    scope = forms.ChoiceField(choices=RuleScope.choices, initial=RuleScope.ALL)
    device = forms.CharField(required=False, label="Device uid", help_text="For scope “one device”.")
    group = forms.ModelChoiceField(queryset=DeviceGroup.objects.order_by("slug"), required=False,
                                   to_field_name="slug", empty_label="(none)")
    selector = forms.CharField(required=False, max_length=4096, help_text="For scope “a label selector”.")
    severity = forms.ChoiceField(choices=Severity.choices, initial=Severity.WARNING)
    webhook_url = forms.URLField(required=False, max_length=500, assume_scheme="https")
    enabled = forms.BooleanField(required=False, initial=True)

    def clean_device(self) -> Device | None:
        uid = self.cleaned_data["device"].strip()
        if not uid:
            return None
        device = Device.objects.filter(uid=uid).first()
        if device is None:
            raise forms.ValidationError(f"no device has uid {uid!r}")
        return device

    @classmethod
    def from_rule(cls, rule: AlertRule) -> RuleForm:
        initial = {f: getattr(rule, f) for f in services.RULE_FIELDS if f not in ("device", "group")}
        initial["device"] = rule.device.uid if rule.device_id else ""
        initial["group"] = rule.group.slug if rule.group_id else None
        return cls(initial=initial)


@page("telemetry.view_alert")
def alerts(request: HttpRequest) -> HttpResponse:
    active = list(Alert.objects.filter(state__in=ACTIVE_STATES).select_related("rule", "device")
                  .order_by("-opened_at")[:200])
    active_total = Alert.objects.filter(state__in=ACTIVE_STATES).count()
    resolved = list(Alert.objects.filter(state=AlertState.RESOLVED).select_related("rule", "device")
                    .order_by("-resolved_at")[:30])
    rules = list(AlertRule.objects.select_related("device", "group")
                 .annotate(active=Count("alerts", filter=Q(alerts__state__in=ACTIVE_STATES))).order_by("name"))
    return render(request, "frontend/alerts.html", {
        "nav": "alerts", "active": active, "active_total": active_total, "resolved": resolved, "rules": rules,
        "max_id": max((a.id for a in active), default=0),
    })


@action("telemetry.change_alert")
def alert_ack(request: HttpRequest, pk: int) -> HttpResponse:
    alert = get_object_or_404(Alert, pk=pk)
    try:
        services.alert_acknowledge(alert=alert, actor=request.user, note=request.POST.get("note", "")[:500])
        messages.success(request, f"Alert #{alert.id} acknowledged.")
    except DomainError as exc:
        messages.error(request, exc.message)
    return redirect(request.POST.get("next") if request.POST.get("next", "").startswith("/") else "alerts")


def _save_rule(request: HttpRequest, form: RuleForm, rule: AlertRule | None) -> AlertRule | None:
    data = dict(form.cleaned_data)
    try:
        if rule is None:
            return services.alert_rule_create(actor=request.user, **data)
        return services.alert_rule_update(actor=request.user, rule=rule, **data)
    except SelectorError as exc:
        form.add_error("selector", f"{exc.reason} at column {exc.position + 1}")
    except DomainError as exc:
        form.add_error(None, exc.message)
    except ValidationError as exc:
        for field, errors in getattr(exc, "message_dict", {"__all__": exc.messages}).items():
            form.add_error(field if field in form.fields else None, errors)
    return None


def rule_form_view(request: HttpRequest, pk: int | None = None) -> HttpResponse:
    rule = get_object_or_404(AlertRule, pk=pk) if pk else None
    if request.method == "POST":
        form = RuleForm(request.POST)
        if form.is_valid():
            saved = _save_rule(request, form, rule)
            if saved is not None:
                messages.success(request, f"Rule “{saved.name}” {'saved' if rule else 'created'}.")
                return redirect("alerts")
    else:
        form = RuleForm.from_rule(rule) if rule else RuleForm()
    return render(request, "frontend/rule_form.html", {"nav": "alerts", "form": form, "rule": rule})


def _rule_view(perm: str):
    from django.contrib.auth.decorators import login_required
    from django.core.exceptions import PermissionDenied
    from django.views.decorators.http import require_http_methods

    from frontend.access import VIEW

    @require_http_methods(["GET", "POST"])
    @login_required
    def view(request: HttpRequest, pk: int | None = None) -> HttpResponse:
        if not request.user.has_perms((VIEW, perm)):
            raise PermissionDenied("your role may not change alert rules")
        return rule_form_view(request, pk)

    return view


rule_create = _rule_view("telemetry.add_alertrule")
rule_edit = _rule_view("telemetry.change_alertrule")
