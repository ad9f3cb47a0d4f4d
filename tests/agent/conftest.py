import pytest
from django.db import connection

from tests.harness import ConsoleServer


@pytest.fixture
def console_server(transactional_db):
    """A real uvicorn process serving the console against the test database."""
    server = ConsoleServer(connection.settings_dict).start()
    yield server
    server.stop()


@pytest.fixture
def ota_server(transactional_db, settings):
    """The console with download URLs pointing at itself. Offers are built both in the server
    (on connect) and in the test process when it plays Celery (orchestrator.tick): both must
    carry the server's URL, not the default http://127.0.0.1:8000."""
    server = ConsoleServer(connection.settings_dict)
    server.env["ROLLOUTS_DOWNLOAD_BASE_URL"] = server.http_url
    settings.ROLLOUTS_DOWNLOAD_BASE_URL = server.http_url
    server.start()
    yield server
    server.stop()


@pytest.fixture
def enrollment_token(transactional_db):
    from datetime import timedelta

    from security.services import enrollment_token_create

    def make(**kwargs) -> str:
        kwargs.setdefault("expires_in", timedelta(hours=1))
        kwargs.setdefault("max_uses", 10)
        return enrollment_token_create(actor="test", **kwargs)[1]

    return make


# The real software TPM fixtures (swtpm on a loopback port, private CA) from tests/tpm.
from tests.tpm.conftest import swtpm, swtpm_factory, tpm  # noqa: E402, F401
