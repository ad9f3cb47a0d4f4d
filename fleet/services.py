"""Every state change of the inventory. Keyword-only, atomic, audited.

Views, serializers, admin actions, consumers and tasks call these; nothing else calls
`.save()` on a Device.
"""

from __future__ import annotations

import json
import logging
import uuid
from collections.abc import Iterable
from datetime import datetime
from typing import Any

from django.db import connection, transaction
from django.db.models import QuerySet
from django.db.models.expressions import RawSQL
from django.utils import timezone

from fleet import audit, push
from fleet.errors import Conflict, InvalidInput
from fleet.models import Device, DeviceCommand, DeviceGroup, DeviceStatus, PresenceEvent, Site, UplinkCursor
from fleet.selector import validate_label_key, validate_label_value
from fleet.tiers import compute_tier

log = logging.getLogger(__name__)

COMPONENTS = ("agent", "model", "firmware")
CAPABILITY_FIELDS = ("cpu_cores", "ram_mb", "accelerator", "storage_mb", "arch", "os")

def clean_labels(labels: Any) -> dict[str, str]:
    if not isinstance(labels, dict):
        raise InvalidInput("labels must be an object of key/value strings")
    cleaned: dict[str, str] = {}
    for key, value in labels.items():
        if not isinstance(key, str) or not isinstance(value, str):
            raise InvalidInput(f"label {key!r}: keys and values must be strings")
        reason = validate_label_key(key) or validate_label_value(value)
        if reason:
            raise InvalidInput(reason)
        cleaned[key] = value
    return cleaned


def clean_versions(versions: Any, *, what: str) -> dict[str, str]:
    if not isinstance(versions, dict):
        raise InvalidInput(f"{what} must be an object mapping component to version")
    for key, value in versions.items():
        if key not in COMPONENTS:
            raise InvalidInput(f"{what}: unknown component {key!r}; use one of {', '.join(COMPONENTS)}")
        if not isinstance(value, str) or not value or len(value) > 64:
            raise InvalidInput(f"{what}.{key}: a version is a non-empty string of at most 64 characters")
    return dict(versions)


def _locked(device: Device) -> Device:
    # FOR NO KEY UPDATE, not FOR UPDATE: rows inserted elsewhere that reference the device (their
    # deferred foreign-key checks take KEY SHARE at COMMIT, after the audit seal's lock) must not
    # wait for this lock, or two audited transactions deadlock (security/audit.py).
    return Device.objects.select_for_update(no_key=True).get(pk=device.pk)


@transaction.atomic
def site_create(*, actor: Any, name: str, slug: str, region: str = "", timezone_name: str = "UTC",
                latitude: float | None = None, longitude: float | None = None) -> Site:
    site = Site(name=name, slug=slug, region=region, timezone=timezone_name, latitude=latitude, longitude=longitude)
    site.full_clean()
    site.save()
    audit.record(actor=actor, action="site.create", target=site, data={"slug": slug})
    return site


@transaction.atomic
def site_update(*, actor: Any, site: Site, **changes: Any) -> Site:
    allowed = {"name", "slug", "region", "timezone", "latitude", "longitude"}
    unknown = set(changes) - allowed
    if unknown:
        raise InvalidInput(f"cannot change {', '.join(sorted(unknown))} of a site")
    for field, value in changes.items():
        setattr(site, field, value)
    site.full_clean()
    site.save()
    audit.record(actor=actor, action="site.update", target=site, data={"changed": sorted(changes)})
    return site


@transaction.atomic
def site_delete(*, actor: Any, site: Site) -> None:
    audit.record(actor=actor, action="site.delete", target=site, data={"slug": site.slug})
    site.delete()


