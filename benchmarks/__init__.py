"""Benchmarks: scripts, not timed tests. `python -m benchmarks.run` runs them all (see run.py).

Every benchmark module exposes `run(**params) -> dict` returning `result(...)`: a list of rows
(metric, value, unit, target, met) plus free-form details. The helpers below are shared: Django
set-up, a scratch database on DATABASE_URL's server (created, migrated, dropped), CPU and memory
of processes read from /proc and psutil, percentiles.
"""

from __future__ import annotations

import contextlib
import math
import os
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))
os.environ.setdefault("DJANGO_SETTINGS_MODULE", "console.settings")


def setup_django() -> None:
    import django
    from django.apps import apps

    if not apps.ready:
        django.setup()


@contextlib.contextmanager
def scratch_database(prefix: str) -> Iterator[dict]:
    """A fresh, migrated database `<prefix>_<pid>` on DATABASE_URL's server for the duration of
    the block; Django's default connection points at it. Yields its settings dict. Dropped after."""
    setup_django()
    from django.conf import settings
    from django.db import connection

    scratch = f"{prefix}_{os.getpid()}"
    settings.DATABASES["default"].setdefault("TEST", {})["NAME"] = scratch
    print(f"[{prefix}] scratch database {scratch}: creating and migrating …", flush=True)
    original = connection.creation.create_test_db(verbosity=0, autoclobber=True, keepdb=False)
    try:
        yield connection.settings_dict
    finally:
        connection.close()
        connection.creation.destroy_test_db(original, verbosity=0)
        print(f"[{prefix}] scratch database {scratch} dropped", flush=True)


def cpu_seconds(pid: int | None = None) -> float:
    """User + system CPU seconds of a process (this one by default), from /proc."""
    fields = Path(f"/proc/{pid or 'self'}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def tree_cpu_seconds(pid: int) -> float:
    """CPU seconds of a process and its live children (e.g. a server with worker threads/processes)."""
    import psutil

    total = 0.0
    try:
        proc = psutil.Process(pid)
        for p in [proc, *proc.children(recursive=True)]:
            with contextlib.suppress(psutil.Error):
                t = p.cpu_times()
                total += t.user + t.system
    except psutil.Error:
        pass
    return total


def memory(pid: int) -> dict[str, int]:
    """rss, uss and pss in bytes (uss/pss from smaps_rollup)."""
    import psutil

    info = psutil.Process(pid).memory_full_info()
    return {"rss": info.rss, "uss": info.uss, "pss": getattr(info, "pss", info.uss)}


def postgres_backend_pids(database: str) -> list[int]:
    """Server processes of the connections to `database` (read through a fresh connection)."""
    from django.db import connection

    with connection.cursor() as cursor:
        cursor.execute("SELECT pid FROM pg_stat_activity WHERE datname = %s AND pid <> pg_backend_pid()", [database])
        return [row[0] for row in cursor.fetchall()]


def cpu_of_pids(pids: list[int]) -> dict[int, float]:
    out = {}
    for pid in pids:
        with contextlib.suppress(OSError):
            out[pid] = cpu_seconds(pid)
    return out


def cpu_delta(before: dict[int, float], after: dict[int, float]) -> float:
    """CPU spent between two `cpu_of_pids` samples by the processes alive at the end
    (a process born in between counts fully)."""
    return sum(cpu - before.get(pid, 0.0) for pid, cpu in after.items())


def pct(values: list[float], q: float) -> float:
    """Nearest-rank percentile, q in [0, 1]; nan for no values."""
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, math.ceil(q * len(ordered)) - 1))]


def row(metric: str, value: float | int | None, unit: str = "", target: str = "", met: bool | None = None) -> dict:
    return {"metric": metric, "value": value, "unit": unit, "target": target, "met": met}


def result(name: str, rows: list[dict], **details: Any) -> dict:
    return {"benchmark": name, "rows": rows, "details": details}


class Stopwatch:
    def __init__(self) -> None:
        self.t0 = time.monotonic()

    @property
    def elapsed(self) -> float:
        return time.monotonic() - self.t0
