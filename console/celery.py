"""The Celery application. The beat schedule is declared here, in code, not in the database."""

from __future__ import annotations

import os

from celery import Celery

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "console.settings")

app = Celery("console")
app.config_from_object("django.conf:settings", namespace="CELERY")
app.autodiscover_tasks()

# Every periodic job of the console. Each task is idempotent and cheap when nothing
# changed, so running it late or twice is harmless.
app.conf.beat_schedule = {
    "fleet.sweep-presence": {"task": "fleet.tasks.sweep_presence", "schedule": 30.0},
}
