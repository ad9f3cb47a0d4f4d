"""The campaign orchestrator: moves campaigns and executions forward.

Runs as a Celery beat tick (every 5 s, `rollouts.tasks.tick`) plus event-driven steps:
a device report that may unblock work kicks `rollouts.tasks.step_campaign(campaign_id)`
after commit (debounced per campaign through the cache).

Guarantees
- State lives in rows; a worker can die at any point and the next tick carries on.
- Idempotent and safe to run concurrently: a campaign step holds that campaign's row lock
  (`FOR UPDATE SKIP LOCKED`: a second stepper skips the campaign), claims executions with
  `FOR UPDATE SKIP LOCKED` and moves them with `UPDATE … WHERE state = 'pending'`, so no
  execution is offered twice.
- A doorbell (push) is at most once and follows the commit, so a worker killed in between
  loses it: a connected device that has not acked an offer within REDELIVER_AFTER_S gets the
  same offer again; an offer recorded for a device that connected while the step ran is
  delivered right after the commit (`deliver_if_connected`).
- Cost per tick follows what changed: the deadline sweep reads only expired rows through a
  partial index (bounded batch); a campaign step reads its current wave's counts from the
  (campaign, wave, state) index and claims at most one bounded batch of pending rows. There
  is never a Python loop over the fleet.
"""

from __future__ import annotations

import datetime as dt
import logging
import math
import time
from typing import Any

from django.core.cache import cache
from django.db import connection, transaction
from django.db.models import Q
from django.utils import timezone

from fleet.models import Device, DeviceStatus
from rollouts import conf, gates, services
from rollouts.models import Campaign, Execution

log = logging.getLogger(__name__)

S = Execution.State
CS = Campaign.State
ACTOR = "system:orchestrator"
TELEMETRY_EVERY_S = 10  # the telemetry gate reads rollups; every 10 s is soon enough
CONTINUOUS = ("failure", "telemetry")
REDELIVER_AFTER_S = 20  # a connected device that has not acked an offer by then never got its doorbell


_kicked: dict[int, float] = {}  # campaign id → when this process last asked (monotonic)


def kick(campaign_id: int) -> None:
    """Ask a worker to step this campaign soon (at most one request per campaign per second).

    Thousands of device reports a second may each kick: the process remembers its own last
    request, so only the first in each second asks the shared cache (one Redis round trip)."""
    now = time.monotonic()
    if now - _kicked.get(campaign_id, float("-inf")) < 1.0:
        return
    if len(_kicked) > 10_000:
        _kicked.clear()
    _kicked[campaign_id] = now
    try:
        if cache.add(f"rollouts:kick:{campaign_id}", 1, timeout=1):
            from rollouts.tasks import step_campaign

            step_campaign.delay(campaign_id)
    except Exception:
        log.warning("could not enqueue a step for campaign %s; the next tick will do it", campaign_id, exc_info=True)


def tick(*, now: dt.datetime | None = None) -> dict[str, Any]:
    """One orchestrator pass: start due campaigns, expire deadlines, step running campaigns."""
    t0 = time.process_time()
    started = services.start_due(now=now)
    expired = expire_deadlines(now=now)
    offered = 0
    for campaign_id in Campaign.objects.filter(state=CS.RUNNING).values_list("id", flat=True):
        offered += step_campaign(campaign_id, now=now)
    return {"started": started, "expired": expired, "offered": offered, "cpu_s": time.process_time() - t0}


# --- deadlines ----------------------------------------------------------------------------

