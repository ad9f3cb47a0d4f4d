"""End-to-end: the real agent against the fake console in fakeserver.py, over loopback."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest

from agent_stub import keys
from agent_stub import protocol as P
from agent_stub.client import EXIT_CONFIG, EXIT_STOPPED_BY_SERVER, Agent, Config
from agent_stub.inference import AnomalyModel
from agent_stub.outbox import Outbox
from agent_stub.simulate import SimOptions, simulate
from tests.agent_stub.fakeserver import FakeServer, running

MODEL = AnomalyModel()


def run(scenario: Callable[[], Awaitable[Any]], timeout: float = 60) -> Any:
    return asyncio.run(asyncio.wait_for(scenario(), timeout))


def fast_agent(server: FakeServer, state_dir: Path | None, **kw: Any) -> Agent:
    """An agent that samples at 50 Hz and sends 10-point frames, with tiny backoffs."""
    kw.setdefault("enroll_token", "tok-1")
    config = kw.pop("config", None) or Config(sample_hz=50, batch_points=10, batch_s=0.1, fault_rate=0.0)
    return Agent(server.url, state_dir, config=config, model=MODEL, backoff_start=0.05, backoff_cap=0.2,
                 long_backoff_s=0.2, **kw)


def capture_emitted(agent: Agent) -> list[dict[str, Any]]:
    """Record every durable frame the agent produces (to prove nothing is lost)."""
    emitted: list[dict[str, Any]] = []
    original = agent.emit

    def emit(frame: dict[str, Any]) -> int | None:
        emitted.append(frame)
        return original(frame)

    agent.emit = emit  # type: ignore[method-assign]
    return emitted


def sensor_points(frames: list[dict[str, Any]]) -> list[tuple[int, str, float]]:
    return [tuple(p) for f in frames if f["type"] == "telemetry" for p in f["points"]  # type: ignore[misc]
            if p[1].startswith("sensor.")]


def assert_contiguous(stored: list[dict[str, Any]]) -> None:
    assert [f["seq"] for f in stored] == list(range(1, len(stored) + 1))


def test_agent_enrolls_then_authenticates_on_reconnect(tmp_path: Path) -> None:
    async def scenario() -> None:
        async with running() as server:
            agent = fast_agent(server, tmp_path / "dev")
            uid = agent.device_uid
            task = asyncio.create_task(agent.run())
            await server.wait_for(lambda: uid in server.devices and len(server.devices[uid].stored) >= 3)
            agent.stop()
            assert await task == 0
            assert server.handshakes == ["enroll"]
            assert json.loads((tmp_path / "dev" / "state.json").read_text()) == {"device_uid": uid, "enrolled": True}
            # The first durable frame after welcome describes the device.
            first = server.devices[uid].stored[0]
            assert first["type"] == "state"
            P.validate_state(first)

            again = fast_agent(server, tmp_path / "dev", enroll_token=None)
            assert again.device_uid == uid
            n = len(server.devices[uid].stored)
            task = asyncio.create_task(again.run())
            await server.wait_for(lambda: len(server.devices[uid].stored) >= n + 3)
            again.stop()
            assert await task == 0
            assert server.handshakes == ["enroll", "auth"]
            assert_contiguous(server.devices[uid].stored)
            assert server.closes[-1] == P.Close.NORMAL

    run(scenario)


def test_outbox_replays_after_dropped_connection_without_loss_duplicates_or_reordering(tmp_path: Path) -> None:
    async def scenario() -> None:
        async with running() as server:
            # First connection: frames are committed but never acked, then the TCP
            # connection is cut mid-stream (the 6th durable frame is never processed).
            server.ack = False
            server.drop_after = 5
            agent = fast_agent(server, tmp_path / "dev")
            emitted = capture_emitted(agent)
            uid = agent.device_uid
            task = asyncio.create_task(agent.run())
            await server.wait_for(lambda: len(server.closes) >= 1)
            committed_unacked = server.devices[uid].last_acked
            server.ack, server.drop_after = True, None
            await server.wait_for(lambda: len(server.devices[uid].stored) >= 40 and agent.outbox.in_flight_count == 0
                                  and len(server.closes) >= 1, timeout=20)
            agent.stop()
            assert await task == 0
            assert len(server.handshakes) >= 2
            assert server.closes[0] != P.Close.NORMAL  # a cut, not a clean close
            assert committed_unacked >= 5  # the server had committed frames the agent never saw acked
            stored = server.devices[uid].stored
            assert_contiguous(stored)
            delivered = sensor_points(stored)
            assert len(delivered) == len(set(delivered)), "a point was stored twice"
            for metric in ("sensor.vibration_rms", "sensor.temperature_c"):
                times = [t for t, name, _ in delivered if name == metric]
                assert times == sorted(times), "points arrived out of order"
            # Whatever was not delivered is still on disk: nothing is lost.
            leftover = Outbox(tmp_path / "dev" / "outbox.sqlite")
            pending = [json.loads(f.text) for f in leftover.resume_from(server.devices[uid].last_acked)]
            leftover.close()
            assert sorted(delivered + sensor_points(pending)) == sorted(sensor_points(emitted))

    run(scenario)


def test_seq_gap_makes_the_agent_resend_from_expected(tmp_path: Path) -> None:
    async def scenario() -> None:
        async with running() as server:
            server.gap_once_at = 3
            agent = fast_agent(server, tmp_path / "dev")
            uid = agent.device_uid
            task = asyncio.create_task(agent.run())
            await server.wait_for(lambda: uid in server.devices and len(server.devices[uid].stored) >= 20)
            agent.stop()
            assert await task == 0
            stored = server.devices[uid].stored
            assert_contiguous(stored)
            delivered = sensor_points(stored)
            assert len(delivered) == len(set(delivered))
            assert server.gap_once_at is None  # the gap was really sent
            assert agent.stats.errors >= 1  # ... and received
            assert len(server.handshakes) == 1  # recovered in-session, no reconnect

    run(scenario)


@pytest.mark.parametrize(("code", "words"), [(P.Close.AUTH_FAILED, "authentication failed"),
                                             (P.Close.REVOKED, "revoked")])
def test_auth_failure_and_revocation_stop_the_agent(tmp_path: Path, code: int, words: str) -> None:
    async def scenario() -> None:
        async with running() as server:
            server.close_on_auth = code
            agent = fast_agent(server, tmp_path / "dev", enroll_token=None)
            agent.enrolled = True  # as if enrolled earlier
            assert await agent.run() == EXIT_STOPPED_BY_SERVER
            assert words in agent.exit_message
            assert server.handshakes == ["auth"]  # no retry

    run(scenario)


def test_unknown_device_gets_4401_and_stops(tmp_path: Path) -> None:
    async def scenario() -> None:
        async with running() as server:
            agent = fast_agent(server, tmp_path / "dev", enroll_token=None)
            agent.enrolled = True
            assert await agent.run() == EXIT_STOPPED_BY_SERVER
            assert "unknown device" in agent.exit_message

    run(scenario)


def test_unenrolled_agent_without_token_exits_with_a_clear_message(tmp_path: Path) -> None:
    async def scenario() -> None:
        async with running() as server:
            agent = fast_agent(server, tmp_path / "dev", enroll_token=None)
            assert await agent.run() == EXIT_CONFIG
            assert "--enroll-token" in agent.exit_message
            assert server.handshakes == []

    run(scenario)


def test_pending_device_sends_only_heartbeats_until_approved(tmp_path: Path) -> None:
    async def scenario() -> None:
        async with running() as server:
            server.status_for_new = "pending"
            agent = fast_agent(server, tmp_path / "dev")
            uid = agent.device_uid
            task = asyncio.create_task(agent.run())
            await server.wait_for(lambda: len(server.frames("heartbeat", uid)) >= 1)
            await asyncio.sleep(0.5)
            assert {f["type"] for f in server.received} == {"heartbeat"}
            assert agent.outbox.buffered > 0  # telemetry kept on disk meanwhile
            await server.approve(uid)
            await server.wait_for(lambda: len(server.devices[uid].stored) >= 5)
            agent.stop()
            await task
            stored = server.devices[uid].stored
            assert_contiguous(stored)
            # The backlog from the pending period comes first, then the state frame.
            assert any(f["type"] == "state" for f in stored)

    run(scenario)


def test_attest_challenge_is_answered_with_signed_software_claims(tmp_path: Path) -> None:
    async def scenario() -> None:
        async with running() as server:
            agent = fast_agent(server, tmp_path / "dev")
            uid = agent.device_uid
            task = asyncio.create_task(agent.run())
            await server.wait_for(lambda: uid in server.connections)
            nonce = b"n" * 32
            await server.send(uid, P.attest_challenge("ch-1", nonce, P.now_ms() + 60_000))
            await server.wait_for(lambda: len(server.frames("attest.evidence", uid)) == 1)
            agent.stop()
            await task
            evidence = P.validate_attest_evidence(server.frames("attest.evidence", uid)[0])
            assert evidence.format == "software-claims"
            assert evidence.challenge_id == "ch-1"
            assert evidence.model_sha256 == MODEL.sha256
            assert keys.verify(server.devices[uid].public_key, evidence.sig, P.claims_message(nonce, evidence.claims))

    run(scenario)


def test_commands_get_durable_results_and_reboot_reconnects(tmp_path: Path) -> None:
    async def scenario() -> None:
        async with running() as server:
            agent = fast_agent(server, tmp_path / "dev")
            uid = agent.device_uid
            task = asyncio.create_task(agent.run())
            await server.wait_for(lambda: uid in server.connections)
            for cid, name, args in [(1, "sync_state", {}), (2, "set_config", {"batch_points": 7}),
                                    (3, "set_config", {"bogus": 1}), (4, "dance", {}), (5, "reboot", {})]:
                await server.send(uid, P.command(cid, name, args))
            await server.send(uid, P.command(5, "reboot", {}))  # a resend must not reboot twice

            def results() -> dict[Any, dict[str, Any]]:
                return {f["command_id"]: f for f in server.devices[uid].stored if f["type"] == "command.result"}

            await server.wait_for(lambda: len(results()) == 5 and len(server.handshakes) >= 2)
            await asyncio.sleep(0.3)
            agent.stop()
            await task
            r = results()
            assert [r[i]["ok"] for i in range(1, 6)] == [True, True, False, False, True]
            assert agent.config.batch_points == 7
            assert "bogus" in r[3]["output"]
            assert server.handshakes == ["enroll", "auth"]  # exactly one simulated reboot
            assert json.loads((tmp_path / "dev" / "config.json").read_text())["batch_points"] == 7
            assert_contiguous(server.devices[uid].stored)

    run(scenario)


def test_an_offer_signed_by_an_untrusted_key_is_rejected_as_signature_invalid(tmp_path: Path) -> None:
    async def scenario() -> None:
        async with running() as server:
            agent = fast_agent(server, tmp_path / "dev")
            uid = agent.device_uid
            task = asyncio.create_task(agent.run())
            await server.wait_for(lambda: uid in server.connections)
            await server.send(uid, P.rollout_offer(
                "ex-9", name="anomaly", kind="model", version="2.0.0", url="https://x/a", sha256="0" * 64, size=1,
                manifest=b"{}", signature=b"s" * 64, key_id="k1", deadline=P.now_ms() + 60_000))
            await server.send(uid, {"type": "something.new", "x": 1})  # ignored, no crash

            def statuses() -> list[dict[str, Any]]:
                return [f for f in server.devices[uid].stored if f["type"] == "rollout.status"]

            await server.wait_for(lambda: len(statuses()) == 1)
            agent.stop()
            await task
            status = P.validate_rollout_status(statuses()[0])
            assert (status.execution_id, status.state) == ("ex-9", "rejected")
            assert status.error is not None and status.error.code == "signature_invalid"

    run(scenario)


def test_simulator_runs_independent_devices_sharing_one_model() -> None:
    async def scenario() -> None:
        async with running() as server:
            opts = SimOptions(server.url, devices=4, rate=100, batch=10, enroll_token="tok-1", state_dir=None,
                              duration=2.0, ramp_s=0.2, fault_rate=0.0, backoff_start=0.05, backoff_cap=0.2)
            out = _Sink()
            stats = await simulate(opts, out=out)  # type: ignore[arg-type]
            assert stats.welcomed == 4
            assert len(server.devices) == 4
            assert stats.acked_points > 0
            assert "connected" in out.text
            for device in server.devices.values():
                assert_contiguous(device.stored)

    run(scenario)


class _Sink:
    def __init__(self) -> None:
        self.text = ""

    def write(self, s: str) -> None:
        self.text += s

    def flush(self) -> None:
        pass


def test_close_codes_map_to_the_contracts_actions(tmp_path: Path) -> None:
    from agent_stub.client import AgentStop, _Outcome

    agent = Agent("ws://127.0.0.1:9/", None, model=MODEL, backoff_start=1.0, backoff_cap=300.0, long_backoff_s=60.0)
    for code in (P.Close.AUTH_FAILED, P.Close.REVOKED):
        with pytest.raises(AgentStop):
            agent._delay_after(_Outcome(code=code), 0)
    assert agent._delay_after(_Outcome(code=P.Close.REPLACED), 0) >= 60.0
    assert agent._delay_after(_Outcome(code=P.Close.PROTOCOL_ERROR), 0) >= 60.0
    agent._retry_after_s = 42.0
    assert agent._delay_after(_Outcome(code=P.Close.RATE_LIMITED), 0) >= 42.0
    for code in (P.Close.NORMAL, P.Close.GOING_AWAY, P.Close.HANDSHAKE_TIMEOUT, P.Close.OVERLOADED, 1006, None):
        assert 0.0 <= agent._delay_after(_Outcome(code=code), 3) <= 8.0  # full jitter: [0, 1 s * 2**3]
    assert max(agent._delay_after(_Outcome(code=1006), 40) for _ in range(200)) <= 300.0  # the cap
    before = agent.config.batch_points
    agent._delay_after(_Outcome(code=P.Close.TOO_LARGE), 0)
    assert agent.config.batch_points == before // 2
    agent.outbox.close()


def test_sigterm_stops_the_cli_agent_cleanly_with_close_1000(tmp_path: Path) -> None:
    import signal
    import sys

    async def scenario() -> None:
        async with running() as server:
            proc = await asyncio.create_subprocess_exec(
                sys.executable, "-m", "agent_stub", "run", "--server", server.url, "--state-dir",
                str(tmp_path / "dev"), "--enroll-token", "tok-1",
                cwd=Path(__file__).resolve().parents[2], stderr=asyncio.subprocess.PIPE)
            await server.wait_for(lambda: len(server.frames("heartbeat")) >= 1, timeout=30)
            proc.send_signal(signal.SIGTERM)
            _, stderr = await asyncio.wait_for(proc.communicate(), 30)
            assert proc.returncode == 0, stderr.decode()
            await server.wait_for(lambda: len(server.closes) == 1)
            assert server.closes == [P.Close.NORMAL]
            assert (tmp_path / "dev" / "outbox.sqlite").exists()
            assert not (tmp_path / "dev" / "outbox.sqlite-wal").exists() or \
                (tmp_path / "dev" / "outbox.sqlite-wal").stat().st_size == 0  # checkpointed

    run(scenario)


def test_a_configured_heartbeat_longer_than_the_servers_is_capped_at_the_servers(tmp_path: Path) -> None:
    # The server closes connections silent for 3 of its heartbeat intervals (1 s here), so an
    # operator's set_config of a slow heartbeat must not make the agent look dead.
    async def scenario() -> tuple[float, float, int]:
        async with running() as server:
            agent = fast_agent(server, tmp_path / "dev")
            uid = agent.device_uid
            task = asyncio.create_task(agent.run())
            await server.wait_for(lambda: uid in server.connections)
            await server.send(uid, P.command(1, "set_config", {"heartbeat_s": 600}))
            await server.wait_for(lambda: agent.config.heartbeat_s == 600)
            before = len(server.frames("heartbeat", uid))
            await asyncio.sleep(2.5)
            after = len(server.frames("heartbeat", uid))
            agent.stop()
            await task
            return agent.config.heartbeat_s, agent.heartbeat_s, after - before

    configured, effective, sent = run(scenario)
    assert (configured, effective) == (600, 1.0)
    assert sent >= 2
