"""Operator roles as Django groups: viewer (read), operator (day-to-day), admin (everything).

The permission sets are declared here, in code, and synced after every migrate, so a new
model's permissions reach the right roles without a manual step. The API, the admin and
the dashboard all check these same Django permissions.
"""

from __future__ import annotations

from typing import Any

from django.contrib.auth.models import Group, Permission
from django.db.models import Q

VIEWER, OPERATOR, ADMIN = "viewer", "operator", "admin"
ROLES = (VIEWER, OPERATOR, ADMIN)

# Apps whose models the console manages; permissions outside these go to admins only.
CONSOLE_APPS = ("fleet", "security", "telemetry", "rollouts", "frontend")

# Day-to-day operator actions beyond viewing ("app_label.codename"). Keys, trust stores,
# policies and user management are deliberately absent: those are admin-only.
OPERATOR_PERMISSIONS = {
    "fleet.add_site", "fleet.change_site",
    "fleet.add_device", "fleet.change_device", "fleet.approve_device", "fleet.quarantine_device",
    "fleet.pin_device", "fleet.send_command",
    "fleet.add_devicegroup", "fleet.change_devicegroup", "fleet.delete_devicegroup",
    "security.add_enrollmenttoken", "security.change_enrollmenttoken", "security.add_devicekey",
    "security.request_attestation", "security.approve_ek",
    "telemetry.add_alertrule", "telemetry.change_alertrule", "telemetry.delete_alertrule",
    "telemetry.change_alert",
    "rollouts.add_artifact", "rollouts.add_campaign", "rollouts.change_campaign",
    "rollouts.control_campaign",
}


def _permissions(role: str) -> Any:
    in_console = Permission.objects.filter(content_type__app_label__in=CONSOLE_APPS)
    if role == ADMIN:
        return Permission.objects.filter(
            Q(content_type__app_label__in=CONSOLE_APPS)
            | Q(content_type__app_label__in=("auth", "authtoken"))
        )
    viewing = in_console.filter(codename__startswith="view_")
    if role == VIEWER:
        return viewing
    wanted = Q()
    for dotted in OPERATOR_PERMISSIONS:
        app_label, codename = dotted.split(".")
        wanted |= Q(content_type__app_label=app_label, codename=codename)
    return viewing | in_console.filter(wanted)


def sync_roles() -> None:
    for role in ROLES:
        group, _ = Group.objects.get_or_create(name=role)
        group.permissions.set(_permissions(role))


def sync_roles_after_migrate(sender: Any, **kwargs: Any) -> None:
    # post_migrate fires once per app, in INSTALLED_APPS order, and each app's permissions are
    # created on its own signal: syncing only on "security"'s left a fresh database's roles without
    # the permissions of the apps after it (telemetry, rollouts, frontend). Sync on each console
    # app's signal (idempotent, a few queries); the last one sees every permission.
    if getattr(sender, "name", None) in CONSOLE_APPS:
        sync_roles()


def role_of(user: Any) -> str | None:
    """The strongest role a user holds (superusers count as admin)."""
    if getattr(user, "is_superuser", False):
        return ADMIN
    names = set(user.groups.values_list("name", flat=True))
    for role in (ADMIN, OPERATOR, VIEWER):
        if role in names:
            return role
    return None
