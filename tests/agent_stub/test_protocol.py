"""The shared wire formats: parsing, validators, builders, canonical JSON, signed messages."""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from agent_stub import protocol as P

NOW = 1_700_000_000_000
RETENTION = 7 * 24 * 3600 * 1000
SIG = b"s" * 64
KEY = b"k" * 32


def valid_uplinks() -> list[dict[str, Any]]:
    return [
        P.telemetry(1, [[NOW, "sensor.temperature_c", 41.5], [NOW - 1000, "inference.anomaly_score", 2]]),
        P.event(2, [P.event_item(NOW, "inference", "warning", "anomaly", {"score": 9.1})]),
        P.state(3, {"agent": "0.1.0", "model": "1.0.0", "firmware": None},
                {"cpu_cores": 4, "ram_mb": 4096, "accelerator": "none", "storage_mb": 32000, "arch": "aarch64",
                 "os": "Linux 6.1"}),
        P.rollout_status(4, "ex-1", "rejected", 0, P.rollout_error("not_supported", retryable=False, detail="no")),
        P.command_result(5, 77, True, "done"),
    ]


# --- parse_frame -----------------------------------------------------------------------
def test_parse_frame_returns_the_object_with_a_string_type() -> None:
    assert P.parse_frame('{"type":"heartbeat","t":1}') == {"type": "heartbeat", "t": 1}
    assert P.parse_frame('{"type":"x","s":"caf\u00e9"}'.encode()) == {"type": "x", "s": "café"}


@pytest.mark.parametrize(("data", "words"), [
    ('{"type":"x","v":NaN}', "NaN"),
    ('{"type":"x","v":Infinity}', "Infinity"),
    ('{"type":"x","v":-Infinity}', "Infinity"),
    ("[1,2]", "object"),
    ('"type"', "object"),
    ('{"t":1}', "'type'"),
    ('{"type":5}', "'type'"),
    ("{", "JSON"),
    (b'{"type":"x","s":"\xff"}', "UTF-8"),
    ('{"type":"x","v":' + "[" * 40 + "]" * 40 + "}", "deeper"),
    ('{"type":"x","v":' + "[" * 100_000 + "]" * 100_000 + "}", "deeper"),
    ('{"type":"x","v":"\\ud800"}', "surrogate"),
    ('{"type":"x","v":"a\\u0000b"}', "NUL"),
    (b"\xef\xbb\xbf{}", "JSON"),
    ('{"type":"x","v":' + "1" * 5000 + "}", "JSON"),
    (None, "text"),
])
def test_parse_frame_rejects_bad_input_with_a_readable_bad_frame(data: Any, words: str) -> None:
    with pytest.raises(P.ProtocolError) as exc:
        P.parse_frame(data)
    assert exc.value.code == "bad_frame"
    assert words in exc.value.message


def test_parse_frame_accepts_nesting_up_to_the_limit_and_paired_surrogates() -> None:
    depth_32 = '{"type":"x","v":' + "[" * 31 + "]" * 31 + "}"
    assert P.parse_frame(depth_32)["type"] == "x"
    assert P.parse_frame('{"type":"x","v":"\\ud83d\\ude00"}')["v"] == "\U0001f600"


def _depth(value: Any) -> int:
    """Nesting depth of lists and dicts, the obvious recursive way (the reference)."""
    if type(value) is list:
        return 1 + max(map(_depth, value), default=0)
    if type(value) is dict:
        return 1 + max(map(_depth, value.values()), default=0)
    return 0


nested = st.recursive(st.one_of(st.integers(), st.text(max_size=3), st.none()),
                      lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=2), inner, max_size=3),
                      max_leaves=60)


@given(nested.filter(lambda v: type(v) in (list, dict)), st.integers(min_value=1, max_value=6))
@settings(max_examples=400)
def test_the_depth_check_agrees_with_a_recursive_count(value: Any, limit: int) -> None:
    assert P._too_deep(value, limit) == (_depth(value) > limit)


