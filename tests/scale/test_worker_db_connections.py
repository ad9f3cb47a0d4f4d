"""A Celery worker keeps its database connection from task to task (console/celery.py)."""

import time

import pytest
from django.db import connection

from tests.scale.test_two_processes import Worker

pytestmark = pytest.mark.django_db(transaction=True)


def worker_backends() -> set[int]:
    """PostgreSQL backends on the test database other than this test's own connection."""
    with connection.cursor() as cursor:
        cursor.execute("SELECT pid FROM pg_stat_activity WHERE datname = current_database() AND pid <> pg_backend_pid()")
        return {pid for (pid,) in cursor.fetchall()}


def run_task(worker: Worker, name: str, done_before: int, timeout: float = 30) -> None:
    """Send task `name` to the worker's queue and wait until its log shows one more success."""
    from console.celery import app

    app.send_task(name, queue=worker.queue)
    deadline = time.monotonic() + timeout
    while worker.log_path.read_bytes().count(b" succeeded in ") <= done_before:
        assert worker.proc.poll() is None and time.monotonic() < deadline, worker.log()
        time.sleep(0.1)


def test_a_celery_worker_runs_task_after_task_on_the_same_database_connection(tmp_path):
    # Persistent connections as in production (the scale tests' workers run with DB_CONN_MAX_AGE=0).
    worker = Worker(tmp_path / "worker.log", extra_env={"DB_CONN_MAX_AGE": "60"})
    try:
        worker.wait_ready()
        run_task(worker, "fleet.tasks.sweep_presence", done_before=0)
        after_first = worker_backends()
        for done in (1, 2):
            run_task(worker, "fleet.tasks.sweep_presence", done_before=done)
        after_third = worker_backends()
    finally:
        worker.stop()
    # Celery's default closes the connection after every task: no backend would be left.
    assert len(after_first) == 1, worker.log()
    assert after_third == after_first
