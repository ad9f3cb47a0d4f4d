"""Rollout settings with their defaults. Each can be set in Django settings or the environment.

    ROLLOUTS_DOWNLOAD_BASE_URL   absolute base of download URLs sent to agents (default http://127.0.0.1:8000)
    ROLLOUTS_DOWNLOAD_TTL_S      lifetime of a download URL (default 900 s)
    ROLLOUTS_MAX_ARTIFACT_BYTES  largest accepted upload (default 2 GiB)
    ROLLOUTS_OFFER_BATCH         most offers one campaign step makes (default 500)
    ROLLOUTS_TIMEOUT_BATCH       most expired deadlines one tick handles (default 2000)
    ROLLOUTS_OFFLINE_TTL_S       how long an offer waits for an offline device (default 7 days)
"""

from __future__ import annotations

from typing import Any

from django.conf import settings

DEFAULTS: dict[str, Any] = {
    "DOWNLOAD_BASE_URL": "http://127.0.0.1:8000",
    "DOWNLOAD_TTL_S": 900,
    "MAX_ARTIFACT_BYTES": 2 * 1024**3,
    "OFFER_BATCH": 500,
    "TIMEOUT_BATCH": 2000,
    "OFFLINE_TTL_S": 7 * 86400,
}


def get(name: str) -> Any:
    default = DEFAULTS[name]
    value = getattr(settings, f"ROLLOUTS_{name}", None)
    if value is None:
        return default
    try:
        return type(default)(value)
    except (TypeError, ValueError):
        from django.core.exceptions import ImproperlyConfigured

        raise ImproperlyConfigured(f"ROLLOUTS_{name}={value!r} must be a {type(default).__name__}") from None
