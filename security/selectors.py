"""Reads other apps ask of security (e.g. the rollout attestation gate)."""

from __future__ import annotations

from collections.abc import Iterable
from datetime import timedelta

from django.db.models import OuterRef, Subquery
from django.utils import timezone

from security.models import AttestationResult, DeviceTrust


def attestation_fresh(*, device_ids: Iterable[int], max_age_s: float) -> set[int]:
    """Devices whose latest attestation result is `affirming` and newer than `max_age_s`.

    One query for any number of devices (latest result per device via the trust row).
    Self-reported results are never affirming, so devices without a TPM never pass.
    """
    ids = list(device_ids)
    if not ids:
        return set()
    cutoff = timezone.now() - timedelta(seconds=max_age_s)
    latest = AttestationResult.objects.filter(device_id=OuterRef("device_id")).order_by("-created_at").values("status")[:1]
    rows = (DeviceTrust.objects.filter(device_id__in=ids, last_attested_at__gte=cutoff)
            .annotate(latest_status=Subquery(latest)).filter(latest_status="affirming"))
    return set(rows.values_list("device_id", flat=True))