_EXPIRE_SQL = """
WITH due AS (
    SELECT id FROM rollouts_execution
    WHERE state IN ('offered', 'acked', 'downloading', 'downloaded', 'installing', 'verifying')
      AND deadline_at < %(now)s
    ORDER BY deadline_at LIMIT %(limit)s FOR UPDATE SKIP LOCKED
), decided AS (
    SELECT e.id, e.state AS old_state, e.delivered_at IS NOT NULL AS delivered,
           (e.delivered_at IS NOT NULL AND e.state IN ('offered', 'acked', 'downloading', 'downloaded')
            AND e.attempt < c.max_retries AND c.state IN ('running', 'paused')) AS retry,
           c.retry_backoff_s, e.attempt
    FROM rollouts_execution e JOIN due ON due.id = e.id JOIN rollouts_campaign c ON c.id = e.campaign_id
)
UPDATE rollouts_execution e SET
    state = CASE WHEN d.retry THEN 'pending' ELSE 'timed_out' END,
    attempt = CASE WHEN d.retry THEN e.attempt + 1 ELSE e.attempt END,
    next_attempt_at = CASE WHEN d.retry
        THEN %(now)s + d.retry_backoff_s * power(2, least(d.attempt, 10)) * interval '1 second' END,
    error = jsonb_build_object(
        'code', CASE WHEN NOT d.delivered THEN 'device_offline' ELSE d.old_state || '_timeout' END,
        'retryable', d.retry,
        'detail', CASE WHEN NOT d.delivered THEN 'the device did not connect before the offer expired'
                       ELSE 'no progress before the ' || d.old_state || ' deadline' END),
    finished_at = CASE WHEN d.retry THEN NULL ELSE %(now)s END,
    delivered_at = CASE WHEN d.retry THEN NULL ELSE e.delivered_at END,
    deadline_at = NULL, progress = CASE WHEN d.retry THEN 0 ELSE e.progress END, updated_at = %(now)s
FROM decided d
WHERE e.id = d.id
RETURNING e.id, e.device_id, e.campaign_id, e.state, d.delivered
"""


def expire_deadlines(*, now: dt.datetime | None = None) -> int:
    """Executions past their phase deadline: retry (back to pending with backoff) while
    attempts remain, else `timed_out` (with `rollout.cancel` to the device)."""
    now = now or timezone.now()
    with transaction.atomic():
        with connection.cursor() as cursor:
            cursor.execute(_EXPIRE_SQL, {"now": now, "limit": conf.get("TIMEOUT_BATCH")})
            rows = cursor.fetchall()
        cancels = [(eid, device) for eid, device, _, state, delivered in rows if state == S.TIMED_OUT and delivered]
        if cancels:
            transaction.on_commit(lambda: services._push_cancels(cancels))
    return len(rows)


# --- one campaign -------------------------------------------------------------------------

def _wave_counts(campaign: Campaign) -> tuple[dict[str, int], int]:
    """(counts by state in the current wave, executions blocking the wave from finishing).

    Held (gate) executions and offers not yet delivered to offline devices do not block."""
    with connection.cursor() as cursor:
        cursor.execute(
            "SELECT wave = %(w)s, state, delivered_at IS NULL, hold <> '', count(*) FROM rollouts_execution "
            "WHERE campaign_id = %(c)s AND wave <= %(w)s GROUP BY 1, 2, 3, 4",
            {"c": campaign.id, "w": campaign.current_wave},
        )
        rows = cursor.fetchall()
    counts: dict[str, int] = {}
    blocking = 0
    for current, state, undelivered, held, n in rows:
        if current:
            counts[state] = counts.get(state, 0) + n
        in_progress = state in (S.ACKED, S.DOWNLOADING, S.DOWNLOADED, S.INSTALLING, S.VERIFYING)
        if (state == S.PENDING and not held) or (state == S.OFFERED and not undelivered) or in_progress:
            blocking += n
    return counts, blocking


def _context(campaign: Campaign, counts: dict[str, int], now: dt.datetime, final: bool) -> gates.WaveContext:
    wave = campaign.current_wave

    def wave_devices(limit: int) -> list[int]:
        return list(Execution.objects.filter(campaign=campaign, wave=wave, state=S.COMMITTED)
                    .values_list("device_id", flat=True)[:limit])

    def untouched(limit: int) -> list[int]:
        return list(Execution.objects.filter(campaign=campaign, wave__gt=wave, state=S.PENDING, attempt=0)
                    .values_list("device_id", flat=True)[:limit])

    return gates.WaveContext(campaign=campaign, wave=wave, counts=counts, now=now, final=final,
                             wave_devices=wave_devices, untouched_devices=untouched)


