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
