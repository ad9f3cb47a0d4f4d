"""Celery tasks of rollouts: the orchestrator tick (beat, every 5 s) and event-driven steps.

Tasks take ids; state lives in tables. Both are idempotent and safe to run concurrently."""

from __future__ import annotations

from celery import shared_task

from rollouts import orchestrator


@shared_task(name="rollouts.tasks.tick", ignore_result=True, acks_late=True)
def tick() -> None:
    orchestrator.tick()


@shared_task(name="rollouts.tasks.step_campaign", ignore_result=True, acks_late=True)
def step_campaign(campaign_id: int) -> None:
    orchestrator.step_campaign(campaign_id)