def _evaluate(campaign: Campaign, ctx: gates.WaveContext, *, final: bool) -> tuple[dict, list[dict]]:
    """Run this wave's gates; return (results, failing gate specs)."""
    key = str(campaign.current_wave)
    previous = campaign.gate_results.get(key, {})
    overridden = set(campaign.gate_overrides.get(key, []))
    results = dict(previous)
    failing = []
    for spec in campaign.waves[campaign.current_wave].get("gates", []):
        name = spec["type"]
        if name in overridden or (not final and name not in CONTINUOUS):
            continue
        if not final and name == "telemetry":
            last = previous.get(name, {}).get("at")
            if last and (ctx.now - dt.datetime.fromisoformat(last)).total_seconds() < TELEMETRY_EVERY_S:
                continue
        result = gates.WAVE_GATES[name].evaluate(spec, ctx)
        results[name] = {**result.as_dict(), "at": ctx.now.isoformat(), "final": final}
        if result.ok is False:
            failing.append(spec)
    return results, failing


def step_campaign(campaign_id: int, *, now: dt.datetime | None = None) -> int:
    """Advance one running campaign: gates, wave progress, a batch of offers. Returns offers made."""
    now = now or timezone.now()
    frames: list[tuple[int, dict]] = []
    with transaction.atomic():
        campaign = (Campaign.objects.select_for_update(skip_locked=True)
                    .filter(id=campaign_id, state=CS.RUNNING).first())
        if campaign is None:
            return 0  # not running, or another worker is stepping it right now
        counts, blocking = _wave_counts(campaign)
        wave_spec = campaign.waves[campaign.current_wave]
        if blocking == 0 and campaign.wave_drained_at is None:
            campaign.wave_drained_at = now
        ctx = _context(campaign, counts, now, final=False)
        ctx.final = soaked = campaign.wave_drained_at is not None and (
            now >= campaign.wave_drained_at + dt.timedelta(seconds=wave_spec.get("soak_s", 0)) or ctx.targeted == 0)
        results, failing = _evaluate(campaign, ctx, final=soaked)
        if results != campaign.gate_results.get(str(campaign.current_wave)):
            campaign.gate_results = {**campaign.gate_results, str(campaign.current_wave): results}
        if failing:
            _gate_failed(campaign, failing, results)
            return 0
        if soaked:
            _advance(campaign, now)
            if campaign.state != CS.RUNNING:
                return 0
        frames = _offer_batch(campaign, now)
        campaign.save()
        resent = _redeliver_lost(campaign, now)
        if resent:
            transaction.on_commit(lambda: services.push_offers(resent))
        if frames:
            transaction.on_commit(lambda: services.push_offers([f for f in frames if f[0] is not None]))
            offline = [f[1]["execution_id"] for f in frames if f[0] is None]
            if offline:
                transaction.on_commit(lambda: deliver_if_connected(offline))
    return len(frames)


def deliver_if_connected(execution_ids: list[int]) -> int:
    """After a step commits: deliver offers it recorded for offline devices that are online now.

    The step read `online = false` inside its transaction. An agent that connected meanwhile
    asked for its pending offers (`services.pending_offers`) before the step committed and
    got none, and no doorbell follows an offline offer: without this re-check it would wait
    for its next reconnect while the wave, not blocked by undelivered offers, moves on.
    Each offer is delivered at most once here (`delivered_at IS NULL`, rows a concurrent
    `pending_offers` holds are skipped: it is delivering them). Returns offers delivered."""
    now = timezone.now()
    try:
        with transaction.atomic():
            executions = list(
                Execution.objects.select_for_update(skip_locked=True, of=("self",))
                .select_related("campaign", "variant__artifact", "variant__key")
                .filter(id__in=execution_ids, state=S.OFFERED, delivered_at__isnull=True, variant__isnull=False,
                        device__online=True, device__status=DeviceStatus.ACTIVE)
                .exclude(campaign__state=CS.ABORTED).order_by("id")
            )
            for execution in executions:
                Execution.objects.filter(pk=execution.pk, state=S.OFFERED, delivered_at__isnull=True).update(
                    delivered_at=now, deadline_at=now + dt.timedelta(seconds=execution.campaign.ack_timeout_s),
                    updated_at=now)
            frames = [(e.device_id, services.offer_frame(e, e.campaign, now)) for e in executions]
            if frames:
                transaction.on_commit(lambda: services.push_offers(frames))
    except Exception:
        log.warning("could not re-check %d offline offers; they are delivered on reconnect", len(execution_ids),
                    exc_info=True)
        return 0
    return len(frames)