@transaction.atomic
def device_register(
    *,
    actor: Any,
    uid: str,
    name: str = "",
    serial: str = "",
    hardware_model: str = "",
    site: Site | None = None,
    labels: dict | None = None,
    capabilities: dict | None = None,
    status: str = DeviceStatus.PENDING,
    installed_versions: dict | None = None,
) -> Device:
    """Create a device in the inventory (pre-registration, enrollment or seeding)."""
    if Device.objects.filter(uid=uid).exists():
        raise Conflict(f"a device with uid {uid!r} already exists", code="duplicate_uid")
    device = Device(
        uid=uid, name=name, serial=serial, hardware_model=hardware_model, site=site,
        labels=clean_labels(labels or {}), status=status,
        installed_versions=clean_versions(installed_versions or {}, what="installed_versions"),
    )
    _apply_capabilities(device, capabilities or {})
    device.full_clean()
    device.save()
    UplinkCursor.objects.create(device=device)
    audit.record(actor=actor, action="device.register", target=device, data={"status": status})
    return device


def _apply_capabilities(device: Device, capabilities: dict) -> None:
    unknown = set(capabilities) - set(CAPABILITY_FIELDS)
    if unknown:
        raise InvalidInput(f"unknown capabilities: {', '.join(sorted(unknown))}")
    for field, value in capabilities.items():
        setattr(device, field, value)
    device.tier = compute_tier(accelerator=device.accelerator, ram_mb=device.ram_mb)


@transaction.atomic
def device_update(*, actor: Any, device: Device, **changes: Any) -> Device:
    """Change descriptive fields: name, serial, hardware_model, site, labels, capabilities."""
    device = _locked(device)
    allowed = {"name", "serial", "hardware_model", "site", "labels", *CAPABILITY_FIELDS}
    unknown = set(changes) - allowed
    if unknown:
        raise InvalidInput(f"cannot change {', '.join(sorted(unknown))} this way")
    if "labels" in changes:
        changes["labels"] = clean_labels(changes["labels"])
    capabilities = {k: changes.pop(k) for k in CAPABILITY_FIELDS if k in changes}
    for field, value in changes.items():
        setattr(device, field, value)
    _apply_capabilities(device, capabilities)
    device.full_clean()
    device.save()
    audit.record(actor=actor, action="device.update", target=device,
                 data={"changed": sorted([*changes, *capabilities])})
    return device


@transaction.atomic
def device_set_labels(*, actor: Any, devices: QuerySet[Device], set_labels: dict | None = None,
                      remove: Iterable[str] = ()) -> int:
    """Add/replace some labels and remove others on many devices: one UPDATE, one audit entry."""
    set_labels = clean_labels(set_labels or {})
    remove = [str(k) for k in remove]
    uids = list(devices.values_list("uid", flat=True)[:100_001])
    if len(uids) > 100_000:
        raise InvalidInput("a bulk label change is limited to 100,000 devices")
    count = Device.objects.filter(uid__in=uids).update(
        labels=RawSQL("(labels - %s::text[]) || %s::jsonb", [remove, json.dumps(set_labels)]),
        updated_at=timezone.now(),
    )
    audit.record(actor=actor, action="device.labels", target=None,
                 data={"set": set_labels, "remove": remove, "count": count, "devices": uids[:1000]})
    return count


def _transition(*, actor: Any, device: Device, to: str, allowed_from: Iterable[str], action: str,
                reason: str = "") -> Device:
    device = _locked(device)
    if device.status not in allowed_from:
        raise Conflict(f"device {device.uid} is {device.status}; cannot {action.split('.')[-1]} it")
    before = device.status
    device.status = to
    device.save(update_fields=["status", "updated_at"])
    audit.record(actor=actor, action=action, target=device, data={"from": before, "to": to, "reason": reason})
    transaction.on_commit(lambda: push.status_changed(device.id, to))
    return device


@transaction.atomic
def device_approve(*, actor: Any, device: Device, reason: str = "") -> Device:
    return _transition(actor=actor, device=device, to=DeviceStatus.ACTIVE, allowed_from=[DeviceStatus.PENDING],
                       action="device.approve", reason=reason)


