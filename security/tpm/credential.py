"""Server-side TPM2_MakeCredential in pure Python.

This module owns the credential-protection maths of TPM 2.0 (Part 1 §24,
"Credential Protection"; Part 1 §11.4.9-10 for KDFa/KDFe; Part 1 Annex B/C for
RSA-OAEP and ECDH secret sharing). The console uses it during enrollment: it
encrypts a random secret to the device's EK, bound to the AK *name*, so only
the TPM that holds that EK — and has that AK loaded — can recover it with
TPM2_ActivateCredential. Output is the raw TPM2B_ID_OBJECT and
TPM2B_ENCRYPTED_SECRET the protocol carries (no tpm2-tools file header).
"""

from __future__ import annotations

import hmac
import os
from dataclasses import dataclass

from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms

try:  # cryptography >= 43 moved CFB to "decrepit"; the TPM still mandates it.
    from cryptography.hazmat.decrepit.ciphers.modes import CFB
except ImportError:  # pragma: no cover - older cryptography
    from cryptography.hazmat.primitives.ciphers.modes import CFB  # type: ignore[no-redef]

from .structures import (
    HASH_ALGS,
    Alg,
    EccParms,
    ObjectAttributes,
    Public,
    TpmFormatError,
    parse_tpm2b_public,
    public_key_from_tpmt,
)

__all__ = ["MadeCredential", "kdfa", "kdfe", "make_credential"]

_CRYPTO_HASH = {
    Alg.SHA1: hashes.SHA1,
    Alg.SHA256: hashes.SHA256,
    Alg.SHA384: hashes.SHA384,
    Alg.SHA512: hashes.SHA512,
}


@dataclass(frozen=True)
class MadeCredential:
    """Result of MakeCredential, in protocol form (see PROTOCOL.md)."""

    credential_blob: bytes  # TPM2B_ID_OBJECT
    encrypted_secret: bytes  # TPM2B_ENCRYPTED_SECRET


def _label(label: bytes) -> bytes:
    # The TPM always hashes the label *including* its NUL terminator; callers
    # may pass "IDENTITY" or "IDENTITY\0".
    return label if label.endswith(b"\x00") else label + b"\x00"


def kdfa(hash_alg: int, key: bytes, label: bytes, context_u: bytes, context_v: bytes, bits: int) -> bytes:
    """KDFa: SP 800-108 counter-mode KDF with HMAC, as the TPM defines it.

    K(i) = HMAC(key, [i]32 ‖ label ‖ 00 ‖ contextU ‖ contextV ‖ [bits]32)
    """
    name = HASH_ALGS[hash_alg][0]
    need = (bits + 7) // 8
    lab = _label(label)
    out = b""
    counter = 0
    while len(out) < need:
        counter += 1
        out += hmac.new(
            key,
            counter.to_bytes(4, "big") + lab + context_u + context_v + bits.to_bytes(4, "big"),
            name,
        ).digest()
    out = out[:need]
    if bits % 8:
        # Part 1 §11.4.10.2: excess high-order bits of the first octet are cleared.
        out = bytes([out[0] & ((1 << (bits % 8)) - 1)]) + out[1:]
    return out


def kdfe(hash_alg: int, z: bytes, label: bytes, party_u: bytes, party_v: bytes, bits: int) -> bytes:
    """KDFe: SP 800-56A concatenation KDF, as the TPM defines it.

    K(i) = H([i]32 ‖ Z ‖ label ‖ 00 ‖ partyUInfo ‖ partyVInfo)
    """
    ctor = HASH_ALGS[hash_alg][2]
    need = (bits + 7) // 8
    lab = _label(label)
    out = b""
    counter = 0
    while len(out) < need:
        counter += 1
        out += ctor(counter.to_bytes(4, "big") + z + lab + party_u + party_v).digest()
    return out[:need]


def _seed_rsa(ek: Public, seed_size: int) -> tuple[bytes, bytes]:
    key = public_key_from_tpmt(ek)
    assert isinstance(key, rsa.RSAPublicKey)
    seed = os.urandom(seed_size)
    h = _CRYPTO_HASH[ek.name_alg]
    enc = key.encrypt(
        seed,
        padding.OAEP(mgf=padding.MGF1(h()), algorithm=h(), label=b"IDENTITY\x00"),
    )
    return seed, enc


