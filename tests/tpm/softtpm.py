"""A software stand-in for a TPM's AK, for evidence a real TPM will not produce.

Real-TPM tests cover the happy path and most tampering; a few cases (safe=0,
wrong magic/type, a validly signed quote naming another signer) need attest
bytes we construct and sign ourselves with a key wrapped as an AK TPMT_PUBLIC.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import padding, rsa

from security.tpm.structures import (
    Alg,
    ClockInfo,
    ObjectAttributes,
    PcrSelection,
    RsaParms,
    Scheme,
    Signature,
    SymDef,
    marshal_attest,
    marshal_signature,
    marshal_tpm2b_public,
    marshal_tpmt_public,
    object_name,
)
from security.tpm.verify import make_challenge_qualifying_data

AK_ATTRS = (
    ObjectAttributes.FIXED_TPM
    | ObjectAttributes.FIXED_PARENT
    | ObjectAttributes.SENSITIVE_DATA_ORIGIN
    | ObjectAttributes.USER_WITH_AUTH
    | ObjectAttributes.RESTRICTED
    | ObjectAttributes.SIGN_ENCRYPT
)

ZERO_PCRS = {"sha256": {str(i): "00" * 32 for i in range(8)}}


@dataclass
class SoftAk:
    key: rsa.RSAPrivateKey
    public: bytes  # TPM2B_PUBLIC

    @property
    def name(self) -> bytes:
        return object_name(self.public)

    def sign(self, attest: bytes) -> bytes:
        sig = self.key.sign(attest, padding.PKCS1v15(), hashes.SHA256())
        return marshal_signature(Signature(Alg.RSASSA, Alg.SHA256, sig=sig))


def soft_ak(attributes: int = AK_ATTRS, name_alg: int = Alg.SHA256) -> SoftAk:
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    n = key.public_key().public_numbers().n.to_bytes(256, "big")
    tpmt = marshal_tpmt_public(
        type=Alg.RSA,
        name_alg=name_alg,
        object_attributes=attributes,
        parameters=RsaParms(SymDef(), Scheme(Alg.RSASSA, Alg.SHA256), 2048, 65537),
        unique=(n,),
    )
    return SoftAk(key, marshal_tpm2b_public(tpmt))


def soft_quote(
    ak: SoftAk,
    *,
    nonce: bytes,
    device_key: bytes,
    clock: ClockInfo | None = None,
    signer: bytes | None = None,
    pcrs: dict[str, dict[str, str]] | None = None,
    magic: int = 0xFF544347,
    type: int = 0x8018,
) -> tuple[bytes, bytes]:
    """(attest, signature) for a quote over sha256 PCRs 0-7 with the given values."""
    pcrs = pcrs or ZERO_PCRS
    values = b"".join(bytes.fromhex(pcrs["sha256"][str(i)]) for i in range(8))
    attest = marshal_attest(
        qualified_signer=ak.name if signer is None else signer,
        extra_data=make_challenge_qualifying_data(nonce, device_key),
        clock_info=clock or ClockInfo(1000, 1, 0, True),
        firmware_version=0x20191023,
        pcr_select=(PcrSelection(Alg.SHA256, tuple(range(8))),),
        pcr_digest=hashlib.sha256(values).digest(),
        magic=magic,
        type=type,
    )
    return attest, ak.sign(attest)
