"""The device agent: one WebSocket to the console, speaking protocol v1.

Owns the agent's behaviour on the wire: the handshake (enroll on first contact, auth
after), the durable uplink (outbox replay from ``last_acked_seq + 1``, a window of frames
in flight, acks, ``seq_gap`` resends, ``rate_limited`` pauses), heartbeats, telemetry and
anomaly events from the sensor stream and the model, ``state`` on connect, attestation
(software claims; a TPM through ``agent_stub.tpm`` when ``tpm_spec`` is given), commands,
and what each close code means (stop, back off, reconnect with full-jitter backoff).

Every frame is built with ``agent_stub.protocol``.  Rollout offers go to ``self.ota``, an
object with ``on_offer``/``on_cancel`` (see ``OtaHandler``); the default one rejects
every offer with ``not_supported`` until ``ota.py`` exists.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import hashlib
import json
import logging
import os
import platform
import random
import secrets
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol
from urllib.parse import urlsplit

import numpy as np
import psutil
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed, InvalidHandshake, InvalidURI

from agent_stub import keys
from agent_stub import protocol as P
from agent_stub.inference import AnomalyModel, BatchScorer, ModelError
from agent_stub.outbox import Outbox
from agent_stub.sensors import METRICS, WINDOW, SensorStream, seed_for

log = logging.getLogger(__name__)

AGENT_VERSION = "0.1.0"
# WebSocket keepalive: a ping every 2 minutes finds a dead server within ~150 s. The server does not
# ping (the heartbeats tell it the agent is alive; docs/protocol.md "Keepalive") but answers these:
# at 10,000 agents a ping a minute was 1.5 % of a core of the 10 % budget (docs/deploy.md, sizing).
PING_INTERVAL_S, PING_TIMEOUT_S = 120, 30
PACKAGE_DIR = Path(__file__).resolve().parent
STATE_FILE = "state.json"
CONFIG_FILE = "config.json"
OUTBOX_FILE = "outbox.sqlite"
EXIT_OK = 0
EXIT_STOPPED_BY_SERVER = 2
EXIT_CONFIG = 3
# Frames numbered and sent but not yet acked; beyond this the agent waits for acks, which
# paces replay after a long outage instead of flooding the server (and its rate limit).
DEFAULT_WINDOW = 64
MAX_COMMAND_OUTPUT = 16 * 1024
# Hysteresis: an anomaly event fires when the score crosses the threshold and re-arms
# only once the score is back below this share of it, so one fault is one event.
REARM_RATIO = 0.8


class AgentStop(Exception):
    """The agent must stop and not retry (operator action needed)."""

    def __init__(self, message: str, exit_code: int = EXIT_STOPPED_BY_SERVER) -> None:
        super().__init__(message)
        self.exit_code = exit_code


class OtaHandler(Protocol):
    """What the agent needs from an OTA implementation."""

    async def on_offer(self, agent: Agent, frame: dict[str, Any]) -> None: ...

    async def on_cancel(self, agent: Agent, frame: dict[str, Any]) -> None: ...


class RejectingOta:
    """Placeholder OTA: every offer is answered ``rejected`` / ``not_supported``."""

    async def on_offer(self, agent: Agent, frame: dict[str, Any]) -> None:
        execution_id = frame.get("execution_id")
        if type(execution_id) not in (str, int):
            log.warning("%s: rollout.offer without a usable execution_id ignored", agent.device_uid)
            return
        agent.emit(P.rollout_status(None, execution_id, "rejected", 0, P.rollout_error(
            "not_supported", retryable=False, detail="this agent build does not install updates")))

    async def on_cancel(self, agent: Agent, frame: dict[str, Any]) -> None:
        log.info("%s: rollout.cancel for %r (nothing in progress)", agent.device_uid, frame.get("execution_id"))


class ManagedOta:
    """OTA through ``agent_stub.ota.OtaManager``: signature, digest, A/B install, self-test,
    health window, rollback; progress becomes durable ``rollout.status`` frames. A committed
    model is loaded into the running agent."""

    def __init__(self, agent: Agent) -> None:
        from agent_stub.ota import OtaManager

        self.agent = agent
        self.manager = OtaManager(agent.state_dir, {}, report=self._report, install_hook=self._install)

    async def _report(self, execution_id: Any, state: str, progress: int, error: dict[str, Any] | None) -> None:
        self.agent.emit(P.rollout_status(None, execution_id, state, progress, error))

    def _install(self, slot: Path | None, manifest: dict[str, Any]) -> None:
        if manifest.get("kind") != "model":
            return
        if slot is None:  # rolled back from the first install: the shipped model again
            self.agent.model = AnomalyModel()
            return
        models = sorted(slot.glob("*.onnx"))
        if models:
            self.agent.model = AnomalyModel(models[0])
            if self.agent.scorer is None:
                log.info("%s: now running model %s", self.agent.device_uid, self.agent.model.version)

    def load_active(self) -> None:
        """At start-up: run the model the OTA slots say is installed (not the shipped one), so
        what ``state`` reports and what scores telemetry is what is on disk."""
        slot, record = self.manager.active("model")
        if slot is None or not slot.is_dir():
            return
        try:
            self._install(slot, {"kind": "model", **record})
        except ModelError as exc:
            log.error("%s: the installed model in %s does not load (%s); running the shipped one",
                      self.agent.device_uid, slot, exc)

    def trust(self, keys: list[dict[str, Any]]) -> None:
        trusted = {}
        for key in keys:
            with contextlib.suppress(P.ProtocolError, KeyError, TypeError):
                trusted[str(key["key_id"])] = P.b64d(key["public_key"])
        self.manager.set_trusted_keys(trusted)

    async def on_offer(self, agent: Agent, frame: dict[str, Any]) -> None:
        await self.manager.handle_offer(frame)

    async def on_cancel(self, agent: Agent, frame: dict[str, Any]) -> None:
        await self.manager.handle_cancel(frame)


@dataclass
class Stats:
    """Counters shared by the agents of one process (the simulator prints them)."""

    connected: int = 0
    welcomed: int = 0
    acked_frames: int = 0
    acked_points: int = 0
    rejected_points: int = 0
    errors: int = 0
    connect_failures: int = 0
    closes: collections.Counter[int] = field(default_factory=collections.Counter)


# --- facts about this machine and this agent ------------------------------------------
_cache: dict[str, Any] = {}


def agent_sha256() -> str:
    """SHA-256 over the agent's Python sources (relative path and content digest, sorted)."""
    if "agent_sha256" not in _cache:
        digest = hashlib.sha256()
        for path in sorted(PACKAGE_DIR.rglob("*.py")):
            if "__pycache__" in path.parts:
                continue
            rel = path.relative_to(PACKAGE_DIR).as_posix()
            digest.update(rel.encode() + b"\x00" + hashlib.sha256(path.read_bytes()).digest())
        _cache["agent_sha256"] = digest.hexdigest()
    return _cache["agent_sha256"]


