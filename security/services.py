"""State changes of the security app (operators now; keys, tokens and attestation later)."""

from __future__ import annotations

import hashlib
import secrets
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey
from django.contrib.auth import get_user_model
from django.contrib.auth.models import Group
from django.core.exceptions import ValidationError
from django.db import connection, transaction
from django.utils import timezone
from rest_framework.authtoken.models import Token

from agent_stub.protocol import auth_message
from fleet import audit, push
from fleet import services as fleet_services
from fleet.errors import Conflict, DomainError, InvalidInput
from fleet.models import Device, DeviceStatus
from security.models import DeviceKey, EnrollmentToken
from security.roles import ROLES, sync_roles


@transaction.atomic
def operator_upsert(*, actor: Any, username: str, role: str, email: str = "",
                    password: str | None = None) -> tuple[Any, str, bool]:
    """Create or update an operator with exactly one role. Returns (user, api token, created)."""
    if role not in ROLES:
        raise InvalidInput(f"unknown role {role!r}; use one of {', '.join(ROLES)}")
    if not Group.objects.filter(name=role).exists():
        sync_roles()
    user_model = get_user_model()
    user, created = user_model.objects.get_or_create(username=username, defaults={"email": email})
    if email:
        user.email = email
    # Staff so the Django admin admits them; what they see there is bounded by their role.
    user.is_staff = True
    if password:
        user.set_password(password)
    elif created:
        user.set_unusable_password()
    user.save()
    user.groups.set([Group.objects.get(name=role)])
    token, _ = Token.objects.get_or_create(user=user)
    audit.record(actor=actor, action="operator.create" if created else "operator.update", target=user,
                 data={"role": role})
    return user, token.key, created


# --- Device identity: enrollment tokens, keys, authentication ---------------------------

class AuthFailed(Exception):
    """Authentication refused (close 4401). `message` is safe to send to the device."""

    close_code = 4401

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class DeviceRevoked(AuthFailed):
    close_code = 4403


@dataclass(frozen=True)
class DeviceSession:
    """What the agent connection needs to know after a successful handshake."""

    device_id: int
    uid: str
    status: str
    last_acked_seq: int
    public_key: bytes


TOKEN_PREFIX = "fet_"  # noqa: S105 -- a public marker that makes leaked tokens greppable, not a secret
HARDWARE_FIELDS = ("cpu_cores", "ram_mb", "accelerator", "storage_mb", "arch", "os")


def token_digest(secret: str) -> str:
    return hashlib.sha256(secret.encode()).hexdigest()


def key_fingerprint(public_key: bytes) -> str:
    return hashlib.sha256(public_key).hexdigest()


def _check_public_key(public_key: bytes) -> Ed25519PublicKey:
    if len(public_key) != 32:
        raise InvalidInput("an Ed25519 public key is 32 raw bytes")
    try:
        return Ed25519PublicKey.from_public_bytes(public_key)
    except ValueError:
        raise InvalidInput("not a valid Ed25519 public key") from None


def signature_valid(public_key: bytes, message: bytes, signature: bytes) -> bool:
    try:
        Ed25519PublicKey.from_public_bytes(public_key).verify(signature, message)
        return True
    except (InvalidSignature, ValueError):
        return False


@transaction.atomic
def enrollment_token_create(
    *, actor: Any, expires_in: timedelta, max_uses: int = 1, name: str = "", site: Any = None,
    labels: dict | None = None, auto_approve: bool = False,
) -> tuple[EnrollmentToken, str]:
    """Create a token; returns it and its secret (shown once, stored only as a hash)."""
    if max_uses < 1:
        raise InvalidInput("max_uses must be at least 1")
    if expires_in.total_seconds() <= 0 or expires_in > timedelta(days=365):
        raise InvalidInput("a token must expire within 365 days")
    secret = TOKEN_PREFIX + secrets.token_urlsafe(32)
    token = EnrollmentToken.objects.create(
        name=name, prefix=secret[: len(TOKEN_PREFIX) + 6], secret_hash=token_digest(secret),
        created_by=actor if getattr(actor, "pk", None) and not isinstance(actor, Device) else None,
        expires_at=timezone.now() + expires_in, max_uses=max_uses, site=site,
        labels=fleet_services.clean_labels(labels or {}), auto_approve=auto_approve,
    )
    audit.record(actor=actor, action="enrollment_token.create", target=token,
                 data={"max_uses": max_uses, "auto_approve": auto_approve, "expires_at": token.expires_at.isoformat()})
    return token, secret


