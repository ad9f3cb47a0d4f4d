"""Cursor pagination: stable under inserts, constant cost per page at any depth.

Bad paging parameters are the caller's mistake, so they answer 400 with a message naming the
parameter (DRF's own answers are 404 for a bad cursor and a silent default for a bad page size)."""

import binascii
from base64 import b64decode
from urllib import parse

from django.core.exceptions import ValidationError as DjangoValidationError
from rest_framework import pagination
from rest_framework.exceptions import NotFound, ValidationError


class CursorPagination(pagination.CursorPagination):
    ordering = "id"
    page_size_query_param = "page_size"
    max_page_size = 1000

    def get_page_size(self, request):
        raw = request.query_params.get(self.page_size_query_param)
        if raw is None or raw == "":
            return self.page_size
        try:
            size = int(raw)
        except ValueError:
            size = 0
        if not 1 <= size <= self.max_page_size:
            raise ValidationError({self.page_size_query_param: [
                f"must be a whole number from 1 to {self.max_page_size}, not {raw[:40]!r}"]})
        return size

    def decode_cursor(self, request):
        encoded = request.query_params.get(self.cursor_query_param)
        if encoded is None:
            return None
        # DRF's decoder skips characters outside base64 and reads what is left, so most junk
        # decodes to "the first page"; a cursor we made is strict base64 of o/r/p tokens.
        try:
            tokens = parse.parse_qs(b64decode(encoded.encode("ascii"), validate=True).decode("ascii"),
                                    keep_blank_values=True, strict_parsing=True)
            if not tokens or set(tokens) - {"o", "r", "p"}:
                raise ValueError(encoded)
            return super().decode_cursor(request)
        except (NotFound, ValueError, binascii.Error, UnicodeError):
            raise ValidationError({self.cursor_query_param: [
                "invalid cursor: use the `next` or `previous` link of an earlier page"]}) from None

    def paginate_queryset(self, queryset, request, view=None):
        # A well-formed cursor can still carry a position of the wrong type for the ordering
        # field (a hand-made or stale cursor); the database would refuse it.
        try:
            return super().paginate_queryset(queryset, request, view)
        except (ValueError, TypeError, DjangoValidationError):
            if request.query_params.get(self.cursor_query_param) is None:
                raise
            raise ValidationError({self.cursor_query_param: [
                "invalid cursor: use the `next` or `previous` link of an earlier page"]}) from None