@pytest.mark.parametrize("text", [
    '{"type":"x","v":123456789012345678901234567890}',  # beyond 64 bits: kept as an exact int
    '{"type":"x","v":-98765432109876543210}',
    '{"type":"x","v":18446744073709551615}',
    '{"type":"x","v":[1e400,-1e400,1e-400,-0.0,0.1,5e-324]}',  # 1e400 is an infinite float, as in the stdlib
    r'{"type":"x","v":"caf\u00e9 \ud83d\ude00","k":{"a":1,"a":2}}',
])
def test_the_fast_decoder_gives_what_the_stdlib_gives(text: str) -> None:
    assert P.orjson is not None, "the console installs orjson (requirements.in)"
    fast, reference = P._decode(text), json.loads(text)
    assert repr(fast) == repr(reference)  # repr tells 1 from 1.0 and -0.0 from 0.0


def test_parse_frame_enforces_max_bytes_as_too_large() -> None:
    with pytest.raises(P.ProtocolError) as exc:
        P.parse_frame('{"type":"x","v":"' + "a" * 100 + '"}', max_bytes=50)
    assert exc.value.code == "too_large"


# --- encodings and signed messages ----------------------------------------------------
def test_b64_round_trips_and_decoding_is_strict() -> None:
    assert P.b64d(P.b64e(b"\x00\xffhello")) == b"\x00\xffhello"
    for bad in ["aGVsbG8", "aGVs bG8=", "aGVsbG8-", "a_==", "aGVsbG9=", "é", 5]:
        with pytest.raises(P.ProtocolError):
            P.b64d(bad)  # type: ignore[arg-type]


def test_canonical_json_sorts_keys_compacts_keeps_utf8_and_refuses_nan() -> None:
    assert P.canonical_json({"b": 1, "a": [1.5, "é"], "c": {"z": None, "y": True}}) == \
        '{"a":[1.5,"é"],"b":1,"c":{"y":true,"z":null}}'.encode()
    for bad in (math.nan, math.inf):
        with pytest.raises(ValueError, match="JSON"):
            P.canonical_json({"v": bad})


def test_auth_and_claims_messages_are_the_contract_bytes() -> None:
    nonce = bytes(range(32))
    assert P.auth_message(nonce, "dev-1") == b"fleet-auth-v1\x00" + nonce + b"dev-1"
    claims = {"model_sha256": "b" * 64, "agent_sha256": "a" * 64, "boot_id": "x"}
    digest = hashlib.sha256(b'{"agent_sha256":"' + b"a" * 64 + b'","boot_id":"x","model_sha256":"' + b"b" * 64
                            + b'"}').digest()
    assert P.claims_message(nonce, claims) == b"fleet-claims-v1\x00" + nonce + digest


# --- validators: valid frames ---------------------------------------------------------
def test_builders_produce_frames_their_validators_accept() -> None:
    auth = P.validate_auth(P.auth("dev-1", SIG, "0.1.0"))
    assert (auth.device_uid, auth.sig) == ("dev-1", SIG)
    enroll = P.validate_enroll(P.enroll("tok", "dev-1", KEY, SIG, hardware={"arch": "x86_64"},
                                        tpm=P.tpm_info(b"ek", None, b"ak")))
    assert enroll.public_key == KEY and enroll.tpm == P.TpmInfo(b"ek", None, b"ak")
    assert P.validate_heartbeat(P.heartbeat(NOW, 12, 3)) == P.Heartbeat(NOW, 12, 3)
    assert P.validate_tpm_activate(P.tpm_activate(b"secret")).secret == b"secret"
    software = P.validate_attest_evidence(P.attest_evidence_software(
        "c1", {"agent_sha256": "a" * 64, "model_sha256": "b" * 64, "boot_id": "boot"}, SIG))
    assert software.boot_id == "boot" and software.sig == SIG
    quote = P.validate_attest_evidence(P.attest_evidence_tpm(7, b"att", b"sig", {"sha256": {0: "0" * 64}}))
    assert quote.pcrs == {"sha256": {0: "0" * 64}} and quote.attest == b"att"
    for frame in valid_uplinks():
        kind, seq, _payload = P.validate_uplink(frame, now_ms=NOW, retention_ms=RETENTION)
        assert (kind, seq) == (frame["type"], frame["seq"])
    tel = P.validate_telemetry(valid_uplinks()[0], now_ms=NOW, retention_ms=RETENTION)
    assert tel.points == [(NOW, "sensor.temperature_c", 41.5), (NOW - 1000, "inference.anomaly_score", 2.0)]
    assert isinstance(tel.points[1][2], float) and tel.rejected == []


def test_unknown_fields_are_ignored() -> None:
    frame = P.heartbeat(NOW, 1, 0) | {"future_field": {"x": [1]}}
    assert P.validate_heartbeat(frame).t == NOW


