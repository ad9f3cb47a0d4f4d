"""One exception handler: every API error is JSON with a `detail` a person can act on.

Shape: {"detail": "readable message", "code": "machine_code", "errors": {field: [...]}}
(`errors` only for validation failures).
"""

from __future__ import annotations

from typing import Any

from django.core.exceptions import ValidationError as DjangoValidationError
from django.db import DataError
from django.db.models import ProtectedError
from rest_framework import exceptions, status
from rest_framework.response import Response
from rest_framework.views import exception_handler as drf_exception_handler

from fleet.errors import DomainError
from fleet.selector import SelectorError


def _flatten(errors: Any, prefix: str = "") -> list[str]:
    if isinstance(errors, dict):
        out: list[str] = []
        for key, value in errors.items():
            name = key if key != "non_field_errors" else ""
            out += _flatten(value, f"{prefix}{name}: " if name else prefix)
        return out
    if isinstance(errors, list):
        return [line for item in errors for line in _flatten(item, prefix)]
    return [f"{prefix}{errors}"]


def exception_handler(exc: Exception, context: dict) -> Response | None:
    if isinstance(exc, DomainError):
        return Response({"detail": exc.message, "code": exc.code}, status=exc.status)
    if isinstance(exc, SelectorError):
        return Response(
            {"detail": f"invalid selector: {exc}", "code": "invalid_selector", "position": exc.position},
            status=status.HTTP_400_BAD_REQUEST,
        )
    if isinstance(exc, DjangoValidationError):
        exc = exceptions.ValidationError(exc.message_dict if hasattr(exc, "error_dict") else exc.messages)
    if isinstance(exc, DataError) and "NUL (0x00)" in str(exc):
        # A NUL in any text that reaches PostgreSQL (a slug lookup, a filter): the caller's input.
        return Response({"detail": "NUL characters (\\x00) are not allowed in text", "code": "invalid"}, status=400)
    if isinstance(exc, ProtectedError):
        return Response({"detail": f"still in use: {exc.args[0]}", "code": "protected"}, status=409)
    response = drf_exception_handler(exc, context)
    if response is None:
        return None
    if isinstance(exc, exceptions.ValidationError):
        response.data = {"detail": "; ".join(_flatten(exc.detail)), "code": "invalid", "errors": exc.detail}
    elif isinstance(response.data, dict) and "detail" in response.data:
        response.data["code"] = getattr(exc, "default_code", "error")
    return response