def boot_id() -> str:
    """The kernel's boot id (changes on every reboot), or a per-process stand-in."""
    if "boot_id" not in _cache:
        try:
            _cache["boot_id"] = Path("/proc/sys/kernel/random/boot_id").read_text().strip()[:64]
        except OSError:
            _cache["boot_id"] = "process-" + secrets.token_hex(8)
    return _cache["boot_id"]


def _gpu_runtime() -> bool:
    """Whether an installed onnxruntime has a GPU execution provider, found by its provider
    libraries rather than by importing it (the numpy backend must not pay ~20 MB for this)."""
    import importlib.util

    spec = importlib.util.find_spec("onnxruntime")
    if spec is None or not spec.submodule_search_locations:
        return False
    capi = Path(next(iter(spec.submodule_search_locations))) / "capi"
    return any(next(capi.glob(f"libonnxruntime_providers_{name}.*"), None) is not None
               for name in ("cuda", "rocm", "tensorrt", "migraphx"))


def capabilities(storage_path: str | Path | None = None) -> dict[str, Any]:
    """``state.capabilities`` from psutil/platform (computed once per process)."""
    if "caps" not in _cache:
        try:
            storage = psutil.disk_usage(str(storage_path or "/")).total // (1024 * 1024)
        except OSError:
            storage = 0
        _cache["caps"] = {
            "cpu_cores": psutil.cpu_count() or 1,
            "ram_mb": psutil.virtual_memory().total // (1024 * 1024),
            "accelerator": "gpu" if _gpu_runtime() else "none",
            "storage_mb": storage,
            "arch": platform.machine()[:64] or "unknown",
            "os": f"{platform.system()} {platform.release()}"[:256],
        }
    return dict(_cache["caps"])


class _SystemSampler:
    """System metrics sampled at most once a second for the whole process (the simulator
    would otherwise make thousands of identical syscalls)."""

    def __init__(self) -> None:
        self._at = 0.0
        self._values = (0.0, 0.0)
        self._proc = psutil.Process()
        psutil.cpu_percent(None)  # primes the counter; the first reading is meaningless

    def read(self) -> tuple[float, float]:
        now = time.monotonic()
        if now - self._at >= 1.0:
            self._at = now
            self._values = (float(psutil.cpu_percent(None)), self._proc.memory_info().rss / (1024 * 1024))
        return self._values


_system: _SystemSampler | None = None


def system_metrics() -> tuple[float, float]:
    """``(system.cpu_percent, system.mem_rss_mb)``."""
    global _system
    if _system is None:
        _system = _SystemSampler()
    return _system.read()


def full_jitter(attempt: int, start: float, cap: float) -> float:
    """Backoff delay: uniform in ``[0, min(cap, start * 2**attempt)]`` ("full jitter")."""
    return random.uniform(0.0, min(cap, start * (2 ** min(attempt, 30))))


# --- the agent -------------------------------------------------------------------------
@dataclass
class _Outcome:
    code: int | None = None  # close code, None when no WebSocket was established
    reason: str = ""
    welcomed: bool = False
    error: str = ""


