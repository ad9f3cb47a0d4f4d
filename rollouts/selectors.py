"""Reads of rollouts used by several callers (the agent connection, the API, the dashboard)."""

from __future__ import annotations

import math
from typing import Any

from django.db import connection
from django.db.models import Count

from rollouts import services
from rollouts.models import Campaign, Execution, SigningKey

EXECUTION_ESTIMATE_S = 600  # assumed download + install + health check per device, for estimates


def artifact_public_keys() -> list[tuple[str, bytes]]:
    """(key_id, raw Ed25519 public key) of every key agents should trust (not revoked).
    Raw SQL: every agent (re)connect reads it."""
    with connection.cursor() as cursor:
        cursor.execute("SELECT key_id, public_key FROM rollouts_signingkey WHERE revoked_at IS NULL ORDER BY created_at")
        return [(key_id, bytes(public)) for key_id, public in cursor.fetchall()]


def verify_manifest(*, manifest: bytes, signature: bytes, key_id: str) -> bool:
    """Check a manifest's signature against the keyring (revoked keys never verify)."""
    from rollouts import signing

    public = SigningKey.objects.filter(key_id=key_id, revoked_at__isnull=True).values_list("public_key", flat=True).first()
    return public is not None and signing.verify(manifest, signature, bytes(public))


def campaign_counts(campaign: Campaign) -> dict[str, Any]:
    """Executions by state, overall and per wave."""
    rows = (Execution.objects.filter(campaign=campaign).values_list("wave", "state").annotate(n=Count("id"))
            .order_by())
    total: dict[str, int] = {}
    waves: dict[int, dict[str, int]] = {}
    for wave, state, n in rows:
        total[state] = total.get(state, 0) + n
        waves.setdefault(wave, {})[state] = n
    return {"by_state": total, "by_wave": {str(k): v for k, v in sorted(waves.items())}}


def campaign_preview(*, campaign: Campaign, sample: int = 100) -> dict[str, Any]:
    """Dry run: which devices each wave would take, which are left out and why, and how long
    it would take. Runs the same SQL plan as the real start, without writing anything."""
    if campaign.artifact is None:
        return {"detail": "revert campaigns have no preview"}
    sql, params = services.plan_sql(campaign)
    with connection.cursor() as cursor:
        cursor.execute(
            f"SELECT uid, online, tier, state, reason, wave, rank, variant_id FROM ({sql}) AS plan "  # noqa: S608 -- generated plan
            "ORDER BY state <> 'pending', wave, rank, uid", params)
        rows = cursor.fetchall()
    variants = dict(campaign.artifact.variants.values_list("id", "name"))
    waves = [{"index": i + 1, "size": w["size"], "soak_s": w["soak_s"], "gates": w["gates"], "devices": 0,
              "online": 0, "offline": 0, "by_variant": {}, "sample": []} for i, w in enumerate(campaign.waves)]
    ineligible: dict[str, dict[str, Any]] = {}
    for uid, online, tier, state, reason, wave, _rank, variant_id in rows:
        if state == "pending":
            entry = waves[wave]
            entry["devices"] += 1
            entry["online" if online else "offline"] += 1
            name = variants.get(variant_id, "?")
            entry["by_variant"][name] = entry["by_variant"].get(name, 0) + 1
            if len(entry["sample"]) < sample:
                entry["sample"].append({"uid": uid, "tier": tier, "online": online, "variant": name})
        else:
            bucket = ineligible.setdefault(reason, {"count": 0, "state": state,
                                                    "detail": services.REASON_DETAIL.get(reason, reason),
                                                    "sample": []})
            bucket["count"] += 1
            if len(bucket["sample"]) < sample:
                bucket["sample"].append(uid)
    total_s = 0.0
    for i, entry in enumerate(waves):
        rate = float(campaign.rate_per_min)
        if campaign.ramp_initial_per_min:
            rate = min(rate, campaign.ramp_initial_per_min * 2.0 ** i)
        n = entry["devices"]
        offering = n / rate * 60.0
        by_concurrency = math.ceil(n / campaign.max_concurrent) * EXECUTION_ESTIMATE_S if n else 0
        entry["estimate_s"] = round(max(offering + (EXECUTION_ESTIMATE_S if n else 0), by_concurrency)
                                    + entry["soak_s"])
        total_s += entry["estimate_s"]
    notes = []
    offline = sum(w["offline"] for w in waves)
    if offline:
        notes.append(f"{offline} targeted device(s) are offline now: they get their offer when they reconnect "
                     "and count as not (yet) successful in success-ratio gates")
    if campaign.window_cron:
        notes.append("installs wait for the maintenance window; the estimate does not include that wait")
    if campaign.offer_gates:
        notes.append("devices failing an offer gate (e.g. attestation) are held back at offer time")
    return {
        "targeted": len(rows), "eligible": sum(w["devices"] for w in waves), "waves": waves,
        "ineligible": ineligible, "estimate_s": round(total_s),
        "assumptions": {"execution_s": EXECUTION_ESTIMATE_S, "rate_per_min": campaign.rate_per_min,
                        "max_concurrent": campaign.max_concurrent},
        "notes": notes,
    }
