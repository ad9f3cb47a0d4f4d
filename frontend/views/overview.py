"""The fleet overview: a handful of GROUP BY queries, whatever the fleet's size."""

from __future__ import annotations

import datetime as dt
import logging

from django.db import DatabaseError, connection
from django.db.models import Count, Q
from django.http import HttpRequest, HttpResponse
from django.shortcuts import render
from django.utils import timezone

from fleet.models import Device, DeviceStatus, Site
from frontend.access import page
from frontend.live import cached
from frontend.rollouts_bridge import rollouts_ready
from security.models import DeviceTrust
from telemetry import storage
from telemetry.models import ACTIVE_STATES, Alert
from telemetry.selectors import rollup_watermark

log = logging.getLogger(__name__)

STALE_AFTER = dt.timedelta(hours=24)  # AttestationPolicy.max_age_s default


def fleet_counts() -> dict:
    """Devices by status and presence: one GROUP BY over the status/online index."""
    rows = Device.objects.values_list("status", "online").annotate(n=Count("id")).order_by()
    by_status = dict.fromkeys(DeviceStatus.values, 0)
    online = total = 0
    for status, is_online, n in rows:
        by_status[status] = by_status.get(status, 0) + n
        total += n
        if is_online:
            online += n
    live = total - by_status.get(DeviceStatus.DECOMMISSIONED, 0)
    return {"total": total, "online": online, "by_status": by_status, "live": live,
            "online_pct": round(100 * online / live, 1) if live else None}


def attestation_counts(now: dt.datetime) -> dict:
    cutoff = now - STALE_AFTER
    fresh = Q(last_attested_at__gte=cutoff)
    counts = DeviceTrust.objects.aggregate(
        affirming=Count("device_id", filter=fresh & Q(last_status="affirming")),
        warning=Count("device_id", filter=fresh & Q(last_status="warning")),
        contraindicated=Count("device_id", filter=fresh & Q(last_status="contraindicated")),
        stale=Count("device_id", filter=Q(last_attested_at__lt=cutoff)),
        never=Count("device_id", filter=Q(last_attested_at__isnull=True)),
    )
    return counts


def ingest_rate() -> dict | None:
    """Points per second over the last closed minute, from the 1-minute rollup (BRIN on bucket),
    cached for 30 s: never a scan of raw points."""
    return cached("frontend:ingest_rate", 30, _ingest_rate)


def _ingest_rate() -> dict:
    if storage.backend() == "postgres":
        end = rollup_watermark().replace(second=0, microsecond=0)
    else:
        end = timezone.now().replace(second=0, microsecond=0) - dt.timedelta(minutes=1)
    start = end - dt.timedelta(minutes=1)
    with connection.cursor() as cursor:
        cursor.execute("SELECT coalesce(sum(count), 0) FROM telemetry_rollup_1m WHERE bucket >= %s AND bucket < %s",
                       [start, end])
        points = int(cursor.fetchone()[0])
    return {"per_s": round(points / 60, 1), "minute": start.isoformat(),
            "stale": timezone.now() - end > dt.timedelta(minutes=10)}


@page()
def overview(request: HttpRequest) -> HttpResponse:
    now = timezone.now()
    counts = fleet_counts()
    by_tier = dict(Device.objects.exclude(status=DeviceStatus.DECOMMISSIONED)
                   .values_list("tier").annotate(n=Count("id")).order_by())
    site_rows = list(Device.objects.exclude(status=DeviceStatus.DECOMMISSIONED).values_list("site_id")
                     .annotate(n=Count("id"), up=Count("id", filter=Q(online=True))).order_by("-n")[:12])
    names = dict(Site.objects.filter(id__in=[r[0] for r in site_rows if r[0]]).values_list("id", "slug"))
    by_site = [{"slug": names.get(sid), "n": n, "online": up} for sid, n, up in site_rows]
    site_count = Site.objects.count()
    alerts = dict(Alert.objects.filter(state__in=ACTIVE_STATES).values_list("severity").annotate(n=Count("id"))
                  .order_by())
    recent_alerts = list(Alert.objects.filter(state__in=ACTIVE_STATES).select_related("rule", "device")
                         .order_by("-opened_at")[:5])
    try:
        rate = ingest_rate()
    except DatabaseError:  # e.g. telemetry tables missing on a fresh install: omit the card
        log.warning("ingest rate unavailable", exc_info=True)
        rate = None
    campaigns = None
    if rollouts_ready():
        from frontend.views.rollouts import active_campaigns

        campaigns = active_campaigns()
    return render(request, "frontend/overview.html", {
        "counts": counts, "by_tier": [(t, by_tier.get(t, 0)) for t in (1, 2, 3)], "by_site": by_site,
        "site_count": site_count, "alerts": alerts, "alerts_total": sum(alerts.values()),
        "recent_alerts": recent_alerts, "attest": attestation_counts(now), "rate": rate,
        "campaigns": campaigns, "rollouts_ready": rollouts_ready(), "nav": "overview",
    })
