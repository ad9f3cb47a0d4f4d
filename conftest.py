"""Shared fixtures: personas (admin, operator, viewer, outsider) and API clients for them."""

from __future__ import annotations

from typing import TYPE_CHECKING

import pytest

if TYPE_CHECKING:
    from rest_framework.test import APIClient

# Django-dependent imports happen inside the fixtures, so Django-free suites
# (tests/agent_stub, tests/tpm) also run with `-p no:django`.


@pytest.fixture
def roles(db):
    from security.roles import sync_roles

    sync_roles()


def _persona(role: str | None, username: str):
    from django.contrib.auth import get_user_model

    from security.services import operator_upsert

    if role is None:
        user = get_user_model().objects.create_user(username=username, password="x-unused-x")
        return user, None
    user, token, _ = operator_upsert(actor="test", username=username, role=role, password="correct horse battery")
    return user, token


@pytest.fixture
def admin_user(roles):
    return _persona("admin", "alice-admin")[0]


@pytest.fixture
def operator_user(roles):
    return _persona("operator", "oscar-operator")[0]


@pytest.fixture
def viewer_user(roles):
    return _persona("viewer", "vera-viewer")[0]


@pytest.fixture
def outsider_user(roles):
    return _persona(None, "otto-outsider")[0]


def _client_for(user) -> APIClient:
    from rest_framework.authtoken.models import Token
    from rest_framework.test import APIClient

    client = APIClient()
    token, _ = Token.objects.get_or_create(user=user)
    client.credentials(HTTP_AUTHORIZATION=f"Token {token.key}")
    return client


@pytest.fixture
def anon_api() -> APIClient:
    from rest_framework.test import APIClient

    return APIClient()


@pytest.fixture
def admin_api(admin_user) -> APIClient:
    return _client_for(admin_user)


@pytest.fixture
def operator_api(operator_user) -> APIClient:
    return _client_for(operator_user)


@pytest.fixture
def viewer_api(viewer_user) -> APIClient:
    return _client_for(viewer_user)


@pytest.fixture
def outsider_api(outsider_user) -> APIClient:
    return _client_for(outsider_user)
