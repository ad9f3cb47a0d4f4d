import pytest
from django.core.cache import cache

pytestmark = pytest.mark.django_db


KEYS = ["login-fail:vera-viewer:127.0.0.1", "login-fail:vera-viewer:*"]


@pytest.fixture(autouse=True)
def _clean_counters():
    # Only our keys: the cache shares Redis with the channel layer and Celery.
    cache.delete_many(KEYS)
    yield
    cache.delete_many(KEYS)


def _login(client, password):
    return client.post("/admin/login/?next=/admin/", {"username": "vera-viewer", "password": password})


def test_repeated_wrong_passwords_lock_the_account_even_for_the_right_one(client, viewer_user, settings):
    settings.LOGIN_MAX_FAILURES = 3
    for _ in range(3):
        assert _login(client, "wrong").status_code == 200  # the form again, with an error
    response = _login(client, "correct horse battery")
    assert response.status_code == 200 and "_auth_user_id" not in client.session


def test_a_successful_login_before_the_limit_resets_the_count(client, viewer_user, settings):
    settings.LOGIN_MAX_FAILURES = 3
    _login(client, "wrong")
    _login(client, "wrong")
    assert _login(client, "correct horse battery").status_code == 302
    client.logout()
    _login(client, "wrong")
    _login(client, "wrong")
    assert _login(client, "correct horse battery").status_code == 302
