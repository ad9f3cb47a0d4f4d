"""Periodic telemetry jobs (Celery beat, see console/celery.py) and webhook delivery.

Each job is idempotent and cheap when nothing changed; tasks take ids, not objects.
"""

from __future__ import annotations

from typing import Any

from celery import shared_task

from telemetry import conf, rollups, storage


@shared_task(name="telemetry.tasks.ensure_partitions", ignore_result=True)
def ensure_partitions() -> list[str]:
    """Keep TELEMETRY_PARTITION_DAYS_AHEAD daily partitions ready (plain PostgreSQL backend)."""
    created = storage.ensure_partitions(days_ahead=conf.get("PARTITION_DAYS_AHEAD"))
    storage.vacuum_closed_partitions()  # once per partition, after its day (telemetry/storage.py)
    return created


@shared_task(name="telemetry.tasks.refresh_rollups", ignore_result=True)
def refresh_rollups() -> dict[str, Any]:
    return rollups.refresh()


@shared_task(name="telemetry.tasks.apply_retention", ignore_result=True)
def apply_retention() -> dict[str, Any]:
    return rollups.apply_retention()


@shared_task(name="telemetry.tasks.evaluate_alerts", ignore_result=True)
def evaluate_alerts() -> dict[str, int]:
    from telemetry import alerts

    return alerts.evaluate_all()


@shared_task(name="telemetry.tasks.deliver_alert_webhook", bind=True, ignore_result=True,
             max_retries=None, acks_late=True)
def deliver_alert_webhook(self: Any, alert_id: int, event: str) -> bool:
    """POST the alert to its rule's webhook; retried with exponential back-off on failure."""
    from telemetry import alerts

    try:
        return alerts.deliver_webhook(alert_id=alert_id, event=event)
    except alerts.WebhookError as exc:
        if self.request.retries >= conf.get("WEBHOOK_MAX_RETRIES"):
            alerts.log.error("giving up webhook for alert %s (%s): %s", alert_id, event, exc)
            return False
        raise self.retry(exc=exc, countdown=min(600, 5 * 2 ** self.request.retries)) from exc
