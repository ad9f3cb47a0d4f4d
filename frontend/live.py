"""What the dashboard socket pushes: cheap "what changed since my cursor" reads per topic.

A page subscribes to topics; the consumer (frontend.consumers.UiConsumer) calls `poll` at
most once per second and sends one compact delta with every topic that changed. Nothing is
pushed per telemetry point or per device event: the unit of work is "one tick per page".

Topics and their cost:
  nav          active-alert count: one COUNT on the (state, opened_at) index, shared by all
               pages through a 1-second cache entry.
  fleet        devices by status × presence (one GROUP BY), shared through the same cache.
  alerts       alerts with id > cursor (primary-key range) and the active count.
  attestation  attestation results with id > cursor (primary-key range).
  presence     online / last seen / status of the ≤ 100 devices the page shows (by id).
  campaign     one campaign's state, executions per wave × state (GROUP BY on the
               (campaign, wave, state) index) and gate results.
Cursors start at the newest row when the page gives none, so a page only hears what
happens after it loaded (it rendered the rest). On reconnect the page re-subscribes with
its cursors and gets what it missed; if it missed more than BACKLOG rows it is told to
re-fetch (reload) instead.
"""

from __future__ import annotations

import contextlib
import datetime as dt
from typing import Any

from django.core.cache import cache
from django.db import connection
from django.db.models import Max
from redis.exceptions import RedisError

from fleet.models import Device
from security.models import AttestationResult
from telemetry.models import ACTIVE_STATES, Alert

BACKLOG = 20
MAX_PRESENCE = 100
SHARED_TTL_S = 1

TOPIC_PERMS = {
    "nav": "telemetry.view_alert",
    "fleet": "fleet.view_device",
    "alerts": "telemetry.view_alert",
    "attestation": "security.view_attestationresult",
    "presence": "fleet.view_device",
    "campaign": "rollouts.view_campaign",
}


def cached(key: str, ttl: float, compute: Any) -> Any:
    """`compute()` at most once per `ttl` per key across every socket and process (Redis cache);
    if Redis is unavailable, compute without it: the cache is an optimisation only."""
    # Keyed by database too: several consoles (or test databases) may share one Redis.
    key = f"{key}:{connection.settings_dict['NAME']}"
    try:
        value = cache.get(key)
    except (RedisError, OSError):
        return compute()
    if value is None:
        value = compute()
        with contextlib.suppress(RedisError, OSError):
            cache.set(key, value, ttl)
    return value


def _shared(key: str, compute: Any) -> Any:
    return cached(key, SHARED_TTL_S, compute)


def _active_alerts() -> int:
    return Alert.objects.filter(state__in=ACTIVE_STATES).count()


def _fleet() -> dict:
    from frontend.views.overview import fleet_counts

    return fleet_counts()


def _iso(when: dt.datetime | None) -> str | None:
    return when.isoformat() if when else None


def _alert_row(a: Alert) -> dict:
    return {"id": a.id, "rule": a.rule.name, "device": a.device.uid, "severity": a.severity, "state": a.state,
            "value": a.last_value, "metric": a.rule.metric, "opened_at": _iso(a.opened_at)}


def subscribe(state: dict, topics: dict, allowed: set[str]) -> dict:
    """Merge a page's subscription into the connection's state; returns refused topics."""
    refused = {}
    for name, arg in topics.items():
        if name not in TOPIC_PERMS:
            refused[name] = "unknown topic"
            continue
        if TOPIC_PERMS[name] not in allowed:
            refused[name] = "your role may not read this"
            continue
        if name in ("alerts", "attestation"):
            cursor = arg.get("after") if isinstance(arg, dict) else None
            state[name] = {"after": int(cursor) if isinstance(cursor, int | str) and str(cursor).isdigit() else None}
        elif name == "campaign":
            cid = arg.get("id") if isinstance(arg, dict) else None
            if not str(cid).isdigit():
                refused[name] = "give the campaign id"
                continue
            state[name] = {"id": int(cid), "last": None}
        elif name == "presence":
            ids = arg.get("ids", []) if isinstance(arg, dict) else []
            clean = [int(i) for i in ids if str(i).isdigit()][:MAX_PRESENCE]
            state[name] = {"ids": clean, "seen": {}}
        else:
            state[name] = {"last": None}
    return refused


def _newer(model: Any, cursor: int | None, query: Any) -> tuple[int, list, bool]:
    if cursor is None:
        return model.objects.aggregate(m=Max("id"))["m"] or 0, [], False
    rows = list(query.filter(id__gt=cursor).order_by("id")[: BACKLOG + 1])
    overflow = len(rows) > BACKLOG
    rows = rows[:BACKLOG]
    return (rows[-1].id if rows else cursor), rows, overflow


def poll(state: dict) -> dict:
    """One tick: the changes since the connection's cursors, as {topic: delta}; {} if none."""
    out: dict[str, Any] = {}
    if "nav" in state:
        n = _shared("frontend:live:active_alerts", _active_alerts)
        if n != state["nav"]["last"]:
            state["nav"]["last"] = n
            out["nav"] = {"active_alerts": n}
    if "fleet" in state:
        counts = _shared("frontend:live:fleet", _fleet)
        if counts != state["fleet"]["last"]:
            state["fleet"]["last"] = counts
            out["fleet"] = counts
    if "alerts" in state:
        st = state["alerts"]
        cursor, rows, overflow = _newer(Alert, st["after"], Alert.objects.select_related("rule", "device"))
        st["after"] = cursor
        if rows or overflow:
            out["alerts"] = {"new": [_alert_row(a) for a in rows], "resync": overflow,
                             "active_alerts": _active_alerts(), "cursor": cursor}
    if "attestation" in state:
        st = state["attestation"]
        cursor, rows, overflow = _newer(AttestationResult, st["after"],
                                        AttestationResult.objects.select_related("device"))
        st["after"] = cursor
        if rows or overflow:
            out["attestation"] = {"new": [
                {"id": r.id, "device": r.device.uid, "status": r.status, "self_reported": r.self_reported,
                 "failed": r.failed_checks, "at": _iso(r.created_at)} for r in rows
            ], "resync": overflow, "cursor": cursor}
    if "campaign" in state:
        from frontend.views.rollouts import _models, campaign_snapshot

        campaign = _models().Campaign.objects.filter(pk=state["campaign"]["id"]).first()
        snap = campaign_snapshot(campaign) if campaign is not None else {"gone": True}
        if snap != state["campaign"]["last"]:
            state["campaign"]["last"] = snap
            out["campaign"] = snap
    if "presence" in state and state["presence"]["ids"]:
        st = state["presence"]
        changed = []
        for row in Device.objects.filter(id__in=st["ids"]).values("id", "uid", "online", "last_seen", "status"):
            snap = (row["online"], _iso(row["last_seen"]), row["status"])
            if st["seen"].get(row["id"]) != snap:
                st["seen"][row["id"]] = snap
                changed.append({"id": row["id"], "uid": row["uid"], "online": snap[0], "last_seen": snap[1],
                                "status": snap[2]})
        if changed:
            out["presence"] = {"devices": changed}
    return out
