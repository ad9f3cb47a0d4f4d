"""A small in-test console that speaks protocol v1 on 127.0.0.1 (no Django).

It implements just enough of the server side to drive the agent: the handshake (enroll
with a token, auth with a signature), exactly-once storage of durable frames with acks,
``seq_gap`` errors, and knobs to misbehave (stop acking, drop the connection, close with
a given code).  It validates every frame with ``agent_stub.protocol``, so the agent is
also checked against the shared validators.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
from dataclasses import dataclass, field
from typing import Any

from websockets.asyncio.server import ServerConnection, serve
from websockets.exceptions import ConnectionClosed

from agent_stub import keys
from agent_stub import protocol as P


@dataclass
class Device:
    uid: str
    public_key: bytes
    status: str = "active"
    last_acked: int = 0
    stored: list[dict[str, Any]] = field(default_factory=list)  # committed durable frames, in order
    revoked: bool = False


class FakeServer:
    """Knobs (set any time): ``status_for_new`` (welcome status after enroll), ``ack``
    (False: commit but never ack), ``commit`` (False: neither commit nor ack),
    ``drop_after`` (abort the TCP connection after that many durable frames arrive),
    ``close_on_auth`` (close code to answer auth with), ``gap_once_at`` (answer that seq
    with a seq_gap once, as if an earlier frame had been lost)."""

    def __init__(self, tokens: set[str] | None = None) -> None:
        self.tokens = tokens if tokens is not None else {"tok-1"}
        self.devices: dict[str, Device] = {}
        self.status_for_new = "active"
        self.ack = True
        self.commit = True
        self.drop_after: int | None = None
        self.close_on_auth: int | None = None
        self.gap_once_at: int | None = None
        self.received: list[dict[str, Any]] = []  # every frame from every device, in order
        self.handshakes: list[str] = []  # "auth" / "enroll" per connection
        self.connections: dict[str, ServerConnection] = {}
        self.closes: list[int | None] = []
        self.nonces: list[bytes] = []
        self._server: Any = None
        self.port = 0
        self.changed = asyncio.Condition()

    @property
    def url(self) -> str:
        return f"ws://127.0.0.1:{self.port}/ws/agent/v1/"

    async def start(self) -> FakeServer:
        self._server = await serve(self._handler, "127.0.0.1", 0, compression=None)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    async def stop(self) -> None:
        self._server.close()
        await self._server.wait_closed()

    async def _notify(self) -> None:
        async with self.changed:
            self.changed.notify_all()

    async def wait_for(self, predicate: Any, timeout: float = 10.0) -> None:
        """Wait until ``predicate()`` is true (re-checked whenever a frame arrives)."""
        async def loop() -> None:
            async with self.changed:
                await self.changed.wait_for(predicate)
        await asyncio.wait_for(loop(), timeout)

    def frames(self, kind: str, uid: str | None = None) -> list[dict[str, Any]]:
        return [f for f in self.received if f["type"] == kind and (uid is None or f.get("_uid") == uid)]

    async def send(self, uid: str, frame: dict[str, Any]) -> None:
        await self.connections[uid].send(P.dumps(frame))

    async def approve(self, uid: str) -> None:
        device = self.devices[uid]
        device.status = "active"
        await self.send(uid, P.welcome(uid, "active", device.last_acked))

    # --- the connection handler ----------------------------------------------------------
    async def _handler(self, ws: ServerConnection) -> None:
        nonce = os.urandom(32)
        self.nonces.append(nonce)
        try:
            await ws.send(P.dumps(P.hello(nonce, P.now_ms())))
            device = await self._handshake(ws, nonce)
            if device is None:
                return
            self.connections[device.uid] = ws
            await ws.send(P.dumps(P.welcome(device.uid, device.status, device.last_acked, heartbeat_s=1)))
            await self._notify()
            durable_seen = 0
            async for raw in ws:
                frame = P.parse_frame(raw)
                frame["_uid"] = device.uid
                self.received.append(frame)
                kind = frame["type"]
                if kind in P.DURABLE_TYPES:
                    durable_seen += 1
                    if self.drop_after is not None and durable_seen > self.drop_after:
                        ws.transport.abort()  # no close frame, no ack: like a cut cable
                        break
                    await self._durable(ws, device, frame)
                elif kind == "heartbeat":
                    P.validate_heartbeat(frame)
                elif kind == "attest.evidence":
                    P.validate_attest_evidence(frame)
                await self._notify()
        except ConnectionClosed:
            pass
        finally:
            self.closes.append(ws.close_code)
            await self._notify()

    async def _handshake(self, ws: ServerConnection, nonce: bytes) -> Device | None:
        frame = P.parse_frame(await asyncio.wait_for(ws.recv(), P.HANDSHAKE_TIMEOUT_S))
        self.handshakes.append(frame["type"])
        if frame["type"] == "enroll":
            enroll = P.validate_enroll(frame)
            ok = enroll.enrollment_token in self.tokens and keys.verify(
                enroll.public_key, enroll.sig, P.auth_message(nonce, enroll.device_uid))
            if not ok:
                await self._refuse(ws, P.Close.AUTH_FAILED, "bad enrollment")
                return None
            device = self.devices.get(enroll.device_uid)
            if device is None:
                device = Device(enroll.device_uid, enroll.public_key, status=self.status_for_new)
                self.devices[device.uid] = device
            return device
        if frame["type"] == "auth":
            auth = P.validate_auth(frame)
            device = self.devices.get(auth.device_uid)
            if self.close_on_auth is not None:
                await self._refuse(ws, self.close_on_auth, "refused by test")
                return None
            if device is None or not keys.verify(device.public_key, auth.sig, P.auth_message(nonce, auth.device_uid)):
                await self._refuse(ws, P.Close.AUTH_FAILED, "unknown device or bad signature")
                return None
            if device.revoked:
                await self._refuse(ws, P.Close.REVOKED, "revoked")
                return None
            return device
        await self._refuse(ws, P.Close.PROTOCOL_ERROR, "expected auth or enroll")
        return None

    async def _refuse(self, ws: ServerConnection, code: int, message: str) -> None:
        await ws.send(P.dumps(P.error("auth_failed" if code == P.Close.AUTH_FAILED else "refused", message)))
        await ws.close(code, message)

    async def _durable(self, ws: ServerConnection, device: Device, frame: dict[str, Any]) -> None:
        kind, seq, payload = P.validate_uplink(frame)
        if self.gap_once_at is not None and seq == self.gap_once_at:
            self.gap_once_at = None
            await ws.send(P.dumps(P.error("seq_gap", "frame lost (test)", expected=device.last_acked + 1)))
            return
        if device.status == "pending":
            await ws.send(P.dumps(P.error("not_allowed", "pending", seq=seq)))
            return
        if seq <= device.last_acked:
            await ws.send(P.dumps(P.ack(seq, 0)))  # a resend: acked again, stored nothing
            return
        if seq > device.last_acked + 1:
            await ws.send(P.dumps(P.error("seq_gap", "gap", expected=device.last_acked + 1)))
            return
        if not self.commit:
            return
        device.last_acked = seq
        stored = {k: v for k, v in frame.items() if k != "_uid"}
        device.stored.append(stored)
        if self.ack:
            accepted = len(payload.points) if kind == "telemetry" else 1
            rejected = payload.rejected if kind == "telemetry" else []
            await ws.send(P.dumps(P.ack(seq, accepted, rejected)))


@contextlib.asynccontextmanager
async def running(server: FakeServer | None = None) -> Any:
    server = server or FakeServer()
    await server.start()
    try:
        yield server
    finally:
        await server.stop()
