"""Rollout benchmark: a campaign over N simulated devices, orchestrator and device reports.

    .venv/bin/python benchmarks/rollout.py [--devices 10000] [--rate 12000] [--tick 5]
                                           [--workers 8] [--fail-pct 20]

What is real and what is simulated (honestly):
- Real: PostgreSQL (a scratch database created from DATABASE_URL's server, migrated, dropped),
  the orchestrator (`rollouts.orchestrator.tick` every --tick seconds, as Celery beat would,
  plus event-driven `step_campaign` right after a kick, as a Celery worker would), every
  service (`campaign_start`, `execution_report` in its own transaction per status frame, like
  the WebSocket consumer), the audit log, the offer frames with signed download URLs.
- Simulated: devices are --workers threads calling `rollouts.services.execution_report` directly
  (acked → downloading → downloaded → installing → verifying → committed, six transactions per
  device); no WebSocket, no download, no channel-layer doorbell (`fleet.push.send_many`
  is replaced by an in-process queue), no Celery broker.

Scenario 1: waves 1% → 10% → 50% → 100% with success-ratio and failure gates, soak 0; prints
offers/min, time to complete and orchestrator CPU per tick/step.
Scenario 2: the same fleet, a new version whose installs fail --fail-pct of the time, with a
failure gate (max 5 %, min sample 100): prints how long after the threshold was crossed (in
committed reports) the campaign was paused.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import queue
import statistics
import sys
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
os.environ.setdefault("DJANGO_SETTINGS_MODULE", "console.settings")


class Sim:
    """Devices as worker threads applying status reports through the real service."""

    def __init__(self, workers: int, fail_pct: float) -> None:
        self.q: queue.Queue = queue.Queue()
        self.fail_pct = fail_pct
        self.offers: list[float] = []
        self.finals: list[tuple[float, bool]] = []  # (time, failed)
        self.lock = threading.Lock()
        self.kicked: set[int] = set()
        self.stop = False
        self.threads = [threading.Thread(target=self.worker, daemon=True) for _ in range(workers)]
        self.reports = 0

    def push_many(self, messages) -> int:
        messages = list(messages)
        for device_id, message in messages:
            self.push(device_id, message)
        return len(messages)

    def push(self, device_id: int, message: dict) -> None:
        frame = message.get("frame", {})
        if frame.get("type") == "rollout.offer":
            with self.lock:
                self.offers.append(time.monotonic())
            self.q.put((device_id, frame["execution_id"]))

    def kick(self, campaign_id: int) -> None:
        self.kicked.add(campaign_id)

    def fails(self, execution_id: int) -> bool:
        h = int(hashlib.sha256(str(execution_id).encode()).hexdigest()[:8], 16) / 2**32
        return h * 100 < self.fail_pct

    def worker(self) -> None:
        from django.db import connection, transaction

        from agent_stub import protocol as p
        from rollouts.services import execution_report

        try:
            while not self.stop:
                try:
                    device_id, execution_id = self.q.get(timeout=0.2)
                except queue.Empty:
                    continue
                failed = self.fails(execution_id)
                steps = ["acked", "downloading", "downloaded", "installing", "verifying"]
                steps.append("rolled_back" if failed else "committed")
                for state in steps:
                    error = p.RolloutError("self_test_failed", False, "bench") if state == "rolled_back" else None
                    with transaction.atomic():
                        execution_report(device_id=device_id, report=p.RolloutStatus(
                            seq=0, execution_id=execution_id, state=state, progress=0, error=error))
                with self.lock:
                    self.reports += len(steps)
                    self.finals.append((time.monotonic(), failed))
        finally:
            connection.close()


def run_campaign(sim: Sim, campaign_id: int, tick_s: float, timeout_s: float) -> dict:
    from rollouts import orchestrator
    from rollouts.models import Campaign

    tick_cpu: list[float] = []
    tick_wall: list[float] = []
    step_cpu: list[float] = []
    offering = {"offers": 0, "wall": 0.0}
    t0 = time.monotonic()
    next_tick = t0
    state = "running"
    while time.monotonic() - t0 < timeout_s:
        now = time.monotonic()
        if now >= next_tick:
            c0, w0 = time.thread_time(), time.perf_counter()
            made = orchestrator.tick()["offered"]
            tick_cpu.append(time.thread_time() - c0)
            tick_wall.append(time.perf_counter() - w0)
            if made:
                offering["offers"] += made
                offering["wall"] += tick_wall[-1]
            next_tick += tick_s
        elif sim.kicked:
            ids, sim.kicked = sim.kicked, set()
            for cid in ids:
                c0, w0 = time.thread_time(), time.perf_counter()
                made = orchestrator.step_campaign(cid)
                step_cpu.append(time.thread_time() - c0)
                if made:
                    offering["offers"] += made
                    offering["wall"] += time.perf_counter() - w0
        else:
            time.sleep(0.02)
        state = Campaign.objects.filter(pk=campaign_id).values_list("state", flat=True).get()
        if state not in ("running", "scheduled") and sim.q.empty():
            break
    return {"wall": time.monotonic() - t0, "state": state, "tick_cpu": tick_cpu, "tick_wall": tick_wall,
            "step_cpu": step_cpu, "t0": t0, "offering": offering}


def _ms(values: list[float], fn=statistics.mean) -> str:
    return f"{fn(values) * 1000:.1f} ms" if values else "n/a"


def run(*, devices: int = 10_000, rate: int = 12_000, concurrency: int = 5_000, tick: float = 5.0, workers: int = 8,
        fail_pct: float = 20.0, timeout: float = 900.0, scenario2: bool = True) -> dict:
    """Both scenarios in a scratch database; returns the runner's rows (see benchmarks/__init__.py)."""
    from benchmarks import setup_django

    args = argparse.Namespace(devices=devices, rate=rate, concurrency=concurrency, tick=tick, workers=workers,
                              fail_pct=fail_pct, timeout=timeout)
    setup_django()
    from django.conf import settings

    settings.ROLLOUTS_OFFER_BATCH = max(500, args.rate // 6)
    from django.core.files.base import ContentFile
    from django.core.management import call_command
    from django.db import connection

    import fleet.push
    from fleet.models import Device, UplinkCursor
    from rollouts import orchestrator, services
    from rollouts.models import Campaign, Execution

    out: dict = {}
    scratch = f"bench_rollout_{os.getpid()}"
    settings.DATABASES["default"].setdefault("TEST", {})["NAME"] = scratch
    settings.MEDIA_ROOT = f"/tmp/{scratch}-media"  # noqa: S108 -- scratch files of a local benchmark
    print(f"scratch database {scratch}: creating and migrating …", flush=True)
    original = connection.creation.create_test_db(verbosity=0, autoclobber=True, keepdb=False)
    try:
        call_command("migrate", verbosity=0)
        devices = Device.objects.bulk_create([
            Device(uid=f"bench-{i:05d}", status="active", online=True, labels={"fleet": "bench"},
                   installed_versions={"model": "1.0.0"}, tier=2, ram_mb=8192) for i in range(args.devices)])
        UplinkCursor.objects.bulk_create([UplinkCursor(device=d) for d in devices])

        def artifact(version: str):
            return services.artifact_create(actor="bench", name="anomaly", kind="model", version=version,
                                            variants=[services.VariantUpload("default", [], ContentFile(
                                                os.urandom(64 * 1024), name="model.onnx"))])

        # --- scenario 1 ---------------------------------------------------------------
        sim = Sim(args.workers, fail_pct=0.0)
        fleet.push.send_many = sim.push_many
        orchestrator.kick = sim.kick
        for thread in sim.threads:
            thread.start()
        waves = [{"size": "1%", "soak_s": 0, "gates": [{"type": "success_ratio", "min_ratio": 0.95},
                                                       {"type": "failure", "max_pct": 5, "min_sample": 20}]},
                 {"size": "10%", "soak_s": 0, "gates": [{"type": "failure", "max_pct": 5, "min_sample": 50}]},
                 {"size": "50%", "soak_s": 0, "gates": [{"type": "failure", "max_pct": 5, "min_sample": 100}]},
                 {"size": "100%", "soak_s": 0, "gates": [{"type": "success_ratio", "min_ratio": 0.95}]}]
        t_start = time.perf_counter()
        campaign = services.campaign_create(actor="bench", artifact=artifact("1.1.0"), name="bench 1.1.0",
                                            target_selector="fleet=bench", waves=waves, rate_per_min=args.rate,
                                            max_concurrent=args.concurrency)
        campaign = services.campaign_start(actor="bench", campaign=campaign, reason="bench")
        start_s = time.perf_counter() - t_start
        print(f"scenario 1: {args.devices:,} devices, waves 1%/10%/50%/100%, rate {args.rate:,}/min, "
              f"cap {args.concurrency:,}, tick {args.tick}s, {args.workers} device threads", flush=True)
        print(f"  campaign_start (materialise {args.devices:,} executions in one INSERT … SELECT): {start_s:.2f}s")
        result = run_campaign(sim, campaign.id, args.tick, args.timeout)
        counts = dict(Execution.objects.filter(campaign=campaign).values_list("state").annotate(
            n=__import__("django.db.models", fromlist=["Count"]).Count("id")).order_by())
        campaign = Campaign.objects.get(pk=campaign.pk)
        last = Execution.objects.filter(campaign=campaign, wave=len(waves) - 1)
        from django.db.models import Max, Min

        span = last.aggregate(a=Min("offered_at"), b=Max("offered_at"))
        n_last = last.count()
        span_s = (span["b"] - span["a"]).total_seconds()
        # A wave offered in one batch has no measurable rate (n/a); the capacity figure covers it.
        sustained = n_last / span_s * 60 if span_s >= 1 else float("nan")
        offering = result["offering"]
        print(f"  final state {result['state']} in {result['wall']:.1f}s; executions {counts}")
        print(f"  last wave: {n_last:,} offers from {span['a']:%H:%M:%S.%f} to {span['b']:%H:%M:%S.%f} = "
              f"{sustained:,.0f} offers/min (rate limit {args.rate:,}/min)")
        print(f"  orchestrator offer capacity: {offering['offers']:,} offers in {offering['wall']:.2f}s of step/tick "
              f"wall time = {offering['offers'] / max(offering['wall'], 1e-9) * 60:,.0f} offers/min")
        print(f"  device reports applied: {sim.reports:,} ({sim.reports / result['wall']:,.0f}/s over the run)")
        out.update(state=result["state"], complete_s=result["wall"], start_s=start_s, sustained=sustained,
                   capacity=offering["offers"] / max(offering["wall"], 1e-9) * 60, counts=counts,
                   tick_cpu_mean=statistics.mean(result["tick_cpu"]) * 1000 if result["tick_cpu"] else float("nan"),
                   tick_cpu_max=max(result["tick_cpu"]) * 1000 if result["tick_cpu"] else float("nan"),
                   ticks=len(result["tick_cpu"]), steps=len(result["step_cpu"]),
                   step_cpu_mean=statistics.mean(result["step_cpu"]) * 1000 if result["step_cpu"] else float("nan"),
                   reports=sim.reports)
        print(f"  orchestrator tick: {len(result['tick_cpu'])} ticks, CPU mean {_ms(result['tick_cpu'])}, "
              f"max {_ms(result['tick_cpu'], max)}; wall mean {_ms(result['tick_wall'])}, "
              f"max {_ms(result['tick_wall'], max)}")
        print(f"  event-driven steps: {len(result['step_cpu'])}, CPU mean {_ms(result['step_cpu'])}, "
              f"max {_ms(result['step_cpu'], max)}", flush=True)
        c0, w0 = time.thread_time(), time.perf_counter()
        orchestrator.tick()
        print(f"  idle tick after completion ({args.devices:,} executions in the table): CPU "
              f"{(time.thread_time() - c0) * 1000:.1f} ms, wall {(time.perf_counter() - w0) * 1000:.1f} ms")

        # --- scenario 2 ---------------------------------------------------------------
        if not scenario2:
            sim.stop = True
            for thread in sim.threads:
                thread.join(5)
            return _result(out, args, None, None)
        sim.fail_pct = args.fail_pct
        sim.finals.clear()
        max_pct, min_sample = 5.0, 100
        campaign2 = services.campaign_create(
            actor="bench", artifact=artifact("1.2.0"), name="bench 1.2.0", target_selector="fleet=bench",
            waves=[{"size": "100%", "soak_s": 0, "gates": [
                {"type": "failure", "max_pct": max_pct, "min_sample": min_sample}]}],
            rate_per_min=args.rate, max_concurrent=args.concurrency)
        campaign2 = services.campaign_start(actor="bench", campaign=campaign2, reason="bench")
        print(f"scenario 2: {args.fail_pct}% of installs roll back; failure gate max {max_pct}% "
              f"with min sample {min_sample}", flush=True)
        result2 = run_campaign(sim, campaign2.id, args.tick, 120)
        paused_at = time.monotonic()
        campaign2 = Campaign.objects.get(pk=campaign2.pk)
        # When did the committed reports first cross the threshold?
        crossed = None
        failed = 0
        for decided, (when, is_failure) in enumerate(sorted(sim.finals), start=1):
            failed += is_failure
            if decided >= min_sample and 100 * failed / decided > max_pct:
                crossed = when
                break
        if campaign2.state == "paused" and crossed is not None:
            # The pause time is when the campaign row changed; measure from the run's clock.
            lag = (campaign2.updated_at.timestamp() - time.time()) + paused_at - crossed
            print(f"  campaign {campaign2.state}: \"{campaign2.state_reason}\"")
            print(f"  gate tripped {lag:.2f}s after the threshold was crossed (tick {args.tick}s, "
                  f"kicks after each final report)")
            out["gate_lag_s"] = lag
        else:
            print(f"  campaign ended {campaign2.state} (threshold crossed: {crossed is not None})")
        print(f"  wall {result2['wall']:.1f}s; offers made before the pause: "
              f"{Execution.objects.filter(campaign=campaign2).exclude(state='pending').count():,}")
        out["scenario2_state"] = campaign2.state
        sim.stop = True
        for thread in sim.threads:
            thread.join(5)
    finally:
        connection.close()
        connection.creation.destroy_test_db(original, verbosity=0)
        print(f"scratch database {scratch} dropped")
    return _result(out, args, out.get("scenario2_state"), out.get("gate_lag_s"))


def _result(out: dict, args: argparse.Namespace, scenario2_state: str | None, lag: float | None) -> dict:
    from benchmarks import result, row

    rows = [
        row(f"campaign over {args.devices:,} devices", out["state"], "", "completed", out["state"] == "completed"),
        row("time to complete", out["complete_s"], "s"),
        row("offers/min sustained (last wave, rate limit "
            f"{args.rate:,}/min)", out["sustained"], "offers/min", "≥ 5,000/min",
            None if out["sustained"] != out["sustained"] else out["sustained"] >= 5000),
        row("orchestrator offer capacity", out["capacity"], "offers/min", "≥ 5,000/min", out["capacity"] >= 5000),
        row(f"orchestrator CPU per tick (mean, {out['ticks']} ticks)", out["tick_cpu_mean"], "ms"),
        row("orchestrator CPU per tick (max)", out["tick_cpu_max"], "ms"),
        row(f"event-driven step CPU (mean, {out['steps']} steps)", out["step_cpu_mean"], "ms"),
    ]
    if scenario2_state is not None:
        rows.append(row(f"failure gate ({args.fail_pct:g} % roll back)", scenario2_state, "", "paused",
                        scenario2_state == "paused"))
        if lag is not None:
            rows.append(row("gate tripped after threshold crossed", lag, "s"))
    return result("rollout", rows, campaign_start_s=round(out["start_s"], 2), executions=out["counts"],
                  device_reports=out["reports"], tick_s=args.tick, workers=args.workers,
                  note="device reports are applied by threads calling rollouts.services directly (no WebSocket)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--devices", type=int, default=10_000)
    parser.add_argument("--rate", type=int, default=12_000, help="campaign rate limit, offers per minute")
    parser.add_argument("--concurrency", type=int, default=5_000, help="campaign max_concurrent")
    parser.add_argument("--tick", type=float, default=5.0, help="orchestrator beat interval, seconds")
    parser.add_argument("--workers", type=int, default=8, help="simulated-device threads")
    parser.add_argument("--fail-pct", type=float, default=20.0, help="install failure rate in scenario 2")
    parser.add_argument("--timeout", type=float, default=900.0)
    args = parser.parse_args()
    run(devices=args.devices, rate=args.rate, concurrency=args.concurrency, tick=args.tick, workers=args.workers,
        fail_pct=args.fail_pct, timeout=args.timeout)


if __name__ == "__main__":
    main()
