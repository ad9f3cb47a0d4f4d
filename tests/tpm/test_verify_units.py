"""Verifier rules that need evidence a real TPM will not produce: built and signed in software."""

from __future__ import annotations

import pytest

from security.tpm.structures import ClockInfo
from security.tpm.verify import evaluate_policy, verify_quote

from .softtpm import ZERO_PCRS, soft_ak, soft_quote

NONCE = b"N" * 32
DEVICE = b"D" * 32


@pytest.fixture(scope="module")
def ak():
    return soft_ak()


def _verify(ak, attest, sig, previous=None, pcrs=ZERO_PCRS):
    return verify_quote(
        ak_public=ak.public,
        attest=attest,
        signature=sig,
        nonce=NONCE,
        device_public_key=DEVICE,
        requested_pcrs={"sha256": list(range(8))},
        reported_pcrs=pcrs,
        previous_clock=previous,
    )


def test_software_quote_verifies_when_everything_matches(ak):
    result = _verify(ak, *soft_quote(ak, nonce=NONCE, device_key=DEVICE))
    assert result.ok
    assert result.failed == ()


def test_clock_unsafe_is_a_warning_not_a_failure(ak):
    attest, sig = soft_quote(ak, nonce=NONCE, device_key=DEVICE, clock=ClockInfo(5000, 3, 0, False))
    result = _verify(ak, attest, sig)
    assert result.ok
    assert result.failed == ()
    assert result.warnings == ("quote.clock_unsafe",)
    assert result.clock_info == ClockInfo(5000, 3, 0, False)


def test_wrong_magic_is_refused_by_name(ak):
    attest, sig = soft_quote(ak, nonce=NONCE, device_key=DEVICE, magic=0xFF544348)
    assert _verify(ak, attest, sig).failed == ("quote.magic",)


def test_non_quote_attestation_type_is_refused_by_name(ak):
    # TPM_ST_ATTEST_CERTIFY (0x8017) has a different body; it must never pass as a quote.
    attest, sig = soft_quote(ak, nonce=NONCE, device_key=DEVICE, type=0x8017)
    result = _verify(ak, attest, sig)
    assert result.failed == ("quote.type",)
    assert result.pcrs == {}


def test_validly_signed_quote_naming_another_signer_is_refused(ak):
    other = soft_ak()
    attest, sig = soft_quote(ak, nonce=NONCE, device_key=DEVICE, signer=other.name)
    assert _verify(ak, attest, sig).failed == ("quote.qualified_signer",)


def test_malformed_attest_and_ak_are_named_not_raised(ak):
    assert _verify(ak, b"\xff\x54", b"").failed == ("quote.signature", "quote.format")

    class Broken:
        public = b"\x00\x05hello"

    assert _verify(Broken, b"", b"").failed == ("quote.ak_public",)


@pytest.mark.parametrize(
    ("previous", "current", "regressed", "reboot"),
    [
        (ClockInfo(1000, 5, 0, True), ClockInfo(2000, 5, 0, True), False, False),  # time moves on
        (ClockInfo(2000, 5, 0, True), ClockInfo(1000, 5, 0, True), True, False),  # same boot, clock back
        (ClockInfo(1000, 5, 3, True), ClockInfo(2000, 5, 2, True), True, False),  # restartCount back
        (ClockInfo(1000, 5, 0, True), ClockInfo(2000, 4, 0, True), True, False),  # resetCount back
        (ClockInfo(2000, 5, 0, True), ClockInfo(1900, 6, 0, False), False, True),  # unorderly reboot lost a little clock
        (ClockInfo(2000, 5, 0, True), ClockInfo(1900, 6, 0, True), True, True),  # clock back but claims safe
        (ClockInfo(2000, 5, 0, True), ClockInfo(3000, 6, 0, True), False, True),  # orderly reboot
    ],
)
def test_clock_rules(ak, previous, current, regressed, reboot):
    attest, sig = soft_quote(ak, nonce=NONCE, device_key=DEVICE, clock=current)
    result = _verify(ak, attest, sig, previous=previous)
    assert ("quote.clock_regressed" in result.failed) is regressed
    assert result.reboot_detected is reboot


def test_policy_names_each_mismatched_or_missing_pcr():
    pcrs = {"sha256": {"0": "aa" * 32, "1": "bb" * 32, "7": "cc" * 32}}
    golden = {"sha256": {"0": "AA" * 32, "1": "00" * 32, "7": "cc" * 32, "4": "dd" * 32}, "sha1": {"0": "00" * 20}}
    assert evaluate_policy(pcrs, golden) == ["pcr.sha256.1", "pcr.sha256.4", "pcr.sha1.0"]
    assert evaluate_policy(pcrs, {}) == []
