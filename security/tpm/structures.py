"""TPM 2.0 wire structures: strict big-endian (un)marshalling.

This module owns the byte-level view of the TPM structures the console receives
from agents (see PROTOCOL.md "TPM encodings"): TPM2B_PUBLIC / TPMT_PUBLIC,
TPMS_ATTEST (quote only), TPMT_SIGNATURE, TPM object names and qualified names,
and the conversion of a TPMT_PUBLIC into a ``cryptography`` public key.

Every parser is strict: it is bounds-checked, rejects trailing bytes at the top
level, and reports any malformed input as :class:`TpmFormatError` (never
IndexError / struct.error / ValueError), because these bytes come straight off
the network from devices we do not trust yet.

The small ``marshal_*`` helpers are the inverse operations; the server itself
only needs to parse, but tests and the fuzzers use them to build evidence.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from cryptography.hazmat.primitives.asymmetric import ec, rsa

__all__ = [
    "HASH_ALGS",
    "TPM_GENERATED_VALUE",
    "TPM_RH_ENDORSEMENT",
    "TPM_ST_ATTEST_QUOTE",
    "Alg",
    "Attest",
    "ClockInfo",
    "EccCurve",
    "EccParms",
    "ObjectAttributes",
    "PcrSelection",
    "Public",
    "QuoteInfo",
    "RsaParms",
    "Scheme",
    "Signature",
    "SymDef",
    "TpmFormatError",
    "digest",
    "hash_alg_from_name",
    "hash_alg_name",
    "marshal_attest",
    "marshal_signature",
    "marshal_tpm2b_public",
    "marshal_tpmt_public",
    "object_name",
    "parse_attest",
    "parse_pcr_selection",
    "parse_signature",
    "parse_tpm2b_public",
    "parse_tpmt_public",
    "public_key_from_tpmt",
    "qualified_name",
]


class TpmFormatError(ValueError):
    """Malformed, truncated or unsupported TPM structure."""


class Alg:
    """TPM_ALG_ID values used here (TPM 2.0 Part 2, table 9)."""

    RSA = 0x0001
    SHA1 = 0x0004
    HMAC = 0x0005
    AES = 0x0006
    KEYEDHASH = 0x0008
    XOR = 0x000A
    SHA256 = 0x000B
    SHA384 = 0x000C
    SHA512 = 0x000D
    NULL = 0x0010
    SM3_256 = 0x0012
    SM4 = 0x0013
    RSASSA = 0x0014
    RSAES = 0x0015
    RSAPSS = 0x0016
    OAEP = 0x0017
    ECDSA = 0x0018
    ECDH = 0x0019
    ECDAA = 0x001A
    SM2 = 0x001B
    ECSCHNORR = 0x001C
    ECMQV = 0x001D
    KDF1_SP800_56A = 0x0020
    KDF2 = 0x0021
    KDF1_SP800_108 = 0x0022
    ECC = 0x0023
    SYMCIPHER = 0x0025
    CAMELLIA = 0x0026
    CTR = 0x0040
    OFB = 0x0041
    CBC = 0x0042
    CFB = 0x0043
    ECB = 0x0044


class EccCurve:
    """TPM_ECC_CURVE values."""

    NIST_P192 = 0x0001
    NIST_P224 = 0x0002
    NIST_P256 = 0x0003
    NIST_P384 = 0x0004
    NIST_P521 = 0x0005
    BN_P256 = 0x0010
    BN_P638 = 0x0011
    SM2_P256 = 0x0020


# Only the NIST curves have a `cryptography` implementation; BN/SM2 keys parse
# but cannot be turned into a verifying key.
_CURVES: dict[int, ec.EllipticCurve] = {
    EccCurve.NIST_P192: ec.SECP192R1(),
    EccCurve.NIST_P224: ec.SECP224R1(),
    EccCurve.NIST_P256: ec.SECP256R1(),
    EccCurve.NIST_P384: ec.SECP384R1(),
    EccCurve.NIST_P521: ec.SECP521R1(),
}


class ObjectAttributes:
    """TPMA_OBJECT bits."""

    FIXED_TPM = 1 << 1
    ST_CLEAR = 1 << 2
    FIXED_PARENT = 1 << 4
    SENSITIVE_DATA_ORIGIN = 1 << 5
    USER_WITH_AUTH = 1 << 6
    ADMIN_WITH_POLICY = 1 << 7
    NO_DA = 1 << 10
    ENCRYPTED_DUPLICATION = 1 << 11
    RESTRICTED = 1 << 16
    DECRYPT = 1 << 17
    SIGN_ENCRYPT = 1 << 18
    X509_SIGN = 1 << 19


TPM_GENERATED_VALUE = 0xFF544347
TPM_ST_ATTEST_QUOTE = 0x8018
TPM_RH_ENDORSEMENT = 0x4000000B

# hash alg id -> (name, digest size, hashlib constructor)
HASH_ALGS: dict[int, tuple[str, int, Callable[..., Any]]] = {
    Alg.SHA1: ("sha1", 20, hashlib.sha1),
    Alg.SHA256: ("sha256", 32, hashlib.sha256),
    Alg.SHA384: ("sha384", 48, hashlib.sha384),
    Alg.SHA512: ("sha512", 64, hashlib.sha512),
}
_HASH_BY_NAME = {v[0]: k for k, v in HASH_ALGS.items()}

# Largest TPMU_HA (SHA-512); TPM2B_DIGEST/TPM2B_DATA can never be larger.
_MAX_DIGEST = 64
# MAX_RSA_KEY_BYTES for a 16384-bit key: generous, but it bounds allocation.
_MAX_RSA_BYTES = 2048
_MAX_ECC_BYTES = 80
_MAX_PCR_BANKS = 16
_MAX_PCR_SELECT = 32


def hash_alg_name(alg: int) -> str:
    """'sha256' for TPM_ALG_SHA256 etc.; raises TpmFormatError if unsupported."""
    try:
        return HASH_ALGS[alg][0]
    except KeyError:
        raise TpmFormatError(f"unsupported hash algorithm 0x{alg:04x}") from None


def hash_alg_from_name(name: str) -> int:
    """TPM_ALG_ID for 'sha256' etc.; raises TpmFormatError if unknown."""
    try:
        return _HASH_BY_NAME[name.lower()]
    except KeyError:
        raise TpmFormatError(f"unsupported hash algorithm {name!r}") from None


def digest(alg: int, data: bytes) -> bytes:
    """Hash ``data`` with the TPM hash algorithm ``alg``."""
    try:
        ctor = HASH_ALGS[alg][2]
    except KeyError:
        raise TpmFormatError(f"unsupported hash algorithm 0x{alg:04x}") from None
    return ctor(data).digest()


class _Reader:
    """Cursor over a bytes buffer; every read is bounds-checked."""

    __slots__ = ("buf", "pos")

    def __init__(self, buf: bytes) -> None:
        if not isinstance(buf, (bytes, bytearray, memoryview)):
            raise TpmFormatError("expected bytes")
        self.buf = bytes(buf)
        self.pos = 0

    def take(self, n: int) -> bytes:
        end = self.pos + n
        if n < 0 or end > len(self.buf):
            raise TpmFormatError(f"truncated: need {n} bytes at offset {self.pos}, have {len(self.buf) - self.pos}")
        out = self.buf[self.pos : end]
        self.pos = end
        return out

    def u8(self) -> int:
        return self.take(1)[0]

    def u16(self) -> int:
        return int.from_bytes(self.take(2), "big")

    def u32(self) -> int:
        return int.from_bytes(self.take(4), "big")

    def u64(self) -> int:
        return int.from_bytes(self.take(8), "big")

    def tpm2b(self, limit: int) -> bytes:
        size = self.u16()
        if size > limit:
            raise TpmFormatError(f"TPM2B size {size} exceeds limit {limit} at offset {self.pos - 2}")
        return self.take(size)

    def remaining(self) -> int:
        return len(self.buf) - self.pos

    def done(self, what: str) -> None:
        if self.pos != len(self.buf):
            raise TpmFormatError(f"{what}: {len(self.buf) - self.pos} trailing bytes")


def _u16(v: int) -> bytes:
    return v.to_bytes(2, "big")


def _u32(v: int) -> bytes:
    return v.to_bytes(4, "big")


def _b(data: bytes) -> bytes:
    """Marshal a TPM2B: u16 size then the bytes."""
    return _u16(len(data)) + data


# --------------------------------------------------------------------------
# TPMT_PUBLIC
# --------------------------------------------------------------------------


@dataclass(frozen=True)
class SymDef:
    """TPMT_SYM_DEF_OBJECT; ``algorithm == Alg.NULL`` means none."""

    algorithm: int = Alg.NULL
    key_bits: int = 0
    mode: int = 0


@dataclass(frozen=True)
class Scheme:
    """TPMT_RSA_SCHEME / TPMT_ECC_SCHEME / TPMT_KDF_SCHEME.

    ``hash_alg`` is 0 when the scheme has no hash (NULL, RSAES);
    ``count`` is only meaningful for ECDAA.
    """

    scheme: int = Alg.NULL
    hash_alg: int = 0
    count: int = 0


@dataclass(frozen=True)
class RsaParms:
    """TPMS_RSA_PARMS. ``exponent`` is normalised: the wire value 0 means 65537."""

    symmetric: SymDef
    scheme: Scheme
    key_bits: int
    exponent: int


@dataclass(frozen=True)
class EccParms:
    """TPMS_ECC_PARMS."""

    symmetric: SymDef
    scheme: Scheme
    curve_id: int
    kdf: Scheme


@dataclass(frozen=True)
class Public:
    """A parsed TPMT_PUBLIC (RSA or ECC). ``raw`` is its exact wire form."""

    type: int
    name_alg: int
    object_attributes: int
    auth_policy: bytes
    parameters: RsaParms | EccParms
    # RSA: (modulus,) ; ECC: (x, y)
    unique: tuple[bytes, ...]
    raw: bytes = field(repr=False)

    def has(self, attr: int) -> bool:
        """True if every bit in ``attr`` is set in objectAttributes."""
        return self.object_attributes & attr == attr

    @property
    def name(self) -> bytes:
        """The object's TPM name: nameAlg ‖ H_nameAlg(TPMT_PUBLIC)."""
        return object_name(self)


