# The agent-connection fixtures (console_server, enrollment_token) and the software TPM ones.
from tests.agent.conftest import console_server, enrollment_token, ota_server  # noqa: F401
from tests.tpm.conftest import swtpm, swtpm_factory, tpm  # noqa: F401