@dataclass
class Config:
    """Runtime settings an operator may change with ``set_config`` (persisted)."""

    sample_hz: float = 1.0
    batch_points: int = 100
    batch_s: float = 5.0
    heartbeat_s: float | None = None  # None: whatever the server's welcome says
    fault_rate: float = 0.002
    log_level: str | None = None

    LIMITS = {
        "sample_hz": (0.01, 100.0), "batch_points": (1, P.MAX_POINTS), "batch_s": (0.1, 300.0),
        "heartbeat_s": (1.0, 3600.0), "fault_rate": (0.0, 1.0),
    }

    def apply(self, changes: dict[str, Any]) -> str:
        """Validate every key first, then apply all of them; raises ValueError naming the
        first bad key (nothing is applied then). Returns a summary."""
        staged: dict[str, Any] = {}
        for key, value in changes.items():
            if key == "log_level":
                if value not in ("DEBUG", "INFO", "WARNING", "ERROR"):
                    raise ValueError("log_level must be DEBUG, INFO, WARNING or ERROR")
                staged[key] = value
                continue
            if key not in self.LIMITS:
                raise ValueError(f"unknown setting {key!r} (known: {sorted([*self.LIMITS, 'log_level'])})")
            lo, hi = self.LIMITS[key]
            if type(value) not in (int, float) or not lo <= value <= hi:
                raise ValueError(f"{key} must be a number in {lo}..{hi}")
            staged[key] = int(value) if key == "batch_points" else float(value)
        for key, value in staged.items():
            setattr(self, key, value)
        return ", ".join(f"{k}={v}" for k, v in staged.items()) or "nothing to change"

    def to_dict(self) -> dict[str, Any]:
        return {k: getattr(self, k) for k in ("sample_hz", "batch_points", "batch_s", "heartbeat_s",
                                              "fault_rate", "log_level")}