def _parse_sym_def(r: _Reader) -> SymDef:
    alg = r.u16()
    if alg == Alg.NULL:
        return SymDef()
    if alg not in (Alg.AES, Alg.SM4, Alg.CAMELLIA, Alg.XOR):
        raise TpmFormatError(f"unsupported symmetric algorithm 0x{alg:04x}")
    return SymDef(alg, r.u16(), r.u16())


# schemes whose details are TPMS_SCHEME_HASH (a single hashAlg)
_HASH_SCHEMES = {
    Alg.RSASSA,
    Alg.RSAPSS,
    Alg.OAEP,
    Alg.ECDSA,
    Alg.SM2,
    Alg.ECSCHNORR,
    Alg.ECDH,
    Alg.ECMQV,
}


def _parse_asym_scheme(r: _Reader) -> Scheme:
    scheme = r.u16()
    if scheme == Alg.NULL or scheme == Alg.RSAES:
        return Scheme(scheme)
    if scheme in _HASH_SCHEMES:
        return Scheme(scheme, r.u16())
    if scheme == Alg.ECDAA:
        return Scheme(scheme, r.u16(), r.u16())
    raise TpmFormatError(f"unsupported asymmetric scheme 0x{scheme:04x}")


def _parse_kdf_scheme(r: _Reader) -> Scheme:
    scheme = r.u16()
    if scheme == Alg.NULL:
        return Scheme(scheme)
    # MGF1 is 0x0007; the others are the SP800 KDFs.
    if scheme in (0x0007, Alg.KDF1_SP800_56A, Alg.KDF2, Alg.KDF1_SP800_108):
        return Scheme(scheme, r.u16())
    raise TpmFormatError(f"unsupported KDF scheme 0x{scheme:04x}")


