"""The audit hook every service calls. The audit log itself belongs to `security/`.

`fleet` is the ground floor and may not import `security`, so the log registers its
recorder here when Django starts (security.apps). A service calls `record(...)` inside
its transaction; the entry commits or rolls back with the change it describes.
"""

from __future__ import annotations

from typing import Any, Protocol

from django.db import models


class Recorder(Protocol):
    def __call__(
        self, *, actor: Any, action: str, target: models.Model | None, data: dict, source_ip: str | None
    ) -> None: ...


_recorder: Recorder | None = None


def register_recorder(recorder: Recorder) -> None:
    global _recorder
    _recorder = recorder


def record(
    *, actor: Any, action: str, target: models.Model | None = None, data: dict | None = None, source_ip: str | None = None
) -> None:
    """Write an audit entry. `actor` is a User, a Device, or a string such as "system"."""
    if _recorder is None:
        raise RuntimeError("no audit recorder registered: is the `security` app installed?")
    _recorder(actor=actor, action=action, target=target, data=data or {}, source_ip=source_ip)
