"""Puts the client's address where the audit recorder can find it for the request."""

from collections.abc import Callable

from django.http import HttpRequest, HttpResponse

from security.audit import current_source_ip


class AuditContextMiddleware:
    def __init__(self, get_response: Callable[[HttpRequest], HttpResponse]) -> None:
        self.get_response = get_response

    def __call__(self, request: HttpRequest) -> HttpResponse:
        # REMOTE_ADDR is the proxy's address behind a reverse proxy; deployments that
        # trust X-Forwarded-For set it at the proxy (docs/deploy.md).
        token = current_source_ip.set(request.META.get("REMOTE_ADDR") or None)
        try:
            return self.get_response(request)
        finally:
            current_source_ip.reset(token)
