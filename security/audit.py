"""The audit log: append-only entries chained by SHA-256, in commit order.

Writing an entry takes no lock: `record_entry` stores the entry with its `content_hash` (SHA-256
over the canonical JSON of its content) and leaves `chain_seq`/`prev_hash`/`hash` NULL. A deferred
constraint trigger (`security_audit_seal`, migration 0004) seals it when the surrounding transaction
COMMITs: it takes a transaction-scoped advisory lock, reads the last sealed entry and sets
`chain_seq` = last + 1, `prev_hash` = last.hash (GENESIS for the first) and
`hash` = SHA-256(prev_hash + content_hash). Deferred triggers run after every statement of the
transaction, so the audit lock comes after every lock the service's own statements take: a service
may lock rows and audit in any order. It is not always the very last lock, though: deferred
foreign-key checks queued after the audit row (rows inserted after `record_entry`) run after the
seal and take KEY SHARE on the rows they reference. So a service that locks a row other audited
transactions may reference, and then audits, locks it FOR NO KEY UPDATE (which KEY SHARE does not
wait for), not FOR UPDATE: otherwise it can hold that row while waiting for the audit lock, held
by a transaction whose foreign-key check waits for the row (`fleet.services._locked`).

`verify_chain` walks the entries by `chain_seq`, recomputes both hashes and names the first entry
that was edited, removed or reordered.

Chain format changed in migration 0004 (it was SHA-256(prev_hash + canonical JSON), in id order,
written under the lock); that migration re-chains existing entries in id order.
"""

from __future__ import annotations

import contextvars
import hashlib
import json
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from django.contrib.auth import get_user_model
from django.db import connection, models
from django.utils import timezone

from security.models import AuditEntry

GENESIS = "0" * 64
LOCK_KEY = 0x61756469  # "audi": one advisory-lock key for the whole log, taken by the seal trigger
SEAL_TRIGGER = "security_audit_seal"

# Set per request by security.middleware so services need not pass the client's address.
current_source_ip: contextvars.ContextVar[str | None] = contextvars.ContextVar("audit_source_ip", default=None)


def canonical_content(entry: Any) -> str:
    """The canonical JSON of an entry's content (works on historical models in migrations too)."""
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
    return json.dumps(body, sort_keys=True, separators=(",", ":"), ensure_ascii=False, default=str)


def content_digest(entry: Any) -> str:
    return hashlib.sha256(canonical_content(entry).encode()).hexdigest()


def link_digest(prev_hash: str, content_hash: str) -> str:
    """What the seal trigger computes: encode(sha256(convert_to(prev_hash || content_hash, 'UTF8')), 'hex')."""
    return hashlib.sha256((prev_hash + content_hash).encode()).hexdigest()


def _describe_actor(actor: Any) -> tuple[str, Any, str]:
    user_model = get_user_model()
    if isinstance(actor, user_model):
        return "user", actor, actor.get_username()
    if isinstance(actor, models.Model):  # a Device acting for itself
        return "device", None, f"device:{getattr(actor, 'uid', actor.pk)}"
    return "system", None, str(actor or "system")


def record_entry(*, actor: Any, action: str, target: models.Model | None, data: dict,
                 source_ip: str | None = None) -> AuditEntry:
    """Store one entry in the caller's transaction, unsealed; it joins the chain when that commits."""
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
    )
    entry.content_hash = content_digest(entry)
    entry.save()
    return entry


def seal_pending() -> None:
    """Seal the current transaction's entries now instead of at commit (SET CONSTRAINTS ... IMMEDIATE).

    This takes the audit lock and holds it until the transaction ends, so a service must never call
    it: it is for tests and tools that need to see the chain inside a transaction they have open."""
    if not connection.in_atomic_block:
        return  # autocommit: every statement has committed, so nothing is pending
    with connection.cursor() as cursor:
        cursor.execute(f"SET CONSTRAINTS {SEAL_TRIGGER} IMMEDIATE")
        cursor.execute(f"SET CONSTRAINTS {SEAL_TRIGGER} DEFERRED")


@dataclass
class ChainBreak:
    entry_id: int
    reason: str


def _iter_entries(batch: int = 5000) -> Iterator[AuditEntry]:
    last_seq = 0
    while True:
        chunk = list(AuditEntry.objects.filter(chain_seq__gt=last_seq).order_by("chain_seq")[:batch])
        if not chunk:
            return
        yield from chunk
        last_seq = chunk[-1].chain_seq


def verify_chain() -> tuple[int, ChainBreak | None]:
    """Return (entries checked, first break or None), walking the chain in `chain_seq` (commit) order.

    Inside an open transaction, that transaction's own entries are sealed first (see seal_pending)."""
    seal_pending()
    prev = GENESIS
    checked = 0
    for entry in _iter_entries():
        checked += 1
        if entry.chain_seq != checked or entry.prev_hash != prev:
            return checked, ChainBreak(entry.id, "prev_hash does not match the previous entry (entry removed or reordered)")
        if content_digest(entry) != entry.content_hash or link_digest(prev, entry.content_hash) != entry.hash:
            return checked, ChainBreak(entry.id, "content does not match its hash (entry edited)")
        prev = entry.hash
    unsealed = AuditEntry.objects.filter(chain_seq__isnull=True).order_by("id").values_list("id", flat=True).first()
    if unsealed is not None:
        return checked + 1, ChainBreak(unsealed, "entry is not in the chain (its chain position was removed)")
    return checked, None
