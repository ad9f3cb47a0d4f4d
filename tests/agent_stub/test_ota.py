"""The agent's OTA manager against a real local HTTP server: verify, download, A/B install,
self-test, rollback, windows and crash recovery."""

from __future__ import annotations

import asyncio
import hashlib
import http.server
import io
import json
import threading
import time
import zipfile
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

from agent_stub import protocol as P
from agent_stub.inference import DEFAULT_MODEL
from agent_stub.ota import OtaManager

KEY = Ed25519PrivateKey.generate()
KEY_ID = "ed25519-test"
TRUSTED = {KEY_ID: KEY.public_key().public_bytes(Encoding.Raw, PublicFormat.Raw)}


@pytest.fixture
def server(tmp_path):
    root = tmp_path / "www"
    root.mkdir()

    class Handler(http.server.SimpleHTTPRequestHandler):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, directory=str(root), **kwargs)

        def log_message(self, *args):
            pass

    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield root, f"http://127.0.0.1:{httpd.server_address[1]}"
    httpd.shutdown()


def model_zip(version: str = "1.1.0", *, broken: bool = False) -> bytes:
    buf = io.BytesIO()
    meta = json.loads(DEFAULT_MODEL.with_suffix(".json").read_text())
    meta["version"] = version
    with zipfile.ZipFile(buf, "w") as archive:
        archive.writestr("anomaly.onnx", b"not a model" if broken else DEFAULT_MODEL.read_bytes())
        archive.writestr("anomaly.json", json.dumps(meta))
    return buf.getvalue()


def offer(server, content: bytes, *, execution_id: int = 7, version: str = "1.1.0", window=None,
          sign_with=KEY, key_id: str = KEY_ID, tamper: bool = False) -> dict:
    root, base = server
    (root / f"a{execution_id}.zip").write_bytes(content)
    manifest = P.canonical_json({"name": "anomaly", "kind": "model", "version": version,
                                 "sha256": hashlib.sha256(content).hexdigest(), "size": len(content),
                                 "variant": "default", "created": 0})
    signature = sign_with.sign(manifest)
    if tamper:
        manifest = manifest.replace(b'"size":', b'"size":1')
    return P.rollout_offer(execution_id, name="anomaly", kind="model", version=version,
                           url=f"{base}/a{execution_id}.zip", sha256=hashlib.sha256(content).hexdigest(),
                           size=len(content), manifest=manifest, signature=signature, key_id=key_id,
                           deadline=P.now_ms() + 60_000, window=window)


class Reports:
    def __init__(self):
        self.items: list[tuple] = []

    async def __call__(self, execution_id, state, progress, error):
        self.items.append((execution_id, state, progress, error))

    @property
    def states(self) -> list[str]:
        return [s for _, s, _, _ in self.items if s != "downloading"]

    @property
    def last_error(self):
        return self.items[-1][3]


def manager(tmp_path, reports, **kwargs) -> OtaManager:
    kwargs.setdefault("health_window_s", 0.05)
    return OtaManager(tmp_path / "state", TRUSTED, report=reports, **kwargs)


def run(coro):
    return asyncio.run(coro)


def test_a_good_model_is_downloaded_verified_installed_in_the_other_slot_and_committed(tmp_path, server):
    reports, swapped = Reports(), []

    async def scenario():
        ota = manager(tmp_path, reports, install_hook=lambda slot, manifest: swapped.append(slot))
        await ota.handle_offer(offer(server, model_zip()))
        await ota.wait()
        return ota

    ota = run(scenario())
    assert reports.states == ["acked", "downloaded", "installing", "verifying", "committed"]
    slot, record = ota.active("model")
    assert record["version"] == "1.1.0" and record["slot"] == "B" and (slot / "anomaly.onnx").exists()
    assert swapped == [slot]
    assert not (tmp_path / "state" / "ota" / "journal.json").exists()