def _parse_tpmt_public(r: _Reader) -> Public:
    start = r.pos
    typ = r.u16()
    name_alg = r.u16()
    attrs = r.u32()
    policy = r.tpm2b(_MAX_DIGEST)
    params: RsaParms | EccParms
    if typ == Alg.RSA:
        sym = _parse_sym_def(r)
        scheme = _parse_asym_scheme(r)
        key_bits = r.u16()
        exponent = r.u32()
        params = RsaParms(sym, scheme, key_bits, exponent or 65537)
        unique: tuple[bytes, ...] = (r.tpm2b(_MAX_RSA_BYTES),)
    elif typ == Alg.ECC:
        sym = _parse_sym_def(r)
        scheme = _parse_asym_scheme(r)
        curve = r.u16()
        kdf = _parse_kdf_scheme(r)
        params = EccParms(sym, scheme, curve, kdf)
        unique = (r.tpm2b(_MAX_ECC_BYTES), r.tpm2b(_MAX_ECC_BYTES))
    else:
        raise TpmFormatError(f"unsupported public key type 0x{typ:04x} (only RSA and ECC)")
    # A name must be computable, so the nameAlg must be a hash we know.
    if name_alg not in HASH_ALGS:
        raise TpmFormatError(f"unsupported nameAlg 0x{name_alg:04x}")
    if policy and len(policy) != HASH_ALGS[name_alg][1]:
        raise TpmFormatError("authPolicy size does not match nameAlg")
    return Public(typ, name_alg, attrs, policy, params, unique, r.buf[start : r.pos])


