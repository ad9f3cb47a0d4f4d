"""Hypothesis strategies for hostile agent frames (issue #9: "bad input" over the agent protocol).

A generated frame is a `Case`: which connection phase it is sent in (`handshake`: the first
frame on a fresh connection, before authentication; `session`: on an authenticated
connection), a label naming the frame type and the mutation, and a payload:

* a JSON-ish tree (dict / list / str / int / float / bool / None) that may contain
  `Fill` placeholders, resolved only at send time from the live connection (the next
  `seq`, this connection's nonce signature, the current time, the latest challenge id,
  a real enrollment token), and `Raw` nodes spliced into the text verbatim (deep nesting,
  integers with thousands of digits, `NaN` literals) — things `json.dumps` cannot write;
* or `RawText` / `RawBytes`: garbage sent as a text or a binary WebSocket frame.

`encode` writes the tree as JSON text by hand so that every hostile value survives:
NaN/Infinity become the (invalid) JSON literals, lone surrogates become `\\ud800`
escapes, other non-ASCII text goes over the wire as real UTF-8 (RTL overrides,
homoglyphs, zero-width characters).

Near-valid frames start from a valid frame of each device→server type of the contract
(`auth`, `enroll`, `tpm.activate`, `heartbeat`, `telemetry`, `event`, `state`,
`rollout.status`, `command.result`, `attest.evidence`) and mutate one field (or one field of
one nested object): delete it, replace it with a hostile value, or add an unknown field.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from typing import Any

from hypothesis import strategies as st

# --- the payload tree ------------------------------------------------------------------


@dataclass(frozen=True)
class Fill:
    """A value taken from the live connection when the frame is sent."""

    what: str  # seq, sig, now, challenge, token, uid, public_key, new_uid, new_sig
    delta: int = 0


@dataclass(frozen=True)
class Raw:
    """JSON text spliced in verbatim."""

    text: str


@dataclass(frozen=True)
class RawText:
    text: str


@dataclass(frozen=True)
class RawBytes:
    data: bytes


@dataclass(frozen=True)
class Case:
    phase: str  # "handshake" or "session"
    label: str  # "<type>:<mutation>"
    payload: Any
    binary: bool = False  # send an encoded tree as a binary frame

    @property
    def kind(self) -> str:
        return self.label.split(":", 1)[0]


def encode(node: Any, resolve) -> str:
    """JSON text of a payload tree; `resolve(Fill)` supplies placeholder values.

    The tree is copied with placeholders filled and `Raw` nodes swapped for marker strings,
    written by the C encoder (NaN/Infinity as their literals), then the markers are replaced
    by the raw text. Text with lone surrogates is written with `\\u` escapes instead."""
    raws: list[str] = []

    def fill(item: Any) -> Any:
        tv = type(item)
        if tv is dict:
            return {(k if type(k) is str else str(k)): fill(v) for k, v in item.items()}
        if tv is list or tv is tuple:
            if item and all(type(v) in _SCALARS for v in item):
                return item
            return [fill(v) for v in item]
        if tv is Fill:
            return fill(resolve(item))
        if tv is Raw:
            raws.append(item.text)
            return f"\x00raw{len(raws) - 1}\x00"
        return item

    tree = fill(node)
    text = json.dumps(tree, ensure_ascii=False, allow_nan=True, separators=(",", ":"))
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        text = json.dumps(tree, ensure_ascii=True, allow_nan=True, separators=(",", ":"))
    for i, raw in enumerate(raws):
        text = text.replace(f'"\\u0000raw{i}\\u0000"', raw, 1)
    return text


_SCALARS = {int, float, str, bool, type(None)}


# --- hostile values ----------------------------------------------------------------------
TRICKY_STRINGS = [
    "", " ", "\x00", "a\x00b", "\ud800", "\udfff", "x\udbff", "\u202e", "\u202egnp.exe", "\u200b", "\ufeff",
    "ѕensor.temp_c",  # Cyrillic ѕ homoglyph
    "sensor.tеmp_c",  # Cyrillic е
    "e\u0301" * 50, "\U0010ffff", "\U0001f4a9", "\u0000\u0001\u001f\u007f", "\\", "\"", "'; DROP TABLE x; --",
    "../../etc/passwd", "%s%s%n", "{{7*7}}", "<script>alert(1)</script>", "\r\n\t", "null", "NaN", "1e999",
    "\u2028\u2029", "ℌ𝔢𝔩𝔩𝔬", "fleet-auth-v1\x00", "A" * 65, "a" * 64, "a" * 257,
]
SPECIAL_FLOATS = [math.nan, math.inf, -math.inf, -0.0, 0.0, 1e308, -1e308, 1.7976931348623157e308, 5e-324,
                  2.0**63, 2.0**64, 1.5, -1.5]
SPECIAL_INTS = [0, -1, 1, 2**31 - 1, 2**31, 2**53 + 1, 2**63 - 1, 2**63, 2**64, -(2**63), -(2**63) - 1, 10**30,
                -(10**30)]


def huge_int_text() -> st.SearchStrategy[Raw]:
    # Beyond Python's 4,300-digit int<->str limit too: the server must refuse, not crash.
    return st.builds(lambda d, n, neg: Raw(("-" if neg else "") + d * n), st.sampled_from("123456789"),
                     st.sampled_from([20, 400, 4300, 4301, 20_000]), st.booleans())


def nested_text() -> st.SearchStrategy[Raw]:
    def build(depth: int, opener: str, leaf: str) -> Raw:
        if opener == "[":
            return Raw("[" * depth + leaf + "]" * depth)
        return Raw('{"a":' * depth + leaf + "}" * depth)

    return st.builds(build, st.sampled_from([31, 32, 33, 100, 1000, 5000, 50_000]), st.sampled_from("[{"),
                     st.sampled_from(["1", "null", '"x"', "[]", "{}"]))


def enormous_string() -> st.SearchStrategy[str]:
    return st.builds(lambda c, n: c * n, st.sampled_from(["a", "é", "\u202e", "\U0001f4a9", "\x01", " "]),
                     st.sampled_from([65, 257, 4097, 65_537, 70_000, 140_000]))


def long_array() -> st.SearchStrategy[list]:
    return st.builds(lambda v, n: [v] * n, st.sampled_from([0, None, "x", [], {}]),
                     st.sampled_from([101, 1001, 5000, 30_000]))


small_json = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=8,
)

hostile_value = st.one_of(
    st.sampled_from(SPECIAL_INTS),
    st.sampled_from(SPECIAL_FLOATS),
    st.sampled_from(TRICKY_STRINGS),
    st.integers(),
    st.floats(),
    st.text(max_size=30),
    st.booleans(),
    st.none(),
    huge_int_text(),
    nested_text(),
    enormous_string(),
    long_array(),
    small_json,
)


# --- valid frames of each device→server type (with placeholders) ------------------------
def now(delta: int = 0) -> Fill:
    return Fill("now", delta)


B64_SIG = "A" * 86 + "=="  # 64 zero bytes
HEX64 = "0" * 64


def _point(i: int = 0) -> list:
    return [now(-i - 1), "fuzz.metric", 1.5]


def valid_templates() -> dict[str, list[dict]]:
    """A few valid frames of each device→server type; mutations supply the variety."""
    caps = {"cpu_cores": 4, "ram_mb": 8192, "accelerator": "gpu", "storage_mb": 64000, "arch": "aarch64",
            "os": "Debian 12"}
    claims = {"agent_sha256": HEX64, "model_sha256": HEX64, "boot_id": "boot-1"}
    return {
        "auth": [{"type": "auth", "device_uid": Fill("uid"), "sig": Fill("sig"), "agent_version": "fuzz"}],
        "enroll": [
            {"type": "enroll", "enrollment_token": Fill("token"), "device_uid": Fill("new_uid"),
             "public_key": Fill("public_key"), "sig": Fill("new_sig"),
             "hardware": {"model": "fuzz-box", "ram_mb": 8192, "cpu_cores": 4}, "tpm": None},
            {"type": "enroll", "enrollment_token": Fill("token"), "device_uid": Fill("new_uid"),
             "public_key": Fill("public_key"), "sig": Fill("new_sig"), "agent_version": "1.0.0",
             "hardware": {"model": "fuzz-box", "serial": "SN1", "ram_mb": 512, "cpu_cores": 1, "accelerator": "npu",
                          "storage_mb": 1000, "arch": "armv7l", "os": "Yocto"},
             "tpm": None},
        ],
        "tpm.activate": [{"type": "tpm.activate", "secret": "c2VjcmV0"}],
        "heartbeat": [{"type": "heartbeat", "t": now(), "uptime_s": 120, "buffered": 0},
                      {"type": "heartbeat", "t": now(), "uptime_s": 1.5, "buffered": 17}],
        "telemetry": [
            {"type": "telemetry", "seq": Fill("seq"), "points": [[now(-1), "fuzz.metric", 1.5]]},
            {"type": "telemetry", "seq": Fill("seq"), "points": [[now(-3), "cpu", 1], [now(-2), "gpu.util", 0.25],
                                                                  [now(-1), "sensor.temp_c", -40.0]]},
            {"type": "telemetry", "seq": Fill("seq"), "points": []},
        ],
        "event": [
            {"type": "event", "seq": Fill("seq"), "events": [
                {"t": now(), "kind": "inference", "severity": "warning", "message": "score 0.97",
                 "attrs": {"score": 0.97}}]},
            {"type": "event", "seq": Fill("seq"), "events": [
                {"t": now(-5), "kind": "boot", "severity": "info", "message": "", "attrs": {}},
                {"t": now(), "kind": "alert", "severity": "critical", "message": "overheat"}]},
        ],
        "state": [
            {"type": "state", "seq": Fill("seq"), "installed": {"agent": "1.4.0", "model": "m-1", "firmware": None},
             "capabilities": caps},
        ],
        "rollout.status": [
            {"type": "rollout.status", "seq": Fill("seq"), "execution_id": 1, "state": "downloading",
             "progress": 40, "error": None},
            {"type": "rollout.status", "seq": Fill("seq"), "execution_id": "e-1", "state": "failed", "progress": 0,
             "error": {"code": "digest_mismatch", "retryable": True, "detail": "sha256 differs"}},
        ],
        "command.result": [
            {"type": "command.result", "seq": Fill("seq"), "command_id": "7b0f6a34-1d1e-4c43-9b0e-5d2f0e0f0a11",
             "ok": True, "output": "rebooting"},
            {"type": "command.result", "seq": Fill("seq"), "command_id": 12, "ok": False, "output": ""},
        ],
        "attest.evidence": [
            {"type": "attest.evidence", "challenge_id": Fill("challenge"), "format": "software-claims",
             "claims": claims, "sig": B64_SIG},
            {"type": "attest.evidence", "challenge_id": "7b0f6a34-1d1e-4c43-9b0e-5d2f0e0f0a11",
             "format": "software-claims", "claims": claims, "sig": B64_SIG},
            {"type": "attest.evidence", "challenge_id": Fill("challenge"), "format": "tpm2-quote", "attest": "AAAA",
             "signature": "AAAA", "pcrs": {"sha256": {"0": HEX64, "7": HEX64}}},
        ],
    }


VALID = {kind: st.sampled_from(frames) for kind, frames in valid_templates().items()}
HANDSHAKE_TYPES = ["auth", "enroll", "tpm.activate", "heartbeat", "telemetry"]
SESSION_TYPES = ["telemetry", "event", "state", "rollout.status", "command.result", "heartbeat", "attest.evidence",
                 "tpm.activate", "auth", "enroll"]


# --- mutations ---------------------------------------------------------------------------
def _paths(frame: Any, prefix: tuple = ()) -> list[tuple]:
    """Paths of every dict field and list item, two levels into nested values."""
    out: list[tuple] = []
    if len(prefix) > 3:
        return out
    if type(frame) is dict:
        for key, value in frame.items():
            out.append((*prefix, key))
            out += _paths(value, (*prefix, key))
    elif type(frame) is list:
        for i, value in enumerate(frame[:3]):
            out.append((*prefix, i))
            out += _paths(value, (*prefix, i))
    return out


def _copy(frame: Any) -> Any:
    if type(frame) is dict:
        return {k: _copy(v) for k, v in frame.items()}
    if type(frame) is list:
        return [_copy(v) for v in frame]
    return frame


def _at(frame: Any, path: tuple) -> tuple[Any, Any]:
    parent = frame
    for step in path[:-1]:
        parent = parent[step]
    return parent, path[-1]


SEQ_VALUES = [Fill("seq", -1), Fill("seq", 1), Fill("seq", 5), 0, -1, 2**63 - 1, 2**63, 2**64, 1.0, "1", True, None,
              math.nan, math.inf, Raw("1e400"), Raw("-0"), Raw("1.0e0"), [1], {"n": 1}]


HOW = st.sampled_from(["valid", "delete", "replace", "replace", "replace", "replace", "extra", "seq", "type"])
EXTRA_KEYS = st.sampled_from(["x", "seq", "__proto__", "type ", "\u202etype", "\x00"]) | st.text(max_size=10)
SEQ_MUTANTS = st.sampled_from(SEQ_VALUES) | st.integers()
TYPE_MUTANTS = {
    kind: st.sampled_from([kind.upper(), kind + " ", "\u202e" + kind, kind.replace("e", "е"), None, 1, [], {}, "",
                           "x" * 300]) | st.text(max_size=12)
    for kind in VALID
}
HANDSHAKE_KINDS = st.sampled_from(HANDSHAKE_TYPES)
# A handshake frame on an open session closes it (4400) and the reconnect is the costliest
# thing in the run; one path, so it needs fewer samples than the rest.
SESSION_KINDS = st.sampled_from([kind for kind in SESSION_TYPES for _ in range(1 if kind in ("auth", "enroll") else 5)])
INDEX = st.integers(0, 2**16)
ONE_IN_20 = st.sampled_from([True] + [False] * 19)


@st.composite
def mutated(draw, kind: str) -> tuple[str, dict]:
    frame = _copy(draw(VALID[kind]))
    how = draw(HOW)
    paths = _paths(frame)
    if how == "valid":
        return "valid", frame
    if how == "extra":
        key = draw(EXTRA_KEYS)
        target = frame
        nested = [p for p in paths if type(_at(frame, p)[0][p[-1]]) is dict]
        if nested and draw(st.booleans()):
            parent, step = _at(frame, nested[draw(INDEX) % len(nested)])
            target = parent[step]
        if key not in target or key != "type":
            target[key] = draw(hostile_value)
        return "extra", frame
    if how == "seq":
        if "seq" in frame:
            frame["seq"] = draw(SEQ_MUTANTS)
            return "seq", frame
        how = "replace"
    if how == "type":
        frame["type"] = draw(TYPE_MUTANTS[kind])
        return "type", frame
    candidates = [p for p in paths if p != ("type",)]
    if not candidates:
        return "valid", frame
    path = candidates[draw(INDEX) % len(candidates)]
    parent, step = _at(frame, path)
    if how == "delete":
        if type(parent) is dict:
            del parent[step]
        else:
            parent.pop(step)
        return "delete", frame
    parent[step] = draw(hostile_value)
    return "replace", frame


@st.composite
def near_valid(draw, phase: str) -> Case:
    kind = draw(HANDSHAKE_KINDS if phase == "handshake" else SESSION_KINDS)
    how, frame = draw(mutated(kind))
    return Case(phase=phase, label=f"{kind}:{how}", payload=frame, binary=draw(ONE_IN_20))


# --- garbage -----------------------------------------------------------------------------
GARBAGE_TEXT = [
    "", " ", "NaN", "Infinity", "-Infinity", "null", "true", "1", "1e999", '"telemetry"', "[]", "{}", "[{}]", "{",
    "}", '{"type"', '{"type":', '{"type":"telemetry"', '{"type":"telemetry",}', "{'type':'telemetry'}",
    '{"type":"telemetry","seq":1,"points":[[1,"a",NaN]]}', '{"type":NaN}', '{"type":null}', '{"type":1}',
    '{"type":["telemetry"]}', '{"type":"telemetry","type":"heartbeat"}', '\ufeff{"type":"heartbeat"}',
    '{"type":"heartbeat"}\n{"type":"heartbeat"}', '{"type":"heartbeat"} trailing', "\x00", '{"\\u0000":1,"type":"x"}',
    '{"type":"\\ud800"}', '{"type":"t\\u0000"}', '{"type":"heartbeat","t":1,"uptime_s":1,"buffered":1' + " " * 1000,
    "[" * 100_000, "{" * 10_000, '{"a":' * 50_000, "0" * 5000, "-" + "9" * 5000, '"' + "\\" * 1001,
]


@st.composite
def truncated_json(draw) -> RawText:
    kind = draw(SESSION_KINDS)
    frame = draw(VALID[kind])
    text = encode(frame, lambda f: 1)
    cut = draw(INDEX) % max(1, len(text))
    return RawText(text[:cut])


def over_max(size: int) -> RawText:
    return RawText('{"type":"telemetry","seq":1,"points":[],"pad":"' + "a" * size + '"}')


OVERSIZED = [over_max(size) for size in (256 * 1024 - 80, 256 * 1024, 256 * 1024 + 1, 300_000, 1_200_000)]

garbage_payload = st.one_of(
    # (Hypothesis favours the first entry: the over-limit frame, a costly path, stays rare.)
    st.sampled_from([OVERSIZED[2], *(RawText(text) for text in GARBAGE_TEXT[:20]), OVERSIZED[4], OVERSIZED[0],
                     *(RawText(text) for text in GARBAGE_TEXT[20:]), OVERSIZED[1], OVERSIZED[3]]),
    st.text(max_size=60).map(RawText),
    truncated_json(),
    st.binary(max_size=60).map(RawBytes),
    st.sampled_from([b"\xff\xfe", b"\xc0\x80", b'{"type":"heartbeat\xff"}', b"\xed\xa0\x80",
                     b'{"type":"x"}', b"\x00" * 16]).map(RawBytes),
)


@st.composite
def garbage(draw, phase: str) -> Case:
    payload = draw(garbage_payload)
    if isinstance(payload, RawText) and len(payload.text) > 200_000:
        label = "garbage:oversized"
    else:
        label = "garbage:" + ("binary" if isinstance(payload, RawBytes) else "text")
    # Raw bytes go as a binary frame, or (one in twenty) as a text frame that may not be UTF-8.
    as_text = isinstance(payload, RawBytes) and draw(ONE_IN_20)
    return Case(phase=phase, label=label + ("-as-text" if as_text else ""), payload=payload, binary=not as_text)


def cases(handshake_share: int = 8, garbage_share: int = 15) -> st.SearchStrategy[Case]:
    """One hostile frame: `handshake_share`% are first frames of a fresh connection,
    `garbage_share`% are raw garbage, the rest near-valid frames on authenticated sessions."""

    phases = st.sampled_from(["session"] * (100 - handshake_share) + ["handshake"] * handshake_share)
    garbage_or_not = st.sampled_from([False] * (100 - garbage_share) + [True] * garbage_share)

    @st.composite
    def one(draw) -> Case:
        phase = draw(phases)
        if draw(garbage_or_not):
            return draw(garbage(phase))
        return draw(near_valid(phase))

    return one()


def draw_corpus(count: int, *, batch: int = 20, seed: int = 9) -> list[Case]:
    """`count` cases drawn by Hypothesis, reproducibly: a fixed seed, no example database,
    generation only (no shrinking: every drawn frame is sent, none is "the" failure)."""
    from hypothesis import HealthCheck, Phase, given, settings
    from hypothesis import seed as hseed

    corpus: list[Case] = []
    strategy = st.lists(cases(), min_size=batch, max_size=batch)

    @hseed(seed)
    @settings(max_examples=(count + batch - 1) // batch, database=None, phases=[Phase.generate], deadline=None,
              suppress_health_check=list(HealthCheck))
    @given(strategy)
    def collect(drawn: list[Case]) -> None:
        corpus.extend(drawn)

    collect()
    return corpus[:count]


def stream_corpus(count: int, seed: int, out, *, chunk: int = 200) -> None:
    """Child-process entry point: draw `count` cases with `seed` and put them on the
    multiprocessing queue `out` in chunks, then None. Drawing runs beside the replay."""
    corpus = draw_corpus(count, seed=seed)
    for i in range(0, len(corpus), chunk):
        out.put(corpus[i:i + chunk])
    out.put(None)
