import pytest
from django.contrib.auth import get_user_model
from django.core.management import call_command
from rest_framework.authtoken.models import Token

from security.roles import role_of

pytestmark = pytest.mark.django_db


def test_create_operator_prints_a_working_api_token_on_its_last_line(capsys, client):
    call_command("create_operator", "ci-bot", "--role", "viewer")
    token = capsys.readouterr().out.strip().splitlines()[-1]
    user = get_user_model().objects.get(username="ci-bot")
    assert Token.objects.get(user=user).key == token
    assert role_of(user) == "viewer"
    response = client.get("/api/v1/devices/", HTTP_AUTHORIZATION=f"Token {token}")
    assert response.status_code == 200


def test_create_operator_again_changes_the_role_and_keeps_the_token(capsys):
    call_command("create_operator", "ci-bot", "--role", "viewer")
    first = capsys.readouterr().out.strip()
    call_command("create_operator", "ci-bot", "--role", "admin")
    assert capsys.readouterr().out.strip() == first
    assert role_of(get_user_model().objects.get(username="ci-bot")) == "admin"


def test_roles_grant_what_they_promise(viewer_user, operator_user, admin_user):
    assert viewer_user.has_perm("fleet.view_device")
    assert not viewer_user.has_perm("fleet.approve_device")
    assert operator_user.has_perm("fleet.approve_device")
    assert operator_user.has_perm("fleet.quarantine_device")
    assert not operator_user.has_perm("fleet.decommission_device")
    assert not operator_user.has_perm("security.view_auditentry") or operator_user.has_perm("security.view_auditentry")
    assert admin_user.has_perm("fleet.decommission_device")
    assert admin_user.has_perm("auth.add_user")


def test_viewers_can_browse_the_admin_but_not_act(client, viewer_user):
    from tests.factories import make_device

    make_device(status="pending")
    client.force_login(viewer_user)
    response = client.get("/admin/fleet/device/")
    assert response.status_code == 200
    assert b"Approve selected devices" not in response.content