def parse_tpmt_public(data: bytes) -> Public:
    """Parse a bare TPMT_PUBLIC (no size prefix); the whole buffer must be used."""
    r = _Reader(data)
    pub = _parse_tpmt_public(r)
    r.done("TPMT_PUBLIC")
    return pub


def parse_tpm2b_public(data: bytes) -> Public:
    """Parse a TPM2B_PUBLIC (u16 size ‖ TPMT_PUBLIC) as sent in ek_pub / ak_pub."""
    r = _Reader(data)
    inner = r.tpm2b(0xFFFF)
    r.done("TPM2B_PUBLIC")
    if not inner:
        raise TpmFormatError("empty TPM2B_PUBLIC")
    return parse_tpmt_public(inner)


def _as_public(pub: Public | bytes) -> Public:
    """Accept a parsed Public or TPM2B_PUBLIC bytes (the protocol form)."""
    if isinstance(pub, Public):
        return pub
    return parse_tpm2b_public(pub)


def object_name(pub: Public | bytes) -> bytes:
    """TPM name of an object: nameAlg (u16) ‖ H_nameAlg(TPMT_PUBLIC)."""
    p = _as_public(pub)
    return _u16(p.name_alg) + digest(p.name_alg, p.raw)


def qualified_name(parent_qualified_name: bytes, pub: Public | bytes) -> bytes:
    """Qualified name of a child: nameAlg ‖ H_nameAlg(QN(parent) ‖ Name(child)).

    For a primary key (e.g. the EK) the parent QN is the 4-byte hierarchy
    handle, e.g. ``TPM_RH_ENDORSEMENT.to_bytes(4, "big")``.
    """
    p = _as_public(pub)
    return _u16(p.name_alg) + digest(p.name_alg, parent_qualified_name + object_name(p))


def public_key_from_tpmt(pub: Public | bytes) -> rsa.RSAPublicKey | ec.EllipticCurvePublicKey:
    """Convert a TPMT_PUBLIC (parsed, or TPM2B_PUBLIC bytes) into a cryptography key."""
    p = _as_public(pub)
    try:
        if isinstance(p.parameters, RsaParms):
            modulus = p.unique[0]
            if not modulus or len(modulus) * 8 != p.parameters.key_bits:
                raise TpmFormatError("RSA modulus size does not match keyBits")
            return rsa.RSAPublicNumbers(p.parameters.exponent, int.from_bytes(modulus, "big")).public_key()
        curve = _CURVES.get(p.parameters.curve_id)
        if curve is None:
            raise TpmFormatError(f"unsupported ECC curve 0x{p.parameters.curve_id:04x}")
        x, y = p.unique
        return ec.EllipticCurvePublicNumbers(int.from_bytes(x, "big"), int.from_bytes(y, "big"), curve).public_key()
    except TpmFormatError:
        raise
    except ValueError as exc:  # point not on curve, bad RSA numbers, ...
        raise TpmFormatError(f"invalid public key: {exc}") from None