@transaction.atomic
def device_quarantine(*, actor: Any, device: Device, reason: str) -> Device:
    if not reason:
        raise InvalidInput("a reason is required to quarantine a device")
    device = _transition(actor=actor, device=device, to=DeviceStatus.QUARANTINED,
                         allowed_from=[DeviceStatus.ACTIVE, DeviceStatus.PENDING], action="device.quarantine",
                         reason=reason)
    # A quarantined device takes no updates: its outstanding rollout executions end in this
    # transaction (every path, attestation included, comes through here). Imported here:
    # rollouts builds on fleet, not the other way round.
    from rollouts.services import executions_quarantine

    executions_quarantine(actor=actor, device=device, reason=reason)
    return device


@transaction.atomic
def device_release(*, actor: Any, device: Device, reason: str = "") -> Device:
    device = _transition(actor=actor, device=device, to=DeviceStatus.ACTIVE, allowed_from=[DeviceStatus.QUARANTINED],
                         action="device.release", reason=reason)
    # Campaigns still running take the device back (see device_quarantine).
    from rollouts.services import executions_release

    executions_release(actor=actor, device=device, reason=reason)
    return device


@transaction.atomic
def device_decommission(*, actor: Any, device: Device, reason: str = "") -> Device:
    device = _transition(actor=actor, device=device, to=DeviceStatus.DECOMMISSIONED,
                         allowed_from=[DeviceStatus.PENDING, DeviceStatus.ACTIVE, DeviceStatus.QUARANTINED],
                         action="device.decommission", reason=reason)
    from rollouts.services import executions_decommission  # see device_quarantine

    executions_decommission(actor=actor, device=device, reason=reason or "decommissioned")
    return device


@transaction.atomic
def device_pin(*, actor: Any, device: Device, component: str, version: str | None = None) -> Device:
    """Pin a component to a version (default: the one installed now)."""
    device = _locked(device)
    if component not in COMPONENTS:
        raise InvalidInput(f"unknown component {component!r}; use one of {', '.join(COMPONENTS)}")
    version = version or device.installed_versions.get(component)
    if not version:
        raise InvalidInput(f"{device.uid} reports no installed {component}; give the version to pin")
    clean_versions({component: version}, what="pinned_versions")
    device.pinned_versions = {**device.pinned_versions, component: version}
    device.save(update_fields=["pinned_versions", "updated_at"])
    audit.record(actor=actor, action="device.pin", target=device, data={"component": component, "version": version})
    return device


@transaction.atomic
def device_unpin(*, actor: Any, device: Device, component: str) -> Device:
    device = _locked(device)
    if component not in device.pinned_versions:
        raise Conflict(f"{device.uid} has no pinned {component}")
    device.pinned_versions = {k: v for k, v in device.pinned_versions.items() if k != component}
    device.save(update_fields=["pinned_versions", "updated_at"])
    audit.record(actor=actor, action="device.unpin", target=device, data={"component": component})
    return device


@transaction.atomic
def device_report_state(*, device_id: int, installed: dict, capabilities: dict) -> None:
    """Apply an agent's `state` frame: installed versions and capabilities (tier recomputed)."""
    device = Device.objects.select_for_update(no_key=True).get(pk=device_id)
    # Components this console does not manage are ignored (forward compatibility).
    known = {k: v for k, v in installed.items() if k in COMPONENTS}
    device.installed_versions = {**device.installed_versions, **clean_versions(known, what="installed")}
    _apply_capabilities(device, {k: v for k, v in capabilities.items() if k in CAPABILITY_FIELDS})
    device.full_clean(validate_unique=False, validate_constraints=False)
    device.save()


def presence_mark_seen(*, device_ids: Iterable[int], at: datetime | None = None) -> int:
    """Batch presence update: one UPDATE for many devices (coalesced heartbeats)."""
    ids = list(device_ids)
    if not ids:
        return 0
    # `= ANY(array)`: one parameter, not one per device (an ORM `pk__in` of a few thousand ids
    # spent more CPU compiling the query than the web process spent on the heartbeats themselves).
    with connection.cursor() as cursor:
        cursor.execute("UPDATE fleet_device SET online = true, last_seen = %s WHERE id = ANY(%s)",
                       [at or timezone.now(), ids])
        return cursor.rowcount