def _redeliver_lost(campaign: Campaign, now: dt.datetime) -> list[tuple[int, dict]]:
    """Offers whose doorbell was lost: the worker died between the commit and the push (or the
    at-most-once channel layer dropped it) and the device, still connected, has no reason to
    reconnect and fetch it. A connected device that has not acked within REDELIVER_AFTER_S gets
    the same offer again (same execution and attempt, fresh URL; an agent ignores an offer it
    already has). Otherwise it would wait for the ack timeout and a retry, the wave blocked."""
    cutoff = now - dt.timedelta(seconds=REDELIVER_AFTER_S)
    lost = list(
        Execution.objects.select_for_update(skip_locked=True, of=("self",))
        .select_related("variant__artifact", "variant__key")
        .filter(campaign=campaign, state=S.OFFERED, variant__isnull=False, device__online=True,
                device__status=DeviceStatus.ACTIVE)
        .filter(Q(delivered_at__lt=cutoff) | Q(delivered_at__isnull=True, offered_at__lt=cutoff))
        .order_by("id")[:conf.get("OFFER_BATCH")]
    )
    if not lost:
        return []
    undelivered = [e.id for e in lost if e.delivered_at is None]
    Execution.objects.filter(id__in=[e.id for e in lost], state=S.OFFERED).update(delivered_at=now, updated_at=now)
    if undelivered:
        Execution.objects.filter(id__in=undelivered, state=S.OFFERED).update(
            deadline_at=now + dt.timedelta(seconds=campaign.ack_timeout_s))
    log.info("campaign %s: %d offers re-sent to connected devices that never acked them", campaign.id, len(lost))
    window = services.current_window(campaign, now)
    return [(e.device_id, services.offer_frame(e, campaign, now, window=window)) for e in lost]


SEVERITY = {Campaign.Action.PAUSE: 0, Campaign.Action.ABORT: 1, Campaign.Action.ABORT_AND_REVERT: 2}


def _gate_failed(campaign: Campaign, failing: list[dict], results: dict) -> None:
    """Apply the most severe action among the failing gates; the reason names them all."""
    actions = [spec.get("action") or campaign.on_gate_failure for spec in failing]
    action = max(actions, key=lambda a: SEVERITY[a])
    details = "; ".join(f"gate {spec['type']} failed in wave {campaign.current_wave + 1}: "
                        f"{results[spec['type']].get('detail', '')}" for spec in failing)
    campaign.save()
    if action == Campaign.Action.PAUSE:
        services._set_state(campaign, to=CS.PAUSED, actor=ACTOR, action="campaign.pause", reason=details,
                            gates=[spec["type"] for spec in failing])
    else:
        services._abort(campaign, actor=ACTOR, reason=details, revert=action == Campaign.Action.ABORT_AND_REVERT)


def _advance(campaign: Campaign, now: dt.datetime) -> None:
    if campaign.current_wave + 1 >= len(campaign.waves):
        services._set_state(campaign, to=CS.COMPLETED, actor=ACTOR, action="campaign.complete",
                            reason="every wave passed its gates", gates=campaign.gate_results)
        return
    campaign.current_wave += 1
    campaign.wave_started_at = now
    campaign.wave_drained_at = None
    services._set_state(campaign, to=CS.RUNNING, actor=ACTOR, action="campaign.wave",
                        reason=f"wave {campaign.current_wave} passed its gates; wave {campaign.current_wave + 1} starts",
                        wave=campaign.current_wave)


