"""Quote verification against a real swtpm: the affirming path and every tamper case by its named check."""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest

from agent_stub.tpm import Tpm
from security.tpm.structures import ClockInfo, parse_attest
from security.tpm.verify import evaluate_policy, make_challenge_qualifying_data, verify_quote

PCRS = list(range(8))
REQUESTED = {"sha256": PCRS}
DEVICE_KEY = bytes(range(32))  # the device's raw Ed25519 public key in the protocol


def _challenge(tpm: Tpm, nonce: bytes | None = None, device_key: bytes = DEVICE_KEY, pcrs: list[int] = PCRS):
    nonce = nonce or os.urandom(32)
    attest, sig, values = tpm.quote(make_challenge_qualifying_data(nonce, device_key), pcrs)
    return nonce, attest, sig, values


def _verify(tpm: Tpm, nonce: bytes, attest: bytes, sig: bytes, values, **kw):
    args = {
        "ak_public": tpm.ak_public(),
        "ek_public": tpm.ek_public(),
        "attest": attest,
        "signature": sig,
        "nonce": nonce,
        "device_public_key": DEVICE_KEY,
        "requested_pcrs": REQUESTED,
        "reported_pcrs": values,
    }
    args.update(kw)
    return verify_quote(**args)


def test_quote_verifies_affirming(tpm):
    nonce, attest, sig, values = _challenge(tpm)
    result = _verify(tpm, nonce, attest, sig, values)
    assert result.ok, result.details
    assert result.failed == ()
    assert result.warnings == ()
    assert result.pcrs == values == tpm.read_pcrs(PCRS)
    assert result.clock_info is not None and result.clock_info.safe
    assert result.reboot_detected is False


def test_quote_with_an_ecc_ak_verifies_affirming(ecc_tpm):
    nonce, attest, sig, values = _challenge(ecc_tpm)
    assert _verify(ecc_tpm, nonce, attest, sig, values).ok


def test_reused_nonce_is_refused(tpm):
    old_nonce, attest, sig, values = _challenge(tpm)
    # The verifier holds the nonce of the *current* challenge; the device replays an old quote.
    result = _verify(tpm, os.urandom(32), attest, sig, values)
    assert result.failed == ("quote.nonce",)
    assert _verify(tpm, old_nonce, attest, sig, values).ok


def test_quote_bound_to_another_device_key_is_refused(tpm):
    nonce, attest, sig, values = _challenge(tpm, device_key=b"another device" * 2)
    assert _verify(tpm, nonce, attest, sig, values).failed == ("quote.nonce",)


def test_altered_pcr_value_is_refused(tpm):
    nonce, attest, sig, values = _challenge(tpm)
    forged = {"sha256": dict(values["sha256"], **{"7": "ab" * 32})}
    result = _verify(tpm, nonce, attest, sig, forged)
    assert result.failed == ("quote.pcr_digest",)
    assert not result.ok


def test_missing_or_malformed_pcr_values_are_refused(tpm):
    nonce, attest, sig, values = _challenge(tpm)
    partial = {"sha256": {k: v for k, v in values["sha256"].items() if k != "3"}}
    assert _verify(tpm, nonce, attest, sig, partial).failed == ("quote.pcr_values", "quote.pcr_digest")
    bad_hex = {"sha256": dict(values["sha256"], **{"0": "zz" * 32})}
    assert "quote.pcr_values" in _verify(tpm, nonce, attest, sig, bad_hex).failed


@pytest.mark.parametrize("offset", [0, 4, 7, 40, 60, -1])
def test_flipped_byte_in_attest_is_refused(tpm, offset):
    nonce, attest, sig, values = _challenge(tpm)
    tampered = bytearray(attest)
    tampered[offset] ^= 0x01
    result = _verify(tpm, nonce, bytes(tampered), sig, values)
    assert "quote.signature" in result.failed
    assert not result.ok


def test_flipped_byte_in_signature_is_refused(tpm):
    nonce, attest, sig, values = _challenge(tpm)
    tampered = sig[:-1] + bytes([sig[-1] ^ 0x80])
    assert _verify(tpm, nonce, attest, tampered, values).failed == ("quote.signature",)


def test_signature_from_another_ak_is_refused(tpm, other_ak_tpm):
    nonce, attest, sig, values = _challenge(other_ak_tpm)
    result = _verify(tpm, nonce, attest, sig, values)
    assert set(result.failed) == {"quote.signature", "quote.qualified_signer"}


