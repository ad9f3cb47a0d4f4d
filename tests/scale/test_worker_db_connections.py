"""A Celery worker keeps its database connection from task to task (console/celery.py)."""

import subprocess
import sys
import time

import pytest
from django.db import connection

from tests.harness import ROOT, _die_with_parent
from tests.scale.test_two_processes import Worker, child_env

pytestmark = pytest.mark.django_db(transaction=True)


def worker_backends() -> set[int]:
    """PostgreSQL backends on the test database other than this test's own connection."""
    with connection.cursor() as cursor:
        cursor.execute("SELECT pid FROM pg_stat_activity WHERE datname = current_database() AND pid <> pg_backend_pid()")
        return {pid for (pid,) in cursor.fetchall()}


class KeepingWorker(Worker):
    """The scale tests' worker, with persistent connections as in production (DB_CONN_MAX_AGE=60)."""

    def __init__(self, log_path) -> None:
        import uuid

        self.queue = f"reuse-{uuid.uuid4().hex[:8]}"
        self.log_path = log_path
        with log_path.open("wb") as log:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "celery", "-A", "console", "worker", "--pool", "solo", "-Q", self.queue,
                 "--without-gossip", "--without-mingle", "--without-heartbeat", "--loglevel", "INFO"],
                cwd=ROOT, env={**child_env(), "DB_CONN_MAX_AGE": "60"}, stdout=log, stderr=subprocess.STDOUT,
                preexec_fn=_die_with_parent,
            )

    def run_task(self, name: str, done_before: int, timeout: float = 30) -> None:
        from console.celery import app

        app.send_task(name, queue=self.queue)
        deadline = time.monotonic() + timeout
        while self.log_path.read_bytes().count(b" succeeded in ") <= done_before:
            assert self.proc.poll() is None and time.monotonic() < deadline, self.log()
            time.sleep(0.1)


def test_a_celery_worker_runs_task_after_task_on_the_same_database_connection(tmp_path):
    worker = KeepingWorker(tmp_path / "worker.log")
    try:
        worker.wait_ready()
        worker.run_task("fleet.tasks.sweep_presence", done_before=0)
        after_first = worker_backends()
        for done in (1, 2):
            worker.run_task("fleet.tasks.sweep_presence", done_before=done)
        after_third = worker_backends()
    finally:
        worker.stop()
    # Celery's default closes the connection after every task: no backend would be left.
    assert len(after_first) == 1, worker.log()
    assert after_third == after_first
