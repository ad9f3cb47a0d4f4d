"""Fixtures for rollouts tests: a private media root, captured doorbells, no Celery kicks."""

from __future__ import annotations

import pytest


@pytest.fixture(autouse=True)
def media_root(settings, tmp_path):
    settings.MEDIA_ROOT = str(tmp_path / "media")
    settings.ROLLOUTS_DOWNLOAD_BASE_URL = "http://testserver"
    return tmp_path / "media"


@pytest.fixture(autouse=True)
def no_kicks(monkeypatch):
    """Event-driven steps would go through Celery; tests call the orchestrator themselves."""
    kicks: list[int] = []
    monkeypatch.setattr("rollouts.orchestrator.kick", kicks.append)
    return kicks


@pytest.fixture
def pushed(monkeypatch):
    """Frames sent to devices through fleet.push, as (device_id, frame)."""
    sent: list[tuple[int, dict]] = []

    def capture(messages):
        messages = list(messages)
        sent.extend((device_id, m["frame"]) for device_id, m in messages if m.get("type") == "device.frame")
        return len(messages)

    monkeypatch.setattr("fleet.push.send_many", capture)
    return sent
