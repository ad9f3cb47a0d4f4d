"""API permissions: the operator's role groups, checked as Django model permissions.

Reads need `view_<model>`, writes `add/change/delete_<model>`; command actions (approve,
quarantine, …) name their permission in the view's `action_permissions`.
"""

from __future__ import annotations

from typing import Any

from rest_framework import permissions


class RolePermission(permissions.DjangoModelPermissions):
    perms_map = {
        "GET": ["%(app_label)s.view_%(model_name)s"],
        "OPTIONS": ["%(app_label)s.view_%(model_name)s"],
        "HEAD": ["%(app_label)s.view_%(model_name)s"],
        "POST": ["%(app_label)s.add_%(model_name)s"],
        "PUT": ["%(app_label)s.change_%(model_name)s"],
        "PATCH": ["%(app_label)s.change_%(model_name)s"],
        "DELETE": ["%(app_label)s.delete_%(model_name)s"],
    }

    def has_permission(self, request: Any, view: Any) -> bool:
        if not (request.user and request.user.is_authenticated):
            return False
        action = getattr(view, "action", None)
        action_perms = getattr(view, "action_permissions", {})
        if action in action_perms:
            return request.user.has_perms(action_perms[action])
        required = getattr(view, "required_permissions", None)
        if required is not None:  # views without a model queryset declare theirs
            return request.user.has_perms(required.get(request.method, required.get("*", [])))
        return super().has_permission(request, view)