def test_builders_without_seq_leave_it_out_for_the_outbox() -> None:
    assert "seq" not in P.telemetry(None, [])
    assert P.dumps(P.ack(3, 10)) == '{"type":"ack","seq":3,"accepted":10,"rejected":[]}'


# --- validators: errors ---------------------------------------------------------------
@pytest.mark.parametrize("seq", [0, -1, True, 1.0, "1", None, 2**63])
def test_seq_must_be_a_positive_integer_and_bool_is_not_one(seq: Any) -> None:
    frame = P.command_result(1, "c", True, "")
    frame["seq"] = seq
    with pytest.raises(P.ProtocolError, match="'seq'"):
        P.validate_command_result(frame)


def test_bad_telemetry_points_are_rejected_one_by_one_with_reasons() -> None:
    frame = {"type": "telemetry", "seq": 9, "points": [
        [NOW, "ok.metric", 1.0],
        [NOW, "Bad.Name", 1.0],
        [NOW, "x" * 65, 1.0],
        [NOW, "a..b", 1.0],
        [NOW, "ok", True],
        [NOW, "ok", "1"],
        [NOW, "ok", math.nan],
        [NOW, "ok", math.inf],
        [NOW, "ok", 10**400],
        [NOW + P.FUTURE_SKEW_MS + 1, "ok", 1],
        [NOW - RETENTION - 1, "ok", 1],
        [NOW, "ok"],
        "point",
        [1.5, "ok", 1],
        [True, "ok", 1],
        [NOW + P.FUTURE_SKEW_MS, "edge.future", 1],
        [NOW - RETENTION, "edge.past", -1e308],
    ]}
    result = P.validate_telemetry(frame, now_ms=NOW, retention_ms=RETENTION)
    assert [p[1] for p in result.points] == ["ok.metric", "edge.future", "edge.past"]
    assert result.rejected == [
        {"index": 1, "reason": "bad_metric_name"}, {"index": 2, "reason": "bad_metric_name"},
        {"index": 3, "reason": "bad_metric_name"}, {"index": 4, "reason": "bad_value"},
        {"index": 5, "reason": "bad_value"}, {"index": 6, "reason": "bad_value"},
        {"index": 7, "reason": "bad_value"}, {"index": 8, "reason": "bad_value"},
        {"index": 9, "reason": "time_out_of_range"}, {"index": 10, "reason": "time_out_of_range"},
        {"index": 11, "reason": "bad_point"}, {"index": 12, "reason": "bad_point"},
        {"index": 13, "reason": "bad_point"}, {"index": 14, "reason": "bad_point"},
    ]


def test_metric_name_with_trailing_newline_is_rejected() -> None:
    result = P.validate_telemetry(P.telemetry(1, [[NOW, "abc\n", 1]]), now_ms=NOW, retention_ms=RETENTION)
    assert result.rejected == [{"index": 0, "reason": "bad_metric_name"}]


@pytest.mark.parametrize(("points", "words"), [
    (None, "'points' must be a list"),
    ({"a": 1}, "'points' must be a list"),
    ([[NOW, "a", 1]] * (P.MAX_POINTS + 1), "limit 1000"),
])
def test_telemetry_structure_errors_reject_the_whole_frame(points: Any, words: str) -> None:
    with pytest.raises(P.ProtocolError) as exc:
        P.validate_telemetry({"type": "telemetry", "seq": 4, "points": points}, now_ms=NOW, retention_ms=RETENTION)
    assert words in exc.value.message
    assert exc.value.extra == {"seq": 4}  # so the server can say which frame it refused


def test_max_points_is_configurable() -> None:
    frame = P.telemetry(1, [[NOW, "a", 1]] * 11)
    with pytest.raises(P.ProtocolError):
        P.validate_telemetry(frame, now_ms=NOW, retention_ms=RETENTION, max_points=10)