class Agent:
    """One device.

    ``state_dir=None`` keeps key, identity and outbox in memory (simulator benchmarks);
    otherwise they live in ``state_dir`` (``device_key.pem``, ``state.json``,
    ``outbox.sqlite``, ``config.json``).  ``scorer`` lets several agents share one
    ``BatchScorer``; by default the agent loads ``model`` (or the shipped one) itself.
    """

    def __init__(
        self,
        server_url: str,
        state_dir: str | Path | None,
        *,
        enroll_token: str | None = None,
        device_uid: str | None = None,
        uid_prefix: str = "dev-",
        model: AnomalyModel | None = None,
        scorer: BatchScorer | None = None,
        outbox: Outbox | None = None,
        config: Config | None = None,
        backoff_start: float = 1.0,
        backoff_cap: float = 300.0,
        long_backoff_s: float = 60.0,
        window: int = DEFAULT_WINDOW,
        ack_timeout_s: float = 30.0,
        tpm_spec: str | None = None,
        sensor_seed: int | None = None,
        stats: Stats | None = None,
        hardware: dict[str, Any] | None = None,
        handshake_timeout_s: float = P.HANDSHAKE_TIMEOUT_S + 5,
        open_timeout_s: float = 10.0,
        proxy: str | bool | None = None,
    ) -> None:
        self.server_url = server_url
        self.state_dir = Path(state_dir) if state_dir is not None else None
        self.enroll_token = enroll_token
        self.backoff_start = backoff_start
        self.backoff_cap = backoff_cap
        self.long_backoff_s = long_backoff_s
        self.window = window
        self.ack_timeout_s = ack_timeout_s
        self.tpm_spec = tpm_spec
        self.stats = stats or Stats()
        self.hardware = hardware
        self.handshake_timeout_s = handshake_timeout_s
        self.open_timeout_s = open_timeout_s
        host = urlsplit(server_url).hostname or ""
        # websockets honours *_PROXY variables by default; loopback never goes through one.
        self.proxy = proxy if proxy is not None else (None if host in ("127.0.0.1", "localhost", "::1") else True)
        # Installing updates needs somewhere to keep the A/B slots: in-memory agents (the
        # simulator's benchmark mode) refuse offers instead.
        self.ota: OtaHandler = ManagedOta(self) if self.state_dir is not None else RejectingOta()
        self.exit_code = EXIT_OK
        self.exit_message = ""

        self.key, self.device_uid, self.enrolled = self._load_identity(device_uid, uid_prefix)
        self.public_key = keys.public_bytes(self.key)
        self.config = config or self._load_config()
        self.model = model if model is not None else (scorer.model if scorer is not None else AnomalyModel())
        self.scorer = scorer
        if outbox is None:
            outbox = Outbox(self.state_dir / OUTBOX_FILE if self.state_dir is not None else ":memory:")
        self.outbox = outbox
        seed = sensor_seed if sensor_seed is not None else seed_for(self.device_uid)
        self.sensors = SensorStream(seed, fault_rate=self.config.fault_rate)
        self.tpm: Any = None

        self._stop = asyncio.Event()
        self._wake = asyncio.Event()
        self._ws: ClientConnection | None = None
        self._active = False  # welcomed with status active/quarantined: durable uplink open
        self.status: str | None = None
        self._epoch = 0  # bumped on every renumbering; a sender loop of an old epoch stops
        self._pause_until = 0.0
        self._last_ack_at = time.monotonic()
        self._resend_in_flight = False
        self._retry_after_s = 0.0
        self._last_error: dict[str, Any] | None = None
        self._reconnect_now = False
        self._started = time.monotonic()
        self._seen_commands: collections.OrderedDict[Any, None] = collections.OrderedDict()
        self._points: list[list[Any]] = []
        self._last_flush = time.monotonic()
        self._in_anomaly = False
        self.server_heartbeat_s: float | None = None  # announced in the last welcome
        self.heartbeat_s = float(self.config.heartbeat_s or 30)
        self.max_points = P.MAX_POINTS
        self.on_frame: Callable[[dict[str, Any]], Awaitable[None] | None] | None = None  # test hook

    # --- identity, config ----------------------------------------------------------------
    def _load_identity(self, device_uid: str | None, uid_prefix: str) -> tuple[Any, str, bool]:
        if self.state_dir is None:
            return keys.generate(), device_uid or f"{uid_prefix}{secrets.token_hex(6)}", False
        self.state_dir.mkdir(parents=True, exist_ok=True)
        key, _ = keys.load_or_create(self.state_dir / keys.KEY_FILE)
        state_path = self.state_dir / STATE_FILE
        state = json.loads(state_path.read_text()) if state_path.exists() else {}
        uid = state.get("device_uid")
        if uid and device_uid and uid != device_uid:
            raise AgentStop(f"{self.state_dir} belongs to device {uid!r}, not {device_uid!r}; use another --state-dir",
                            EXIT_CONFIG)
        uid = uid or device_uid or f"{uid_prefix}{secrets.token_hex(6)}"
        if P.DEVICE_UID_RE.fullmatch(uid) is None or len(uid) > P.DEVICE_UID_MAX:
            raise AgentStop(f"device uid {uid!r} is not valid (letters, digits, . _ : -)", EXIT_CONFIG)
        if not state:
            self._save_state({"device_uid": uid, "enrolled": False}, state_path)
        return key, uid, bool(state.get("enrolled"))

    def _save_state(self, state: dict[str, Any], path: Path | None = None) -> None:
        if self.state_dir is None:
            return
        path = path or self.state_dir / STATE_FILE
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text(json.dumps(state, indent=2) + "\n")
        os.replace(tmp, path)

    def _load_config(self) -> Config:
        config = Config()
        if self.state_dir is not None and (self.state_dir / CONFIG_FILE).exists():
            try:
                saved = json.loads((self.state_dir / CONFIG_FILE).read_text())
                config.apply({k: v for k, v in saved.items() if v is not None})
            except (ValueError, OSError) as exc:
                log.warning("%s: ignoring unreadable %s: %s", self.state_dir, CONFIG_FILE, exc)
        return config

    def _save_config(self) -> None:
        if self.state_dir is not None:
            (self.state_dir / CONFIG_FILE).write_text(json.dumps(self.config.to_dict(), indent=2) + "\n")

    # --- public control ------------------------------------------------------------------
    def stop(self) -> None:
        """Ask the agent to stop: close with 1000, flush the outbox, return from ``run``."""
        self._stop.set()

    @property
    def connected(self) -> bool:
        """Whether a session is open and welcomed."""
        return self._ws is not None and self.status is not None

    def emit(self, frame: dict[str, Any]) -> int | None:
        """Queue a durable frame (written to the outbox now, sent when possible)."""
        row = self.outbox.append(frame)
        self._wake.set()
        return row

    async def send(self, frame: dict[str, Any]) -> bool:
        """Send a non-durable frame now if connected; False if it could not be sent."""
        ws = self._ws
        if ws is None:
            return False
        try:
            await ws.send(P.dumps(frame))
        except ConnectionClosed:
            return False
        return True

    async def run(self) -> int:
        """Connect, reconnect and work until stopped; returns the process exit code."""
        if not self.enrolled and not self.enroll_token:
            # Known before the first connection attempt: say so now instead of retrying.
            self.exit_code = EXIT_CONFIG
            self.exit_message = (f"device {self.device_uid} is not enrolled yet: start it once with --enroll-token")
            log.error("%s: %s", self.device_uid, self.exit_message)
            self.outbox.close()
            return self.exit_code
        if self.tpm_spec:
            try:
                await self._open_tpm()
            except AgentStop as stop:
                self.exit_code, self.exit_message = stop.exit_code, str(stop)
                log.error("%s: %s", self.device_uid, stop)
                self.outbox.close()
                return self.exit_code
        if isinstance(self.ota, ManagedOta):
            await self.ota.manager.resume()  # finish or roll back an install a crash interrupted
            if self.scorer is None:
                self.ota.load_active()
        producer = asyncio.create_task(self._produce(), name=f"produce-{self.device_uid}")
        attempt = 0
        try:
            while not self._stop.is_set():
                outcome = await self._connect_once()
                if self._stop.is_set():
                    break
                if outcome.welcomed:
                    attempt = 0
                try:
                    delay = self._delay_after(outcome, attempt)
                except AgentStop as stop:
                    self.exit_code, self.exit_message = stop.exit_code, str(stop)
                    log.error("%s: stopping: %s", self.device_uid, stop)
                    break
                attempt += 1
                if delay > 0:
                    log.info("%s: reconnecting in %.1fs (close %s %s)", self.device_uid, delay, outcome.code,
                             outcome.reason or outcome.error)
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(self._stop.wait(), delay)
        except AgentStop as stop:
            self.exit_code, self.exit_message = stop.exit_code, str(stop)
            log.error("%s: stopping: %s", self.device_uid, stop)
        finally:
            self._stop.set()
            producer.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await producer
            self._flush_points()  # points sampled since the last frame go to disk too
            self.outbox.close()
        return self.exit_code

    # --- connection lifecycle ------------------------------------------------------------
    def _delay_after(self, outcome: _Outcome, attempt: int) -> float:
        """Seconds to wait before the next attempt; raises AgentStop for 4401/4403."""
        code = outcome.code
        detail = (self._last_error or {}).get("message") or outcome.reason
        jitter = full_jitter(attempt, self.backoff_start, self.backoff_cap)
        if code == P.Close.AUTH_FAILED:
            raise AgentStop(f"authentication failed (4401: {detail or 'no reason given'}); "
                            "an operator must re-enroll or re-approve this device")
        if code == P.Close.REVOKED:
            raise AgentStop(f"device revoked or decommissioned (4403: {detail or 'no reason given'})")
        if self._reconnect_now:
            self._reconnect_now = False
            return 0.0
        if code == P.Close.REPLACED:
            # Another connection for this device won; fighting it would flap both forever.
            return max(self.long_backoff_s, jitter)
        if code == P.Close.PROTOCOL_ERROR:
            return max(self.long_backoff_s, jitter)
        if code == P.Close.RATE_LIMITED:
            return max(self._retry_after_s, jitter, self.backoff_start)
        if code == P.Close.TOO_LARGE:
            self.config.batch_points = max(1, self.config.batch_points // 2)
            log.warning("%s: server said frame too large; batches halved to %d points", self.device_uid,
                        self.config.batch_points)
        return jitter

    async def _connect_once(self) -> _Outcome:
        outcome = _Outcome()
        self._last_error = None
        self._retry_after_s = 0.0
        try:
            async with connect(self.server_url, compression=None, open_timeout=self.open_timeout_s,
                               max_size=4 * P.MAX_FRAME_BYTES, proxy=self.proxy, close_timeout=5,
                               ping_interval=PING_INTERVAL_S, ping_timeout=PING_TIMEOUT_S,
                               user_agent_header=f"fleet-agent/{AGENT_VERSION}") as ws:
                self._ws = ws
                try:
                    await self._handshake(ws, outcome)
                    await self._session(ws)
                except (ConnectionClosed, TimeoutError, P.ProtocolError) as exc:
                    if isinstance(exc, TimeoutError):
                        outcome.error = "handshake timed out"
                        await ws.close(P.Close.NORMAL, "handshake timeout")
                    elif isinstance(exc, P.ProtocolError):
                        outcome.error = f"server sent a bad frame: {exc}"
                        await ws.close(P.Close.PROTOCOL_ERROR, "bad frame from server")
            outcome.code = ws.close_code
            outcome.reason = ws.close_reason or ""
        except AgentStop:
            raise
        except (OSError, InvalidURI, InvalidHandshake, TimeoutError) as exc:
            self.stats.connect_failures += 1
            outcome.error = f"{type(exc).__name__}: {exc}"
            log.info("%s: cannot connect to %s: %s", self.device_uid, self.server_url, outcome.error)
        except Exception as exc:  # a bug in one session must not end the agent
            self.stats.errors += 1
            outcome.error = f"{type(exc).__name__}: {exc}"
            log.exception("%s: session failed", self.device_uid)
        finally:
            if self.status is not None:
                self.stats.connected -= 1
            self._ws = None
            self._active = False
            self.status = None
            self.outbox.set_online(False)
        if outcome.code is not None:
            self.stats.closes[outcome.code] += 1
        return outcome

    async def _recv_frame(self, ws: ClientConnection, deadline: float) -> dict[str, Any]:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise TimeoutError
        raw = await asyncio.wait_for(ws.recv(), remaining)
        return P.parse_frame(raw)

    async def _handshake(self, ws: ClientConnection, outcome: _Outcome) -> None:
        deadline = time.monotonic() + self.handshake_timeout_s
        proto, nonce, _ = P.validate_hello(await self._recv_frame(ws, deadline))
        if proto != P.PROTOCOL_VERSION:
            raise P.ProtocolError("bad_frame", f"server speaks protocol {proto}, this agent {P.PROTOCOL_VERSION}")
        sig = keys.sign(self.key, P.auth_message(nonce, self.device_uid))
        if self.enrolled:
            await ws.send(P.dumps(P.auth(self.device_uid, sig, AGENT_VERSION)))
        elif self.enroll_token:
            # Re-sent until a welcome arrives: if we crashed after the server accepted an
            # enroll, the server sees the same uid and key again (its call to accept).
            await ws.send(P.dumps(P.enroll(self.enroll_token, self.device_uid, self.public_key, sig,
                                           hardware=self._hardware(), tpm=await self._tpm_info(),
                                           agent_version=AGENT_VERSION)))
        else:
            raise AgentStop(f"device {self.device_uid} is not enrolled yet: start it once with --enroll-token",
                            EXIT_CONFIG)
        while True:
            frame = await self._recv_frame(ws, deadline)
            kind = frame["type"]
            if kind == "welcome":
                await self._on_welcome(ws, frame)
                outcome.welcomed = True
                return
            if kind == "tpm.credential":
                await self._on_tpm_credential(ws, frame)
            elif kind == "error":
                self._on_error_frame(frame)
            else:
                log.info("%s: ignoring %r during the handshake", self.device_uid, kind)

    def _hardware(self) -> dict[str, Any]:
        if self.hardware is not None:
            return dict(self.hardware)
        caps = capabilities(self.state_dir)
        return {"arch": caps["arch"], "os": caps["os"], "cpu_cores": caps["cpu_cores"], "ram_mb": caps["ram_mb"],
                "hostname": platform.node()[:64]}

    async def _session(self, ws: ClientConnection) -> None:
        tasks = [
            asyncio.create_task(self._receive(ws)),
            asyncio.create_task(self._sender(ws)),
            asyncio.create_task(self._heartbeats(ws)),
        ]
        stop_wait = asyncio.create_task(self._stop.wait())
        try:
            done, _ = await asyncio.wait([*tasks, stop_wait], return_when=asyncio.FIRST_COMPLETED)
            if stop_wait in done:
                await ws.close(P.Close.NORMAL, "agent stopping")
            for task in done:
                if task is not stop_wait and not task.cancelled() and task.exception() is not None:
                    exc = task.exception()
                    if not isinstance(exc, ConnectionClosed):
                        raise exc  # type: ignore[misc]
        finally:
            for task in [*tasks, stop_wait]:
                task.cancel()
            await asyncio.gather(*tasks, stop_wait, return_exceptions=True)

    # --- inbound -------------------------------------------------------------------------
    async def _receive(self, ws: ClientConnection) -> None:
        async for raw in ws:
            try:
                frame = P.parse_frame(raw)
            except P.ProtocolError as exc:
                log.warning("%s: unreadable frame from server ignored: %s", self.device_uid, exc)
                continue
            if self.on_frame is not None:
                result = self.on_frame(frame)
                if asyncio.iscoroutine(result):
                    await result
            await self._dispatch(ws, frame)

    async def _dispatch(self, ws: ClientConnection, frame: dict[str, Any]) -> None:
        kind = frame["type"]
        try:
            if kind == "ack":
                self._on_ack(frame)
            elif kind == "error":
                self._on_error_frame(frame)
            elif kind == "welcome":
                await self._on_welcome(ws, frame)
            elif kind == "attest.challenge":
                await self._on_challenge(ws, frame)
            elif kind == "attest.result":
                log.info("%s: attestation %r: %s", self.device_uid, frame.get("challenge_id"), frame.get("status"))
            elif kind == "command":
                await self._on_command(ws, frame)
            elif kind == "rollout.offer":
                await self.ota.on_offer(self, frame)
            elif kind == "rollout.cancel":
                await self.ota.on_cancel(self, frame)
            else:
                log.info("%s: ignoring frame of unknown type %r", self.device_uid, kind[:64])
        except P.ProtocolError as exc:
            log.warning("%s: bad %s frame from server ignored: %s", self.device_uid, kind, exc.message)

    async def _on_welcome(self, ws: ClientConnection, frame: dict[str, Any]) -> None:
        welcome = P.validate_welcome(frame)
        was = self.status
        self.status = welcome["status"]
        if was is None:
            self.stats.connected += 1
            self.stats.welcomed += 1
        if not self.enrolled:
            self.enrolled = True
            self._save_state({"device_uid": self.device_uid, "enrolled": True})
            log.info("%s: enrolled", self.device_uid)
        self.server_heartbeat_s = float(welcome["heartbeat_s"])
        self.heartbeat_s = self._effective_heartbeat_s()
        self.max_points = welcome["max_points"]
        if isinstance(self.ota, ManagedOta):
            self.ota.trust(welcome.get("artifact_keys") or [])
        log.info("%s: welcome status=%s last_acked_seq=%d", self.device_uid, self.status, welcome["last_acked_seq"])
        if self.status == "pending":
            # Only heartbeats until the operator approves; frames keep piling up on disk.
            self._active = False
            self.outbox.set_online(False)
            return
        self._epoch += 1
        self.outbox.resume_from(welcome["last_acked_seq"], limit=0)
        self.outbox.set_online(True)
        self._active = True
        if was is None or was == "pending":
            self.emit(self._state_frame())
        self._wake.set()

    def _on_ack(self, frame: dict[str, Any]) -> None:
        seq = frame.get("seq")
        if type(seq) is not int:
            log.warning("%s: ack without an integer seq ignored", self.device_uid)
            return
        before = self.outbox.acked_points_total
        frames = self.outbox.ack(seq)
        self._last_ack_at = time.monotonic()
        self.stats.acked_frames += frames
        self.stats.acked_points += self.outbox.acked_points_total - before
        rejected = frame.get("rejected") or []
        if rejected and type(rejected) is list:
            self.stats.rejected_points += len(rejected)
            log.warning("%s: server rejected %d point(s) of seq %d, e.g. %s", self.device_uid, len(rejected), seq,
                        rejected[0])
        self._wake.set()

    def _on_error_frame(self, frame: dict[str, Any]) -> None:
        self._last_error = frame
        self.stats.errors += 1
        code = frame.get("code")
        if code == "seq_gap":
            expected = frame.get("expected")
            if type(expected) is not int or expected < 1:
                log.warning("%s: seq_gap without a usable 'expected'", self.device_uid)
                return
            # The server committed exactly expected-1: renumber from there and resend.
            self._epoch += 1
            self.outbox.resume_from(expected - 1, limit=0)
            self._wake.set()
            log.info("%s: seq_gap, resending from %d", self.device_uid, expected)
        elif code == "rate_limited":
            retry_ms = frame.get("retry_after_ms")
            delay = retry_ms / 1000.0 if type(retry_ms) in (int, float) and 0 <= retry_ms < 3_600_000 else 1.0
            self._retry_after_s = delay
            self._pause_until = time.monotonic() + delay
            log.warning("%s: rate limited, pausing uplink %.1fs", self.device_uid, delay)
        elif code in ("bad_frame", "not_allowed") and type(frame.get("seq")) is int:
            # The server refused this durable frame and committed nothing under its seq:
            # resending it would be refused forever.
            if self.outbox.drop_rejected(frame["seq"]):
                log.error("%s: server refused durable frame %d (%s: %s); dropped", self.device_uid, frame["seq"],
                          code, frame.get("message"))
        else:
            log.warning("%s: server error %s: %s", self.device_uid, code, frame.get("message"))

    # --- outbound ------------------------------------------------------------------------
    async def _sender(self, ws: ClientConnection) -> None:
        while True:
            try:
                await asyncio.wait_for(self._wake.wait(), self.ack_timeout_s / 2)
            except TimeoutError:
                # Frames in flight and no ack for a long time: the server may have dropped
                # them silently (overload, a bug). Resending under the same numbers is
                # safe: a committed frame is only acked again.
                if self.outbox.in_flight_count and time.monotonic() - self._last_ack_at >= self.ack_timeout_s:
                    log.warning("%s: no ack for %.0fs, resending %d frame(s) in flight", self.device_uid,
                                self.ack_timeout_s, self.outbox.in_flight_count)
                    self._resend_in_flight = True
                    self._last_ack_at = time.monotonic()
                else:
                    continue
            self._wake.clear()
            if not self._active:
                continue
            pause = self._pause_until - time.monotonic()
            if pause > 0:
                await asyncio.sleep(pause)
                # A rate-limited server may have discarded what we sent: send it again.
                self._resend_in_flight = True
                self._wake.set()
                continue
            epoch = self._epoch
            frames = self.outbox.in_flight() if self._resend_in_flight else []
            self._resend_in_flight = False
            if not self.outbox.in_flight_count:
                self._last_ack_at = time.monotonic()  # the ack clock starts with the first frame out
            frames += self.outbox.take(self.window - self.outbox.in_flight_count)
            for frame in frames:
                # A renumbering (seq_gap, welcome) while we were awaiting makes the rest of
                # this batch stale; the next wake takes them again with their new numbers.
                if epoch != self._epoch or not self._active:
                    break
                await ws.send(frame.text)

    def _effective_heartbeat_s(self) -> float:
        """The configured interval (set_config), never longer than the server's: the server closes
        a connection that sends nothing for 3 of its intervals (docs/protocol.md, Keepalive)."""
        configured, announced = self.config.heartbeat_s, self.server_heartbeat_s
        if configured is None:
            return announced or 30.0
        return min(configured, announced) if announced else configured

    async def _heartbeats(self, ws: ClientConnection) -> None:
        while True:
            await ws.send(P.dumps(P.heartbeat(P.now_ms(), int(time.monotonic() - self._started),
                                              self.outbox.buffered)))
            await asyncio.sleep(self.heartbeat_s)

    def _state_frame(self) -> dict[str, Any]:
        installed = {"agent": AGENT_VERSION, "model": self.model.version,
                     "firmware": (platform.release() or "unknown")[:64]}
        return P.state(None, installed, capabilities(self.state_dir))

    # --- telemetry -----------------------------------------------------------------------
    async def _produce(self) -> None:
        """Sample at ``sample_hz``; score each full window; batch points into frames."""
        ring: collections.deque[tuple[float, float, float]] = collections.deque(maxlen=WINDOW)
        loop = asyncio.get_running_loop()
        next_at = loop.time()
        while True:
            self.sensors.fault_rate = self.config.fault_rate
            sample = self.sensors.next()
            t = P.now_ms()
            values = sample.values()
            ring.append(values)
            points = self._points
            points.extend([t, name, value] for name, value in zip(METRICS, values, strict=True))
            if len(ring) == WINDOW:
                window = np.asarray(ring, dtype=np.float32)
                if self.scorer is not None:
                    score, latency = await self.scorer.score(window)
                else:
                    t0 = time.perf_counter()
                    score = self.model.score(window)
                    latency = (time.perf_counter() - t0) * 1000.0
                if np.isfinite(score):
                    points.append([t, "inference.anomaly_score", round(score, 4)])
                    self._check_anomaly(t, score)
                points.append([t, "inference.latency_ms", round(latency, 3)])
            limit = min(self.config.batch_points, self.max_points)
            if len(points) >= limit or time.monotonic() - self._last_flush >= self.config.batch_s:
                self._flush_points(limit)
            next_at += 1.0 / self.config.sample_hz
            delay = next_at - loop.time()
            if delay < -5.0:  # fell far behind (suspended laptop, overloaded simulator): skip
                next_at = loop.time()
            await asyncio.sleep(max(0.0, delay))

    def _flush_points(self, limit: int | None = None) -> None:
        if not self._points:
            return
        t = P.now_ms()
        cpu, rss = system_metrics()
        self._points.extend([
            [t, "system.cpu_percent", round(cpu, 1)],
            [t, "system.mem_rss_mb", round(rss, 1)],
            [t, "agent.buffer.dropped", self.outbox.dropped_points],
        ])
        limit = limit or min(self.config.batch_points, self.max_points)
        points, self._points = self._points, []
        self._last_flush = time.monotonic()
        for start in range(0, len(points), max(1, limit)):
            self.emit(P.telemetry(None, points[start:start + limit]))

    def _check_anomaly(self, t: int, score: float) -> None:
        threshold = self.model.threshold
        if not self._in_anomaly and score > threshold:
            self._in_anomaly = True
            self.emit(P.event(None, [P.event_item(
                t, "inference", "warning", f"anomaly score {score:.2f} above threshold {threshold:.2f}",
                {"score": round(score, 4), "threshold": threshold, "model": self.model.version})]))
        elif self._in_anomaly and score < threshold * REARM_RATIO:
            self._in_anomaly = False

    # --- attestation ---------------------------------------------------------------------
    def software_claims(self) -> dict[str, str]:
        """The ``software-claims`` this agent reports (self-reported, not hardware-backed)."""
        return {"agent_sha256": agent_sha256(), "model_sha256": self.model.sha256, "boot_id": boot_id()}

    async def _on_challenge(self, ws: ClientConnection, frame: dict[str, Any]) -> None:
        challenge_id = frame.get("challenge_id")
        if type(challenge_id) not in (str, int):
            raise P.ProtocolError("bad_frame", "attest.challenge without challenge_id")
        nonce = P.b64d(frame.get("nonce"))  # type: ignore[arg-type]
        if self.tpm is not None:
            pcrs = frame.get("pcrs") or list(range(8))
            try:
                qualifying = hashlib.sha256(nonce + self.public_key).digest()
                attest, signature, values = await asyncio.to_thread(self.tpm.quote, qualifying, list(pcrs))
            except Exception as exc:  # noqa: BLE001 - a TPM failure must not kill the session
                log.error("%s: TPM quote failed, challenge %r unanswered: %s", self.device_uid, challenge_id, exc)
                return
            await ws.send(P.dumps(P.attest_evidence_tpm(challenge_id, attest, signature, values)))
            return
        claims = self.software_claims()
        sig = keys.sign(self.key, P.claims_message(nonce, claims))
        await ws.send(P.dumps(P.attest_evidence_software(challenge_id, claims, sig)))

    # --- TPM (optional, lazily imported) -------------------------------------------------
    async def _open_tpm(self) -> None:
        try:
            from agent_stub import tpm as tpm_module
        except ImportError as exc:
            raise AgentStop(f"--tpm given but agent_stub.tpm cannot be imported: {exc}", EXIT_CONFIG) from None
        if self.state_dir is None:
            raise AgentStop("--tpm needs a state directory", EXIT_CONFIG)
        try:
            self.tpm = tpm_module.Tpm(self.tpm_spec)
            await asyncio.to_thread(self.tpm.ensure_keys, self.state_dir / "tpm")
        except Exception as exc:  # noqa: BLE001 - report any TPM setup failure as a config error
            raise AgentStop(f"cannot use the TPM at {self.tpm_spec!r}: {exc}", EXIT_CONFIG) from None

    async def _tpm_info(self) -> dict[str, Any] | None:
        if self.tpm is None:
            return None
        ek_pub, ek_cert, ak_pub = await asyncio.gather(
            asyncio.to_thread(self.tpm.ek_public), asyncio.to_thread(self.tpm.ek_certificate),
            asyncio.to_thread(self.tpm.ak_public))
        return P.tpm_info(ek_pub, ek_cert, ak_pub)

    async def _on_tpm_credential(self, ws: ClientConnection, frame: dict[str, Any]) -> None:
        if self.tpm is None:
            log.error("%s: server sent tpm.credential but this agent has no TPM", self.device_uid)
            return
        blob = P.b64d(frame.get("credential_blob"))  # type: ignore[arg-type]
        secret = P.b64d(frame.get("encrypted_secret"))  # type: ignore[arg-type]
        activated = await asyncio.to_thread(self.tpm.activate_credential, blob, secret)
        await ws.send(P.dumps(P.tpm_activate(activated)))

    # --- commands ------------------------------------------------------------------------
    def _result(self, command_id: P.Id, ok: bool, output: str) -> None:
        if len(output) > MAX_COMMAND_OUTPUT:
            output = output[:MAX_COMMAND_OUTPUT - 15] + "… (truncated)"
        self.emit(P.command_result(None, command_id, ok, output))

    async def _on_command(self, ws: ClientConnection, frame: dict[str, Any]) -> None:
        command_id = frame.get("command_id")
        if type(command_id) not in (str, int):
            raise P.ProtocolError("bad_frame", "command without command_id")
        if command_id in self._seen_commands:
            # Already run (the server resends until our result arrives); the result is
            # in the outbox, so do nothing twice — a reboot especially.
            log.info("%s: command %r already handled", self.device_uid, command_id)
            return
        self._seen_commands[command_id] = None
        while len(self._seen_commands) > 256:
            self._seen_commands.popitem(last=False)
        name = frame.get("name")
        args = frame.get("args") if type(frame.get("args")) is dict else {}
        log.info("%s: command %r %s %s", self.device_uid, command_id, name, args)
        if name == "reboot":
            self._result(command_id, True, "rebooting (simulated: the agent reconnects)")
            self._reconnect_now = True
            self._started = time.monotonic()
            self.emit(P.event(None, [P.event_item(P.now_ms(), "boot", "info", "agent restarted by reboot command")]))
            await asyncio.sleep(0)  # let the sender push the result before we hang up
            await ws.close(P.Close.NORMAL, "reboot")
        elif name == "sync_state":
            self.emit(self._state_frame())
            self._result(command_id, True, "state sent")
        elif name == "attest":
            claims = self.software_claims()
            if "nonce" in args and "challenge_id" in args:
                await self._on_challenge(ws, {"challenge_id": args["challenge_id"], "nonce": args["nonce"]})
            self._result(command_id, True, P.canonical_json(claims).decode())
        elif name == "set_config":
            try:
                summary = self.config.apply(args)
            except ValueError as exc:
                self._result(command_id, False, f"not applied: {exc}")
                return
            if self.config.log_level:
                logging.getLogger("agent_stub").setLevel(self.config.log_level)
            self.heartbeat_s = self._effective_heartbeat_s()
            self._save_config()
            self._result(command_id, True, f"applied: {summary}")
        else:
            self._result(command_id, False, f"unknown command {str(name)[:64]!r}")
