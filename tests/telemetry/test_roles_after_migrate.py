"""Roles on a freshly migrated database: the post-migrate sync runs after every console app's
permissions exist, so an admin or viewer can read telemetry without a second `migrate`."""

from __future__ import annotations

import pytest
from django.contrib.auth.models import Group, Permission
from django.core.management.sql import emit_post_migrate_signal

from security.roles import ROLES

pytestmark = pytest.mark.django_db


def test_the_post_migrate_signal_alone_gives_every_role_the_telemetry_and_rollout_permissions():
    # As on a fresh database: the apps after "security" have no permissions yet (they are created
    # on each app's own post_migrate signal), and no role holds any.
    Permission.objects.filter(content_type__app_label__in=["telemetry", "rollouts", "frontend"]).delete()
    for group in Group.objects.filter(name__in=ROLES):
        group.permissions.clear()

    emit_post_migrate_signal(verbosity=0, interactive=False, db="default")

    for role in ROLES:
        codenames = {(p.content_type.app_label, p.codename) for p in Group.objects.get(name=role).permissions.all()}
        assert ("telemetry", "view_metric") in codenames, role
        assert any(app == "rollouts" for app, _ in codenames), role