@transaction.atomic
def enrollment_token_revoke(*, actor: Any, token: EnrollmentToken) -> EnrollmentToken:
    token = EnrollmentToken.objects.select_for_update().get(pk=token.pk)
    if token.revoked_at:
        raise Conflict("the token is already revoked")
    token.revoked_at = timezone.now()
    token.save(update_fields=["revoked_at"])
    audit.record(actor=actor, action="enrollment_token.revoke", target=token)
    return token


def _session(device: Device) -> DeviceSession:
    key = device.keys.filter(state=DeviceKey.State.ACTIVE).values_list("public_key", flat=True).first()
    return DeviceSession(
        device_id=device.id, uid=device.uid, status=device.status,
        last_acked_seq=fleet_services.cursor_position(device_id=device.id), public_key=bytes(key or b""),
    )


# The device, its newest active key, whether it has any key at all, and its uplink cursor, in
# one statement. Raw SQL on purpose: every (re)connect runs it — a whole fleet at once after an
# outage — and the ORM spent ~7x the statement's own time building the equivalent query.
_AUTH_SQL = """
SELECT d.id, d.status,
       (SELECT k.public_key FROM security_devicekey k WHERE k.device_id = d.id AND k.state = %(active)s
        ORDER BY k.created_at DESC LIMIT 1),
       EXISTS (SELECT 1 FROM security_devicekey k WHERE k.device_id = d.id),
       (SELECT c.last_acked_seq FROM fleet_uplinkcursor c WHERE c.device_id = d.id)
FROM fleet_device d WHERE d.uid = %(uid)s
"""


def device_authenticate(*, uid: str, nonce: bytes, signature: bytes) -> DeviceSession:
    """Check an `auth` frame: a known device signing this connection's nonce with its active key."""
    with connection.cursor() as cursor:
        cursor.execute(_AUTH_SQL, {"uid": uid, "active": DeviceKey.State.ACTIVE})
        row = cursor.fetchone()
    if row is None:
        raise AuthFailed("unknown device")
    device_id, status, public_key, has_keys, acked = row
    if status == DeviceStatus.DECOMMISSIONED:
        raise DeviceRevoked("device is decommissioned")
    if public_key is None:
        if has_keys:
            raise DeviceRevoked("device key revoked")
        raise AuthFailed("device has no registered key")
    if not signature_valid(bytes(public_key), auth_message(nonce, uid), signature):
        raise AuthFailed("bad signature")
    return DeviceSession(device_id=device_id, uid=uid, status=status, last_acked_seq=acked or 0,
                         public_key=bytes(public_key))


def enroll_precheck(*, secret: str, uid: str, public_key: bytes, nonce: bytes, signature: bytes) -> None:
    """Refuse early (before a TPM credential round) what `device_enroll` would refuse."""
    try:
        _check_public_key(public_key)
    except InvalidInput as exc:
        raise AuthFailed(exc.message) from None
    if not signature_valid(public_key, auth_message(nonce, uid), signature):
        raise AuthFailed("bad signature: proof of possession failed")
    token = EnrollmentToken.objects.filter(secret_hash=token_digest(secret)).first()
    if token is None:
        raise AuthFailed("unknown enrollment token")
    if Device.objects.filter(uid=uid).exists():
        return  # device_enroll decides (same key: idempotent; other key: refused)
    state = token.state(timezone.now())
    if state != "valid":
        raise AuthFailed(f"enrollment token {state}")


