"""OpenAPI post-processing: document the error answers every operation can give.

All API errors share one shape (fleet.api.errors): {"detail", "code", "errors"?, "position"?}.
drf-spectacular documents only the success answers; this hook adds the error answers so
clients (and schema-checking tools) know a 400 or 404 is part of the contract."""

from __future__ import annotations

from typing import Any

ERROR_SCHEMA = {
    "type": "object",
    "description": "Every API error: a readable `detail`, a stable `code`, per-field `errors` for invalid input.",
    "properties": {
        "detail": {"type": "string"},
        "code": {"type": "string"},
        "errors": {"description": "per-field messages (validation failures only)"},
        "position": {"type": "integer", "description": "0-based column of a selector error"},
    },
    "required": ["detail"],
}

ERRORS = {
    "400": "Invalid input: the `detail` names the problem.",
    "401": "No or invalid credentials.",
    "403": "The credentials may not do this.",
    "404": "No such object (or page).",
    "429": "Too many requests.",
}
CHANGE_ERRORS = {
    "409": "The object's state does not allow this change (or it is still in use).",
    "413": "The upload is over the size limit.",
}


def add_error_responses(result: dict[str, Any], generator: Any, request: Any, public: bool) -> dict[str, Any]:
    result.setdefault("components", {}).setdefault("schemas", {})["Error"] = ERROR_SCHEMA
    content = {"application/json": {"schema": {"$ref": "#/components/schemas/Error"}}}
    for path_item in result.get("paths", {}).values():
        for method, operation in path_item.items():
            if method not in ("get", "post", "put", "patch", "delete", "head", "options"):
                continue
            wanted = {**ERRORS, **(CHANGE_ERRORS if method != "get" else {})}
            responses = operation.setdefault("responses", {})
            for code, description in wanted.items():
                responses.setdefault(code, {"description": description, "content": content})
    return result
