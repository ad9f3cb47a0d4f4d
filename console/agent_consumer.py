"""The agent connection (`/ws/agent/v1/`): agent protocol v1, server side.

A thin router. It runs the handshake, keeps per-connection order, and hands each frame
to the app that owns it: identity to security.services, telemetry to the telemetry
flusher, state and command results to fleet.services, events to telemetry.services,
rollout progress to rollouts.services. The contract is docs/protocol.md.

Durable uplink and exactly-once storage
  Frames are accepted only in `seq` order. Telemetry is pipelined into the per-process
  flusher (one COPY + cursor update per transaction for many devices); other durable
  frames run in their own transaction. Either way the device's uplink cursor advances
  in the same transaction as the frame's effects, conditionally on its old value, and the
  `ack` is sent only after that commit, in `seq` order, by one task per connection.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import dataclasses
import logging
import os
import random
import time
import uuid
import weakref
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

from asgiref.sync import sync_to_async
from channels.exceptions import StopConsumer
from channels.generic.websocket import AsyncWebsocketConsumer
from django.conf import settings
from django.core.exceptions import ValidationError
from django.db import DatabaseError, DataError, connections, transaction

from agent_stub import protocol as p
from console.presence import presence, silence
from fleet import push
from fleet import services as fleet_services
from fleet.errors import DomainError
from fleet.models import DeviceCommand, DeviceStatus
from rollouts import selectors as rollouts_selectors
from rollouts import services as rollouts_services
from security import attestation
from security import services as security_services
from security.tpm import verify as tpm_verify
from telemetry import conf as telemetry_conf

log = logging.getLogger(__name__)

# Frames a quarantined device may still receive (contract: no offers or commands): attestation,
# and `rollout.cancel` so that an install the quarantine cancelled stops on the device too.
QUARANTINE_ALLOWED = {"attest.challenge", "attest.result", "error", "ack", "welcome", "rollout.cancel"}


def db(fn: Callable[..., Any]) -> Callable[..., Awaitable[Any]]:
    """Run ORM code from the connection in a pool thread.

    Not Channels' default single shared thread: with thousands of devices (re)connecting at
    once, handshakes serialised on one thread back up past the 10 s handshake limit. Each
    call is self-contained (its own transaction), and one connection awaits its calls in
    order, so per-device ordering holds. Unlike Channels' `database_sync_to_async` there is
    no extra connection health check (`SELECT 1`) before every call — that was one round trip
    in four on the handshake path; see `_recycle_connections`. (With a connection pool,
    `DB_POOL_MAX_SIZE`, each call borrows a pooled connection, checked by the pool.)
    """
    def call(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        finally:
            _recycle_connections()

    return sync_to_async(call, thread_sensitive=False)


def _recycle_connections() -> None:
    """Django's end-of-request connection housekeeping, for a pool thread's connection, only
    when it is due: a connection that saw an error is checked (closed if broken, e.g. after a
    PostgreSQL restart: that one call failed and was shed with 4503, the next reconnects), an
    old one (DB_CONN_MAX_AGE) is closed, one left in a transaction is dropped. A healthy
    connection is reused as it is."""
    for conn in connections.all(initialized_only=True):
        if conn.connection is None:
            continue
        due = conn.close_at is not None and time.monotonic() >= conn.close_at
        if conn.errors_occurred or due or conn.in_atomic_block or not conn.get_autocommit():
            conn.close_if_unusable_or_obsolete()


class Admission:
    """Bounds the handshakes one process works on at once, and how many may wait.

    Under a reconnect storm (a whole site's devices after a network outage) accepting every
    handshake means each waits behind all the others, past its agent's timeout, and the
    server then spends its time on agents that have already left. Instead, a few run at a
    time (`AGENT_HANDSHAKE_CONCURRENCY`), up to `AGENT_HANDSHAKE_BACKLOG` wait in order while
    the queue moves (the longest waiting has waited less than half the handshake deadline),
    and the rest are shed at once with the contract's `4503` and a jittered `retry_after_ms`,
    which spreads their retries over the next seconds.
    """

    def __init__(self, concurrency: int, backlog: int, max_wait_s: float) -> None:
        self.slots = asyncio.Semaphore(concurrency)
        self.backlog = backlog
        self.max_wait_s = max_wait_s
        self.queued: collections.deque[float] = collections.deque()  # when each waiting handshake arrived

    def full(self) -> bool:
        """No room: the backlog is full, or the handshake waiting longest has waited more than
        `max_wait_s` (a new one would wait as long, and its agent gives up at the deadline)."""
        if not self.slots.locked():
            return False
        return len(self.queued) >= self.backlog or bool(
            self.queued and time.monotonic() - self.queued[0] > self.max_wait_s)

    @contextlib.asynccontextmanager
    async def slot(self):
        arrived = time.monotonic()
        self.queued.append(arrived)
        try:
            await self.slots.acquire()
        finally:
            self.queued.remove(arrived)  # the oldest one, unless a waiter was cancelled
        try:
            yield
        finally:
            self.slots.release()


_admission: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, Admission] = weakref.WeakKeyDictionary()


def admission() -> Admission:
    """This event loop's admission control (one per process in production; tests may run several loops)."""
    loop = asyncio.get_running_loop()
    if loop not in _admission:
        _admission[loop] = Admission(settings.AGENT_HANDSHAKE_CONCURRENCY, settings.AGENT_HANDSHAKE_BACKLOG,
                                     max_wait_s=settings.AGENT_HANDSHAKE_TIMEOUT_S / 2)
    return _admission[loop]


def now_ms() -> int:
    return int(time.time() * 1000)


@dataclass
class Pending:
    """One durable frame between acceptance and its ack."""

    seq: int
    run: Callable[[], Awaitable[Any]] | None = None  # deferred: started when the acker reaches it
    future: asyncio.Future | None = None  # eager: already submitted to the flusher
    rejected: list[dict] = field(default_factory=list)  # refused by validation
    accepted: int = 0


class Closing(Exception):
    """Stop handling this connection: close with `code` after sending `frame` (if any)."""

    def __init__(self, code: int, frame: dict | None = None) -> None:
        super().__init__(code)
        self.code = code
        self.frame = frame


class AgentConsumer(AsyncWebsocketConsumer):
    # Defaults for a connection whose device left before `connect` ran (its first message is
    # then `websocket.disconnect`): cleanup must find nothing to do rather than fail.
    handshake_timer: asyncio.Task | None = None
    acker: asyncio.Task | None = None
    session: security_services.DeviceSession | None = None
    closed = False
    cleaned_up = False

    # --- plumbing -----------------------------------------------------------------------

    async def __call__(self, scope, receive, send) -> None:
        # Channels' AsyncConsumer.__call__, with two changes. The channel layer is optional at
        # run time: if Redis is down the connection keeps working without doorbells. And the
        # two sources are not multiplexed with Channels' `await_many_dispatch`, which makes a
        # task and an `asyncio.wait` for every message (per heartbeat frame, 10,000 agents):
        # this task reads the WebSocket itself, a second task reads the layer, and a lock keeps
        # one handler running at a time, as before (handlers never interleave; each source's
        # messages are handled in their order).
        self.scope = scope
        from channels.layers import get_channel_layer

        self.channel_layer = get_channel_layer(self.channel_layer_alias)
        self.channel_name = await self.channel_layer.new_channel() if self.channel_layer else None
        self.base_send = send
        self.turn = asyncio.Lock()
        self.layer_failure: BaseException | None = None
        pump = None
        if self.channel_layer is not None:
            pump = asyncio.get_running_loop().create_task(self._layer_pump(asyncio.current_task()))
        try:
            try:
                while True:
                    message = await receive()
                    async with self.turn:
                        await self.dispatch(message)
            except asyncio.CancelledError:
                if self.layer_failure is None:
                    raise
                raise self.layer_failure from None  # a layer message's handler failed: end as Channels did
        except StopConsumer:
            pass
        except OSError:
            pass  # the device went away while we were sending to it (uvicorn's ClientDisconnected)
        except Exception:
            log.exception("agent connection failed")
            raise
        finally:
            if pump is not None:
                pump.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await pump
            # A connection that ends without a `websocket.disconnect` (e.g. the device left
            # while we were mid-send) must still be cleaned up: presence, group membership.
            if not getattr(self, "cleaned_up", True):
                await asyncio.shield(self.disconnect(1006))

    async def _layer_pump(self, main: asyncio.Task) -> None:
        """Handle channel-layer messages (doorbells, replace, revoke) in their order, each in its
        turn with the WebSocket's frames. If a handler fails, the connection ends with that error."""
        try:
            while True:
                message = await self._layer_receive()
                async with self.turn:
                    await self.dispatch(message)
        except asyncio.CancelledError:
            raise
        except BaseException as exc:  # noqa: BLE001 -- handed to the connection's task, which raises it
            self.layer_failure = exc
            main.cancel()

    async def _layer_receive(self) -> dict:
        missed = False
        while True:
            try:
                if missed and getattr(self, "session", None) is not None and not self.closed:
                    # Redis is back, perhaps empty (restarted, failed over): join the device's
                    # group again, then catch up on the doorbells rung while it was away.
                    await self.channel_layer.group_add(push.device_group(self.session.device_id), self.channel_name)
                    missed = False
                    return {"type": "device.commands"}
                return await self.channel_layer.receive(self.channel_name)
            except asyncio.CancelledError:
                raise
            except Exception:
                log.warning("channel layer receive failed; retrying in 2 s", exc_info=log.isEnabledFor(logging.DEBUG))
                missed = True
                await asyncio.sleep(2)

    async def dispatch(self, message: dict) -> None:
        # Channels 4.3 hops to a thread before every message (aclose_old_connections);
        # this consumer touches the database only through database_sync_to_async (which
        # manages connections itself) and the flusher, so it skips that hop.
        handler = getattr(self, message["type"].replace(".", "_"), None)
        if handler is None:
            raise ValueError(f"no handler for {message['type']}")
        await handler(message)

    async def send_frame(self, frame: dict) -> None:
        # A frame handler can still be awaiting the database when another task (the acker,
        # a doorbell) closes the connection; after the close there is nothing to send to.
        if self.closed:
            return
        await self.send(text_data=p.dumps(frame))

    async def close_with(self, code: int, frame: dict | None = None) -> None:
        if self.closed:
            return
        self.closed = True
        if frame is not None:
            with contextlib.suppress(Exception):  # the socket may already be gone
                await self.send(text_data=p.dumps(frame))
        await self.close(code)

    # --- lifecycle ----------------------------------------------------------------------

    async def connect(self) -> None:
        self.closed = False
        self.cleaned_up = False
        self.session: security_services.DeviceSession | None = None
        self.status = ""
        self.conn_id = uuid.uuid4().hex
        self.nonce = os.urandom(32)
        self.committed = 0
        self.submitted = 0
        self.queue: asyncio.Queue[Pending] | None = None  # with the acker, made by the first durable frame
        self.deferred_pending = 0
        self.acker: asyncio.Task | None = None
        self.tokens = float(settings.AGENT_RATE_BURST)
        self.tokens_at = time.monotonic()
        self.pending_enroll: tuple[p.Enroll, attestation.TpmEnrollment] | None = None
        self.announced_keys: set[str] = set()  # artifact key ids sent in this connection's last welcome
        await self.accept()
        await self.send_frame(p.hello(nonce=self.nonce, server_time=now_ms()))
        self.handshake_timer = asyncio.get_running_loop().create_task(self._handshake_deadline())
        silence().watch(self)  # every frame resets `self.quiet`; see `silent`

    async def silent(self) -> None:
        """No frame for several heartbeat intervals: the device is gone or stuck (console/presence.py)."""
        await self.close_with(p.Close.GOING_AWAY, p.error(code="silent", message="no frame for "
                                                          f"{silence().rounds} heartbeat intervals"))

    async def _handshake_deadline(self) -> None:
        await asyncio.sleep(settings.AGENT_HANDSHAKE_TIMEOUT_S)
        if self.session is None:
            await self.close_with(p.Close.HANDSHAKE_TIMEOUT, p.error(code="handshake_timeout",
                                                                      message="handshake not finished in time"))

    async def disconnect(self, code: int) -> None:
        if self.cleaned_up:
            return
        self.cleaned_up = True
        self.closed = True
        silence().forget(self)
        if self.handshake_timer is not None:
            self.handshake_timer.cancel()
        if self.acker:
            self.acker.cancel()
        if self.session is not None:
            try:
                await db(fleet_services.presence_disconnected)(
                    device_id=self.session.device_id, session=self.conn_id
                )
            except Exception:
                log.warning("could not mark %s offline", self.session.uid, exc_info=True)
            await self._layer_call("group_discard", push.device_group(self.session.device_id), self.channel_name)

    async def _layer_call(self, method: str, *args: Any) -> None:
        if self.channel_layer is None:
            return
        try:
            await getattr(self.channel_layer, method)(*args)
        except Exception:
            log.warning("channel layer %s failed", method, exc_info=log.isEnabledFor(logging.DEBUG))

    # --- inbound frames -----------------------------------------------------------------

    async def receive(self, text_data: str | None = None, bytes_data: bytes | None = None) -> None:
        self.quiet = 0  # heard from (the silence watch)
        if self.closed:
            return
        data = text_data if text_data is not None else bytes_data
        limit = settings.AGENT_MAX_FRAME_BYTES
        size = len(data) if bytes_data is not None or len(data) * 4 <= limit else len(data.encode())
        if size > limit:
            await self.close_with(p.Close.TOO_LARGE, p.error(code="frame_too_large",
                                                           message=f"frame of {size} bytes exceeds {limit}"))
            return
        if not self._take_token():
            retry = int(1000 / settings.AGENT_RATE_PER_S) + 1
            await self.close_with(p.Close.RATE_LIMITED, p.error(code="rate_limited", message="too many messages",
                                                              retry_after_ms=retry))
            return
        try:
            frame = p.parse_frame(data)
        except p.ProtocolError as exc:
            if self.session is None:
                await self.close_with(p.Close.PROTOCOL_ERROR, p.error(code=exc.code, message=exc.message))
            else:
                await self.send_frame(p.error(code=exc.code, message=exc.message))
            return
        try:
            if self.session is None:
                await self._admitted_handshake(frame)
            else:
                presence().seen(self.session.device_id)
                await self._route(frame)
        except Closing as exc:
            await self.close_with(exc.code, exc.frame)
        except DatabaseError as exc:
            # PostgreSQL unreachable (handshake, a durable frame, attestation): shed the
            # connection with the contract's code instead of dropping it with no close frame.
            log.warning("database unavailable, shedding the connection: %s", exc)
            await self.close_with(p.Close.OVERLOADED, p.error(code="unavailable", message="storage unavailable; "
                                                              "retry later", retry_after_ms=5000))

    def _take_token(self) -> bool:
        now = time.monotonic()
        self.tokens = min(settings.AGENT_RATE_BURST, self.tokens + (now - self.tokens_at) * settings.AGENT_RATE_PER_S)
        self.tokens_at = now
        if self.tokens < 1:
            return False
        self.tokens -= 1
        return True

    async def _admitted_handshake(self, frame: dict) -> None:
        gate = admission()
        if gate.full():
            raise Closing(p.Close.OVERLOADED, p.error(
                code="overloaded", message="too many devices connecting at once; retry later",
                retry_after_ms=random.randint(1000, settings.AGENT_HANDSHAKE_RETRY_MS)))
        async with gate.slot():
            if self.closed:
                return  # the agent left (or the handshake deadline passed) while this one waited
            await self._handshake(frame)

    async def _handshake(self, frame: dict) -> None:
        kind = frame["type"]
        try:
            if kind == "auth":
                auth = p.validate_auth(frame)
                session = await db(security_services.device_authenticate)(
                    uid=auth.device_uid, nonce=self.nonce, signature=auth.sig
                )
            elif kind == "enroll" and self.pending_enroll is None:
                enroll = p.validate_enroll(frame)
                if enroll.tpm is not None:
                    await self._tpm_enrollment_begin(enroll)
                    return  # the device answers with `tpm.activate`
                session = await self._enroll(enroll, tpm=None)
            elif kind == "tpm.activate" and self.pending_enroll is not None:
                answer = p.validate_tpm_activate(frame)
                enroll, tpm = self.pending_enroll
                self.pending_enroll = None
                if tpm_verify.verify_activation(tpm.secret, answer.secret):
                    raise security_services.AuthFailed("TPM credential activation failed: EK and AK are not bound")
                session = await self._enroll(enroll, tpm=tpm)
            else:
                raise Closing(p.Close.PROTOCOL_ERROR, p.error(code="bad_frame",
                                                               message=f"unexpected {kind[:64]!r} during the handshake"))
        except p.ProtocolError as exc:
            raise Closing(p.Close.PROTOCOL_ERROR, p.error(code=exc.code, message=exc.message)) from None
        except security_services.AuthFailed as exc:
            raise Closing(exc.close_code, p.error(code="auth_failed" if exc.close_code == 4401 else "revoked",
                                                  message=exc.message)) from None
        # Single use: a second handshake on this connection cannot reuse the nonce.
        self.nonce = b""
        self.handshake_timer.cancel()
        if self.closed:
            # The handshake deadline closed the socket while the database was verifying the
            # device: the agent has given up on this connection, so it must not come online.
            return
        self.session = session
        self.status = session.status
        self.committed = self.submitted = session.last_acked_seq
        group = push.device_group(session.device_id)
        # Tell an older connection of this device (in any process) to step aside, then join.
        await self._layer_call("group_send", group, {"type": "device.replace", "channel": self.channel_name})
        await self._layer_call("group_add", group, self.channel_name)
        # One trip to the database (one transaction) for everything a new session needs.
        start = await db(open_session)(device_id=session.device_id, session=self.conn_id)
        self.status = start.status
        await self._send_welcome(start.keys)
        await self._send_commands(start.commands)
        if start.challenge is not None:
            await self.send_frame(start.challenge)
        for offer in start.offers:
            await self._send_offer(offer)

    async def _enroll(self, enroll: p.Enroll, *, tpm: attestation.TpmEnrollment | None) -> Any:
        return await db(security_services.device_enroll)(
            secret=enroll.enrollment_token, uid=enroll.device_uid, public_key=enroll.public_key,
            nonce=self.nonce, signature=enroll.sig, hardware=enroll.hardware or {}, tpm=tpm,
        )

    async def _tpm_enrollment_begin(self, enroll: p.Enroll) -> None:
        await db(security_services.enroll_precheck)(
            secret=enroll.enrollment_token, uid=enroll.device_uid, public_key=enroll.public_key,
            nonce=self.nonce, signature=enroll.sig,
        )
        try:
            tpm = await db(attestation.tpm_enrollment_begin)(
                ek_public=enroll.tpm.ek_pub, ek_certificate=enroll.tpm.ek_cert, ak_public=enroll.tpm.ak_pub
            )
        except DomainError as exc:
            raise security_services.AuthFailed(exc.message) from None
        self.pending_enroll = (enroll, tpm)
        await self.send_frame(p.tpm_credential(tpm.credential_blob, tpm.encrypted_secret))

    async def _challenge(self, reason: str) -> None:
        if self.status not in (DeviceStatus.ACTIVE, DeviceStatus.QUARANTINED):
            return
        frame = await db(attestation.challenge_issue)(device_id=self.session.device_id,
                                                                          reason=reason)
        await self.send_frame(frame)

    async def _evidence(self, frame: dict) -> None:
        if self.status not in (DeviceStatus.ACTIVE, DeviceStatus.QUARANTINED):
            await self.send_frame(p.error(code="not_allowed", message=f"device is {self.status}"))
            return
        try:
            evidence = p.validate_attest_evidence(frame)
        except p.ProtocolError as exc:
            await self.send_frame(p.error(code=exc.code, message=exc.message))
            return
        result = await db(attestation.evidence_appraise)(
            device_id=self.session.device_id, evidence=evidence
        )
        if result is None:
            await self.send_frame(p.error(code="challenge_unknown", message="unknown or expired challenge"))
            return
        await self.send_frame(p.attest_result(str(evidence.challenge_id), result.status))

    async def _send_welcome(self, keys: list[tuple[str, bytes]] | None = None) -> None:
        if keys is None:
            keys = await db(rollouts_selectors.artifact_public_keys)()
        self.announced_keys = {key_id for key_id, _ in keys}
        await self.send_frame(p.welcome(
            device_uid=self.session.uid, status=self.status, last_acked_seq=self.committed,
            heartbeat_s=settings.AGENT_HEARTBEAT_S, max_points=settings.AGENT_MAX_POINTS, artifact_keys=keys,
        ))

    async def _send_pending_offers(self) -> None:
        """Offers the device missed (after a status change mid-session) — active devices only."""
        if self.status != DeviceStatus.ACTIVE:
            return
        for offer in await db(rollouts_services.pending_offers)(device_id=self.session.device_id):
            await self._send_offer(offer)

    async def _send_offer(self, offer: dict) -> None:
        """An offer signed with a key this connection's agent has not been told about (created or
        rotated in since its welcome) is preceded by a fresh `welcome` carrying the keyring:
        agents trust only keys announced in a welcome, and long-lived connections would
        otherwise refuse every offer (`signature_invalid`) until they reconnect."""
        key_id = (offer.get("artifact") or {}).get("key_id")
        if key_id is not None and key_id not in self.announced_keys:
            await self._send_welcome()
        await self.send_frame(offer)

    async def _route(self, frame: dict) -> None:
        kind = frame["type"]
        if kind in p.DURABLE_TYPES:
            await self._durable(kind, frame)
        elif kind == "heartbeat":
            try:
                p.validate_heartbeat(frame)
            except p.ProtocolError as exc:
                await self.send_frame(p.error(code=exc.code, message=exc.message))
        elif kind in ("auth", "enroll"):
            raise Closing(p.Close.PROTOCOL_ERROR, p.error(code="bad_frame", message="already authenticated"))
        elif kind == "attest.evidence":
            await self._evidence(frame)
        elif kind == "tpm.activate":
            await self.send_frame(p.error(code="bad_frame", message="no TPM enrollment is in progress"))
        else:
            # At most 64 characters of the device's text are echoed (a 256 KiB type is not).
            await self.send_frame(p.error(code="unknown_type", message=f"unknown frame type {kind[:64]!r}"))

    # --- durable uplink -----------------------------------------------------------------

    async def _durable(self, kind: str, frame: dict) -> None:
        if self.status == DeviceStatus.PENDING:
            await self.send_frame(p.error(code="not_allowed", message="device is pending approval; only heartbeats"))
            return
        seq = frame.get("seq")
        if type(seq) is not int or seq < 1:
            await self.send_frame(p.error(code="bad_frame", message="seq must be a positive integer"))
            return
        if seq <= self.committed:
            await self.send_frame(p.ack(seq=seq, accepted=0, rejected=[]))  # stored before: ack again, store nothing
            return
        if seq <= self.submitted:
            return  # in flight; its ack follows its commit
        if seq != self.submitted + 1:
            await self.send_frame(p.error(code="seq_gap", message=f"expected seq {self.submitted + 1}",
                                          expected=self.submitted + 1))
            return
        try:
            if kind == "telemetry":
                checked = p.validate_telemetry(
                    frame, now_ms=now_ms(), retention_ms=self._retention_ms(), max_points=settings.AGENT_MAX_POINTS
                )
                points = checked.points
                item = Pending(seq=seq, rejected=list(checked.rejected), accepted=len(points))
                if self.deferred_pending == 0:
                    item.future = await self._submit(seq, points)
                else:
                    item.run = lambda: self._submit_and_wait(seq, points)
            else:
                payload = p.validate_uplink(frame)[2]
                item = Pending(seq=seq, accepted=1)
                item.run = lambda: db(apply_durable)(self.session.device_id, seq, kind, payload)
        except p.ProtocolError as exc:
            await self.send_frame(p.error(code=exc.code, message=exc.message, seq=seq))
            return
        self.submitted = seq
        if item.run is not None:
            self.deferred_pending += 1
        if self.acker is None:
            # Made on first use: most connections carry heartbeats for long stretches, and a
            # queue and a task per idle connection are memory times 10,000.
            self.queue = asyncio.Queue()
            self.acker = asyncio.get_running_loop().create_task(self._ack_loop())
        self.queue.put_nowait(item)

    def _retention_ms(self) -> int:
        return int(telemetry_conf.get("RAW_RETENTION_DAYS") * 86_400_000)

    async def _submit(self, seq: int, points: list) -> asyncio.Future:
        """Hand the frame to the flusher; returns the future of its outcome. When the queue is
        full this waits (TELEMETRY_QUEUE_WAIT_MS) for room without reading the socket, so the
        device is slowed down by TCP; only then is it shed with 4503 (by the ack loop)."""
        from telemetry.ingest import FlushFailed, Overloaded, get_flusher

        try:
            future = await get_flusher().enqueue(device_id=self.session.device_id, seq=seq, points=points,
                                                 wait_s=telemetry_conf.get("QUEUE_WAIT_MS") / 1000)
            # Shielded: if this connection goes away, the frame is still written, its outcome dropped.
            return asyncio.shield(future)
        except (Overloaded, FlushFailed) as exc:
            # The ack loop sheds the device when it reaches this frame (4503, `rate_limited` for a
            # full queue, `unavailable` while the database is down): after the acks of the frames
            # before it, which are stored.
            refused = asyncio.get_running_loop().create_future()
            refused.set_exception(exc)
            return refused

    async def _submit_and_wait(self, seq: int, points: list) -> Any:
        return await (await self._submit(seq, points))

    async def _ack_loop(self) -> None:
        from telemetry.ingest import Overloaded

        while True:
            item = await self.queue.get()
            try:
                result = await (item.future if item.future is not None else item.run())
            except Closing as exc:
                await self.close_with(exc.code, exc.frame)
                return
            except Overloaded as exc:
                await self.close_with(p.Close.OVERLOADED, p.error(code="rate_limited", message="ingest queue full",
                                                                  retry_after_ms=exc.retry_after_ms))
                return
            except Exception:
                log.warning("durable frame %s of %s failed; closing so the agent resends", item.seq, self.session.uid,
                            exc_info=True)
                await self.close_with(p.Close.OVERLOADED, p.error(code="unavailable",
                                                                  message="storage unavailable; retry later",
                                                                  retry_after_ms=5000))
                return
            finally:
                if item.run is not None:
                    self.deferred_pending -= 1
            status = getattr(result, "status", result if isinstance(result, str) else "stored")
            if status == "conflict":
                await self.close_with(p.Close.REPLACED, p.error(code="replaced",
                                                                message="another connection stored these frames"))
                return
            rejected = list(item.rejected)
            accepted = item.accepted
            if status == "duplicate":
                accepted = 0
            else:
                extra = getattr(result, "rejected", None) or []
                if extra:
                    rejected += frame_indices(item, extra)
                    rejected.sort(key=lambda r: r["index"])
                accepted -= len(extra)
            self.committed = item.seq
            if not self.closed:
                await self.send_frame(p.ack(seq=item.seq, accepted=accepted, rejected=rejected))

    # --- messages from other processes (channel layer) -----------------------------------

    async def device_replace(self, event: dict) -> None:
        if event.get("channel") != self.channel_name:
            await self.close_with(p.Close.REPLACED, p.error(code="replaced", message="a newer connection took over"))

    async def device_revoked(self, event: dict) -> None:
        await self.close_with(p.Close.REVOKED, p.error(code="revoked", message=event.get("reason", "revoked")))

    async def device_status(self, event: dict) -> None:
        status = await db(current_status)(self.session.device_id)
        if status == DeviceStatus.DECOMMISSIONED:
            await self.close_with(p.Close.REVOKED, p.error(code="revoked", message="device decommissioned"))
            return
        if status != self.status:
            was_pending = self.status == DeviceStatus.PENDING
            self.status = status
            await self._send_welcome()
            await self._deliver_commands()
            if was_pending:
                await self._challenge("connect")
            await self._send_pending_offers()

    async def device_commands(self, event: dict) -> None:
        await self._deliver_commands()

    async def device_frame(self, event: dict) -> None:
        if self.closed:
            return  # the state behind the frame is re-sent when the device reconnects
        frame = event["frame"]
        if self.status == DeviceStatus.QUARANTINED and frame.get("type") not in QUARANTINE_ALLOWED:
            return
        if self.status == DeviceStatus.PENDING:
            return
        if frame.get("type") == "rollout.offer":
            await self._send_offer(frame)
            return
        await self.send_frame(frame)

    async def _deliver_commands(self) -> None:
        if self.closed or self.status not in (DeviceStatus.ACTIVE, DeviceStatus.QUARANTINED):
            return
        commands = await db(fleet_services.commands_claim_for_delivery)(
            device_id=self.session.device_id, allow=commands_allowed(self.status)
        )
        await self._send_commands(commands)

    async def _send_commands(self, commands: list[DeviceCommand]) -> None:
        for command in commands:
            await self.send_frame(p.command(command_id=str(command.id), name=command.name, args=command.args))


def commands_allowed(status: str) -> list[str] | None:
    """Command names a device in `status` may receive (None: all); quarantine allows attestation only."""
    return [DeviceCommand.Name.ATTEST] if status == DeviceStatus.QUARANTINED else None


@dataclass
class SessionStart:
    """What a fresh session is sent after authentication, in this order: `welcome` (with the
    artifact keyring), queued commands, an attestation challenge, offers missed while offline."""

    status: str
    keys: list[tuple[str, bytes]]
    commands: list[DeviceCommand] = field(default_factory=list)
    challenge: dict | None = None
    offers: list[dict] = field(default_factory=list)


@transaction.atomic
def open_session(*, device_id: int, session: str) -> SessionStart:
    """Mark the device online and gather its session start, in one transaction (one commit on
    the path every reconnect takes). The status is read from the device row the presence
    update locks, so a quarantine or decommission since `auth` is seen here."""
    status = fleet_services.presence_connected(device_id=device_id, session=session) or DeviceStatus.DECOMMISSIONED
    start = SessionStart(status=status, keys=rollouts_selectors.artifact_public_keys())
    if status not in (DeviceStatus.ACTIVE, DeviceStatus.QUARANTINED):
        return start
    start.commands = fleet_services.commands_claim_for_delivery(device_id=device_id, allow=commands_allowed(status),
                                                                include_unanswered=True)
    start.challenge = attestation.challenge_issue(device_id=device_id, reason="connect")
    if status == DeviceStatus.ACTIVE:
        # Offers the device missed while offline (or whose push was lost).
        start.offers = rollouts_services.pending_offers(device_id=device_id)
    return start


def frame_indices(item: Pending, extra: list[tuple[int, str]]) -> list[dict]:
    """Map positions in the accepted-points list back to indices in the agent's frame."""
    refused = {r["index"] for r in item.rejected}
    original = [i for i in range(item.accepted + len(refused)) if i not in refused]
    return [{"index": original[position], "reason": reason} for position, reason in extra]


def current_status(device_id: int) -> str:
    from fleet.models import Device

    return Device.objects.filter(pk=device_id).values_list("status", flat=True).first() or DeviceStatus.DECOMMISSIONED


def _apply_state(device_id: int, payload: Any) -> None:
    installed = {k: v for k, v in payload.installed.items() if v}
    fleet_services.device_report_state(device_id=device_id, installed=installed,
                                       capabilities=dataclasses.asdict(payload.capabilities))


def _apply_event(device_id: int, payload: Any) -> None:
    from telemetry.services import events_store

    events_store(device_id=device_id, events=[dataclasses.asdict(e) for e in payload.events])


def _apply_command_result(device_id: int, payload: Any) -> None:
    fleet_services.command_complete(device_id=device_id, command_id=payload.command_id, ok=payload.ok,
                                    output=payload.output or "")


def _apply_rollout_status(device_id: int, payload: Any) -> None:
    rollouts_services.execution_report(device_id=device_id, report=payload)


APPLY = {
    "state": _apply_state,
    "event": _apply_event,
    "command.result": _apply_command_result,
    "rollout.status": _apply_rollout_status,
}


def apply_durable(device_id: int, seq: int, kind: str, payload: Any) -> str | tuple:
    """Apply one non-telemetry durable frame and advance the cursor in one transaction.

    Most `rollout.status` frames (a phase forward) take one statement that does both
    (`rollouts.services.execution_progress`); the rest fall through to the general path."""
    if kind == "rollout.status" and rollouts_services.execution_progress(
            device_id=device_id, report=payload, cursor_from=seq - 1, cursor_to=seq):
        return "stored"
    try:
        with transaction.atomic():
            if not fleet_services.cursor_advance(device_id=device_id, from_seq=seq - 1, to_seq=seq):
                position = fleet_services.cursor_position(device_id=device_id)
                return "duplicate" if seq <= position else "conflict"
            APPLY[kind](device_id, payload)
        return "stored"
    except (DomainError, ValidationError, DataError) as exc:
        # The frame is well-formed but its content is refused: record the refusal, advance
        # the cursor (the agent must not resend it forever) and report it in the ack.
        with transaction.atomic():
            if not fleet_services.cursor_advance(device_id=device_id, from_seq=seq - 1, to_seq=seq):
                return "conflict"
        return Refused(str(getattr(exc, "message", exc)))


@dataclass
class Refused:
    reason: str
    status: str = "stored"

    @property
    def rejected(self) -> list[tuple[int, str]]:
        return [(0, self.reason)]
