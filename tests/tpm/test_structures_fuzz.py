"""Hypothesis fuzzing of the unmarshallers: malformed input may only ever raise TpmFormatError."""

from __future__ import annotations

import contextlib
import hashlib

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from security.tpm.structures import (
    Alg,
    ClockInfo,
    PcrSelection,
    TpmFormatError,
    marshal_attest,
    object_name,
    parse_attest,
    parse_pcr_selection,
    parse_signature,
    parse_tpm2b_public,
    parse_tpmt_public,
    public_key_from_tpmt,
)
from security.tpm.verify import check_ak_attributes, verify_quote

from .softtpm import soft_ak, soft_quote

PARSERS = [parse_tpm2b_public, parse_tpmt_public, parse_attest, parse_signature, parse_pcr_selection]

_AK = soft_ak()
_ATTEST, _SIG = soft_quote(_AK, nonce=b"n", device_key=b"d")
# Valid seeds to mutate: mutations of well-formed input reach deep parser paths
# that random bytes almost never do.
SEEDS = {
    parse_tpm2b_public: _AK.public,
    parse_tpmt_public: _AK.public[2:],
    parse_attest: _ATTEST,
    parse_signature: _SIG,
    parse_pcr_selection: bytes.fromhex("00000001000b03ff0000"),
}
FUZZ = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def _only_format_errors(parser, data: bytes) -> None:
    try:
        parsed = parser(data)
    except TpmFormatError:
        return
    if parser in (parse_tpm2b_public, parse_tpmt_public):
        # Derived operations on a parsed key must hold to the same rule.
        with contextlib.suppress(TpmFormatError):
            public_key_from_tpmt(parsed)
        object_name(parsed)


@pytest.mark.parametrize("parser", PARSERS, ids=lambda p: p.__name__)
@FUZZ
@given(data=st.binary(max_size=600))
def test_random_bytes_raise_only_tpm_format_error(parser, data):
    _only_format_errors(parser, data)


@st.composite
def mutations(draw, seed: bytes) -> bytes:
    buf = bytearray(seed)
    for _ in range(draw(st.integers(1, 6))):
        op = draw(st.sampled_from(["flip", "set", "truncate", "insert", "delete"]))
        if not buf:
            break
        i = draw(st.integers(0, len(buf) - 1))
        if op == "flip":
            buf[i] ^= 1 << draw(st.integers(0, 7))
        elif op == "set":
            buf[i] = draw(st.sampled_from([0x00, 0xFF, 0x7F, 0x80, 0x01]))
        elif op == "truncate":
            del buf[i:]
        elif op == "insert":
            buf[i:i] = draw(st.binary(min_size=1, max_size=8))
        else:
            del buf[i]
    return bytes(buf)


@pytest.mark.parametrize("parser", PARSERS, ids=lambda p: p.__name__)
@FUZZ
@given(data=st.data())
def test_mutated_structures_raise_only_tpm_format_error(parser, data):
    _only_format_errors(parser, data.draw(mutations(SEEDS[parser])))


@FUZZ
@given(data=st.data())
def test_verifier_never_raises_on_mutated_evidence(data):
    attest = data.draw(mutations(_ATTEST))
    sig = data.draw(st.one_of(st.just(_SIG), mutations(_SIG)))
    ak_pub = data.draw(st.one_of(st.just(_AK.public), mutations(_AK.public)))
    result = verify_quote(
        ak_public=ak_pub,
        attest=attest,
        signature=sig,
        nonce=b"n",
        device_public_key=b"d",
        requested_pcrs={"sha256": list(range(8))},
        reported_pcrs={"sha256": {"0": "zz"}},
    )
    assert not result.ok
    check_ak_attributes(ak_pub)


@FUZZ
@given(
    signer=st.binary(max_size=66),
    extra=st.binary(max_size=64),
    clock=st.integers(0, 2**64 - 1),
    reset=st.integers(0, 2**32 - 1),
    restart=st.integers(0, 2**32 - 1),
    safe=st.booleans(),
    fw=st.integers(0, 2**64 - 1),
    pcrs=st.sets(st.integers(0, 23)),
)
def test_attest_round_trips(signer, extra, clock, reset, restart, safe, fw, pcrs):
    sel = (PcrSelection(Alg.SHA256, tuple(sorted(pcrs))),)
    digest = hashlib.sha256(extra).digest()
    info = ClockInfo(clock, reset, restart, safe)
    raw = marshal_attest(
        qualified_signer=signer, extra_data=extra, clock_info=info, firmware_version=fw, pcr_select=sel, pcr_digest=digest
    )
    parsed = parse_attest(raw)
    assert (parsed.qualified_signer, parsed.extra_data, parsed.clock_info, parsed.firmware_version) == (
        signer,
        extra,
        info,
        fw,
    )
    assert parsed.quote is not None
    assert parsed.quote.pcr_select == sel
    assert parsed.quote.pcr_digest == digest
    with pytest.raises(TpmFormatError):
        parse_attest(raw + b"\x00")