@transaction.atomic
def device_enroll(
    *, secret: str, uid: str, public_key: bytes, nonce: bytes, signature: bytes, hardware: dict,
    tpm: Any = None,
) -> DeviceSession:
    """First contact: a valid token plus proof of possession of the key creates the device.

    Re-enrolling with the same uid and key (the agent lost our `welcome`) returns the same
    device without spending the token again. Anything refused creates nothing.
    """
    try:
        _check_public_key(public_key)
    except InvalidInput as exc:
        raise AuthFailed(exc.message) from None
    if not signature_valid(public_key, auth_message(nonce, uid), signature):
        raise AuthFailed("bad signature: proof of possession failed")
    token = EnrollmentToken.objects.select_for_update().filter(secret_hash=token_digest(secret)).first()
    if token is None:
        raise AuthFailed("unknown enrollment token")
    state = token.state(timezone.now())
    fingerprint = key_fingerprint(public_key)
    existing = Device.objects.filter(uid=uid).first()
    if existing is not None:
        if existing.status == DeviceStatus.DECOMMISSIONED:
            raise DeviceRevoked("device is decommissioned")
        if existing.keys.filter(fingerprint=fingerprint, state=DeviceKey.State.ACTIVE).exists():
            return _session(existing)
        raise AuthFailed("this uid is already enrolled with a different key")
    if state != "valid":
        raise AuthFailed(f"enrollment token {state}")
    if DeviceKey.objects.filter(fingerprint=fingerprint).exists():
        raise AuthFailed("this public key already belongs to another device")
    hardware = hardware if isinstance(hardware, dict) else {}
    capabilities = {k: hardware[k] for k in HARDWARE_FIELDS if k in hardware}
    # An EK without a trusted certificate needs an operator's approval first, token or not.
    auto_approve = token.auto_approve and (tpm is None or tpm.ek_approved)
    try:
        device = fleet_services.device_register(
            actor=f"enrollment-token:{token.prefix}", uid=uid,
            hardware_model=str(hardware.get("model", ""))[:100], serial=str(hardware.get("serial", ""))[:100],
            site=token.site, labels=token.labels, capabilities=capabilities,
            status=DeviceStatus.ACTIVE if auto_approve else DeviceStatus.PENDING,
        )
    except (DomainError, ValidationError) as exc:
        raise AuthFailed(f"enrollment refused: {getattr(exc, 'message', None) or exc}") from None
    DeviceKey.objects.create(device=device, public_key=public_key, fingerprint=fingerprint, source="enroll")
    if tpm is not None:
        from security.attestation import tpm_identity_store

        tpm_identity_store(device=device, enrollment=tpm)
    token.uses += 1
    token.save(update_fields=["uses"])
    audit.record(actor=device, action="device.enroll", target=device,
                 data={"token": token.prefix, "status": device.status, "key": fingerprint[:16],
                       "tpm": None if tpm is None else {"ek_tier": tpm.ek_tier, "ek_cert_failed": tpm.ek_cert_failed}})
    return _session(device)


@transaction.atomic
def device_preauthorize(
    *, actor: Any, uid: str, public_key: bytes, name: str = "", site: Any = None, labels: dict | None = None,
    approve: bool = False,
) -> Device:
    """Register a device and its key before it first connects; it then authenticates directly."""
    _check_public_key(public_key)
    fingerprint = key_fingerprint(public_key)
    if DeviceKey.objects.filter(fingerprint=fingerprint).exists():
        raise Conflict("this public key already belongs to a device")
    device = fleet_services.device_register(
        actor=actor, uid=uid, name=name, site=site, labels=labels,
        status=DeviceStatus.ACTIVE if approve else DeviceStatus.PENDING,
    )
    DeviceKey.objects.create(device=device, public_key=public_key, fingerprint=fingerprint, source="preauthorized")
    audit.record(actor=actor, action="device.preauthorize", target=device, data={"key": fingerprint[:16]})
    return device


@transaction.atomic
def device_key_rotate(*, actor: Any, device: Device, public_key: bytes) -> DeviceKey:
    _check_public_key(public_key)
    fingerprint = key_fingerprint(public_key)
    if DeviceKey.objects.filter(fingerprint=fingerprint).exists():
        raise Conflict("this public key is already registered")
    now = timezone.now()
    device.keys.filter(state=DeviceKey.State.ACTIVE).update(state=DeviceKey.State.REVOKED, revoked_at=now)
    key = DeviceKey.objects.create(device=device, public_key=public_key, fingerprint=fingerprint, source="rotated")
    audit.record(actor=actor, action="device.key_rotate", target=device, data={"key": fingerprint[:16]})
    # The open connection authenticated with the old key: close it so the device re-authenticates.
    transaction.on_commit(lambda: push.send_to_device(device.id, {"type": "device.revoked", "reason": "key rotated"}))
    return key


@transaction.atomic
def device_revoke(*, actor: Any, device: Device, reason: str) -> Device:
    """Revoke every key of the device and decommission it: 4403 now and at every later connect."""
    if not reason:
        raise InvalidInput("a reason is required to revoke a device")
    device.keys.filter(state=DeviceKey.State.ACTIVE).update(state=DeviceKey.State.REVOKED, revoked_at=timezone.now())
    if device.status != DeviceStatus.DECOMMISSIONED:
        device = fleet_services.device_decommission(actor=actor, device=device, reason=reason)
    audit.record(actor=actor, action="device.revoke", target=device, data={"reason": reason})
    transaction.on_commit(lambda: push.send_to_device(device.id, {"type": "device.revoked", "reason": reason}))
    return device
