"""Agent protocol v1: the wire formats, typed once, shared by the agent and the server.

This module owns everything that crosses the WebSocket between a device and the console:
constants and limits, close codes, the signed byte strings (``auth_message``,
``claims_message``), frame parsing, one validator per device→server frame and one builder
per frame in either direction.  The contract it implements is ``docs/protocol.md``
(``/work/shared/PROTOCOL.md``).

It is imported by the Django consumer on every message, so it is stdlib-only and cheap to
import.  Conventions:

* ``parse_frame`` turns raw text into a dict with a string ``type``; it raises only
  ``ProtocolError``, whatever the input.
* ``validate_*`` take a parsed frame and return a small frozen dataclass (documented on
  each class).  Structural errors raise ``ProtocolError("bad_frame", ...)`` whose message
  names the offending field.  Unknown fields are ignored (forward compatibility).
  Validators never raise anything but ``ProtocolError``, even on frames that did not come
  through ``parse_frame``.
* Builders return plain dicts; ``dumps`` makes compact JSON text of them.  Durable
  builders take ``seq=None`` to leave ``seq`` out: the agent's outbox assigns it just
  before the frame is sent.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
import math
import re
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from enum import IntEnum
from itertools import chain
from typing import Any, TypedDict

try:  # optional accelerator (the console installs it; an agent may not): see parse_frame
    import orjson
except ImportError:  # pragma: no cover - exercised on agents without it
    orjson = None

PROTOCOL_VERSION = 1


class Close(IntEnum):
    """WebSocket close codes of the contract (see its table for what the agent does)."""

    NORMAL = 1000
    GOING_AWAY = 1001
    PROTOCOL_ERROR = 4400
    AUTH_FAILED = 4401
    REVOKED = 4403
    HANDSHAKE_TIMEOUT = 4408
    REPLACED = 4409
    TOO_LARGE = 4413
    RATE_LIMITED = 4429
    OVERLOADED = 4503


# --- limits (defaults; the server may configure its own and announces max_points) -------
MAX_FRAME_BYTES = 256 * 1024
MAX_POINTS = 1000
HANDSHAKE_TIMEOUT_S = 10
FUTURE_SKEW_MS = 5 * 60 * 1000
# Only a default for callers that have no retention setting at hand (validate_uplink);
# the server passes its configured retention.
DEFAULT_RETENTION_MS = 30 * 24 * 3600 * 1000
MAX_DEPTH = 32
METRIC_NAME_RE = re.compile(r"^[a-z][a-z0-9_]*(\.[a-z0-9_]+)*$")
METRIC_NAME_MAX = 64
# The contract leaves the uid format open; this keeps uids safe in URLs, logs and file
# names (the agent uses the uid as a directory name) without constraining real schemes.
DEVICE_UID_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._:-]*$")
DEVICE_UID_MAX = 128
# Postgres bigint: seq and ids end up there.
SEQ_MAX = 2**63 - 1
# The last millisecond of year 9999: a stored time (event `t`) cannot be later.
MAX_TIME_MS = 253_402_300_799_999
MAX_EVENTS = 100
MAX_MESSAGE_CHARS = 4096
MAX_OUTPUT_CHARS = 64 * 1024
MAX_SHORT_CHARS = 256

DURABLE_TYPES = frozenset({"telemetry", "event", "state", "rollout.status", "command.result"})
ROLLOUT_STATES = frozenset({
    "acked", "downloading", "downloaded", "installing", "verifying",
    "committed", "failed", "rolled_back", "rejected",
})
EVENT_KINDS = frozenset({"inference", "alert", "log", "boot"})
SEVERITIES = frozenset({"info", "warning", "critical"})
ACCELERATORS = frozenset({"none", "gpu", "npu", "tpu"})
COMMAND_NAMES = frozenset({"reboot", "attest", "sync_state", "set_config"})
WELCOME_STATUSES = frozenset({"active", "pending", "quarantined"})
ATTEST_FORMATS = frozenset({"tpm2-quote", "software-claims"})
ATTEST_STATUSES = frozenset({"affirming", "warning", "contraindicated"})
ARTIFACT_KINDS = frozenset({"model", "agent", "firmware"})
# Digest sizes of the PCR banks we accept, in bytes (hex is twice as long).
PCR_BANKS = {"sha1": 20, "sha256": 32, "sha384": 48, "sha512": 64}

ED25519_PUBLIC_BYTES = 32
ED25519_SIG_BYTES = 64
NONCE_BYTES = 32

AUTH_DOMAIN = b"fleet-auth-v1\x00"
CLAIMS_DOMAIN = b"fleet-claims-v1\x00"

Id = str | int
"""Server-chosen identifiers (execution, command, challenge) may be strings or integers;
validators return them as sent so the server can compare them with its own."""


# --- errors ----------------------------------------------------------------------------
class ProtocolError(Exception):
    """A frame the contract does not allow.

    ``code`` is the ``error`` frame code to answer with (``bad_frame``, ``unknown_type``,
    ``too_large``); ``message`` is readable and names the field; ``extra`` holds fields to
    add to the error frame (e.g. ``seq`` when the bad frame carried a usable one).
    """

    def __init__(self, code: str, message: str, **extra: Any) -> None:
        super().__init__(f"{code}: {message}")
        self.code = code
        self.message = message
        self.extra = extra

    def to_frame(self) -> dict[str, Any]:
        """The ``error`` frame that answers this problem."""
        return error(self.code, self.message, **self.extra)


def _bad(message: str, **extra: Any) -> ProtocolError:
    return ProtocolError("bad_frame", message, **extra)


# --- encodings -------------------------------------------------------------------------
def b64e(data: bytes) -> str:
    """Standard, padded base64 text of ``data``."""
    return base64.b64encode(data).decode("ascii")


def b64d(text: str) -> bytes:
    """Strictly decode standard padded base64; anything else is a ``ProtocolError``."""
    if type(text) is not str:
        raise _bad("expected base64 text")
    try:
        # validate=True rejects characters outside the alphabet (incl. url-safe ones and
        # whitespace); padding errors raise binascii.Error.
        raw = base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError) as exc:
        raise _bad(f"invalid base64 ({exc})") from None
    # b64decode tolerates non-zero pad bits; a strict decoder wants the canonical form.
    if base64.b64encode(raw).decode("ascii") != text:
        raise _bad("invalid base64 (not canonical)")
    return raw


def canonical_json(obj: Any) -> bytes:
    """Canonical JSON bytes: UTF-8, sorted keys, ``,``/``:`` separators, no NaN/Infinity.

    Raises ``ValueError`` (or ``TypeError``) for objects JSON cannot represent, including
    non-finite floats and strings with lone surrogates.
    """
    text = json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False)
    return text.encode("utf-8")


def auth_message(nonce: bytes, device_uid: str) -> bytes:
    """The bytes a device signs to authenticate (and to prove key possession at enroll)."""
    return AUTH_DOMAIN + nonce + device_uid.encode("utf-8")


def claims_message(nonce: bytes, claims: Mapping[str, Any]) -> bytes:
    """The bytes a device signs for ``software-claims`` attestation evidence."""
    return CLAIMS_DOMAIN + nonce + hashlib.sha256(canonical_json(claims)).digest()


def now_ms() -> int:
    """Current time in integer milliseconds since the epoch (the protocol's time unit)."""
    return time.time_ns() // 1_000_000


_now_ms = now_ms  # validate_uplink's keyword argument shadows the name


def dumps(frame: Mapping[str, Any]) -> str:
    """Compact JSON text of a frame (non-ASCII kept as UTF-8, NaN refused)."""
    return json.dumps(frame, separators=(",", ":"), ensure_ascii=False, allow_nan=False)


# --- parsing ---------------------------------------------------------------------------
def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not valid JSON")


_decoder = json.JSONDecoder(parse_constant=_reject_constant)
# An escaped surrogate or NUL in the text: only then do we walk the strings (rare path).
_SUSPECT_ESCAPE = re.compile(r"\\u(?:[dD][89a-fA-F]|0000)")


# An integer literal of 20 digits or more: orjson reads those as floats (losing digits), the
# stdlib as ints, so text with a run of 20 digits is decoded by the stdlib. Found by mapping
# every digit byte to "0" and everything else to " " (one C-level pass) and looking for 20 "0"s.
_DIGIT_MAP = bytes(0x30 if 0x30 <= i <= 0x39 else 0x20 for i in range(256))
_LONG_DIGIT_RUN = b"0" * 20


def _decode(text: str) -> Any:
    """JSON text to Python objects, with orjson when it is installed (4–5× faster on telemetry).

    The stdlib decoder is the reference; orjson is used only where the two agree. Text
    orjson refuses goes through the stdlib, so its outcome and message stand: ``1e400`` is
    an infinite float that validation rejects point by point (orjson refuses the whole
    text), NaN/Infinity literals, lone surrogates and bad syntax raise ValueError. Long
    integers are kept exact (above).
    """
    if orjson is not None:
        raw = text.encode("utf-8")  # valid here: parse_frame has checked the text
        if _LONG_DIGIT_RUN not in raw.translate(_DIGIT_MAP):
            try:
                return orjson.loads(raw)
            except orjson.JSONDecodeError:
                pass
    return _decoder.decode(text)


def _too_deep(obj: Any, limit: int) -> bool:
    """Whether ``obj`` holds a list or dict nested deeper than ``limit`` (``obj`` is level 1).

    Level by level, with the per-element work in C (``chain``, ``map(type)``, ``set``): a
    telemetry frame's 500 point lists and their 1,500 scalars are never looped over in Python."""
    level = [obj]
    for _ in range(limit):
        if set(map(type, level)) == _LIST_ONLY:
            children = list(chain.from_iterable(level))
        else:
            children = list(chain.from_iterable(n.values() if type(n) is dict else n for n in level))
        kinds = set(map(type, children))
        if kinds.isdisjoint(_CONTAINERS):
            return False
        level = children if kinds <= _CONTAINERS else [c for c in children if type(c) is list or type(c) is dict]
    return True


_LIST_ONLY = {list}
_CONTAINERS = frozenset((list, dict))


def _bad_string(obj: Any) -> str | None:
    """First problem with a string in ``obj``: a lone surrogate or a NUL character."""
    stack = [obj]
    while stack:
        node = stack.pop()
        items: Iterable[Any] = (
            [*node.keys(), *node.values()] if type(node) is dict else node if type(node) is list else (node,)
        )
        for value in items:
            tv = type(value)
            if tv is str:
                if "\x00" in value:
                    return "NUL characters (\\u0000) are not allowed in strings"
                try:
                    value.encode("utf-8")
                except UnicodeEncodeError:
                    return "lone surrogate escapes are not valid Unicode"
            elif tv is list or tv is dict:
                stack.append(value)
    return None


def parse_frame(data: str | bytes, *, max_bytes: int | None = None) -> dict[str, Any]:
    """Parse one frame: a JSON object with a string ``type``.

    Rejects non-UTF-8 bytes, invalid JSON, NaN/Infinity literals, non-objects, nesting
    deeper than ``MAX_DEPTH`` and strings PostgreSQL cannot store (NUL, lone surrogates),
    all as ``ProtocolError("bad_frame")``; a frame over ``max_bytes`` (UTF-8 length) is
    ``ProtocolError("too_large")``.  Never raises anything else.
    """
    try:
        if isinstance(data, (bytes, bytearray, memoryview)):
            raw = bytes(data)
            if max_bytes is not None and len(raw) > max_bytes:
                raise ProtocolError("too_large", f"frame is {len(raw)} bytes, limit {max_bytes}")
            try:
                text = raw.decode("utf-8")
            except UnicodeDecodeError as exc:
                raise _bad(f"frame is not valid UTF-8 (byte {exc.start})") from None
        elif isinstance(data, str):
            text = data
            if not text.isascii():
                try:
                    size = len(text.encode("utf-8"))
                except UnicodeEncodeError:
                    raise _bad("frame is not valid UTF-8 (lone surrogate)") from None
            else:
                size = len(text)
            if max_bytes is not None and size > max_bytes:
                raise ProtocolError("too_large", f"frame is {size} bytes, limit {max_bytes}")
        else:
            raise _bad(f"frame must be text, got {type(data).__name__}")
        try:
            obj = _decode(text)
        except RecursionError:
            raise _bad(f"frame nests deeper than {MAX_DEPTH} levels") from None
        except ValueError as exc:  # JSONDecodeError, NaN constants, over-long integers
            raise _bad(f"frame is not valid JSON: {exc}") from None
        if type(obj) is not dict:
            raise _bad("frame must be a JSON object")
        kind = obj.get("type")
        if type(kind) is not str:
            raise _bad("field 'type' must be a string")
        # Counting brackets is C-speed; only frames that could be too deep get walked.
        if text.count("[") + text.count("{") > MAX_DEPTH and _too_deep(obj, MAX_DEPTH):
            raise _bad(f"frame nests deeper than {MAX_DEPTH} levels")
        if _SUSPECT_ESCAPE.search(text) is not None:
            problem = _bad_string(obj)
            if problem is not None:
                raise _bad(problem)
        return obj
    except ProtocolError:
        raise
    except (RecursionError, MemoryError, ValueError, TypeError) as exc:  # belt and braces
        raise _bad(f"unreadable frame ({type(exc).__name__})") from None


# --- field helpers (each raises ProtocolError naming the field) -------------------------
def _obj(frame: Any) -> Mapping[str, Any]:
    if not isinstance(frame, Mapping):
        raise _bad("frame must be a JSON object")
    return frame


def _expect_type(frame: Any, expected: str) -> Mapping[str, Any]:
    frame = _obj(frame)
    if frame.get("type") != expected:
        raise _bad(f"field 'type' must be {expected!r}")
    return frame


def _str(frame: Mapping[str, Any], field: str, *, max_len: int = MAX_SHORT_CHARS, min_len: int = 1,
         where: str = "") -> str:
    value = frame.get(field)
    if type(value) is not str:
        raise _bad(f"field '{where}{field}' must be a string")
    if not min_len <= len(value) <= max_len:
        raise _bad(f"field '{where}{field}' must be {min_len}..{max_len} characters")
    return value


def _opt_str(frame: Mapping[str, Any], field: str, *, max_len: int = MAX_SHORT_CHARS, where: str = "") -> str | None:
    if frame.get(field) is None:
        return None
    return _str(frame, field, max_len=max_len, min_len=0, where=where)


def _int(frame: Mapping[str, Any], field: str, *, lo: int = 0, hi: int = SEQ_MAX, where: str = "") -> int:
    value = frame.get(field)
    # bool is a subclass of int; true/false are not numbers on this wire.
    if type(value) is not int:
        raise _bad(f"field '{where}{field}' must be an integer")
    if not lo <= value <= hi:
        raise _bad(f"field '{where}{field}' must be in {lo}..{hi}")
    return value


def _bool(frame: Mapping[str, Any], field: str, *, where: str = "") -> bool:
    value = frame.get(field)
    if type(value) is not bool:
        raise _bad(f"field '{where}{field}' must be true or false")
    return value


def _id(frame: Mapping[str, Any], field: str) -> Id:
    value = frame.get(field)
    if type(value) is int:
        if not 0 <= value <= SEQ_MAX:
            raise _bad(f"field '{field}' is out of range")
        return value
    if type(value) is str and 1 <= len(value) <= MAX_SHORT_CHARS:
        return value
    raise _bad(f"field '{field}' must be a string or an integer")


def _b64(frame: Mapping[str, Any], field: str, *, size: int | None = None, max_size: int = 64 * 1024,
         where: str = "") -> bytes:
    value = frame.get(field)
    if type(value) is not str:
        raise _bad(f"field '{where}{field}' must be base64 text")
    if len(value) > (max_size + 2) // 3 * 4:
        raise _bad(f"field '{where}{field}' is longer than {max_size} bytes")
    try:
        raw = b64d(value)
    except ProtocolError:
        raise _bad(f"field '{where}{field}' is not valid base64 (standard alphabet, padded)") from None
    if size is not None and len(raw) != size:
        raise _bad(f"field '{where}{field}' must decode to {size} bytes, got {len(raw)}")
    return raw


def _dict(frame: Mapping[str, Any], field: str, *, required: bool = True, where: str = "") -> dict[str, Any]:
    value = frame.get(field)
    if value is None and not required:
        return {}
    if type(value) is not dict:
        raise _bad(f"field '{where}{field}' must be an object")
    return value


def _uid(frame: Mapping[str, Any]) -> str:
    uid = _str(frame, "device_uid", max_len=DEVICE_UID_MAX)
    if DEVICE_UID_RE.fullmatch(uid) is None:
        raise _bad("field 'device_uid' may contain only letters, digits and . _ : - (not first)")
    return uid


def _seq(frame: Mapping[str, Any]) -> int:
    value = frame.get("seq")
    if type(value) is not int or not 1 <= value <= SEQ_MAX:
        raise _bad("field 'seq' must be a positive integer")
    return value


def _hex(value: Any, size: int, where: str) -> str:
    if type(value) is not str or len(value) != size * 2 or _HEX_RE.fullmatch(value) is None:
        raise _bad(f"field '{where}' must be {size * 2} lowercase hex digits")
    return value


_HEX_RE = re.compile(r"[0-9a-f]*")


# --- result types ----------------------------------------------------------------------
@dataclass(frozen=True, slots=True)
class Auth:
    """``auth``: a known device signs the server nonce."""

    device_uid: str
    sig: bytes
    agent_version: str


@dataclass(frozen=True, slots=True)
class TpmInfo:
    """The TPM part of ``enroll`` (TPM 2.0 marshaled structures, decoded from base64)."""

    ek_pub: bytes
    ek_cert: bytes | None
    ak_pub: bytes


@dataclass(frozen=True, slots=True)
class Enroll:
    """``enroll``: first contact with an enrollment token and a fresh Ed25519 key."""

    enrollment_token: str
    device_uid: str
    public_key: bytes
    sig: bytes
    hardware: dict[str, Any]
    tpm: TpmInfo | None
    agent_version: str | None


@dataclass(frozen=True, slots=True)
class Heartbeat:
    """``heartbeat`` (not durable). ``uptime_s`` is floored to whole seconds."""

    t: int
    uptime_s: int
    buffered: int


class Rejected(TypedDict):
    """One rejected telemetry point, as listed in ``ack.rejected``."""

    index: int
    reason: str


Point = tuple[int, str, float]
"""An accepted telemetry point: (t_ms, metric name, finite float value)."""


@dataclass(frozen=True, slots=True)
class Telemetry:
    """``telemetry``: accepted points in frame order and the rejected ones by index."""

    seq: int
    points: list[Point]
    rejected: list[Rejected]


@dataclass(frozen=True, slots=True)
class EventItem:
    """One entry of an ``event`` frame."""

    t: int
    kind: str
    severity: str
    message: str
    attrs: dict[str, Any]


@dataclass(frozen=True, slots=True)
class Event:
    """``event``: one or more device events."""

    seq: int
    events: list[EventItem]


@dataclass(frozen=True, slots=True)
class Capabilities:
    """``state.capabilities``."""

    cpu_cores: int
    ram_mb: int
    accelerator: str
    storage_mb: int
    arch: str
    os: str


@dataclass(frozen=True, slots=True)
class State:
    """``state``: installed versions (``None`` when a component is absent) and capabilities."""

    seq: int
    installed: dict[str, str | None]
    capabilities: Capabilities


@dataclass(frozen=True, slots=True)
class RolloutError:
    """``rollout.status.error``."""

    code: str
    retryable: bool
    detail: str


@dataclass(frozen=True, slots=True)
class RolloutStatus:
    """``rollout.status``: progress of one execution on this device."""

    seq: int
    execution_id: Id
    state: str
    progress: int
    error: RolloutError | None


@dataclass(frozen=True, slots=True)
class CommandResult:
    """``command.result``: the answer to one ``command``."""

    seq: int
    command_id: Id
    ok: bool
    output: str


@dataclass(frozen=True, slots=True)
class AttestEvidence:
    """``attest.evidence``.

    ``software-claims``: ``claims`` is the object exactly as sent (verify ``sig`` over
    ``claims_message(nonce, claims)``); ``agent_sha256``/``model_sha256``/``boot_id`` are
    its checked fields.  ``tpm2-quote``: ``attest``, ``signature``, ``pcrs``
    (bank → {index → lowercase hex}) and optional ``event_log``.
    """

    challenge_id: Id
    format: str
    claims: dict[str, Any] | None = None
    sig: bytes | None = None
    agent_sha256: str | None = None
    model_sha256: str | None = None
    boot_id: str | None = None
    attest: bytes | None = None
    signature: bytes | None = None
    pcrs: dict[str, dict[int, str]] | None = None
    event_log: bytes | None = None


@dataclass(frozen=True, slots=True)
class TpmActivate:
    """``tpm.activate``: the secret the TPM recovered from the credential."""

    secret: bytes


# --- device → server validators ---------------------------------------------------------
def validate_auth(frame: Any) -> Auth:
    """Check an ``auth`` frame (signature checking is the server's job)."""
    frame = _expect_type(frame, "auth")
    return Auth(
        device_uid=_uid(frame),
        sig=_b64(frame, "sig", size=ED25519_SIG_BYTES),
        agent_version=_str(frame, "agent_version", max_len=64),
    )


def _tpm_info(value: Any) -> TpmInfo | None:
    if value is None:
        return None
    if type(value) is not dict:
        raise _bad("field 'tpm' must be an object or null")
    ek_cert = None if value.get("ek_cert") is None else _b64(value, "ek_cert", max_size=16 * 1024, where="tpm.")
    return TpmInfo(
        ek_pub=_b64(value, "ek_pub", max_size=4096, where="tpm."),
        ek_cert=ek_cert,
        ak_pub=_b64(value, "ak_pub", max_size=4096, where="tpm."),
    )


_HARDWARE_INTS = {"cpu_cores": (1, 1 << 20), "ram_mb": (0, SEQ_MAX), "storage_mb": (0, SEQ_MAX)}
_HARDWARE_STRS = {"model": MAX_SHORT_CHARS, "serial": MAX_SHORT_CHARS, "arch": 64, "os": MAX_SHORT_CHARS}


def _hardware(value: Any) -> dict[str, Any]:
    """``enroll.hardware``: the known keys checked like ``state.capabilities`` (null means
    absent and is dropped); unknown keys are kept as sent and ignored by the server."""
    if value is None:
        return {}
    if type(value) is not dict:
        raise _bad("field 'hardware' must be an object")
    out = {k: v for k, v in value.items() if v is not None}
    for key, (lo, hi) in _HARDWARE_INTS.items():
        if key in out:
            _int(out, key, lo=lo, hi=hi, where="hardware.")
    for key, max_len in _HARDWARE_STRS.items():
        if key in out:
            _str(out, key, max_len=max_len, min_len=0, where="hardware.")
    if "accelerator" in out and (type(out["accelerator"]) is not str or out["accelerator"] not in ACCELERATORS):
        raise _bad(f"field 'hardware.accelerator' must be one of {sorted(ACCELERATORS)}")
    return out


def validate_enroll(frame: Any) -> Enroll:
    """Check an ``enroll`` frame. ``hardware`` defaults to ``{}``, ``tpm`` to ``None``."""
    frame = _expect_type(frame, "enroll")
    return Enroll(
        enrollment_token=_str(frame, "enrollment_token", max_len=MAX_SHORT_CHARS),
        device_uid=_uid(frame),
        public_key=_b64(frame, "public_key", size=ED25519_PUBLIC_BYTES),
        sig=_b64(frame, "sig", size=ED25519_SIG_BYTES),
        hardware=_hardware(frame.get("hardware")),
        tpm=_tpm_info(frame.get("tpm")),
        agent_version=_opt_str(frame, "agent_version", max_len=64),
    )


def _nonneg_number(frame: Mapping[str, Any], field: str) -> int:
    value = frame.get(field)
    tv = type(value)
    if tv is int:
        if 0 <= value <= SEQ_MAX:
            return value
    elif tv is float and math.isfinite(value) and 0 <= value <= SEQ_MAX:
        return int(value)
    raise _bad(f"field '{field}' must be a non-negative number")


def validate_heartbeat(frame: Any) -> Heartbeat:
    """Check a ``heartbeat`` frame."""
    frame = _expect_type(frame, "heartbeat")
    return Heartbeat(
        t=_int(frame, "t"),
        uptime_s=_nonneg_number(frame, "uptime_s"),
        buffered=_int(frame, "buffered"),
    )


# The name cache keeps the per-point cost of a metric-name check to one dict lookup; it is
# bounded so a device sending random names cannot grow it without limit.
_name_ok: dict[Any, bool] = {}
_NAME_CACHE_MAX = 8192
_FLOAT_MAX = 1.7976931348623157e308


def _metric_name_ok(name: Any) -> bool:
    ok = type(name) is str and len(name) <= METRIC_NAME_MAX and METRIC_NAME_RE.fullmatch(name) is not None
    if len(_name_ok) >= _NAME_CACHE_MAX:
        _name_ok.clear()
    if type(name) is str:
        _name_ok[name] = ok
    return ok


def validate_telemetry(frame: Any, *, now_ms: int, retention_ms: int, max_points: int = MAX_POINTS) -> Telemetry:
    """Check a ``telemetry`` frame point by point.

    A point with a bad shape (``bad_point``), name (``bad_metric_name``), value
    (``bad_value``: not a finite number; booleans are not numbers) or a time outside
    ``[now_ms - retention_ms, now_ms + FUTURE_SKEW_MS]`` (``time_out_of_range``) is
    rejected alone, with the first reason in that order.  A missing or non-list
    ``points`` or more than ``max_points`` points rejects the whole frame.
    """
    frame = _expect_type(frame, "telemetry")
    seq = _seq(frame)
    points = frame.get("points")
    if type(points) is not list:
        raise _bad("field 'points' must be a list", seq=seq)
    if len(points) > max_points:
        raise _bad(f"field 'points' has {len(points)} points, limit {max_points}", seq=seq)
    lo = now_ms - retention_ms
    hi = now_ms + FUTURE_SKEW_MS
    accepted: list[Point] = []
    rejected: list[Rejected] = []
    add, reject = accepted.append, rejected.append
    names = _name_ok
    isfinite = math.isfinite
    # One tight loop with type() identity checks: no exceptions, no regex per point, one
    # tuple per accepted point.
    for i, point in enumerate(points):
        if type(point) is not list or len(point) != 3:
            reject({"index": i, "reason": "bad_point"})
            continue
        t, name, value = point
        if type(t) is not int:
            reject({"index": i, "reason": "bad_point"})
            continue
        ok = names.get(name) if type(name) is str else False
        if ok is None:
            ok = _metric_name_ok(name)
        if not ok:
            reject({"index": i, "reason": "bad_metric_name"})
            continue
        tv = type(value)
        if tv is float:
            if not isfinite(value):
                reject({"index": i, "reason": "bad_value"})
                continue
        elif tv is int:
            # Python ints are unbounded; one too large for a double is not a finite number.
            if not -_FLOAT_MAX <= value <= _FLOAT_MAX:
                reject({"index": i, "reason": "bad_value"})
                continue
            value = float(value)
        else:
            reject({"index": i, "reason": "bad_value"})
            continue
        if not lo <= t <= hi:
            reject({"index": i, "reason": "time_out_of_range"})
            continue
        add((t, name, value))
    return Telemetry(seq=seq, points=accepted, rejected=rejected)


def _event_item(value: Any, i: int) -> EventItem:
    where = f"events[{i}]."
    if type(value) is not dict:
        raise _bad(f"field 'events[{i}]' must be an object")
    kind = value.get("kind")
    if type(kind) is not str or kind not in EVENT_KINDS:
        raise _bad(f"field '{where}kind' must be one of {sorted(EVENT_KINDS)}")
    severity = value.get("severity")
    if type(severity) is not str or severity not in SEVERITIES:
        raise _bad(f"field '{where}severity' must be one of {sorted(SEVERITIES)}")
    return EventItem(
        t=_int(value, "t", hi=MAX_TIME_MS, where=where),
        kind=kind,
        severity=severity,
        message=_str(value, "message", max_len=MAX_MESSAGE_CHARS, min_len=0, where=where),
        attrs=_dict(value, "attrs", required=False, where=where),
    )


def validate_event(frame: Any) -> Event:
    """Check an ``event`` frame (1..MAX_EVENTS events; ``attrs`` defaults to ``{}``)."""
    frame = _expect_type(frame, "event")
    seq = _seq(frame)
    events = frame.get("events")
    if type(events) is not list or not 1 <= len(events) <= MAX_EVENTS:
        raise _bad(f"field 'events' must be a list of 1..{MAX_EVENTS} events", seq=seq)
    try:
        return Event(seq=seq, events=[_event_item(e, i) for i, e in enumerate(events)])
    except ProtocolError as exc:
        raise _bad(exc.message, seq=seq) from None


def validate_state(frame: Any) -> State:
    """Check a ``state`` frame. ``installed`` maps component → version text or null."""
    frame = _expect_type(frame, "state")
    seq = _seq(frame)
    try:
        installed = _dict(frame, "installed")
        for key, version in installed.items():
            version_ok = version is None or (type(version) is str and len(version) <= 64)
            if type(key) is not str or len(key) > 64 or not version_ok:
                raise _bad(f"field 'installed.{str(key)[:64]}' must be a version string (≤ 64) or null")
        caps = _dict(frame, "capabilities")
        where = "capabilities."
        accelerator = caps.get("accelerator")
        if type(accelerator) is not str or accelerator not in ACCELERATORS:
            raise _bad(f"field 'capabilities.accelerator' must be one of {sorted(ACCELERATORS)}")
        capabilities = Capabilities(
            cpu_cores=_int(caps, "cpu_cores", lo=1, hi=1 << 20, where=where),
            ram_mb=_int(caps, "ram_mb", where=where),
            accelerator=accelerator,
            storage_mb=_int(caps, "storage_mb", where=where),
            arch=_str(caps, "arch", max_len=64, where=where),
            os=_str(caps, "os", max_len=MAX_SHORT_CHARS, where=where),
        )
    except ProtocolError as exc:
        raise _bad(exc.message, seq=seq) from None
    return State(seq=seq, installed=dict(installed), capabilities=capabilities)


def validate_rollout_status(frame: Any) -> RolloutStatus:
    """Check a ``rollout.status`` frame (``progress`` defaults to 0, ``error`` to null)."""
    frame = _expect_type(frame, "rollout.status")
    seq = _seq(frame)
    try:
        state = frame.get("state")
        if type(state) is not str or state not in ROLLOUT_STATES:
            raise _bad(f"field 'state' must be one of {sorted(ROLLOUT_STATES)}")
        progress = 0 if frame.get("progress") is None else _int(frame, "progress", hi=100)
        err_value = frame.get("error")
        err = None
        if err_value is not None:
            if type(err_value) is not dict:
                raise _bad("field 'error' must be an object or null")
            err = RolloutError(
                code=_str(err_value, "code", max_len=64, where="error."),
                retryable=_bool(err_value, "retryable", where="error."),
                detail=_opt_str(err_value, "detail", max_len=MAX_MESSAGE_CHARS, where="error.") or "",
            )
        return RolloutStatus(seq=seq, execution_id=_id(frame, "execution_id"), state=state,
                             progress=progress, error=err)
    except ProtocolError as exc:
        raise _bad(exc.message, seq=seq) from None


def validate_command_result(frame: Any) -> CommandResult:
    """Check a ``command.result`` frame (``output`` ≤ 64 KiB characters)."""
    frame = _expect_type(frame, "command.result")
    seq = _seq(frame)
    try:
        return CommandResult(
            seq=seq,
            command_id=_id(frame, "command_id"),
            ok=_bool(frame, "ok"),
            output=_opt_str(frame, "output", max_len=MAX_OUTPUT_CHARS) or "",
        )
    except ProtocolError as exc:
        raise _bad(exc.message, seq=seq) from None


def _pcrs(value: Any) -> dict[str, dict[int, str]]:
    if type(value) is not dict or not value:
        raise _bad("field 'pcrs' must be an object of banks")
    out: dict[str, dict[int, str]] = {}
    for bank, entries in value.items():
        size = PCR_BANKS.get(bank) if type(bank) is str else None
        if size is None:
            raise _bad(f"field 'pcrs' has an unknown bank (one of {sorted(PCR_BANKS)})")
        if type(entries) is not dict:
            raise _bad(f"field 'pcrs.{bank}' must be an object")
        bank_out: dict[int, str] = {}
        for index, digest in entries.items():
            if not (type(index) is str and index.isascii() and index.isdigit() and len(index) <= 2 and int(index) <= 23):
                raise _bad(f"field 'pcrs.{bank}' keys must be PCR indices 0..23")
            bank_out[int(index)] = _hex(digest, size, f"pcrs.{bank}.{index}")
        out[bank] = bank_out
    return out


def validate_attest_evidence(frame: Any) -> AttestEvidence:
    """Check an ``attest.evidence`` frame of either format (cryptography is the server's)."""
    frame = _expect_type(frame, "attest.evidence")
    challenge_id = _id(frame, "challenge_id")
    fmt = frame.get("format")
    if fmt == "software-claims":
        claims = _dict(frame, "claims")
        return AttestEvidence(
            challenge_id=challenge_id,
            format=fmt,
            claims=claims,
            sig=_b64(frame, "sig", size=ED25519_SIG_BYTES),
            agent_sha256=_hex(claims.get("agent_sha256"), 32, "claims.agent_sha256"),
            model_sha256=_hex(claims.get("model_sha256"), 32, "claims.model_sha256"),
            boot_id=_str(claims, "boot_id", max_len=64, where="claims."),
        )
    if fmt == "tpm2-quote":
        event_log = None if frame.get("event_log") is None else _b64(frame, "event_log", max_size=128 * 1024)
        return AttestEvidence(
            challenge_id=challenge_id,
            format=fmt,
            attest=_b64(frame, "attest", max_size=4096),
            signature=_b64(frame, "signature", max_size=4096),
            pcrs=_pcrs(frame.get("pcrs")),
            event_log=event_log,
        )
    raise _bad(f"field 'format' must be one of {sorted(ATTEST_FORMATS)}")


def validate_tpm_activate(frame: Any) -> TpmActivate:
    """Check a ``tpm.activate`` frame (1..64 secret bytes)."""
    frame = _expect_type(frame, "tpm.activate")
    secret = _b64(frame, "secret", max_size=64)
    if not secret:
        raise _bad("field 'secret' must not be empty")
    return TpmActivate(secret=secret)


Uplink = Telemetry | Event | State | RolloutStatus | CommandResult


def validate_uplink(frame: Any, *, now_ms: int | None = None, retention_ms: int = DEFAULT_RETENTION_MS,
                    max_points: int = MAX_POINTS) -> tuple[str, int, Uplink]:
    """Validate any durable uplink frame: returns ``(type, seq, payload)``.

    ``payload`` is the type's result object.  A type outside ``DURABLE_TYPES`` raises
    ``ProtocolError("unknown_type")``.  ``now_ms`` defaults to the current time.
    Structural errors carry ``extra["seq"]`` when the frame's seq itself was valid.
    """
    frame = _obj(frame)
    kind = frame.get("type")
    if kind == "telemetry":
        result: Uplink = validate_telemetry(
            frame, now_ms=now_ms if now_ms is not None else _now_ms(),
            retention_ms=retention_ms, max_points=max_points)
    elif kind == "event":
        result = validate_event(frame)
    elif kind == "state":
        result = validate_state(frame)
    elif kind == "rollout.status":
        result = validate_rollout_status(frame)
    elif kind == "command.result":
        result = validate_command_result(frame)
    else:
        shown = kind[:64] if type(kind) is str else type(kind).__name__
        raise ProtocolError("unknown_type", f"{shown!r} is not a durable uplink type")
    return kind, result.seq, result


# --- validators for server → device frames (used by the agent) --------------------------
def validate_hello(frame: Any) -> tuple[int, bytes, int]:
    """``hello`` → ``(protocol, nonce, server_time)``."""
    frame = _expect_type(frame, "hello")
    return _int(frame, "protocol"), _b64(frame, "nonce", size=NONCE_BYTES), _int(frame, "server_time")


def validate_welcome(frame: Any) -> dict[str, Any]:
    """``welcome`` → the frame with ``status``, ``last_acked_seq``, ``heartbeat_s`` and
    ``max_points`` checked and defaulted (30 s / MAX_POINTS)."""
    frame = _expect_type(frame, "welcome")
    status = frame.get("status")
    if type(status) is not str or status not in WELCOME_STATUSES:
        raise _bad(f"field 'status' must be one of {sorted(WELCOME_STATUSES)}")
    out = dict(frame)
    out["last_acked_seq"] = _int(frame, "last_acked_seq")
    out["heartbeat_s"] = 30 if frame.get("heartbeat_s") is None else _int(frame, "heartbeat_s", lo=1, hi=86400)
    out["max_points"] = MAX_POINTS if frame.get("max_points") is None else _int(frame, "max_points", lo=1)
    return out


# --- builders --------------------------------------------------------------------------
def _durable(kind: str, seq: int | None, body: dict[str, Any]) -> dict[str, Any]:
    frame: dict[str, Any] = {"type": kind}
    if seq is not None:
        frame["seq"] = seq
    frame.update(body)
    return frame


def hello(nonce: bytes, server_time: int) -> dict[str, Any]:
    """Server → device: start of the handshake."""
    return {"type": "hello", "protocol": PROTOCOL_VERSION, "nonce": b64e(nonce), "server_time": server_time}


def welcome(device_uid: str, status: str, last_acked_seq: int, *, heartbeat_s: int = 30,
            max_points: int = MAX_POINTS, artifact_keys: Iterable[tuple[str, bytes]] = ()) -> dict[str, Any]:
    """Server → device: handshake accepted; ``artifact_keys`` as (key_id, raw public key)."""
    return {
        "type": "welcome", "device_uid": device_uid, "status": status, "last_acked_seq": last_acked_seq,
        "heartbeat_s": heartbeat_s, "max_points": max_points,
        "artifact_keys": [{"key_id": key_id, "public_key": b64e(key)} for key_id, key in artifact_keys],
    }


def ack(seq: int, accepted: int, rejected: Sequence[Rejected] = ()) -> dict[str, Any]:
    """Server → device: durable frame ``seq`` is committed."""
    return {"type": "ack", "seq": seq, "accepted": accepted, "rejected": list(rejected)}


def error(code: str, message: str, **extra: Any) -> dict[str, Any]:
    """Server → device: a problem (``seq_gap`` adds ``expected``, ``rate_limited`` adds
    ``retry_after_ms``)."""
    return {"type": "error", "code": code, "message": message, **extra}


def auth(device_uid: str, sig: bytes, agent_version: str) -> dict[str, Any]:
    """Device → server: authenticate a known device."""
    return {"type": "auth", "device_uid": device_uid, "sig": b64e(sig), "agent_version": agent_version}


def tpm_info(ek_pub: bytes, ek_cert: bytes | None, ak_pub: bytes) -> dict[str, Any]:
    """The ``tpm`` object of ``enroll``."""
    return {"ek_pub": b64e(ek_pub), "ek_cert": None if ek_cert is None else b64e(ek_cert), "ak_pub": b64e(ak_pub)}


def enroll(enrollment_token: str, device_uid: str, public_key: bytes, sig: bytes, *,
           hardware: Mapping[str, Any] | None = None, tpm: Mapping[str, Any] | None = None,
           agent_version: str | None = None) -> dict[str, Any]:
    """Device → server: first contact (``tpm`` as built by ``tpm_info``)."""
    frame = {
        "type": "enroll", "enrollment_token": enrollment_token, "device_uid": device_uid,
        "public_key": b64e(public_key), "sig": b64e(sig), "hardware": dict(hardware or {}),
        "tpm": None if tpm is None else dict(tpm),
    }
    if agent_version is not None:
        frame["agent_version"] = agent_version
    return frame


def heartbeat(t: int, uptime_s: int, buffered: int) -> dict[str, Any]:
    """Device → server: liveness and buffer depth (not durable)."""
    return {"type": "heartbeat", "t": t, "uptime_s": uptime_s, "buffered": buffered}


def telemetry(seq: int | None, points: Iterable[Sequence[Any]]) -> dict[str, Any]:
    """Device → server: points as ``(t_ms, metric, value)``."""
    return _durable("telemetry", seq, {"points": [[t, name, value] for t, name, value in points]})


def event_item(t: int, kind: str, severity: str, message: str,
               attrs: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """One entry of an ``event`` frame."""
    return {"t": t, "kind": kind, "severity": severity, "message": message, "attrs": dict(attrs or {})}


def event(seq: int | None, events: Iterable[Mapping[str, Any]]) -> dict[str, Any]:
    """Device → server: events built with ``event_item``."""
    return _durable("event", seq, {"events": [dict(e) for e in events]})


def state(seq: int | None, installed: Mapping[str, str | None], capabilities: Mapping[str, Any]) -> dict[str, Any]:
    """Device → server: installed versions and capabilities."""
    return _durable("state", seq, {"installed": dict(installed), "capabilities": dict(capabilities)})


def rollout_error(code: str, *, retryable: bool, detail: str = "") -> dict[str, Any]:
    """The ``error`` object of ``rollout.status``."""
    return {"code": code, "retryable": retryable, "detail": detail}


def rollout_status(seq: int | None, execution_id: Id, state: str, progress: int = 0,
                   error: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """Device → server: rollout progress (``error`` built with ``rollout_error``)."""
    return _durable("rollout.status", seq, {
        "execution_id": execution_id, "state": state, "progress": progress,
        "error": None if error is None else dict(error),
    })


def command_result(seq: int | None, command_id: Id, ok: bool, output: str = "") -> dict[str, Any]:
    """Device → server: the outcome of a ``command``."""
    return _durable("command.result", seq, {"command_id": command_id, "ok": ok, "output": output})


def attest_challenge(challenge_id: Id, nonce: bytes, expires_at: int,
                     pcrs: Sequence[int] = (0, 1, 2, 3, 4, 5, 6, 7)) -> dict[str, Any]:
    """Server → device: prove your state (single use)."""
    return {"type": "attest.challenge", "challenge_id": challenge_id, "nonce": b64e(nonce),
            "pcrs": list(pcrs), "expires_at": expires_at}


def attest_evidence_software(challenge_id: Id, claims: Mapping[str, Any], sig: bytes) -> dict[str, Any]:
    """Device → server: self-reported claims signed over ``claims_message``."""
    return {"type": "attest.evidence", "challenge_id": challenge_id, "format": "software-claims",
            "claims": dict(claims), "sig": b64e(sig)}


def attest_evidence_tpm(challenge_id: Id, attest: bytes, signature: bytes,
                        pcrs: Mapping[str, Mapping[int | str, str]],
                        event_log: bytes | None = None) -> dict[str, Any]:
    """Device → server: a TPM2 quote (``pcrs`` bank → {index → lowercase hex})."""
    frame: dict[str, Any] = {
        "type": "attest.evidence", "challenge_id": challenge_id, "format": "tpm2-quote",
        "attest": b64e(attest), "signature": b64e(signature),
        "pcrs": {bank: {str(i): d for i, d in values.items()} for bank, values in pcrs.items()},
    }
    if event_log is not None:
        frame["event_log"] = b64e(event_log)
    return frame


def attest_result(challenge_id: Id, status: str) -> dict[str, Any]:
    """Server → device: the verdict on the evidence."""
    return {"type": "attest.result", "challenge_id": challenge_id, "status": status}


def rollout_offer(execution_id: Id, *, name: str, kind: str, version: str, url: str, sha256: str, size: int,
                  manifest: bytes, signature: bytes, key_id: str, deadline: int,
                  window: tuple[int, int] | None = None) -> dict[str, Any]:
    """Server → device: install an artifact (``manifest`` is its canonical JSON bytes)."""
    return {
        "type": "rollout.offer", "execution_id": execution_id,
        "artifact": {"name": name, "kind": kind, "version": version, "url": url, "sha256": sha256,
                     "size": size, "manifest": b64e(manifest), "signature": b64e(signature), "key_id": key_id},
        "window": None if window is None else {"start": window[0], "end": window[1]},
        "deadline": deadline,
    }


def rollout_cancel(execution_id: Id) -> dict[str, Any]:
    """Server → device: stop this execution."""
    return {"type": "rollout.cancel", "execution_id": execution_id}


def command(command_id: Id, name: str, args: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """Server → device: run a command (answered by a durable ``command.result``)."""
    return {"type": "command", "command_id": command_id, "name": name, "args": dict(args or {})}


def tpm_credential(credential_blob: bytes, encrypted_secret: bytes) -> dict[str, Any]:
    """Server → device: MakeCredential output for the AK."""
    return {"type": "tpm.credential", "credential_blob": b64e(credential_blob),
            "encrypted_secret": b64e(encrypted_secret)}


def tpm_activate(secret: bytes) -> dict[str, Any]:
    """Device → server: ActivateCredential result."""
    return {"type": "tpm.activate", "secret": b64e(secret)}