def _offer_batch(campaign: Campaign, now: dt.datetime) -> list[tuple[int | None, dict]]:
    rate = services.effective_rate(campaign)
    elapsed = max(0.0, (now - (campaign.rate_updated_at or now)).total_seconds())
    tokens = min(services._burst(campaign), campaign.rate_tokens + elapsed * rate / 60.0)
    campaign.rate_tokens, campaign.rate_updated_at = tokens, now
    in_flight = (Execution.objects.filter(campaign=campaign, state__in=[S.OFFERED, S.ACKED, S.DOWNLOADING])
                 .exclude(state=S.OFFERED, delivered_at__isnull=True).count())
    budget = min(math.floor(tokens), campaign.max_concurrent - in_flight, conf.get("OFFER_BATCH"))
    if budget <= 0:
        return []
    claimed = list(
        Execution.objects.select_for_update(skip_locked=True)
        .filter(campaign=campaign, state=S.PENDING, wave__lte=campaign.current_wave)
        .filter(Q(next_attempt_at__isnull=True) | Q(next_attempt_at__lte=now))
        .order_by("wave", "rank").values("id", "device_id", "target_version")[:budget]
    )
    if not claimed:
        return []
    ids = [row["device_id"] for row in claimed]
    devices = {d["id"]: d for d in Device.objects.filter(id__in=ids).values(
        "id", "status", "online", "pinned_versions", "installed_versions")}
    held: dict[str, list[int]] = {}
    remaining = set(ids)
    for spec in campaign.offer_gates:
        passed = gates.OFFER_GATES[spec["type"]].evaluate(spec, campaign, sorted(remaining))
        blocked = remaining - set(passed)
        if blocked:
            held.setdefault(spec["type"], []).extend(blocked)
        remaining &= set(passed)
    busy = set(Execution.objects.filter(device_id__in=list(remaining), component=campaign.kind,
                                        state__in=services.LIVE).exclude(campaign=campaign)
               .values_list("device_id", flat=True))
    offer_online, offer_offline, skipped = [], [], []
    for row in claimed:
        device = devices.get(row["device_id"])
        device_id, version = row["device_id"], row["target_version"]
        if device is None or device["status"] != DeviceStatus.ACTIVE:
            status = device["status"] if device else "deleted"
            # Quarantine cancels a device's executions itself; one caught here (quarantined while
            # this step ran) gets the same code, so a release queues it again.
            code = services.QUARANTINED if status == DeviceStatus.QUARANTINED else f"device_{status}"
            skipped.append((row["id"], S.CANCELED, code, f"the device is {status}"))
        elif (device["pinned_versions"] or {}).get(campaign.kind) not in (None, version):
            skipped.append((row["id"], S.PINNED, "pinned", "the device pins this component to another version"))
        elif (device["installed_versions"] or {}).get(campaign.kind) == version:
            skipped.append((row["id"], S.CANCELED, "already_installed", "this version is already installed"))
        elif device_id not in remaining:
            continue  # held by an offer gate
        elif device_id in busy:
            held.setdefault("busy", []).append(device_id)
        elif device["online"]:
            offer_online.append(row["id"])
        else:
            offer_offline.append(row["id"])
    for reason, device_ids in held.items():
        recheck = services.BUSY_RECHECK_S if reason == "busy" else services.GATE_RECHECK_S
        Execution.objects.filter(campaign=campaign, device_id__in=device_ids, state=S.PENDING).update(
            hold=reason, next_attempt_at=now + dt.timedelta(seconds=recheck), updated_at=now)
    for execution_id, state, code, detail in skipped:
        Execution.objects.filter(id=execution_id, state=S.PENDING).update(
            state=state, hold="", finished_at=now, updated_at=now,
            error={"code": code, "retryable": False, "detail": detail})
    if offer_online:
        Execution.objects.filter(id__in=offer_online, state=S.PENDING).update(
            state=S.OFFERED, hold="", offered_at=now, delivered_at=now, progress=0, next_attempt_at=None,
            deadline_at=now + dt.timedelta(seconds=campaign.ack_timeout_s), updated_at=now)
    if offer_offline:
        Execution.objects.filter(id__in=offer_offline, state=S.PENDING).update(
            state=S.OFFERED, hold="", offered_at=now, delivered_at=None, progress=0, next_attempt_at=None,
            deadline_at=now + dt.timedelta(seconds=conf.get("OFFLINE_TTL_S")), updated_at=now)
    campaign.rate_tokens -= len(offer_online) + len(offer_offline)
    placeholders: list[tuple[int | None, dict]] = [(None, {"execution_id": e}) for e in offer_offline]
    if not offer_online:
        return placeholders
    window = services.current_window(campaign, now)
    executions = (Execution.objects.filter(id__in=offer_online)
                  .select_related("variant__artifact", "variant__key").order_by("wave", "rank"))
    frames: list[tuple[int | None, dict]] = [
        (e.device_id, services.offer_frame(e, campaign, now, window=window)) for e in executions
    ]
    return frames + placeholders

