"""Alert evaluation on 1-minute rollups, batched per rule, and webhook delivery.

Threshold rule semantics (docs/telemetry.md): every tick evaluates the window
[W − for_duration, W), W = the rollup watermark (only closed minutes count). For each device in
the rule's scope, one SQL statement per rule computes the per-minute aggregate (`agg`) of
`metric`:
  * no active alert, the condition holds in every minute with data, and there is data in the
    window's first minute → open (once: at most one active alert per rule and device);
  * active alert and the latest minute is back on the safe side of `clear_threshold`
    (default: threshold) → resolve (hysteresis); otherwise it stays open and tracks the value;
  * a device with no data in the window keeps its alert (silence is the absence rule's job).
Absence rule: a device in scope whose `last_seen` is older than for_duration_s opens an alert;
it resolves once the device is seen again.
"""

from __future__ import annotations

import datetime as dt
import json
import logging
import operator
import urllib.error
import urllib.request
from typing import Any

from django.db import connection
from django.utils import timezone

from telemetry import conf, services, storage
from telemetry.models import ACTIVE_STATES, Alert, AlertRule, Metric, RuleKind
from telemetry.selectors import rollup_watermark

log = logging.getLogger(__name__)

COMPARE = {">": operator.gt, ">=": operator.ge, "<": operator.lt, "<=": operator.le}
_MINUTE_VALUE = {"avg": "sum / nullif(count, 0)", "min": "min", "max": "max", "last": "last"}


class WebhookError(Exception):
    pass


def _closed_until(now: dt.datetime) -> dt.datetime:
    if storage.backend() == "postgres":
        return min(rollup_watermark(), now)
    return now.replace(second=0, microsecond=0) - dt.timedelta(minutes=1)


def evaluate_all(*, now: dt.datetime | None = None) -> dict[str, int]:
    now = now or timezone.now()
    totals = {"rules": 0, "opened": 0, "resolved": 0}
    for rule in AlertRule.objects.filter(enabled=True).order_by("id"):
        try:
            opened, resolved = evaluate_rule(rule, now=now)
        except Exception:  # one broken rule (e.g. a bad selector) must not stop the others
            log.exception("evaluating alert rule %s failed", rule.id)
            continue
        totals["rules"] += 1
        totals["opened"] += opened
        totals["resolved"] += resolved
    return totals


def evaluate_rule(rule: AlertRule, *, now: dt.datetime | None = None) -> tuple[int, int]:
    """Evaluate one rule for all its devices at once. Returns (opened, resolved)."""
    now = now or timezone.now()
    active = {a.device_id: a for a in Alert.objects.filter(rule=rule, state__in=ACTIVE_STATES)}
    opened = resolved = 0
    if rule.kind == RuleKind.ABSENCE:
        cutoff = now - dt.timedelta(seconds=rule.for_duration_s)
        scope = services.scope_devices(rule)
        silent = dict(scope.filter(last_seen__lt=cutoff).values_list("id", "last_seen"))
        for device_id in silent.keys() - active.keys():
            opened += services.alert_open(rule=rule, device_id=device_id, value=None, at=now) is not None
        for device_id in active.keys() - silent.keys():
            services.alert_resolve(alert=active[device_id], value=None, at=now, note="device seen again")
            resolved += 1
    else:
        rows = _threshold_rows(rule, now)
        clear = rule.threshold if rule.clear_threshold is None else rule.clear_threshold
        compare = COMPARE[rule.comparison]
        tracked = {}
        for device_id, breach, latest, covers_start in rows:
            alert = active.get(device_id)
            if alert is not None:
                if latest is not None and not compare(latest, clear):
                    services.alert_resolve(alert=alert, value=latest, at=now)
                    resolved += 1
                elif latest is not None and latest != alert.last_value:
                    tracked[alert.id] = latest
            elif breach and covers_start:
                opened += services.alert_open(rule=rule, device_id=device_id, value=latest, at=now) is not None
        services.alert_track_values(values=tracked)
    AlertRule.objects.filter(pk=rule.pk).update(last_evaluated_at=now)
    return opened, resolved


def _threshold_rows(rule: AlertRule, now: dt.datetime) -> list[tuple]:
    metric_id = Metric.objects.filter(name=rule.metric).values_list("id", flat=True).first()
    if metric_id is None:
        return []
    end = _closed_until(now)
    start = end - dt.timedelta(seconds=rule.for_duration_s)
    scope_sql, scope_params = services.scope_devices(rule).values("id").query.sql_with_params()
    value = _MINUTE_VALUE[rule.agg]
    sql = (
        f"SELECT device_id, bool_and(v {rule.comparison} %s), (array_agg(v ORDER BY bucket DESC))[1], "  # noqa: S608 -- comparison and agg come from model choices
        "min(bucket) < %s FROM ("
        f" SELECT device_id, bucket, {value} AS v FROM telemetry_rollup_1m"
        " WHERE metric_id = %s AND bucket >= %s AND bucket < %s"
        f" AND device_id IN ({scope_sql})) AS m GROUP BY device_id"
    )
    if rule.comparison not in COMPARE or rule.agg not in _MINUTE_VALUE:
        raise ValueError(f"rule {rule.id}: unsupported comparison or agg")
    with connection.cursor() as cursor:
        cursor.execute(sql, [rule.threshold, start + dt.timedelta(minutes=1), metric_id, start, end, *scope_params])
        return cursor.fetchall()


def webhook_payload(alert: Alert, event: str) -> dict[str, Any]:
    return {
        "event": event, "alert": alert.id, "state": alert.state, "severity": alert.severity,
        "rule": {"id": alert.rule_id, "name": alert.rule.name, "metric": alert.rule.metric, "kind": alert.rule.kind},
        "device": alert.device.uid, "value": alert.last_value,
        "opened_at": alert.opened_at.isoformat(),
        "resolved_at": alert.resolved_at.isoformat() if alert.resolved_at else None,
    }


def deliver_webhook(*, alert_id: int, event: str) -> bool:
    """POST the alert as JSON to its rule's webhook. Raises WebhookError to be retried."""
    alert = Alert.objects.select_related("rule", "device").filter(pk=alert_id).first()
    if alert is None or not alert.rule.webhook_url:
        return False
    url = alert.rule.webhook_url
    if not url.startswith(("http://", "https://")):
        log.error("alert rule %s: webhook URL %r is not http(s); not delivering", alert.rule_id, url)
        return False
    request = urllib.request.Request(  # noqa: S310 -- scheme checked above
        url, data=json.dumps(webhook_payload(alert, event)).encode(), method="POST",
        headers={"Content-Type": "application/json", "User-Agent": "edge-fleet-console/1"},
    )
    try:
        with urllib.request.urlopen(request, timeout=conf.get("WEBHOOK_TIMEOUT_S")) as response:  # noqa: S310 -- scheme checked above
            response.read()
    except (urllib.error.URLError, OSError, TimeoutError) as exc:
        raise WebhookError(f"{url}: {exc}") from exc
    return True
