"""Attestation verifier: AK attributes, EK certificate chain, TPM2 quotes, PCR policy.

This module owns every decision about whether TPM evidence is acceptable. All
functions are pure (no I/O, no clock unless passed in, no database) and report
problems as *named checks* (``quote.nonce``, ``ak.restricted``,
``pcr.sha256.7`` …) so the console can store and display "failed checks by
name". The names are a stable contract; docs/attestation.md lists them.
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import hmac
import os
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from functools import lru_cache

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa, utils
from cryptography.x509.oid import ExtensionOID

from .structures import (
    HASH_ALGS,
    TPM_GENERATED_VALUE,
    TPM_RH_ENDORSEMENT,
    TPM_ST_ATTEST_QUOTE,
    Alg,
    ClockInfo,
    EccCurve,
    ObjectAttributes,
    Public,
    QuoteInfo,
    RsaParms,
    TpmFormatError,
    hash_alg_from_name,
    hash_alg_name,
    object_name,
    parse_attest,
    parse_signature,
    parse_tpm2b_public,
    public_key_from_tpmt,
    qualified_name,
)

__all__ = [
    "ClockInfo",
    "EkCertVerification",
    "QuoteVerification",
    "TrustStore",
    "ak_qualified_name",
    "check_ak_attributes",
    "evaluate_policy",
    "make_challenge_qualifying_data",
    "verify_activation",
    "verify_ek_certificate",
    "verify_quote",
]

PcrValues = dict[str, dict[str, str]]  # {"sha256": {"0": "ab12…", …}}

# Signature hashes we accept. SHA-1 is refused: a SHA-1 quote can be forged
# by collision far more cheaply than breaking the AK.
_SIG_HASHES = {
    Alg.SHA256: hashes.SHA256,
    Alg.SHA384: hashes.SHA384,
    Alg.SHA512: hashes.SHA512,
}


# --------------------------------------------------------------------------
# AK
# --------------------------------------------------------------------------

_AK_REQUIRED = (
    ("ak.restricted", ObjectAttributes.RESTRICTED),
    ("ak.sign", ObjectAttributes.SIGN_ENCRYPT),
    ("ak.fixed_tpm", ObjectAttributes.FIXED_TPM),
    ("ak.fixed_parent", ObjectAttributes.FIXED_PARENT),
    ("ak.sensitive_data_origin", ObjectAttributes.SENSITIVE_DATA_ORIGIN),
)


def check_ak_attributes(ak_public: bytes | Public) -> list[str]:
    """Named checks an AK's TPM2B_PUBLIC fails (empty list = acceptable AK).

    restricted+sign: the TPM will only sign digests it produced itself
    (quotes), so the AK cannot be used to forge a TPMS_ATTEST. fixedTPM +
    fixedParent + sensitiveDataOrigin: the private part was generated inside
    and can never leave this TPM, which is what credential activation proves.
    """
    try:
        ak = ak_public if isinstance(ak_public, Public) else parse_tpm2b_public(ak_public)
    except TpmFormatError:
        return ["ak.format"]
    failed = [name for name, bit in _AK_REQUIRED if not ak.has(bit)]
    if ak.has(ObjectAttributes.DECRYPT):
        failed.append("ak.decrypt")
    if ak.name_alg != Alg.SHA256:
        failed.append("ak.name_alg")
    params = ak.parameters
    if isinstance(params, RsaParms):
        key_ok = params.key_bits >= 2048
        scheme_ok = params.scheme.scheme in (Alg.NULL, Alg.RSASSA, Alg.RSAPSS)
    else:
        key_ok = params.curve_id in (EccCurve.NIST_P256, EccCurve.NIST_P384, EccCurve.NIST_P521)
        scheme_ok = params.scheme.scheme in (Alg.NULL, Alg.ECDSA)
    if not key_ok:
        failed.append("ak.key")
    if not scheme_ok or (params.scheme.scheme != Alg.NULL and params.scheme.hash_alg not in _SIG_HASHES):
        failed.append("ak.scheme")
    return failed


def ak_qualified_name(ak_public: bytes | Public, ek_public: bytes | Public) -> bytes:
    """Qualified name of an AK created directly under a primary EK.

    QN(EK) = H(TPM_RH_ENDORSEMENT ‖ Name(EK)); QN(AK) = H(QN(EK) ‖ Name(AK)).
    This is what a real TPM writes into TPMS_ATTEST.qualifiedSigner.
    """
    qn_ek = qualified_name(TPM_RH_ENDORSEMENT.to_bytes(4, "big"), ek_public)
    return qualified_name(qn_ek, ak_public)


def verify_activation(expected_secret: bytes, answered_secret: bytes) -> list[str]:
    """``["credential.activation"]`` unless the device returned exactly the secret
    the server wrapped with :func:`~security.tpm.credential.make_credential`.

    Only the TPM holding the EK *and* an object with the AK's name can unwrap
    it, so a match proves the AK lives in the same TPM as the certified EK.
    """
    if not expected_secret or not hmac.compare_digest(bytes(expected_secret), bytes(answered_secret)):
        return ["credential.activation"]
    return []


# --------------------------------------------------------------------------
# EK certificate
# --------------------------------------------------------------------------

_Cert = x509.Certificate
_CertInput = _Cert | bytes


def _load_cert(c: _CertInput) -> _Cert:
    if isinstance(c, x509.Certificate):
        return c
    data = bytes(c)
    if data.lstrip().startswith(b"-----BEGIN"):
        return x509.load_pem_x509_certificate(data)
    return x509.load_der_x509_certificate(data)


@dataclass(frozen=True)
class TrustStore:
    """Trust anchors grouped by tier, in order of preference.

    ``tiers`` maps a tier name ("manufacturer", "test", …) to its root CA
    certificates; the first tier (in mapping order) that anchors a chain wins.
    ``intermediates`` are *untrusted* helper certificates (e.g. a vendor's
    issuing CAs) used only to build a path to an anchor.
    """

    tiers: Mapping[str, Sequence[_Cert]]
    intermediates: Sequence[_Cert] = ()

    @classmethod
    def from_certs(cls, tiers: Mapping[str, Sequence[_CertInput]], intermediates: Sequence[_CertInput] = ()) -> TrustStore:
        """Build from PEM/DER bytes or cryptography certificates."""
        return cls(
            {t: tuple(_load_cert(c) for c in certs) for t, certs in tiers.items()},
            tuple(_load_cert(c) for c in intermediates),
        )

    @classmethod
    def from_directory(cls, path: str) -> TrustStore:
        """Load ``path/<tier>/*.pem|*.crt|*.der``; ``path/intermediates/`` is the untrusted pool.

        Tier order is "manufacturer" first, then "test", then any other tier
        alphabetically, so a genuine vendor chain is never reported as "test".
        """

        def load_dir(d: str) -> list[_Cert]:
            certs: list[_Cert] = []
            for fn in sorted(os.listdir(d)):
                if fn.endswith((".pem", ".crt", ".der", ".cer")):
                    with open(os.path.join(d, fn), "rb") as f:
                        data = f.read()
                    if b"-----BEGIN CERTIFICATE" in data:
                        certs.extend(x509.load_pem_x509_certificates(data))
                    else:
                        certs.append(x509.load_der_x509_certificate(data))
            return certs

        names = [n for n in os.listdir(path) if os.path.isdir(os.path.join(path, n))]
        order = {"manufacturer": 0, "test": 1}
        names.sort(key=lambda n: (order.get(n, 2), n))
        tiers = {n: tuple(load_dir(os.path.join(path, n))) for n in names if n != "intermediates"}
        inter = tuple(load_dir(os.path.join(path, "intermediates"))) if "intermediates" in names else ()
        return cls(tiers, inter)


@dataclass(frozen=True)
class EkCertVerification:
    """Outcome of :func:`verify_ek_certificate`.

    ``tier`` is set only when every check passed. Unpacks as ``tier, failed``.
    """

    tier: str | None
    failed: tuple[str, ...]
    details: Mapping[str, str] = field(default_factory=dict)
    chain: tuple[str, ...] = ()  # subjects leaf → anchor, for operators

    @property
    def ok(self) -> bool:
        return not self.failed

    def __iter__(self) -> Iterator[object]:
        return iter((self.tier, list(self.failed)))


# Extensions whose meaning we either check or know to be harmless for path
# validation. TPM EK certificates put the TPM manufacturer/model/version in a
# *critical* SAN directoryName (subject is often empty) and TPM spec info in
# subjectDirectoryAttributes; both are understood here. Anything else marked
# critical is refused as RFC 5280 §4.2 requires.
_HANDLED_EXTENSIONS = {
    ExtensionOID.BASIC_CONSTRAINTS,
    ExtensionOID.KEY_USAGE,
    ExtensionOID.EXTENDED_KEY_USAGE,
    ExtensionOID.SUBJECT_ALTERNATIVE_NAME,
    ExtensionOID.CERTIFICATE_POLICIES,
    ExtensionOID.SUBJECT_DIRECTORY_ATTRIBUTES,
    ExtensionOID.AUTHORITY_KEY_IDENTIFIER,
    ExtensionOID.SUBJECT_KEY_IDENTIFIER,
    ExtensionOID.AUTHORITY_INFORMATION_ACCESS,
    ExtensionOID.CRL_DISTRIBUTION_POINTS,
}

_MAX_PATH = 6


def _unknown_critical(cert: _Cert) -> list[str]:
    return [ext.oid.dotted_string for ext in cert.extensions if ext.critical and ext.oid not in _HANDLED_EXTENSIONS]


def _valid_at(cert: _Cert, now: _dt.datetime) -> bool:
    return cert.not_valid_before_utc <= now <= cert.not_valid_after_utc


def _can_issue(issuer: _Cert, below: int) -> bool:
    """CA flag, keyCertSign and pathLen constraint for an issuing certificate."""
    try:
        bc = issuer.extensions.get_extension_for_class(x509.BasicConstraints).value
    except x509.ExtensionNotFound:
        return False
    if not bc.ca or (bc.path_length is not None and below > bc.path_length):
        return False
    try:
        ku = issuer.extensions.get_extension_for_class(x509.KeyUsage).value
    except x509.ExtensionNotFound:
        return True
    return ku.key_cert_sign


def _signed_by(cert: _Cert, issuer: _Cert) -> bool:
    try:
        cert.verify_directly_issued_by(issuer)
    except (ValueError, TypeError, InvalidSignature):
        return False
    return True


def _build_path(leaf: _Cert, store: TrustStore, extra: Sequence[_Cert]) -> tuple[str, list[_Cert]] | None:
    """Depth-first search for leaf → … → anchor; returns (tier, path incl. anchor)."""
    anchors = [(tier, a) for tier, certs in store.tiers.items() for a in certs]
    pool = list(store.intermediates) + list(extra)

    def walk(path: list[_Cert]) -> tuple[str, list[_Cert]] | None:
        cur = path[-1]
        below = len(path) - 1  # intermediates already under the next issuer
        # Prefer anchors: the shortest trusted path, in tier order.
        for tier, anchor in anchors:
            if anchor.subject == cur.issuer and _can_issue(anchor, below) and _signed_by(cur, anchor):
                return tier, [*path, anchor]
        if len(path) >= _MAX_PATH:
            return None
        for cand in pool:
            if cand in path or cand.subject != cur.issuer:
                continue
            if _can_issue(cand, below) and _signed_by(cur, cand):
                found = walk([*path, cand])
                if found:
                    return found
        return None

    return walk([leaf])


def _same_key(cert_key: object, tpm_key: object) -> bool:
    if isinstance(cert_key, rsa.RSAPublicKey) and isinstance(tpm_key, rsa.RSAPublicKey):
        return cert_key.public_numbers() == tpm_key.public_numbers()
    if isinstance(cert_key, ec.EllipticCurvePublicKey) and isinstance(tpm_key, ec.EllipticCurvePublicKey):
        return cert_key.curve.name == tpm_key.curve.name and cert_key.public_numbers() == tpm_key.public_numbers()
    return False


def verify_ek_certificate(
    ek_cert_der: bytes,
    ek_public: bytes | Public,
    trust_store: TrustStore,
    *,
    intermediates: Sequence[_CertInput] = (),
    now: _dt.datetime | None = None,
) -> EkCertVerification:
    """Check an EK certificate: chain to a tiered anchor, validity, key match.

    Failed checks: ``ek_cert.parse``, ``ek_cert.public_key``, ``ek_cert.chain``,
    ``ek_cert.validity``, ``ek_cert.critical_extension``. ``intermediates`` are
    extra untrusted CA certs (DER/PEM bytes or certificates), e.g. sent by the
    device or fetched from the vendor. Returns the tier when all checks pass.
    """
    now = now or _dt.datetime.now(_dt.UTC)
    failed: list[str] = []
    details: dict[str, str] = {}
    try:
        leaf = x509.load_der_x509_certificate(bytes(ek_cert_der))
        leaf_unknown = _unknown_critical(leaf)  # forces extension parsing
        extra = [_load_cert(c) for c in intermediates]
    except (ValueError, TypeError) as exc:
        return EkCertVerification(None, ("ek_cert.parse",), {"ek_cert.parse": str(exc)})

    try:
        same = _same_key(
            leaf.public_key(),
            public_key_from_tpmt(ek_public if isinstance(ek_public, Public) else parse_tpm2b_public(ek_public)),
        )
    except (TpmFormatError, ValueError, TypeError) as exc:
        same = False
        details["ek_cert.public_key"] = f"EK public unusable: {exc}"
    if not same:
        failed.append("ek_cert.public_key")
        details.setdefault("ek_cert.public_key", "certificate key differs from the EK")

    try:
        found = _build_path(leaf, trust_store, extra)
    except ValueError as exc:  # a malformed extension in some pool certificate
        found = None
        details["ek_cert.chain"] = str(exc)
    chain_subjects: tuple[str, ...] = ()
    tier = None
    if found is None:
        failed.append("ek_cert.chain")
        details.setdefault("ek_cert.chain", f"no path from {leaf.issuer.rfc4514_string()!r} to a trust anchor")
        path = [leaf]
    else:
        tier, path = found
        chain_subjects = tuple(c.subject.rfc4514_string() for c in path)

    stale = [c.subject.rfc4514_string() for c in path if not _valid_at(c, now)]
    if stale:
        failed.append("ek_cert.validity")
        details["ek_cert.validity"] = "outside validity period: " + "; ".join(stale)

    # Anchors are configured by the operator, so only leaf + intermediates
    # are held to the critical-extension rule.
    unknown = leaf_unknown + [oid for c in path[1:-1] for oid in _unknown_critical(c)]
    if unknown:
        failed.append("ek_cert.critical_extension")
        details["ek_cert.critical_extension"] = "unhandled critical extensions: " + ", ".join(unknown)

    return EkCertVerification(tier if not failed else None, tuple(failed), details, chain_subjects)


# --------------------------------------------------------------------------
# Quote
# --------------------------------------------------------------------------


def make_challenge_qualifying_data(nonce: bytes, device_public_key: bytes) -> bytes:
    """SHA-256(nonce ‖ device public key): binds a quote to this challenge and device."""
    return hashlib.sha256(bytes(nonce) + bytes(device_public_key)).digest()


@dataclass(frozen=True)
class QuoteVerification:
    """Outcome of :func:`verify_quote`.

    ``ok`` is True iff ``failed`` is empty; ``warnings`` never make it False.
    ``pcrs`` holds only the values the quote actually covers (lowercase hex),
    and is trustworthy only when ``quote.pcr_digest`` did not fail.
    """

    ok: bool
    failed: tuple[str, ...]
    warnings: tuple[str, ...]
    reboot_detected: bool
    clock_info: ClockInfo | None
    pcrs: PcrValues
    firmware_version: int | None = None
    details: Mapping[str, str] = field(default_factory=dict)


@lru_cache(maxsize=4096)
def _ak_material(ak_public: bytes) -> tuple[Public, object, bytes]:
    """Parse an AK once: (Public, cryptography key, name). Cached because the
    same few thousand AKs are verified over and over by one worker."""
    ak = parse_tpm2b_public(ak_public)
    return ak, public_key_from_tpmt(ak), object_name(ak)


def _verify_signature(ak: Public, key: object, attest: bytes, signature: bytes) -> str | None:
    """None if ``signature`` is a valid AK signature over ``attest``, else why not."""
    try:
        sig = parse_signature(signature)
    except TpmFormatError as exc:
        return f"malformed TPMT_SIGNATURE: {exc}"
    h = _SIG_HASHES.get(sig.hash_alg)
    if h is None:
        return f"signature hash 0x{sig.hash_alg:04x} not accepted"
    scheme = ak.parameters.scheme
    if scheme.scheme != Alg.NULL and (scheme.scheme, scheme.hash_alg) != (sig.sig_alg, sig.hash_alg):
        return "signature scheme differs from the AK's fixed scheme"
    try:
        if isinstance(key, rsa.RSAPublicKey) and sig.sig_alg == Alg.RSASSA:
            key.verify(sig.sig, attest, padding.PKCS1v15(), h())
        elif isinstance(key, rsa.RSAPublicKey) and sig.sig_alg == Alg.RSAPSS:
            # TPMs pick the salt length (digest size, or the maximum on older
            # parts), so let the verifier recover it from the encoding.
            key.verify(sig.sig, attest, padding.PSS(mgf=padding.MGF1(h()), salt_length=padding.PSS.AUTO), h())
        elif isinstance(key, ec.EllipticCurvePublicKey) and sig.sig_alg == Alg.ECDSA:
            der = utils.encode_dss_signature(int.from_bytes(sig.r, "big"), int.from_bytes(sig.s, "big"))
            key.verify(der, attest, ec.ECDSA(h()))
        else:
            return "signature algorithm does not match the AK key type"
    except InvalidSignature:
        return "signature does not verify with the AK"
    except ValueError as exc:
        return f"signature unusable: {exc}"
    return None


def _normalise_requested(requested: Mapping[str, Sequence[int]]) -> dict[int, frozenset[int]]:
    out: dict[int, frozenset[int]] = {}
    for bank, idx in requested.items():
        sel = frozenset(int(i) for i in idx)
        if sel:
            out[hash_alg_from_name(bank)] = sel
    return out


def _clock_regressed(cur: ClockInfo, prev: ClockInfo) -> str | None:
    """Why ``cur`` cannot follow ``prev`` on the same TPM, or None."""
    if cur.reset_count < prev.reset_count:
        return "resetCount went backwards"
    if cur.reset_count == prev.reset_count:
        if cur.restart_count < prev.restart_count:
            return "restartCount went backwards"
        if cur.clock < prev.clock:
            return "clock went backwards within one power cycle"
    elif cur.clock < prev.clock and cur.safe:
        # After an unorderly shutdown the TPM may lose up to one NV update
        # interval of Clock, but then it must clear `safe`. A lower Clock with
        # safe=YES means replayed or rolled-back state.
        return "clock went backwards while safe=YES"
    return None


def verify_quote(
    *,
    ak_public: bytes,
    attest: bytes,
    signature: bytes,
    nonce: bytes,
    device_public_key: bytes,
    requested_pcrs: Mapping[str, Sequence[int]],
    reported_pcrs: Mapping[str, Mapping[str, str]],
    previous_clock: ClockInfo | None = None,
    ek_public: bytes | None = None,
) -> QuoteVerification:
    """Verify a TPM2_Quote produced for a challenge.

    ``ak_public``/``ek_public`` are the TPM2B_PUBLIC stored at enrollment;
    ``attest``/``signature``/``reported_pcrs`` come from ``attest.evidence``;
    ``nonce`` is the challenge nonce the *server* issued (never the device's
    copy); ``previous_clock`` is the last accepted quote's clock info.

    ``quote.qualified_signer``: a real TPM signs its *qualified* name (AK under
    EK under the endorsement hierarchy) into the quote, so pass ``ek_public``
    to check that; without it only a bare AK name would be accepted.
    """
    failed: list[str] = []
    warnings: list[str] = []
    details: dict[str, str] = {}

    def fail(name: str, why: str) -> None:
        if name not in failed:
            failed.append(name)
            details[name] = why

    def result(
        clock: ClockInfo | None = None, pcrs: PcrValues | None = None, reboot: bool = False, fw: int | None = None
    ) -> QuoteVerification:
        return QuoteVerification(not failed, tuple(failed), tuple(warnings), reboot, clock, pcrs or {}, fw, details)

    try:
        ak, key, ak_name = _ak_material(bytes(ak_public))
    except TpmFormatError as exc:
        fail("quote.ak_public", f"unusable AK public: {exc}")
        return result()
    attest = bytes(attest)

    why = _verify_signature(ak, key, attest, bytes(signature))
    if why:
        fail("quote.signature", why)

    try:
        info = parse_attest(attest)
    except TpmFormatError as exc:
        fail("quote.format", f"malformed TPMS_ATTEST: {exc}")
        return result()

    if info.magic != TPM_GENERATED_VALUE:
        # Without TPM_GENERATED the structure may be external data the AK was
        # tricked into signing; restricted keys guarantee this value.
        fail("quote.magic", f"magic 0x{info.magic:08x} is not TPM_GENERATED_VALUE")
    if info.type != TPM_ST_ATTEST_QUOTE or info.quote is None:
        fail("quote.type", f"attestation type 0x{info.type:04x} is not a quote")

    expected_extra = make_challenge_qualifying_data(nonce, device_public_key)
    if not hmac.compare_digest(info.extra_data, expected_extra):
        fail("quote.nonce", "extraData is not SHA-256(nonce ‖ device public key)")

    signers = [ak_name]
    if ek_public is not None:
        try:
            signers = [ak_qualified_name(ak, ek_public)]
        except TpmFormatError as exc:
            fail("quote.qualified_signer", f"unusable EK public: {exc}")
    if not any(hmac.compare_digest(info.qualified_signer, s) for s in signers):
        fail("quote.qualified_signer", "qualifiedSigner is not this AK")

    clock = info.clock_info
    if not clock.safe:
        warnings.append("quote.clock_unsafe")
    reboot = False
    if previous_clock is not None:
        reboot = clock.reset_count > previous_clock.reset_count
        why = _clock_regressed(clock, previous_clock)
        if why:
            fail("quote.clock_regressed", why)

    pcrs: PcrValues = {}
    if info.quote is not None:
        quoted = {s.hash_alg: frozenset(s.pcrs) for s in info.quote.pcr_select if s.pcrs}
        try:
            wanted = _normalise_requested(requested_pcrs)
        except (TpmFormatError, ValueError, TypeError) as exc:
            wanted = None
            fail("quote.pcr_selection", f"bad requested PCRs: {exc}")
        if wanted is not None and quoted != wanted:
            fail("quote.pcr_selection", "quoted PCR selection differs from the challenge")
        pcrs = _check_pcr_digest(info.quote, reported_pcrs, signature, fail)
    return result(clock, pcrs, reboot, info.firmware_version)


def _check_pcr_digest(
    quote: QuoteInfo,
    reported: Mapping[str, Mapping[str, str]],
    signature: bytes,
    fail: Callable[[str, str], None],
) -> PcrValues:
    """Recompute pcrDigest from the reported values (selection order, ascending index)."""
    # pcrDigest uses the signing scheme's hash; fall back to SHA-256 if the
    # signature itself is unparsable (that failure is already recorded).
    try:
        sig_hash = parse_signature(signature).hash_alg
        if sig_hash not in HASH_ALGS:
            sig_hash = Alg.SHA256
    except TpmFormatError:
        sig_hash = Alg.SHA256
    acc = HASH_ALGS[sig_hash][2]()
    out: PcrValues = {}
    bad: list[str] = []
    for sel in quote.pcr_select:
        try:
            bank = hash_alg_name(sel.hash_alg)
        except TpmFormatError:
            fail("quote.pcr_selection", f"unknown PCR bank 0x{sel.hash_alg:04x}")
            return {}
        size = HASH_ALGS[sel.hash_alg][1]
        values = reported.get(bank, {}) if isinstance(reported, Mapping) else {}
        for i in sel.pcrs:
            v = values.get(str(i)) if isinstance(values, Mapping) else None
            try:
                raw = bytes.fromhex(v) if isinstance(v, str) else b""
            except ValueError:
                raw = b""
            if len(raw) != size:
                bad.append(f"{bank}:{i}")
                continue
            acc.update(raw)
            out.setdefault(bank, {})[str(i)] = raw.hex()
    if bad:
        fail("quote.pcr_values", "missing or malformed PCR values: " + ", ".join(bad))
        fail("quote.pcr_digest", "cannot recompute pcrDigest")
    elif not hmac.compare_digest(acc.digest(), quote.pcr_digest):
        fail("quote.pcr_digest", "reported PCR values do not hash to the quoted pcrDigest")
    return out


# --------------------------------------------------------------------------
# Policy
# --------------------------------------------------------------------------


def evaluate_policy(pcrs: Mapping[str, Mapping[str, str]], golden: Mapping[str, Mapping[str, str]]) -> list[str]:
    """Named checks ``pcr.<bank>.<index>`` for every golden PCR that differs or is absent.

    PCRs not named in ``golden`` are not constrained. Hex is compared
    case-insensitively.
    """
    failed: list[str] = []
    for bank, wanted in golden.items():
        have = pcrs.get(bank, {})
        for idx in sorted(wanted, key=lambda s: int(s) if str(s).isdigit() else 1 << 30):
            got = have.get(str(idx))
            if got is None or got.lower() != str(wanted[idx]).lower():
                failed.append(f"pcr.{bank}.{idx}")
    return failed
