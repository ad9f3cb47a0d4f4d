"""The Celery application. The beat schedule is declared here, in code, not in the database."""

from __future__ import annotations

import os

from celery import Celery, signals
from django.db import close_old_connections

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "console.settings")

app = Celery("console")
app.config_from_object("django.conf:settings", namespace="CELERY")
app.autodiscover_tasks()

# Celery's Django fixup closes every database connection before and after each task, so every
# task (a rollout step, an orchestrator tick) opened a new PostgreSQL connection: ~29 % of the
# worker's time in a 2,000-device rollout was spent connecting. Connections are kept the way a
# web request keeps them instead: the fixup's closing is switched off (a reuse count it never
# reaches) and Django's own end-of-request check runs around each task, closing a connection
# that is broken (after a PostgreSQL restart) or older than DB_CONN_MAX_AGE.
app.conf["CELERY_DB_REUSE_MAX"] = 2**31


@signals.task_prerun.connect
@signals.task_postrun.connect
def _recycle_db_connections(task: object = None, **_: object) -> None:
    # Not for a task run eagerly inside the caller's process (tests, CELERY_TASK_ALWAYS_EAGER): its
    # connection is the caller's, maybe in the middle of a transaction (as the fixup skips them).
    if getattr(getattr(task, "request", None), "is_eager", False):
        return
    close_old_connections()


# Every periodic job of the console. Each task is idempotent and cheap when nothing
# changed, so running it late or twice is harmless.
app.conf.beat_schedule = {
    "fleet.sweep-presence": {"task": "fleet.tasks.sweep_presence", "schedule": 30.0},
    "fleet.prune-presence": {"task": "fleet.tasks.prune_presence", "schedule": 3600.0},
    "security.attest-due": {"task": "security.tasks.attest_due", "schedule": 60.0},
    "security.mark-overdue": {"task": "security.tasks.mark_overdue", "schedule": 300.0},
    "telemetry.ensure-partitions": {"task": "telemetry.tasks.ensure_partitions", "schedule": 3600.0},
    "telemetry.refresh-rollups": {"task": "telemetry.tasks.refresh_rollups", "schedule": 60.0},
    "telemetry.evaluate-alerts": {"task": "telemetry.tasks.evaluate_alerts", "schedule": 60.0},
    "telemetry.apply-retention": {"task": "telemetry.tasks.apply_retention", "schedule": 6 * 3600.0},
    "rollouts.tick": {"task": "rollouts.tasks.tick", "schedule": 5.0, "options": {"expires": 5.0}},
}
