"""Every state change of telemetry: events, alert rules and alerts. Keyword-only, atomic, audited.

Points are not stored here: they go through the per-process flusher (telemetry.ingest).
"""

from __future__ import annotations

import datetime as dt
import logging
from typing import Any

from django.db import transaction
from django.utils import timezone

from fleet import audit
from fleet.errors import Conflict, InvalidInput
from fleet.models import Device
from fleet.selector import compile_selector
from telemetry.models import ACTIVE_STATES, Alert, AlertRule, AlertState, DeviceEvent, RuleKind, RuleScope

log = logging.getLogger(__name__)


def _ms_to_datetime(t_ms: int) -> dt.datetime:
    return dt.datetime.fromtimestamp(t_ms / 1000, tz=dt.UTC)


def events_store(*, device_id: int, events: list[dict]) -> int:
    """Store an agent `event` frame's validated entries (t in ms, kind, severity, message, attrs).

    No cursor work here: the caller wraps this and `fleet.services.cursor_advance` in one
    transaction, so the events are stored exactly when the frame's seq is committed."""
    rows = [
        DeviceEvent(
            device_id=device_id, time=_ms_to_datetime(int(e["t"])), kind=e["kind"],
            severity=e.get("severity") or "info", message=e.get("message") or "", attrs=e.get("attrs") or {},
        )
        for e in events
    ]
    DeviceEvent.objects.bulk_create(rows, batch_size=1000)
    return len(rows)



RULE_FIELDS = {"name", "kind", "metric", "agg", "comparison", "threshold", "clear_threshold", "for_duration_s",
               "scope", "device", "group", "selector", "severity", "webhook_url", "enabled"}


def _clean_rule(rule: AlertRule) -> None:
    if rule.kind == RuleKind.THRESHOLD and not rule.metric:
        raise InvalidInput("a threshold rule needs a metric")
    if rule.scope == RuleScope.DEVICE and rule.device_id is None:
        raise InvalidInput("scope=device needs a device")
    if rule.scope == RuleScope.GROUP and rule.group_id is None:
        raise InvalidInput("scope=group needs a group")
    if rule.scope == RuleScope.SELECTOR:
        if not rule.selector:
            raise InvalidInput("scope=selector needs a selector")
        compile_selector(rule.selector)  # raises SelectorError (400) with the position
    if rule.clear_threshold is not None and rule.kind == RuleKind.THRESHOLD:
        above = rule.comparison in (">", ">=")
        if (above and rule.clear_threshold > rule.threshold) or (not above and rule.clear_threshold < rule.threshold):
            raise InvalidInput(
                f"clear_threshold must be on the safe side of the threshold ({'≤' if above else '≥'} {rule.threshold})"
            )
    if rule.kind == RuleKind.THRESHOLD and rule.for_duration_s < 60:
        raise InvalidInput("for_duration_s is at least 60: rules are evaluated on 1-minute rollups")
    rule.full_clean()


@transaction.atomic
def alert_rule_create(*, actor: Any, **fields: Any) -> AlertRule:
    unknown = set(fields) - RULE_FIELDS
    if unknown:
        raise InvalidInput(f"unknown alert rule fields: {', '.join(sorted(unknown))}")
    rule = AlertRule(**fields, created_by=actor if getattr(actor, "pk", None) else None)
    _clean_rule(rule)
    rule.save()
    audit.record(actor=actor, action="alertrule.create", target=rule, data={"name": rule.name})
    return rule


@transaction.atomic
def alert_rule_update(*, actor: Any, rule: AlertRule, **changes: Any) -> AlertRule:
    unknown = set(changes) - RULE_FIELDS
    if unknown:
        raise InvalidInput(f"cannot change {', '.join(sorted(unknown))} of an alert rule")
    rule = AlertRule.objects.select_for_update().get(pk=rule.pk)
    for field, value in changes.items():
        setattr(rule, field, value)
    _clean_rule(rule)
    rule.save()
    audit.record(actor=actor, action="alertrule.update", target=rule, data={"changed": sorted(changes)})
    return rule


