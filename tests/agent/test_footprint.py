"""One agent process as a device runs it, scoring its model against the real console, stays
within its memory budget (≤ 60 MB RSS) without loading ONNX Runtime."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
from django.db import connection

pytestmark = pytest.mark.django_db(transaction=True)

ROOT = Path(__file__).resolve().parents[2]
RSS_BUDGET_MB = 60
UID = "footprint-test-1"


def scored_points(uid: str) -> int:
    """Inference results of the device that the console has stored."""
    with connection.cursor() as cursor:
        cursor.execute("SELECT count(*) FROM telemetry_point p JOIN fleet_device d ON d.id = p.device_id "
                       "JOIN telemetry_metric m ON m.id = p.metric_id WHERE d.uid = %s AND m.name = %s",
                       [uid, "inference.latency_ms"])
        count = cursor.fetchone()[0]
    connection.close()
    return count


def test_an_agent_scoring_its_model_stays_under_60_mb_without_onnxruntime(console_server, enrollment_token,
                                                                           tmp_path: Path) -> None:
    state = tmp_path / "agent"
    state.mkdir()
    # 2 Hz so the first 16-sample window is full in 8 s; a frame every second.
    (state / "config.json").write_text(json.dumps({"sample_hz": 2.0, "batch_s": 1.0}))
    log = tmp_path / "agent.log"
    with log.open("wb") as out:
        agent = subprocess.Popen(
            [sys.executable, "-m", "agent_stub", "--log-level", "INFO", "run", "--server", console_server.ws_url,
             "--state-dir", str(state), "--enroll-token", enrollment_token(auto_approve=True), "--uid", UID],
            cwd=ROOT, stdout=out, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 60
        while scored_points(UID) < 5:
            assert agent.poll() is None, log.read_text()
            assert time.monotonic() < deadline, f"no inference points stored within 60 s:\n{log.read_text()}"
            time.sleep(1)
        rss_mb = 0.0
        for _ in range(5):
            rss_mb = max(rss_mb, psutil.Process(agent.pid).memory_info().rss / 2**20)
            time.sleep(1)
        maps = Path(f"/proc/{agent.pid}/maps").read_text()
        assert scored_points(UID) >= 10  # still scoring while measured
    finally:
        agent.terminate()
        agent.wait(15)
    assert "inference backend numpy" in log.read_text()
    assert "onnxruntime" not in maps
    assert rss_mb <= RSS_BUDGET_MB, f"agent RSS {rss_mb:.1f} MB"
