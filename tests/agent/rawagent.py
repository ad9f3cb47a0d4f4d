"""A hand-driven protocol client for server tests: every frame is explicit, so a test can
send exactly what it means (including wrong things)."""

from __future__ import annotations

import asyncio
import json
import time
from dataclasses import dataclass, field

import websockets
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

from agent_stub import protocol as p


def public_bytes(key: Ed25519PrivateKey) -> bytes:
    return key.public_key().public_bytes(Encoding.Raw, PublicFormat.Raw)


@dataclass
class RawAgent:
    url: str
    uid: str
    key: Ed25519PrivateKey = field(default_factory=Ed25519PrivateKey.generate)
    ws: websockets.ClientConnection | None = None
    hello: dict | None = None

    async def open(self) -> dict:
        self.ws = await websockets.connect(self.url, compression=None, max_size=None, open_timeout=10)
        self.hello = await self.recv()
        assert self.hello["type"] == "hello"
        return self.hello

    @property
    def nonce(self) -> bytes:
        return p.b64d(self.hello["nonce"])

    def sign(self, nonce: bytes | None = None, uid: str | None = None) -> str:
        return p.b64e(self.key.sign(p.auth_message(nonce or self.nonce, uid or self.uid)))

    async def send(self, frame: dict | str) -> None:
        await self.ws.send(frame if isinstance(frame, str) else json.dumps(frame))

    async def recv(self, timeout: float = 10) -> dict:
        return json.loads(await asyncio.wait_for(self.ws.recv(), timeout))

    async def recv_type(self, *types: str, timeout: float = 10) -> dict:
        """Next frame of one of `types`, skipping others (e.g. commands, challenges)."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while True:
            frame = await self.recv(timeout=max(0.01, deadline - loop.time()))
            if frame["type"] in types:
                return frame

    async def enroll(self, token: str, hardware: dict | None = None) -> dict:
        await self.open()
        await self.send({
            "type": "enroll", "enrollment_token": token, "device_uid": self.uid,
            "public_key": p.b64e(public_bytes(self.key)), "sig": self.sign(),
            "hardware": hardware or {"model": "test-box", "ram_mb": 8192, "cpu_cores": 4}, "tpm": None,
        })
        return await self.recv()

    async def auth(self) -> dict:
        await self.open()
        await self.send({"type": "auth", "device_uid": self.uid, "sig": self.sign(), "agent_version": "test"})
        return await self.recv()

    async def telemetry(self, seq: int, points: list) -> None:
        await self.send({"type": "telemetry", "seq": seq, "points": points})

    async def closed_code(self, timeout: float = 10) -> int:
        """Wait for the server to close; return its close code."""
        try:
            while True:
                await asyncio.wait_for(self.ws.recv(), timeout)
        except websockets.ConnectionClosed as exc:
            return exc.rcvd.code if exc.rcvd else exc.code if hasattr(exc, "code") else 1006

    async def close(self) -> None:
        if self.ws is not None:
            await self.ws.close()


async def enroll_active(url: str, uid: str, token: str, *, model: str = "test-box") -> RawAgent:
    """A new device enrolled with an auto-approving token: its connection, welcomed `active`."""
    agent = RawAgent(url, uid)
    welcome = await agent.enroll(token, hardware={"model": model, "ram_mb": 8192, "cpu_cores": 4})
    assert welcome["status"] == "active", welcome
    return agent


async def frames_for(agent: RawAgent, seconds: float) -> list[dict]:
    """Everything the server sends this agent during `seconds`."""
    seen: list[dict] = []
    deadline = time.monotonic() + seconds
    while (left := deadline - time.monotonic()) > 0:
        try:
            seen.append(await agent.recv(timeout=left))
        except TimeoutError:
            break
    return seen


def fetch(url: str) -> tuple[int, bytes, str]:
    """GET a URL (e.g. a download URL): (status, body, the error body's `code` if refused)."""
    import urllib.error
    import urllib.request

    try:
        with urllib.request.urlopen(url, timeout=10) as response:
            return response.status, response.read(), ""
    except urllib.error.HTTPError as exc:
        return exc.code, b"", json.loads(exc.read() or b"{}").get("code", "")


async def in_db(fn, *args, **kwargs):
    """Run ORM code from an async test; close the worker thread's connection afterwards so
    the test database can be dropped at the end of the session."""
    from asgiref.sync import sync_to_async
    from django.db import connection

    def call():
        try:
            return fn(*args, **kwargs)
        finally:
            connection.close()

    return await sync_to_async(call)()


def run(coro):
    """Run one async scenario from a synchronous test."""
    import asyncio

    return asyncio.run(coro)
