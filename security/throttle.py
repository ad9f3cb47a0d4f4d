"""Login throttling for every password login (dashboard and Django admin alike).

An authentication backend refuses to even check the password while a (username, client
address) pair — or the username from any address — has failed too often recently; failed
attempts are counted in the cache (Redis) by the `user_login_failed` signal. The counters
expire on their own, so a locked account unlocks after `LOGIN_LOCKOUT_S`.
"""

from __future__ import annotations

from typing import Any

from django.conf import settings
from django.contrib.auth.backends import ModelBackend
from django.contrib.auth.signals import user_logged_in, user_login_failed
from django.core.cache import cache
from django.dispatch import receiver


def _keys(username: str, request: Any) -> list[str]:
    address = (request.META.get("REMOTE_ADDR") if request is not None else None) or "unknown"
    name = (username or "").lower()[:150]
    return [f"login-fail:{name}:{address}", f"login-fail:{name}:*"]


def _limits() -> tuple[int, int]:
    per_address = getattr(settings, "LOGIN_MAX_FAILURES", 5)
    # Any address: allow more before locking, so one attacker cannot lock a user out for long
    # from a single address, but a distributed guess is still bounded.
    return per_address, per_address * 4


def is_locked(username: str, request: Any) -> bool:
    per_address, any_address = _limits()
    counts = cache.get_many(_keys(username, request))
    values = [counts.get(key, 0) for key in _keys(username, request)]
    return values[0] >= per_address or values[1] >= any_address


class ThrottledModelBackend(ModelBackend):
    def authenticate(self, request: Any, username: str | None = None, password: str | None = None, **kwargs: Any):
        if username is not None and is_locked(username, request):
            return None  # counts as a failure; the password is not even checked
        return super().authenticate(request, username=username, password=password, **kwargs)


@receiver(user_login_failed, dispatch_uid="security.throttle.failed")
def _count_failure(sender: Any, credentials: dict, request: Any = None, **kwargs: Any) -> None:
    lockout = getattr(settings, "LOGIN_LOCKOUT_S", 900)
    for key in _keys(credentials.get("username", ""), request):
        if cache.add(key, 1, timeout=lockout):
            continue
        try:
            cache.incr(key)
        except ValueError:  # expired between add and incr
            cache.set(key, 1, timeout=lockout)


@receiver(user_logged_in, dispatch_uid="security.throttle.success")
def _reset_on_success(sender: Any, request: Any, user: Any, **kwargs: Any) -> None:
    cache.delete(_keys(user.get_username(), request)[0])
