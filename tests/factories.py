"""Test data builders. They go through services, like real callers do."""

from __future__ import annotations

import itertools

from fleet import services
from fleet.models import Device, DeviceStatus, Site

_seq = itertools.count(1)


def make_site(*, slug: str | None = None, **kwargs) -> Site:
    n = next(_seq)
    slug = slug or f"site-{n}"
    return services.site_create(actor="test", name=kwargs.pop("name", slug.title()), slug=slug, **kwargs)


def make_device(*, uid: str | None = None, status: str = DeviceStatus.ACTIVE, labels: dict | None = None,
                site: Site | None = None, ram_mb: int = 8192, accelerator: str = "none", **kwargs) -> Device:
    uid = uid or f"dev-{next(_seq):05d}"
    return services.device_register(
        actor="test", uid=uid, status=status, labels=labels or {}, site=site,
        capabilities={"ram_mb": ram_mb, "accelerator": accelerator, "cpu_cores": 4}, **kwargs,
    )