def test_wrong_qualified_signer_is_refused(tpm, ecc_tpm):
    # A genuine, validly signed quote — but the server's records say this AK
    # hangs under a different EK, so the TPM's qualifiedSigner does not match.
    nonce, attest, sig, values = _challenge(tpm)
    result = _verify(tpm, nonce, attest, sig, values, ek_public=ecc_tpm.ek_public())
    assert result.failed == ("quote.qualified_signer",)
    # The TPM signs the AK's *qualified* name, not its bare name.
    assert _verify(tpm, nonce, attest, sig, values, ek_public=None).failed == ("quote.qualified_signer",)


def test_quote_over_other_pcrs_than_requested_is_refused(tpm):
    nonce, attest, sig, values = _challenge(tpm, pcrs=[0, 1, 2])
    assert _verify(tpm, nonce, attest, sig, values).failed == ("quote.pcr_selection",)


def test_pcr_extended_away_from_golden_is_a_named_policy_mismatch(tpm):
    golden = tpm.read_pcrs(PCRS)
    nonce, attest, sig, values = _challenge(tpm)
    assert evaluate_policy(_verify(tpm, nonce, attest, sig, values).pcrs, golden) == []

    tpm.extend_pcr(7, b"unexpected boot component")
    nonce, attest, sig, values = _challenge(tpm)
    result = _verify(tpm, nonce, attest, sig, values)
    assert result.ok  # the evidence is genuine …
    assert evaluate_policy(result.pcrs, golden) == ["pcr.sha256.7"]  # … and says the boot differs


def test_quote_retries_when_pcrs_change_between_quote_and_read(swtpm, tpm):
    class RacyTpm(Tpm):
        """Pretends a PCR was extended right after the first TPM2_Quote."""

        quotes = 0

        def _run(self, *args, check=True):
            proc = super()._run(*args, check=check)
            if args[0] == "tpm2_quote":
                RacyTpm.quotes += 1
                if RacyTpm.quotes == 1:
                    out = Path(args[args.index("-o") + 1])
                    out.write_bytes(b"\x01" + out.read_bytes()[1:])
            return proc

    racy = RacyTpm(swtpm.spec)
    racy.ensure_keys(tpm.state_dir)
    nonce, attest, sig, values = _challenge(racy)
    assert RacyTpm.quotes == 2
    assert _verify(tpm, nonce, attest, sig, values).ok


def test_clock_regression_is_detected(tpm):
    first = _challenge(tpm)
    time.sleep(0.01)
    second = _challenge(tpm)
    later = _verify(tpm, *second)
    earlier = _verify(tpm, *first)
    assert later.clock_info.clock > earlier.clock_info.clock
    # In order: fine. Replaying the older quote after the newer one: regression.
    assert _verify(tpm, *second, previous_clock=earlier.clock_info).ok
    replay = _verify(tpm, *first, previous_clock=later.clock_info)
    assert replay.failed == ("quote.clock_regressed",)


def test_unorderly_reboot_is_detected_and_flagged_unsafe(swtpm_factory, tmp_path):
    inst = swtpm_factory()
    t = Tpm(inst.spec)
    t.ensure_keys(tmp_path / "state")
    before = _verify(t, *_challenge(t))
    assert before.ok

    inst.power_cycle()  # no TPM2_Shutdown: like pulling the plug
    t.startup()
    after = _verify(t, *_challenge(t), previous_clock=before.clock_info)
    assert after.reboot_detected
    assert after.clock_info.reset_count == before.clock_info.reset_count + 1
    assert after.failed == ()
    assert after.warnings == ("quote.clock_unsafe",)


def test_many_quotes_leak_no_transient_handles_or_sessions(tpm):
    target, budget = 2000, 55.0
    qd = make_challenge_qualifying_data(b"n" * 32, DEVICE_KEY)
    start = time.monotonic()
    done = 0
    while done < target and time.monotonic() - start < budget:
        tpm.quote(qd, PCRS)
        done += 1
    elapsed = time.monotonic() - start
    print(f"\n{done} quotes in {elapsed:.1f}s = {done / elapsed:.1f} quotes/s")
    assert done >= 500, f"only {done} quotes fit in {budget}s"
    assert tpm.transient_handles() == []
    assert tpm.session_handles() == []


def test_verifier_reports_the_parsed_clock_and_firmware(tpm):
    nonce, attest, sig, values = _challenge(tpm)
    result = _verify(tpm, nonce, attest, sig, values)
    info = parse_attest(attest)
    assert result.clock_info == info.clock_info
    assert isinstance(result.clock_info, ClockInfo)
    assert result.firmware_version == info.firmware_version