def _marshal_sym(s: SymDef) -> bytes:
    if s.algorithm == Alg.NULL:
        return _u16(Alg.NULL)
    return _u16(s.algorithm) + _u16(s.key_bits) + _u16(s.mode)


def _marshal_scheme(s: Scheme) -> bytes:
    if s.scheme in (Alg.NULL, Alg.RSAES):
        return _u16(s.scheme)
    if s.scheme == Alg.ECDAA:
        return _u16(s.scheme) + _u16(s.hash_alg) + _u16(s.count)
    return _u16(s.scheme) + _u16(s.hash_alg)


def marshal_tpmt_public(
    *,
    type: int,
    name_alg: int,
    object_attributes: int,
    parameters: RsaParms | EccParms,
    unique: tuple[bytes, ...],
    auth_policy: bytes = b"",
) -> bytes:
    """Build a TPMT_PUBLIC. An RSA exponent of 65537 is written as 0 like a TPM does."""
    out = _u16(type) + _u16(name_alg) + _u32(object_attributes) + _b(auth_policy)
    if isinstance(parameters, RsaParms):
        exp = 0 if parameters.exponent == 65537 else parameters.exponent
        out += (
            _marshal_sym(parameters.symmetric)
            + _marshal_scheme(parameters.scheme)
            + _u16(parameters.key_bits)
            + _u32(exp)
            + _b(unique[0])
        )
    else:
        out += (
            _marshal_sym(parameters.symmetric)
            + _marshal_scheme(parameters.scheme)
            + _u16(parameters.curve_id)
            + _marshal_scheme(parameters.kdf)
            + _b(unique[0])
            + _b(unique[1])
        )
    return out


def marshal_tpm2b_public(tpmt_public: bytes) -> bytes:
    """Wrap a TPMT_PUBLIC as TPM2B_PUBLIC."""
    return _b(tpmt_public)


# --------------------------------------------------------------------------
# TPMS_ATTEST (quote)
# --------------------------------------------------------------------------


@dataclass(frozen=True)
class PcrSelection:
    """One TPMS_PCR_SELECTION: a bank and the PCR indices selected in it (ascending)."""

    hash_alg: int
    pcrs: tuple[int, ...]
    size_of_select: int = 3

    @property
    def bank(self) -> str:
        return hash_alg_name(self.hash_alg)


@dataclass(frozen=True)
class ClockInfo:
    """TPMS_CLOCK_INFO: ms clock, reset/restart counters, and the `safe` flag."""

    clock: int
    reset_count: int
    restart_count: int
    safe: bool


@dataclass(frozen=True)
class QuoteInfo:
    """TPMS_QUOTE_INFO."""

    pcr_select: tuple[PcrSelection, ...]
    pcr_digest: bytes


@dataclass(frozen=True)
class Attest:
    """TPMS_ATTEST. ``quote`` is set only when ``type == TPM_ST_ATTEST_QUOTE``.

    Magic and type are reported, not enforced, so the verifier can name the
    exact failed check instead of a generic parse error.
    """

    magic: int
    type: int
    qualified_signer: bytes
    extra_data: bytes
    clock_info: ClockInfo
    firmware_version: int
    quote: QuoteInfo | None


def _parse_pcr_selection(r: _Reader) -> tuple[PcrSelection, ...]:
    count = r.u32()
    if count > _MAX_PCR_BANKS:
        raise TpmFormatError(f"TPML_PCR_SELECTION count {count} too large")
    out = []
    for _ in range(count):
        alg = r.u16()
        size = r.u8()
        if size > _MAX_PCR_SELECT:
            raise TpmFormatError(f"sizeofSelect {size} too large")
        bitmap = r.take(size)
        pcrs = tuple(byte_i * 8 + bit for byte_i, b in enumerate(bitmap) for bit in range(8) if b & (1 << bit))
        out.append(PcrSelection(alg, pcrs, size))
    return tuple(out)