def test_a_bad_signature_or_an_untrusted_key_is_rejected_before_any_download(tmp_path, server):
    reports = Reports()

    async def scenario():
        ota = manager(tmp_path, reports)
        await ota.handle_offer(offer(server, model_zip(), execution_id=1, tamper=True))
        await ota.handle_offer(offer(server, model_zip(), execution_id=2, sign_with=Ed25519PrivateKey.generate()))
        await ota.handle_offer(offer(server, model_zip(), execution_id=3, key_id="someone-else"))
        await ota.wait()
        return ota

    ota = run(scenario())
    assert [(e, s, err["code"]) for e, s, _, err in reports.items] == [
        (1, "rejected", "signature_invalid"), (2, "rejected", "signature_invalid"), (3, "rejected", "signature_invalid")]
    assert ota.active("model") == (None, {})


def test_a_download_that_does_not_match_the_manifest_is_rejected_and_nothing_installed(tmp_path, server):
    reports = Reports()
    frame = offer(server, model_zip())
    (server[0] / "a7.zip").write_bytes(model_zip("6.6.6"))  # the file changed after signing

    async def scenario():
        ota = manager(tmp_path, reports)
        await ota.handle_offer(frame)
        await ota.wait()
        return ota

    ota = run(scenario())
    assert reports.states == ["acked", "rejected"] and reports.last_error["code"] == "digest_mismatch"
    assert ota.active("model") == (None, {})
    assert list((tmp_path / "state" / "ota" / "downloads").iterdir()) == []


def test_a_model_failing_its_self_test_is_rolled_back_to_the_previous_one(tmp_path, server):
    reports = Reports()

    async def scenario():
        ota = manager(tmp_path, reports)
        await ota.handle_offer(offer(server, model_zip("1.1.0"), execution_id=1))
        await ota.wait()
        await ota.handle_offer(offer(server, model_zip("1.2.0", broken=True), execution_id=2, version="1.2.0"))
        await ota.wait()
        return ota

    ota = run(scenario())
    assert reports.items[-1][:2] == (2, "rolled_back") and reports.last_error["code"] == "self_test_failed"
    _, record = ota.active("model")
    assert record["version"] == "1.1.0" and record["slot"] == "B"


def test_a_failing_health_window_after_the_switch_restores_the_previous_version(tmp_path, server):
    reports, hooked = Reports(), []

    async def scenario():
        ota = manager(tmp_path, reports, install_hook=lambda slot, m: hooked.append(m["version"]))
        await ota.handle_offer(offer(server, model_zip("1.1.0"), execution_id=1))
        await ota.wait()
        ota.health_check = lambda: False
        await ota.handle_offer(offer(server, model_zip("1.2.0"), execution_id=2, version="1.2.0"))
        await ota.wait()
        return ota

    ota = run(scenario())
    assert reports.items[-1][1] == "rolled_back" and reports.last_error["code"] == "health_check_failed"
    assert ota.active("model")[1]["version"] == "1.1.0"
    assert hooked == ["1.1.0", "1.2.0", "1.1.0"]


def test_installs_wait_for_the_window_and_a_missed_window_is_a_retryable_failure(tmp_path, server):
    reports = Reports()
    now = P.now_ms()

    async def scenario():
        ota = manager(tmp_path, reports)
        t0 = time.monotonic()
        await ota.handle_offer(offer(server, model_zip(), execution_id=1,
                                     window=(now + 400, now + 60_000)))
        await ota.wait()
        waited = time.monotonic() - t0
        await ota.handle_offer(offer(server, model_zip(), execution_id=2, window=(now - 60_000, now - 1000)))
        await ota.wait()
        return waited

    waited = run(scenario())
    assert waited >= 0.35
    assert reports.items[-1][1] == "failed" and reports.last_error == {"code": "window_missed", "retryable": True,
                                                                       "detail": reports.last_error["detail"]}


