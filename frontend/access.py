"""Who may see and do what in the dashboard: the same Django permissions the API checks.

`page(...)` guards a GET page (anonymous → login redirect, missing permission → 403);
`action(...)` guards a state change (POST only, same checks), so a forced POST from a
role whose page hides the button is refused with 403 all the same.
"""

from __future__ import annotations

from collections.abc import Callable
from functools import wraps
from typing import Any

from django.contrib.auth.decorators import login_required
from django.core.exceptions import PermissionDenied
from django.http import HttpRequest, HttpResponse
from django.views.decorators.http import require_GET, require_POST

# The permission that makes a user a dashboard viewer at all (every role holds it).
VIEW = "fleet.view_device"


def _guard(perms: tuple[str, ...], view: Callable[..., HttpResponse]) -> Callable[..., HttpResponse]:
    @wraps(view)
    def wrapped(request: HttpRequest, *args: Any, **kwargs: Any) -> HttpResponse:
        if not request.user.has_perms((VIEW, *perms)):
            raise PermissionDenied("your role does not allow this")
        return view(request, *args, **kwargs)

    return login_required(wrapped)


def page(*perms: str) -> Callable[[Callable[..., HttpResponse]], Callable[..., HttpResponse]]:
    def decorate(view: Callable[..., HttpResponse]) -> Callable[..., HttpResponse]:
        return require_GET(_guard(perms, view))

    return decorate


def action(*perms: str) -> Callable[[Callable[..., HttpResponse]], Callable[..., HttpResponse]]:
    def decorate(view: Callable[..., HttpResponse]) -> Callable[..., HttpResponse]:
        return require_POST(_guard(perms, view))

    return decorate


def json_page(*perms: str) -> Callable[[Callable[..., HttpResponse]], Callable[..., HttpResponse]]:
    """A JSON read for the page's scripts: anonymous gets 403, not a login redirect."""

    def decorate(view: Callable[..., HttpResponse]) -> Callable[..., HttpResponse]:
        @wraps(view)
        def wrapped(request: HttpRequest, *args: Any, **kwargs: Any) -> HttpResponse:
            if not request.user.is_authenticated or not request.user.has_perms((VIEW, *perms)):
                raise PermissionDenied("log in with a role that may read this")
            return view(request, *args, **kwargs)

        return require_GET(wrapped)

    return decorate