@pytest.mark.parametrize(("build", "mutate", "field"), [
    (lambda: P.auth("dev-1", SIG, "1"), {"device_uid": "bad uid"}, "device_uid"),
    (lambda: P.auth("dev-1", SIG, "1"), {"sig": P.b64e(b"short")}, "sig"),
    (lambda: P.auth("dev-1", SIG, "1"), {"sig": "not base64!"}, "sig"),
    (lambda: P.auth("dev-1", SIG, "1"), {"agent_version": 1}, "agent_version"),
    (lambda: P.enroll("t", "d", KEY, SIG), {"public_key": P.b64e(b"k" * 31)}, "public_key"),
    (lambda: P.enroll("t", "d", KEY, SIG), {"enrollment_token": ""}, "enrollment_token"),
    (lambda: P.enroll("t", "d", KEY, SIG), {"tpm": {"ek_pub": "AA==", "ak_pub": 1}}, "tpm.ak_pub"),
    (lambda: P.enroll("t", "d", KEY, SIG), {"hardware": []}, "hardware"),
    (lambda: P.heartbeat(NOW, 1, 0), {"buffered": -1}, "buffered"),
    (lambda: P.heartbeat(NOW, 1, 0), {"uptime_s": "1"}, "uptime_s"),
    (lambda: valid_uplinks()[1], {"events": []}, "events"),
    (lambda: valid_uplinks()[1], {"events": [{"t": NOW, "kind": "party", "severity": "info", "message": ""}]},
     "events[0].kind"),
    (lambda: valid_uplinks()[1], {"events": [{"t": NOW, "kind": "log", "severity": "info", "message": "",
                                              "attrs": [1]}]}, "events[0].attrs"),
    (lambda: valid_uplinks()[2], {"capabilities": {"cpu_cores": 1}}, "capabilities.accelerator"),
    (lambda: valid_uplinks()[2], {"installed": {"agent": 5}}, "installed.agent"),
    (lambda: valid_uplinks()[3], {"state": "exploded"}, "state"),
    (lambda: valid_uplinks()[3], {"progress": 101}, "progress"),
    (lambda: valid_uplinks()[3], {"error": {"code": "x", "retryable": "no"}}, "error.retryable"),
    (lambda: valid_uplinks()[3], {"execution_id": True}, "execution_id"),
    (lambda: valid_uplinks()[4], {"ok": 1}, "ok"),
    (lambda: valid_uplinks()[4], {"output": "x" * (P.MAX_OUTPUT_CHARS + 1)}, "output"),
    (lambda: P.attest_evidence_software("c", {"agent_sha256": "A" * 64, "model_sha256": "b" * 64,
                                              "boot_id": "x"}, SIG), {}, "claims.agent_sha256"),
    (lambda: P.attest_evidence_tpm("c", b"a", b"s", {"sha256": {0: "00"}}), {}, "pcrs.sha256.0"),
    (lambda: P.attest_evidence_tpm("c", b"a", b"s", {"md5": {0: "00"}}), {}, "pcrs"),
    (lambda: P.attest_evidence_tpm("c", b"a", b"s", {"sha1": {24: "0" * 40}}), {}, "pcrs.sha1"),
    (lambda: P.attest_evidence_software("c", {}, SIG), {"format": "vibes"}, "format"),
    (lambda: P.tpm_activate(b"x"), {"secret": ""}, "secret"),
])
def test_structural_errors_are_bad_frame_naming_the_field(build: Any, mutate: dict[str, Any], field: str) -> None:
    frame = build() | mutate
    validator = {
        "auth": P.validate_auth, "enroll": P.validate_enroll, "heartbeat": P.validate_heartbeat,
        "attest.evidence": P.validate_attest_evidence, "tpm.activate": P.validate_tpm_activate,
    }.get(frame["type"], P.validate_uplink)
    with pytest.raises(P.ProtocolError) as exc:
        validator(frame)
    assert exc.value.code == "bad_frame"
    assert f"'{field}" in exc.value.message


def test_validate_uplink_refuses_non_durable_types_as_unknown_type() -> None:
    with pytest.raises(P.ProtocolError) as exc:
        P.validate_uplink(P.heartbeat(NOW, 1, 1))
    assert exc.value.code == "unknown_type"
    assert exc.value.to_frame()["type"] == "error"


def test_validators_check_the_type_field() -> None:
    with pytest.raises(P.ProtocolError, match="'type' must be 'auth'"):
        P.validate_auth(P.heartbeat(NOW, 1, 1))


