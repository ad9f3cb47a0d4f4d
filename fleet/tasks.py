"""Periodic inventory jobs."""

from celery import shared_task
from django.conf import settings

from fleet import services


@shared_task(name="fleet.tasks.sweep_presence", ignore_result=True)
def sweep_presence() -> int:
    """Mark offline the devices whose connection died without a goodbye."""
    return services.presence_sweep(older_than_s=settings.FLEET_OFFLINE_AFTER_S)


@shared_task(name="fleet.tasks.prune_presence", ignore_result=True)
def prune_presence() -> int:
    """Keep FLEET_PRESENCE_HISTORY_DAYS of presence history."""
    return services.presence_prune(older_than_days=settings.FLEET_PRESENCE_HISTORY_DAYS)