def test_a_retry_of_a_retryable_failure_runs_again_but_a_final_outcome_is_only_re_reported(tmp_path, server):
    reports = Reports()
    now = P.now_ms()

    async def scenario():
        ota = manager(tmp_path, reports)
        await ota.handle_offer(offer(server, model_zip(), execution_id=5, window=(now - 60_000, now - 1000)))
        await ota.wait()  # window missed: failed, retryable
        await ota.handle_offer(offer(server, model_zip(), execution_id=5))  # the server's retry, same id
        await ota.wait()
        before = len(reports.items)
        await ota.handle_offer(offer(server, model_zip(), execution_id=5))  # a duplicate of the committed one
        await ota.wait()
        return ota, before

    ota, before = run(scenario())
    states = [state for _, state, _, _ in reports.items[:before]]
    assert "failed" in states and states[-1] == "committed"
    assert "downloading" in states[states.index("failed"):]  # the retry really ran again
    assert ota.active("model")[1]["version"] == "1.1.0"
    assert [state for _, state, _, _ in reports.items[before:]] == ["committed"]  # re-reported, not re-run


def test_an_agent_killed_mid_install_rolls_back_on_restart_and_says_so(tmp_path, server):
    reports = Reports()

    async def first_life():
        ota = manager(tmp_path, reports)
        await ota.handle_offer(offer(server, model_zip("1.1.0"), execution_id=1))
        await ota.wait()
        # Simulate a crash in the middle of installing 1.2.0: the journal says so.
        journal = {"execution_id": 2, "phase": "verifying", "kind": "model",
                   "previous": ota.active("model")[1], "new": {"slot": "A", "version": "1.2.0"}, "offer": {}}
        (tmp_path / "state" / "ota" / "journal.json").write_text(json.dumps(journal))
        (tmp_path / "state" / "ota" / "slots" / "model" / "active.json").write_text(
            json.dumps({"slot": "A", "version": "1.2.0"}))

    async def second_life():
        ota = manager(tmp_path, reports)
        await ota.resume()
        await ota.handle_offer({"execution_id": 2})  # a duplicate offer re-reports the outcome
        return ota

    run(first_life())
    ota = run(second_life())
    assert reports.items[-2][:2] == (2, "rolled_back") and reports.items[-2][3]["code"] == "interrupted"
    assert reports.items[-1][:2] == (2, "rolled_back")
    assert ota.active("model")[1]["version"] == "1.1.0"


def test_a_download_waiting_for_its_window_survives_a_restart(tmp_path, server):
    reports = Reports()
    now = P.now_ms()
    frame = offer(server, model_zip(), execution_id=5, window=(now + 300, now + 60_000))

    async def first_life():
        ota = manager(tmp_path, reports)
        await ota.handle_offer(frame)
        for _ in range(100):
            if "downloaded" in reports.states:
                break
            await asyncio.sleep(0.01)
        for task in ota.tasks.values():
            task.cancel()  # the agent dies while waiting for the window

    async def second_life():
        ota = manager(tmp_path, reports)
        await ota.resume()
        await ota.wait()
        return ota

    run(first_life())
    ota = run(second_life())
    assert reports.states[-3:] == ["installing", "verifying", "committed"]
    assert ota.active("model")[1]["version"] == "1.1.0"


def test_cancel_stops_an_execution_that_has_not_started_installing(tmp_path, server):
    reports = Reports()
    now = P.now_ms()

    async def scenario():
        ota = manager(tmp_path, reports)
        await ota.handle_offer(offer(server, model_zip(), execution_id=9, window=(now + 5000, now + 60_000)))
        for _ in range(100):
            if "downloaded" in reports.states:
                break
            await asyncio.sleep(0.01)
        await ota.handle_cancel({"type": "rollout.cancel", "execution_id": 9})
        return ota

    ota = run(scenario())
    assert "installing" not in reports.states and ota.active("model") == (None, {})


def test_the_default_self_test_runs_the_real_onnx_model(tmp_path):
    from agent_stub.ota import default_model_self_test

    slot = Path(tmp_path)
    with zipfile.ZipFile(io.BytesIO(model_zip())) as archive:
        archive.extractall(slot)
    assert default_model_self_test(slot, {}) is True
    (slot / "anomaly.onnx").write_bytes(b"garbage")
    assert default_model_self_test(slot, {}) is False
