"""Capability tiers: what class of workload a device can run, from its hardware.

Tier 1 — an accelerator and at least FLEET_TIER1_MIN_RAM_MB: full models.
Tier 2 — at least FLEET_TIER2_MIN_RAM_MB (CPU only is enough): quantized models.
Tier 3 — everything else: sensor aggregation only.
"""

from __future__ import annotations

from django.conf import settings

TIER_CHOICES = [(1, "Tier 1 — full models"), (2, "Tier 2 — quantized models"), (3, "Tier 3 — sensor aggregation")]


def compute_tier(*, accelerator: str, ram_mb: int | None) -> int:
    ram = ram_mb or 0
    if accelerator not in ("", "none") and ram >= settings.FLEET_TIER1_MIN_RAM_MB:
        return 1
    if ram >= settings.FLEET_TIER2_MIN_RAM_MB:
        return 2
    return 3