@transaction.atomic
def presence_sweep(*, older_than_s: float) -> int:
    """Mark offline every device not seen for `older_than_s` (its process died without closing).
    One UPDATE … RETURNING and one batched insert into the presence history."""
    now = timezone.now()
    with connection.cursor() as cursor:
        cursor.execute(
            "UPDATE fleet_device SET online = false WHERE online AND last_seen < %s RETURNING id",
            [now - timezone.timedelta(seconds=older_than_s)])
        ids = [row[0] for row in cursor.fetchall()]
    PresenceEvent.objects.bulk_create(
        [PresenceEvent(device_id=i, kind=PresenceEvent.Kind.TIMED_OUT, at=now) for i in ids], batch_size=1000)
    return len(ids)


def presence_prune(*, older_than_days: int) -> int:
    """Drop presence history older than `older_than_days` (one DELETE)."""
    return PresenceEvent.objects.filter(at__lt=timezone.now() - timezone.timedelta(days=older_than_days)).delete()[0]


@transaction.atomic
def group_create(*, actor: Any, name: str, slug: str, description: str = "") -> DeviceGroup:
    group = DeviceGroup(name=name, slug=slug, description=description)
    group.full_clean()
    group.save()
    audit.record(actor=actor, action="group.create", target=group)
    return group


@transaction.atomic
def group_update(*, actor: Any, group: DeviceGroup, **changes: Any) -> DeviceGroup:
    for field, value in changes.items():
        if field not in {"name", "slug", "description"}:
            raise InvalidInput(f"cannot change {field} of a group")
        setattr(group, field, value)
    group.full_clean()
    group.save()
    audit.record(actor=actor, action="group.update", target=group, data={"changed": sorted(changes)})
    return group


@transaction.atomic
def group_delete(*, actor: Any, group: DeviceGroup) -> None:
    audit.record(actor=actor, action="group.delete", target=group, data={"slug": group.slug})
    group.delete()


@transaction.atomic
def group_set_members(*, actor: Any, group: DeviceGroup, add: Iterable[Device] = (),
                      remove: Iterable[Device] = ()) -> DeviceGroup:
    add, remove = list(add), list(remove)
    group.devices.add(*add)
    group.devices.remove(*remove)
    audit.record(actor=actor, action="group.members", target=group,
                 data={"add": [d.uid for d in add], "remove": [d.uid for d in remove]})
    return group


def cursor_advance(*, device_id: int, from_seq: int, to_seq: int) -> bool:
    """Advance a device's uplink cursor from `from_seq` to `to_seq`, only if it is still at
    `from_seq`. Call inside the transaction that stores the frames' effects; False means
    another connection stored them first, so this transaction must store nothing for them."""
    return UplinkCursor.objects.filter(device_id=device_id, last_acked_seq=from_seq).update(last_acked_seq=to_seq) == 1


def cursor_position(*, device_id: int) -> int:
    return UplinkCursor.objects.filter(device_id=device_id).values_list("last_acked_seq", flat=True).first() or 0


COMMAND_TTL = timezone.timedelta(hours=24)


@transaction.atomic
def command_issue(*, actor: Any, device: Device, name: str, args: dict | None = None) -> DeviceCommand:
    """Queue a command for a device; it is delivered now if online, else when it connects."""
    if name not in DeviceCommand.Name.values:
        raise InvalidInput(f"unknown command {name!r}; use one of {', '.join(DeviceCommand.Name.values)}")
    if device.status == DeviceStatus.DECOMMISSIONED:
        raise Conflict(f"{device.uid} is decommissioned")
    if device.status == DeviceStatus.QUARANTINED and name != DeviceCommand.Name.ATTEST:
        raise Conflict(f"{device.uid} is quarantined: only attestation may be requested")
    command = DeviceCommand.objects.create(
        id=uuid.uuid4(), device=device, name=name, args=args or {}, created_by=str(actor)[:200],
        expires_at=timezone.now() + COMMAND_TTL,
    )
    audit.record(actor=actor, action="device.command", target=device, data={"command": name, "args": args or {}})
    transaction.on_commit(lambda: push.commands_waiting(device.id))
    return command