def parse_pcr_selection(data: bytes) -> tuple[PcrSelection, ...]:
    """Parse a TPML_PCR_SELECTION; the whole buffer must be used."""
    r = _Reader(data)
    sel = _parse_pcr_selection(r)
    r.done("TPML_PCR_SELECTION")
    return sel


def parse_attest(data: bytes) -> Attest:
    """Parse TPMS_ATTEST bytes (the contents of a TPM2B_ATTEST).

    Non-quote attestation types are accepted with ``quote=None`` and their
    body is not parsed (trailing bytes are then tolerated, since we do not
    know their layout); a quote body must use the buffer exactly.
    """
    r = _Reader(data)
    magic = r.u32()
    typ = r.u16()
    signer = r.tpm2b(2 + _MAX_DIGEST)
    extra = r.tpm2b(_MAX_DIGEST)
    clock = r.u64()
    reset = r.u32()
    restart = r.u32()
    safe = r.u8()
    if safe > 1:
        raise TpmFormatError(f"TPMI_YES_NO safe={safe}")
    fw = r.u64()
    quote = None
    if typ == TPM_ST_ATTEST_QUOTE:
        sel = _parse_pcr_selection(r)
        pcr_digest = r.tpm2b(_MAX_DIGEST)
        r.done("TPMS_ATTEST")
        quote = QuoteInfo(sel, pcr_digest)
    return Attest(magic, typ, signer, extra, ClockInfo(clock, reset, restart, bool(safe)), fw, quote)


def marshal_attest(
    *,
    qualified_signer: bytes,
    extra_data: bytes,
    clock_info: ClockInfo,
    firmware_version: int,
    pcr_select: tuple[PcrSelection, ...],
    pcr_digest: bytes,
    magic: int = TPM_GENERATED_VALUE,
    type: int = TPM_ST_ATTEST_QUOTE,
) -> bytes:
    """Build quote TPMS_ATTEST bytes (used by tests and fuzzers)."""
    out = (
        _u32(magic)
        + _u16(type)
        + _b(qualified_signer)
        + _b(extra_data)
        + clock_info.clock.to_bytes(8, "big")
        + _u32(clock_info.reset_count)
        + _u32(clock_info.restart_count)
        + bytes([1 if clock_info.safe else 0])
        + firmware_version.to_bytes(8, "big")
        + _u32(len(pcr_select))
    )
    for s in pcr_select:
        bitmap = bytearray(s.size_of_select)
        for i in s.pcrs:
            bitmap[i // 8] |= 1 << (i % 8)
        out += _u16(s.hash_alg) + bytes([s.size_of_select]) + bytes(bitmap)
    return out + _b(pcr_digest)


# --------------------------------------------------------------------------
# TPMT_SIGNATURE
# --------------------------------------------------------------------------


@dataclass(frozen=True)
class Signature:
    """TPMT_SIGNATURE for RSASSA / RSAPSS (``sig``) or ECDSA (``r``, ``s``)."""

    sig_alg: int
    hash_alg: int
    sig: bytes = b""
    r: bytes = b""
    s: bytes = b""


def parse_signature(data: bytes) -> Signature:
    """Parse a TPMT_SIGNATURE; only RSASSA, RSAPSS and ECDSA are supported."""
    r = _Reader(data)
    alg = r.u16()
    if alg in (Alg.RSASSA, Alg.RSAPSS):
        h = r.u16()
        sig = Signature(alg, h, sig=r.tpm2b(_MAX_RSA_BYTES))
    elif alg == Alg.ECDSA:
        h = r.u16()
        sig = Signature(alg, h, r=r.tpm2b(_MAX_ECC_BYTES), s=r.tpm2b(_MAX_ECC_BYTES))
    else:
        raise TpmFormatError(f"unsupported signature algorithm 0x{alg:04x}")
    r.done("TPMT_SIGNATURE")
    return sig


def marshal_signature(sig: Signature) -> bytes:
    """Build TPMT_SIGNATURE bytes."""
    if sig.sig_alg == Alg.ECDSA:
        return _u16(sig.sig_alg) + _u16(sig.hash_alg) + _b(sig.r) + _b(sig.s)
    return _u16(sig.sig_alg) + _u16(sig.hash_alg) + _b(sig.sig)
