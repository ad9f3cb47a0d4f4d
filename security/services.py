"""State changes of the security app (operators now; keys, tokens and attestation later)."""

from __future__ import annotations

from typing import Any

from django.contrib.auth import get_user_model
from django.contrib.auth.models import Group
from django.db import transaction
from rest_framework.authtoken.models import Token

from fleet import audit
from fleet.errors import InvalidInput
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
