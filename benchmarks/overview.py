"""Dashboard render benchmark: the fleet overview and the devices page with 10,000 devices.

    .venv/bin/python benchmarks/overview.py [--devices 10000] [--runs 50]

Seeds a scratch database (created from DATABASE_URL's server, migrated, dropped) with
--devices devices over 50 sites (labels, statuses, presence, trust rows, open alerts), then
renders each page server-side --runs times through Django's test client as an admin, and
prints p50/p95 and the number of SQL queries per render. Target: overview p95 ≤ 200 ms.
"""

from __future__ import annotations

import argparse
import datetime as dt
import os
import random
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
os.environ.setdefault("DJANGO_SETTINGS_MODULE", "console.settings")

PAGES = [
    ("overview", "/"),
    ("devices (first page)", "/devices/"),
    ("devices (selector, sorted, page 40)", "/devices/?selector=env%3Dprod%2Ctier+in+%281%2C2%29&sort=-last_seen&page=40"),
    ("devices (search)", "/devices/?q=dev-0042"),
]


def seed(n: int) -> None:
    from django.utils import timezone

    from fleet.models import Device, Site, UplinkCursor
    from security.models import DeviceTrust
    from telemetry.models import Alert, AlertRule

    rng = random.Random(7)
    sites = Site.objects.bulk_create([Site(name=f"Plant {i}", slug=f"plant-{i}") for i in range(50)])
    now = timezone.now()
    statuses = ["active"] * 90 + ["pending"] * 4 + ["quarantined"] * 3 + ["decommissioned"] * 3
    devices = Device.objects.bulk_create([
        Device(uid=f"dev-{i:05d}", name=f"Device {i}", site=rng.choice(sites), status=rng.choice(statuses),
               tier=rng.choice((1, 2, 3)), online=rng.random() < 0.7,
               last_seen=now - dt.timedelta(seconds=rng.randint(0, 86400)),
               labels={"env": rng.choice(("prod", "lab")), "ring": rng.choice(("canary", "main", "main"))},
               installed_versions={"agent": "1.2.0", "model": "1.0.0"}, hardware_model=rng.choice(("rpi4", "jetson")))
        for i in range(n)
    ], batch_size=2000)
    UplinkCursor.objects.bulk_create([UplinkCursor(device=d) for d in devices], batch_size=5000)
    DeviceTrust.objects.bulk_create([
        DeviceTrust(device=d, state="trusted", last_status=rng.choice(("affirming", "affirming", "warning")),
                    last_attested_at=now - dt.timedelta(hours=rng.randint(0, 48)))
        for d in devices if rng.random() < 0.6
    ], batch_size=5000)
    rule = AlertRule.objects.create(name="hot", metric="temperature_c", threshold=80)
    Alert.objects.bulk_create([Alert(rule=rule, device=d, opened_at=now, severity="warning", last_value=85.0)
                               for d in devices[:200]])


def measure(client, url: str, runs: int) -> tuple[list[float], int]:
    from django.db import connection
    from django.test.utils import CaptureQueriesContext

    for _ in range(3):  # warm-up: templates, connection, caches
        response = client.get(url)
        assert response.status_code == 200, (url, response.status_code)
    with CaptureQueriesContext(connection) as ctx:
        client.get(url)
    queries = len(ctx.captured_queries)
    times = []
    for _ in range(runs):
        started = time.perf_counter()
        response = client.get(url)
        times.append((time.perf_counter() - started) * 1000)
        assert response.status_code == 200
    return times, queries


def run(*, devices: int = 10_000, runs: int = 50) -> dict:
    """Seed a scratch database and time each page; returns the runner's rows."""
    from django.test import Client

    from benchmarks import pct, result, row, scratch_database

    out = []
    with scratch_database("bench_overview"):
        started = time.perf_counter()
        seed(devices)
        print(f"seeded {devices:,} devices in {time.perf_counter() - started:.1f}s", flush=True)
        from security.services import operator_upsert

        user, _, _ = operator_upsert(actor="bench", username="bench-admin", role="admin", password="x" * 16)
        client = Client(HTTP_HOST="localhost")
        client.force_login(user)
        print(f"{'page':40} {'p50':>8} {'p95':>8} {'max':>8} queries   ({runs} runs, server-side render)")
        for label, url in PAGES:
            times, queries = measure(client, url, runs)
            p95 = pct(times, 0.95)
            print(f"{label:40} {statistics.median(times):6.1f}ms {p95:6.1f}ms {max(times):6.1f}ms {queries:5d}")
            target = 200 if url == "/" else None
            out += [row(f"{label} p50 ({queries} queries)", statistics.median(times), "ms"),
                    row(f"{label} p95", p95, "ms", f"≤ {target} ms" if target else "", p95 <= target if target else None)]
    return result("overview", out, devices=devices, runs=runs)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--devices", type=int, default=10_000)
    parser.add_argument("--runs", type=int, default=50)
    args = parser.parse_args()

    import django

    django.setup()
    run(devices=args.devices, runs=args.runs)


if __name__ == "__main__":
    main()