def _seed_ecc(ek: Public, seed_size: int) -> tuple[bytes, bytes]:
    key = public_key_from_tpmt(ek)
    assert isinstance(key, ec.EllipticCurvePublicKey)
    coord = (key.curve.key_size + 7) // 8
    eph = ec.generate_private_key(key.curve)
    z = eph.exchange(ec.ECDH(), key)  # x-coordinate of the shared point, fixed length
    eph_nums = eph.public_key().public_numbers()
    qe_x = eph_nums.x.to_bytes(coord, "big")
    qe_y = eph_nums.y.to_bytes(coord, "big")
    ek_x = key.public_numbers().x.to_bytes(coord, "big")
    seed = kdfe(ek.name_alg, z, b"IDENTITY", qe_x, ek_x, seed_size * 8)
    # TPMS_ECC_POINT of the ephemeral key is the "encrypted" secret.
    point = len(qe_x).to_bytes(2, "big") + qe_x + len(qe_y).to_bytes(2, "big") + qe_y
    return seed, point


def make_credential(ek_public: bytes | Public, ak_name: bytes, secret: bytes) -> MadeCredential:
    """TPM2_MakeCredential(handle=EK, credential=secret, objectName=ak_name), in software.

    ``ek_public`` is the EK's TPM2B_PUBLIC (or a parsed Public): an RSA or
    NIST-curve ECC restricted decryption key with an AES-CFB symmetric
    definition (every TCG EK template has this). ``ak_name`` is the AK's name
    (nameAlg ‖ H(TPMT_PUBLIC)) computed by the server from ``ak_pub``, never
    taken from the device. ``secret`` is at most the EK nameAlg digest size.
    Raises TpmFormatError for an EK that cannot protect credentials.
    """
    ek = ek_public if isinstance(ek_public, Public) else parse_tpm2b_public(ek_public)
    if not ek.has(ObjectAttributes.RESTRICTED | ObjectAttributes.DECRYPT) or ek.has(ObjectAttributes.SIGN_ENCRYPT):
        raise TpmFormatError("EK must be a restricted decryption (storage) key")
    if ek.name_alg not in _CRYPTO_HASH:
        raise TpmFormatError("unsupported EK nameAlg")
    sym = ek.parameters.symmetric
    if sym.algorithm != Alg.AES or sym.mode != Alg.CFB or sym.key_bits not in (128, 192, 256):
        raise TpmFormatError("EK symmetric definition must be AES-CFB")
    digest_size = HASH_ALGS[ek.name_alg][1]
    if not 1 <= len(secret) <= digest_size:
        # ActivateCredential unmarshals a TPM2B_DIGEST no larger than the
        # EK's nameAlg digest; a longer one would fail on the device.
        raise ValueError(f"secret must be 1..{digest_size} bytes")
    if len(ak_name) < 2 or int.from_bytes(ak_name[:2], "big") not in HASH_ALGS:
        raise ValueError("ak_name must be nameAlg ‖ digest")

    if isinstance(ek.parameters, EccParms):
        seed, enc_secret = _seed_ecc(ek, digest_size)
    else:
        seed, enc_secret = _seed_rsa(ek, digest_size)

    sym_key = kdfa(ek.name_alg, seed, b"STORAGE", ak_name, b"", sym.key_bits)
    plaintext = len(secret).to_bytes(2, "big") + secret  # TPM2B_DIGEST
    # Credential protection uses a zero IV: the key is fresh for every seed.
    encryptor = Cipher(algorithms.AES(sym_key), CFB(b"\x00" * 16)).encryptor()
    enc_identity = encryptor.update(plaintext) + encryptor.finalize()

    hmac_key = kdfa(ek.name_alg, seed, b"INTEGRITY", b"", b"", digest_size * 8)
    outer_hmac = hmac.new(hmac_key, enc_identity + ak_name, HASH_ALGS[ek.name_alg][0]).digest()

    id_object = len(outer_hmac).to_bytes(2, "big") + outer_hmac + enc_identity
    return MadeCredential(
        credential_blob=len(id_object).to_bytes(2, "big") + id_object,
        encrypted_secret=len(enc_secret).to_bytes(2, "big") + enc_secret,
    )