def commands_claim_for_delivery(*, device_id: int, allow: Iterable[str] | None = None,
                                include_unanswered: bool = False) -> list[DeviceCommand]:
    """Unexpired commands for a connected device, marked sent in one UPDATE.

    With `include_unanswered` (a new session), commands sent before but never answered are
    sent again: the earlier connection may have died with them in flight. Delivery is
    at-least-once; agents answer each command id once.
    """
    live = [DeviceCommand.State.QUEUED, DeviceCommand.State.SENT]
    with connection.cursor() as cursor:  # the common case on every connect: nothing waiting (one cheap statement)
        cursor.execute("SELECT EXISTS (SELECT 1 FROM fleet_devicecommand WHERE device_id = %s AND state = ANY(%s))",
                       [device_id, live])
        if not cursor.fetchone()[0]:
            return []
    now = timezone.now()
    DeviceCommand.objects.filter(device_id=device_id, state__in=live, expires_at__lte=now).update(
        state=DeviceCommand.State.EXPIRED, completed_at=now
    )
    queued = DeviceCommand.objects.filter(device_id=device_id,
                                          state__in=live if include_unanswered else live[:1])
    if allow is not None:
        queued = queued.filter(name__in=list(allow))
    commands = list(queued.order_by("created_at")[:100])
    DeviceCommand.objects.filter(id__in=[c.id for c in commands], state__in=live).update(
        state=DeviceCommand.State.SENT, sent_at=now
    )
    return commands


def command_complete(*, device_id: int, command_id: str, ok: bool, output: str) -> bool:
    """Record a device's `command.result` (call inside the frame's transaction)."""
    try:
        uuid.UUID(str(command_id))
    except ValueError:
        return False
    return DeviceCommand.objects.filter(
        id=command_id, device_id=device_id, state__in=[DeviceCommand.State.SENT, DeviceCommand.State.QUEUED]
    ).update(
        state=DeviceCommand.State.SUCCEEDED if ok else DeviceCommand.State.FAILED, output=output[:10000],
        completed_at=timezone.now(),
    ) == 1


# The presence change and its history row in one statement: one round trip on the handshake path.
# It answers with the device's status as of that locked row (connect reads it for the session).
_PRESENCE_SQL = (
    "WITH changed AS (UPDATE fleet_device SET online = %(online)s, last_seen = %(at)s, session = %(new_session)s"
    " WHERE id = %(device)s {only_session} RETURNING id, status),"
    " logged AS (INSERT INTO fleet_presenceevent (device_id, kind, at, session) SELECT id, %(kind)s, %(at)s,"
    " %(session)s FROM changed)"
    " SELECT status FROM changed"
)


def presence_connected(*, device_id: int, session: str) -> str | None:
    """Mark the device online with this session; returns its current status (None: no such device)."""
    with connection.cursor() as cursor:
        cursor.execute(_PRESENCE_SQL.format(only_session=""), {
            "online": True, "at": timezone.now(), "new_session": session, "device": device_id,
            "kind": PresenceEvent.Kind.CONNECTED, "session": session})
        row = cursor.fetchone()
    return row[0] if row else None


def presence_disconnected(*, device_id: int, session: str) -> None:
    """Mark offline only if no newer connection of the device took over meanwhile."""
    with connection.cursor() as cursor:
        cursor.execute(_PRESENCE_SQL.format(only_session="AND session = %(session)s"), {
            "online": False, "at": timezone.now(), "new_session": "", "device": device_id,
            "kind": PresenceEvent.Kind.DISCONNECTED, "session": session})