@transaction.atomic
def alert_rule_delete(*, actor: Any, rule: AlertRule) -> None:
    audit.record(actor=actor, action="alertrule.delete", target=rule, data={"name": rule.name})
    rule.delete()


def _history(alert: Alert, state: str, *, at: dt.datetime, value: float | None, by: str, note: str = "") -> None:
    alert.history = [*alert.history, {"at": at.isoformat(), "state": state, "value": value, "by": by, "note": note}]


def _notify(alert: Alert, event: str) -> None:
    if alert.rule.webhook_url:
        from telemetry.tasks import deliver_alert_webhook

        transaction.on_commit(lambda: deliver_alert_webhook.delay(alert.id, event))


@transaction.atomic
def alert_open(*, rule: AlertRule, device_id: int, value: float | None, at: dt.datetime | None = None,
               actor: Any = "system") -> Alert | None:
    """Open an alert for (rule, device) unless one is already active. Returns it, or None."""
    at = at or timezone.now()
    if Alert.objects.filter(rule=rule, device_id=device_id, state__in=ACTIVE_STATES).exists():
        return None
    alert = Alert(rule=rule, device_id=device_id, state=AlertState.OPEN, severity=rule.severity, opened_at=at,
                  last_value=value)
    _history(alert, AlertState.OPEN, at=at, value=value, by=str(actor))
    alert.save()
    audit.record(actor=actor, action="alert.open", target=alert,
                 data={"rule": rule.id, "device": device_id, "value": value})
    _notify(alert, "open")
    return alert


@transaction.atomic
def alert_resolve(*, alert: Alert, value: float | None, at: dt.datetime | None = None, actor: Any = "system",
                  note: str = "") -> Alert:
    at = at or timezone.now()
    alert = Alert.objects.select_for_update().select_related("rule").get(pk=alert.pk)
    if alert.state not in ACTIVE_STATES:
        raise Conflict(f"alert {alert.id} is already {alert.state}")
    alert.state = AlertState.RESOLVED
    alert.resolved_at = at
    alert.last_value = value
    _history(alert, AlertState.RESOLVED, at=at, value=value, by=str(actor), note=note)
    alert.save()
    audit.record(actor=actor, action="alert.resolve", target=alert, data={"value": value, "note": note})
    _notify(alert, "resolve")
    return alert


@transaction.atomic
def alert_acknowledge(*, alert: Alert, actor: Any, note: str = "") -> Alert:
    alert = Alert.objects.select_for_update().get(pk=alert.pk)
    if alert.state != AlertState.OPEN:
        raise Conflict(f"alert {alert.id} is {alert.state}; only open alerts can be acknowledged")
    now = timezone.now()
    alert.state = AlertState.ACKNOWLEDGED
    alert.acknowledged_at = now
    alert.acknowledged_by = actor if getattr(actor, "pk", None) else None
    _history(alert, AlertState.ACKNOWLEDGED, at=now, value=alert.last_value, by=str(actor), note=note)
    alert.save()
    audit.record(actor=actor, action="alert.acknowledge", target=alert, data={"note": note})
    return alert


def alert_track_values(*, values: dict[int, float]) -> int:
    """Record the latest evaluated value of active alerts (alert id → value): one UPDATE each,
    not audited (a reading, not a state change)."""
    for alert_id, value in values.items():
        Alert.objects.filter(pk=alert_id).update(last_value=value, updated_at=timezone.now())
    return len(values)


def scope_devices(rule: AlertRule) -> Any:
    """The devices a rule watches, as a queryset (decommissioned devices never alert)."""
    devices = Device.objects.exclude(status="decommissioned")
    if rule.scope == RuleScope.DEVICE:
        return devices.filter(pk=rule.device_id)
    if rule.scope == RuleScope.GROUP:
        return devices.filter(groups=rule.group_id)
    if rule.scope == RuleScope.SELECTOR:
        return devices.filter(compile_selector(rule.selector))
    return devices
