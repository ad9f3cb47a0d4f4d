"""The audit log: append-only entries chained by SHA-256.

Writers serialise on a transaction-scoped advisory lock so each entry sees the hash of
the one before it; the lock is held only until the surrounding transaction commits.
`verify_chain` recomputes every hash and names the first entry that does not match.
"""

from __future__ import annotations

import contextvars
import hashlib
import json
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from django.contrib.auth import get_user_model
from django.db import connection, models, transaction
from django.utils import timezone

from security.models import AuditEntry

GENESIS = "0" * 64
_LOCK_KEY = 0x61756469  # "audi": one advisory-lock key for the whole log

# Set per request by security.middleware so services need not pass the client's address.
current_source_ip: contextvars.ContextVar[str | None] = contextvars.ContextVar("audit_source_ip", default=None)


def entry_digest(prev_hash: str, entry: AuditEntry) -> str:
    body = {
        "at": entry.at.isoformat(),
        "actor_type": entry.actor_type,
        "actor": entry.actor,
        "action": entry.action,
        "target_type": entry.target_type,
        "target_id": entry.target_id,
        "target_repr": entry.target_repr,
        "data": entry.data,
        "source_ip": entry.source_ip,
    }
    canonical = json.dumps(body, sort_keys=True, separators=(",", ":"), ensure_ascii=False, default=str)
    return hashlib.sha256((prev_hash + canonical).encode()).hexdigest()


def _describe_actor(actor: Any) -> tuple[str, Any, str]:
    user_model = get_user_model()
    if isinstance(actor, user_model):
        return "user", actor, actor.get_username()
    if isinstance(actor, models.Model):  # a Device acting for itself
        return "device", None, f"device:{getattr(actor, 'uid', actor.pk)}"
    return "system", None, str(actor or "system")


def record_entry(*, actor: Any, action: str, target: models.Model | None, data: dict,
                 source_ip: str | None = None) -> AuditEntry:
    with transaction.atomic():
        with connection.cursor() as cursor:
            cursor.execute("SELECT pg_advisory_xact_lock(%s)", [_LOCK_KEY])
        last = AuditEntry.objects.order_by("-id").values_list("hash", flat=True).first()
        actor_type, actor_user, actor_label = _describe_actor(actor)
        entry = AuditEntry(
            at=timezone.now(),
            actor_type=actor_type,
            actor_user=actor_user,
            actor=actor_label[:200],
            action=action,
            target_type=target._meta.label_lower if target is not None else "",
            target_id=str(target.pk) if target is not None else "",
            target_repr=str(target)[:200] if target is not None else "",
            data=json.loads(json.dumps(data, default=str)),
            source_ip=source_ip or current_source_ip.get(),
            prev_hash=last or GENESIS,
        )
        entry.hash = entry_digest(entry.prev_hash, entry)
        entry.save()
    return entry


@dataclass
class ChainBreak:
    entry_id: int
    reason: str


def _iter_entries(batch: int = 5000) -> Iterator[AuditEntry]:
    last_id = 0
    while True:
        chunk = list(AuditEntry.objects.filter(id__gt=last_id).order_by("id")[:batch])
        if not chunk:
            return
        yield from chunk
        last_id = chunk[-1].id


def verify_chain() -> tuple[int, ChainBreak | None]:
    """Return (entries checked, first break or None)."""
    prev = GENESIS
    checked = 0
    for entry in _iter_entries():
        checked += 1
        if entry.prev_hash != prev:
            return checked, ChainBreak(entry.id, "prev_hash does not match the previous entry (entry removed or reordered)")
        if entry_digest(prev, entry) != entry.hash:
            return checked, ChainBreak(entry.id, "content does not match its hash (entry edited)")
        prev = entry.hash
    return checked, None
