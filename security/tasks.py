"""Periodic attestation: challenge devices that are due, mark stale results suspect."""

from celery import shared_task
from django.conf import settings

from security import attestation


@shared_task(name="security.tasks.attest_due", ignore_result=True)
def attest_due() -> int:
    return attestation.challenges_due(interval_s=settings.SECURITY_ATTEST_INTERVAL_S)


@shared_task(name="security.tasks.mark_overdue", ignore_result=True)
def mark_overdue() -> int:
    # Two missed rounds before a trusted device becomes suspect: one late answer is not news.
    return attestation.mark_overdue(grace_s=2 * settings.SECURITY_ATTEST_INTERVAL_S + settings.SECURITY_CHALLENGE_TTL_S)