def test_close_codes_and_constants_match_the_contract() -> None:
    assert [int(c) for c in P.Close] == [1000, 1001, 4400, 4401, 4403, 4408, 4409, 4413, 4429, 4503]
    assert P.PROTOCOL_VERSION == 1
    assert (P.MAX_FRAME_BYTES, P.MAX_POINTS, P.HANDSHAKE_TIMEOUT_S, P.FUTURE_SKEW_MS) == (262144, 1000, 10, 300000)
    assert {"telemetry", "event", "state", "rollout.status", "command.result"} == P.DURABLE_TYPES
    assert "rolled_back" in P.ROLLOUT_STATES and {"reboot", "attest", "sync_state", "set_config"} == P.COMMAND_NAMES


def test_dumps_is_compact_and_refuses_nan() -> None:
    assert P.dumps({"type": "x", "v": "é"}) == '{"type":"x","v":"é"}'
    with pytest.raises(ValueError, match="JSON"):
        P.dumps({"v": math.nan})


# --- fuzzing: only ProtocolError may escape ---------------------------------------------
json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False, allow_infinity=False) | st.text(),
    lambda children: st.lists(children, max_size=5) | st.dictionaries(st.text(max_size=8), children, max_size=5),
    max_leaves=30,
)
FRAME_TYPES = ["auth", "enroll", "heartbeat", "telemetry", "event", "state", "rollout.status", "command.result",
               "attest.evidence", "tpm.activate", "hello", "welcome", "x"]
FIELDS = ["seq", "points", "events", "installed", "capabilities", "state", "progress", "error", "execution_id",
          "command_id", "ok", "output", "device_uid", "sig", "agent_version", "enrollment_token", "public_key",
          "hardware", "tpm", "t", "uptime_s", "buffered", "challenge_id", "format", "claims", "attest", "signature",
          "pcrs", "event_log", "secret", "protocol", "nonce", "server_time", "status", "last_acked_seq"]


def _all_validators(frame: Any) -> None:
    for validate in (P.validate_auth, P.validate_enroll, P.validate_heartbeat, P.validate_event, P.validate_state,
                     P.validate_rollout_status, P.validate_command_result, P.validate_attest_evidence,
                     P.validate_tpm_activate, P.validate_uplink, P.validate_hello, P.validate_welcome):
        with contextlib.suppress(P.ProtocolError):
            validate(frame)
    with contextlib.suppress(P.ProtocolError):
        P.validate_telemetry(frame, now_ms=NOW, retention_ms=RETENTION)


@settings(max_examples=400, deadline=None)
@given(st.one_of(st.text(), st.binary(), json_values.map(json.dumps)))
def test_parse_frame_raises_only_protocol_error_on_any_input(data: Any) -> None:
    try:
        frame = P.parse_frame(data)
    except P.ProtocolError:
        return
    _all_validators(frame)


@settings(max_examples=600, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.sampled_from(FRAME_TYPES),
       st.dictionaries(st.sampled_from(FIELDS), json_values, max_size=8),
       st.sampled_from([None, *valid_uplinks()]))
def test_validators_raise_only_protocol_error_on_any_json(kind: str, fields: dict[str, Any], base: Any) -> None:
    # Start from a valid frame half of the time, so mutations reach deep checks.
    frame = dict(base or {}) | {"type": kind} | fields
    _all_validators(frame)
    # What parse_frame lets through must be just as safe.
    try:
        text = json.dumps(frame)
    except ValueError:
        return
    with contextlib.suppress(P.ProtocolError):
        _all_validators(P.parse_frame(text))


@settings(max_examples=300, deadline=None)
@given(st.lists(st.one_of(json_values, st.tuples(st.integers(), st.text(), json_values).map(list),
                          st.tuples(st.integers(NOW - RETENTION - 10, NOW + P.FUTURE_SKEW_MS + 10),
                                    st.from_regex(P.METRIC_NAME_RE, fullmatch=True), st.floats()).map(list)),
                max_size=30))
def test_telemetry_rejects_per_point_and_never_crashes(points: list[Any]) -> None:
    result = P.validate_telemetry({"type": "telemetry", "seq": 1, "points": points}, now_ms=NOW,
                                  retention_ms=RETENTION)
    assert len(result.points) + len(result.rejected) == len(points)
    assert all(math.isfinite(v) and type(t) is int for t, _, v in result.points)
    assert [r["index"] for r in result.rejected] == sorted(r["index"] for r in result.rejected)


@given(json_values)
def test_any_json_value_decodes_as_the_stdlib_decodes_it(value: Any) -> None:
    text = json.dumps({"type": "x", "v": value})
    assert repr(P._decode(text)) == repr(json.loads(text))
