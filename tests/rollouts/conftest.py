"""Fixtures for rollout tests over a real server: the console in uvicorn with download URLs
pointing at itself, and enrollment tokens (shared with tests/agent)."""

from tests.agent.conftest import enrollment_token, ota_server  # noqa: F401 -- fixtures re-exported
