"""Enrollment: EK certificate trust, AK attributes, MakeCredential ↔ ActivateCredential on a real swtpm."""

from __future__ import annotations

import datetime as dt
import os
import subprocess

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import NameOID

from agent_stub.tpm import Tpm, TpmError, TpmToolsMissing, tcti_from_spec
from security.tpm.credential import kdfa, make_credential
from security.tpm.structures import TpmFormatError, object_name, public_key_from_tpmt
from security.tpm.verify import TrustStore, check_ak_attributes, verify_activation, verify_ek_certificate


@pytest.fixture(scope="module")
def test_tier_store(swtpm):
    """Trust store with the swtpm local CA root in the "test" tier (its issuing CA as a pooled intermediate)."""
    return TrustStore.from_certs({"manufacturer": [], "test": [swtpm.root_ca_pem]}, [swtpm.issuer_ca_pem])


def _ca(name: str) -> tuple[rsa.RSAPrivateKey, x509.Certificate]:
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    now = dt.datetime.now(dt.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(days=1))
        .not_valid_after(now + dt.timedelta(days=3650))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    return key, cert


def _ek_cert_signed_by(ca_key, ca_cert, ek_public: bytes, *, extra_ext=None, not_after=None) -> bytes:
    now = dt.datetime.now(dt.UTC)
    b = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([]))
        .issuer_name(ca_cert.subject)
        .public_key(public_key_from_tpmt(ek_public))
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(days=2))
        .not_valid_after(not_after or now + dt.timedelta(days=365))
        .add_extension(
            x509.SubjectAlternativeName(
                [x509.DirectoryName(x509.Name([x509.NameAttribute(x509.ObjectIdentifier("2.23.133.2.1"), "id:00001014")]))]
            ),
            critical=True,
        )
    )
    if extra_ext is not None:
        b = b.add_extension(extra_ext, critical=True)
    return b.sign(ca_key, hashes.SHA256()).public_bytes(serialization.Encoding.DER)


# ----------------------------------------------------------------- EK certificate


def test_ek_certificate_chains_to_the_test_tier_ca(tpm, test_tier_store):
    cert = tpm.ek_certificate()
    assert cert is not None
    result = verify_ek_certificate(cert, tpm.ek_public(), test_tier_store)
    tier, failed = result
    assert (tier, failed) == ("test", [])
    assert result.chain[-1] == "CN=swtpm-localca-rootca"


def test_ek_certificate_intermediate_sent_by_the_device_completes_the_chain(tpm, swtpm):
    roots_only = TrustStore.from_certs({"test": [swtpm.root_ca_pem]})
    assert verify_ek_certificate(tpm.ek_certificate(), tpm.ek_public(), roots_only).failed == ("ek_cert.chain",)
    ok = verify_ek_certificate(tpm.ek_certificate(), tpm.ek_public(), roots_only, intermediates=[swtpm.issuer_ca_pem])
    assert ok.tier == "test"
    assert ok.ok


def test_ek_certificate_from_an_untrusted_ca_is_refused(tpm, test_tier_store):
    rogue_key, rogue_cert = _ca("rogue-ca")
    forged = _ek_cert_signed_by(rogue_key, rogue_cert, tpm.ek_public())
    tier, failed = verify_ek_certificate(forged, tpm.ek_public(), test_tier_store)
    assert tier is None
    assert failed == ["ek_cert.chain"]


def test_ek_certificate_with_a_lookalike_issuer_name_is_refused(tpm, swtpm, test_tier_store):
    # Same issuer DN as the genuine swtpm CA, different key: the name matches, the signature cannot.
    issuer = x509.load_pem_x509_certificate(swtpm.issuer_ca_pem)
    key, _ = _ca("x")
    fake_ca = (
        x509.CertificateBuilder()
        .subject_name(issuer.subject)
        .issuer_name(issuer.subject)
        .public_key(key.public_key())
        .serial_number(1)
        .not_valid_before(issuer.not_valid_before_utc)
        .not_valid_after(issuer.not_valid_after_utc)
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    forged = _ek_cert_signed_by(key, fake_ca, tpm.ek_public())
    assert verify_ek_certificate(forged, tpm.ek_public(), test_tier_store).failed == ("ek_cert.chain",)


def test_ek_certificate_for_another_key_is_refused(tpm, ecc_tpm, test_tier_store):
    # The RSA EK's (genuine, chaining) certificate offered for the ECC EK.
    tier, failed = verify_ek_certificate(tpm.ek_certificate(), ecc_tpm.ek_public(), test_tier_store)
    assert tier is None
    assert failed == ["ek_cert.public_key"]


def test_ek_certificate_with_an_unknown_critical_extension_is_refused(tpm):
    ca_key, ca_cert = _ca("vendor-root")
    store = TrustStore.from_certs({"manufacturer": [ca_cert]})
    odd = x509.UnrecognizedExtension(x509.ObjectIdentifier("1.3.6.1.4.1.99999.1"), b"\x05\x00")
    cert = _ek_cert_signed_by(ca_key, ca_cert, tpm.ek_public(), extra_ext=odd)
    result = verify_ek_certificate(cert, tpm.ek_public(), store)
    assert result.failed == ("ek_cert.critical_extension",)
    assert "1.3.6.1.4.1.99999.1" in result.details["ek_cert.critical_extension"]
    # The TCG-style critical SAN alone is understood, and the manufacturer tier wins.
    plain = _ek_cert_signed_by(ca_key, ca_cert, tpm.ek_public())
    assert tuple(verify_ek_certificate(plain, tpm.ek_public(), store)) == ("manufacturer", [])


def test_expired_ek_certificate_is_refused(tpm):
    ca_key, ca_cert = _ca("vendor-root")
    store = TrustStore.from_certs({"manufacturer": [ca_cert]})
    cert = _ek_cert_signed_by(ca_key, ca_cert, tpm.ek_public(), not_after=dt.datetime.now(dt.UTC) - dt.timedelta(hours=1))
    assert verify_ek_certificate(cert, tpm.ek_public(), store).failed == ("ek_cert.validity",)


def test_garbage_ek_certificate_is_refused(tpm, test_tier_store):
    assert verify_ek_certificate(b"\x30\x03\x02\x01\x01", tpm.ek_public(), test_tier_store).failed == ("ek_cert.parse",)


def test_trust_store_loads_tiers_from_a_directory(tmp_path, swtpm, tpm):
    (tmp_path / "test").mkdir()
    (tmp_path / "manufacturer").mkdir()
    (tmp_path / "intermediates").mkdir()
    (tmp_path / "test" / "swtpm-root.pem").write_bytes(swtpm.root_ca_pem)
    (tmp_path / "intermediates" / "swtpm-issuer.pem").write_bytes(swtpm.issuer_ca_pem)
    store = TrustStore.from_directory(str(tmp_path))
    assert list(store.tiers) == ["manufacturer", "test"]
    assert verify_ek_certificate(tpm.ek_certificate(), tpm.ek_public(), store).tier == "test"


def test_ek_certificate_is_absent_when_the_nv_index_is_empty(ecc_tpm):
    # swtpm_setup certifies a P-384 EK (0x01c00016), not the P-256 default at 0x01c0000a.
    assert ecc_tpm.ek_certificate() is None


# ----------------------------------------------------------------- AK attributes


def test_ak_attributes_pass_for_the_agents_ak(tpm, ecc_tpm):
    assert check_ak_attributes(tpm.ak_public()) == []
    assert check_ak_attributes(ecc_tpm.ak_public()) == []


def test_the_ek_is_not_acceptable_as_an_ak(tpm):
    failed = check_ak_attributes(tpm.ek_public())
    assert "ak.sign" in failed
    assert "ak.decrypt" in failed


def test_unrestricted_or_exportable_keys_fail_named_ak_checks():
    from security.tpm.structures import ObjectAttributes as A

    from .softtpm import AK_ATTRS, soft_ak

    loose = soft_ak(AK_ATTRS & ~A.RESTRICTED & ~A.FIXED_TPM & ~A.FIXED_PARENT & ~A.SENSITIVE_DATA_ORIGIN)
    assert check_ak_attributes(loose.public) == [
        "ak.restricted",
        "ak.fixed_tpm",
        "ak.fixed_parent",
        "ak.sensitive_data_origin",
    ]
    assert check_ak_attributes(soft_ak(name_alg=0x000C).public) == ["ak.name_alg"]
    assert check_ak_attributes(b"\x00\x01") == ["ak.format"]


# ----------------------------------------------------------------- credential activation


def test_make_credential_is_activated_by_the_tpm_for_an_rsa_ek(tpm):
    secret = os.urandom(32)
    made = make_credential(tpm.ek_public(), object_name(tpm.ak_public()), secret)
    answered = tpm.activate_credential(made.credential_blob, made.encrypted_secret)
    assert answered == secret
    assert verify_activation(secret, answered) == []
    assert tpm.transient_handles() == []


def test_make_credential_is_activated_by_the_tpm_for_an_ecc_p256_ek(ecc_tpm):
    secret = os.urandom(32)
    made = make_credential(ecc_tpm.ek_public(), object_name(ecc_tpm.ak_public()), secret)
    assert ecc_tpm.activate_credential(made.credential_blob, made.encrypted_secret) == secret


def test_credential_bound_to_another_ak_name_fails_activation(tpm, other_ak_tpm):
    # Wrapped for AK #2 but activated with AK #1: the TPM's integrity check refuses it.
    made = make_credential(tpm.ek_public(), object_name(other_ak_tpm.ak_public()), os.urandom(32))
    with pytest.raises(TpmError, match="tpm2_activatecredential"):
        tpm.activate_credential(made.credential_blob, made.encrypted_secret)
    assert tpm.transient_handles() == []


def test_credential_for_another_ek_fails_activation(tpm, ecc_tpm):
    made = make_credential(ecc_tpm.ek_public(), object_name(tpm.ak_public()), os.urandom(32))
    with pytest.raises(TpmError):
        tpm.activate_credential(made.credential_blob, made.encrypted_secret)


def test_credential_activation_answered_wrongly_is_refused(tpm):
    secret = os.urandom(32)
    made = make_credential(tpm.ek_public(), object_name(tpm.ak_public()), secret)
    answered = tpm.activate_credential(made.credential_blob, made.encrypted_secret)
    wrong = bytes([answered[0] ^ 1]) + answered[1:]
    assert verify_activation(secret, wrong) == ["credential.activation"]
    assert verify_activation(secret, b"") == ["credential.activation"]


def test_make_credential_refuses_a_signing_key_as_ek(tpm):
    with pytest.raises(TpmFormatError):
        make_credential(tpm.ak_public(), object_name(tpm.ak_public()), b"x" * 32)
    with pytest.raises(ValueError, match="secret"):
        make_credential(tpm.ek_public(), object_name(tpm.ak_public()), b"x" * 33)


def test_kdfa_is_sp800_108_counter_mode_hmac_with_a_nul_terminated_label():
    import hmac

    key, u, v = b"k" * 32, b"U" * 34, b"V" * 3
    first = hmac.new(key, b"\x00\x00\x00\x01STORAGE\x00" + u + v + (128).to_bytes(4, "big"), "sha256").digest()
    assert kdfa(0x000B, key, b"STORAGE", u, v, 128) == first[:16]
    assert kdfa(0x000B, key, b"STORAGE\x00", u, v, 128) == first[:16]
    long = kdfa(0x000B, key, b"X", b"", b"", 512)
    assert len(long) == 64
    assert kdfa(0x000B, key, b"X", b"", b"", 7)[0] < 0x80


# ----------------------------------------------------------------- agent key handling


def test_ensure_keys_reuses_the_same_keys_on_rerun(swtpm, tpm, tmp_path_factory):
    ak_before = tpm.ak_public()
    tpm.ensure_keys(tpm.state_dir)
    assert tpm.ak_public() == ak_before
    assert (tpm.state_dir / "ak.pub").read_bytes() == ak_before
    # A state dir from elsewhere is refused rather than silently mixed up.
    stranger = Tpm(swtpm.spec, ak_handle=0x81008020)
    bogus = tmp_path_factory.mktemp("bogus")
    (bogus / "ek.pub").write_bytes(b"\x00\x02ab")
    with pytest.raises(TpmError, match="different TPM"):
        stranger.ensure_keys(bogus)


def test_an_evicted_ak_is_reloaded_from_the_state_dir_unchanged(swtpm, tmp_path_factory):
    t = Tpm(swtpm.spec, ak_handle=0x81008030)
    state = tmp_path_factory.mktemp("evict")
    t.ensure_keys(state)
    ak = t.ak_public()
    subprocess.run(
        ["tpm2_evictcontrol", "-C", "o", "-c", hex(t.ak_handle)], env=swtpm.tools_env(), check=True, capture_output=True
    )
    t.ensure_keys(state)
    assert t.ak_public() == ak
    assert t.transient_handles() == []


def test_leftovers_of_a_crashed_run_are_flushed(swtpm, tpm, tmp_path):
    # A tool that dies before flushing leaves a transient object behind.
    subprocess.run(
        ["tpm2_createprimary", "-C", "o", "-c", str(tmp_path / "p.ctx")],
        env=swtpm.tools_env(),
        check=True,
        capture_output=True,
    )
    subprocess.run(
        ["tpm2_startauthsession", "-S", str(tmp_path / "s.ctx")], env=swtpm.tools_env(), check=True, capture_output=True
    )
    assert tpm.transient_handles() != []
    assert tpm.session_handles() != []
    tpm.ensure_keys(tpm.state_dir)
    assert tpm.transient_handles() == []
    assert tpm.session_handles() == []


def test_tpm_spec_maps_device_paths_and_swtpm_strings():
    assert tcti_from_spec("/dev/tpmrm0") == "device:/dev/tpmrm0"
    assert tcti_from_spec("swtpm:host=127.0.0.1,port=2321") == "swtpm:host=127.0.0.1,port=2321"
    with pytest.raises(ValueError, match="unrecognised TPM spec"):
        tcti_from_spec("carrier-pigeon")


def test_missing_tpm2_tools_give_a_clear_error(monkeypatch):
    monkeypatch.setenv("PATH", "/nonexistent")
    t = Tpm("swtpm:host=127.0.0.1,port=1")
    with pytest.raises(TpmToolsMissing, match="install tpm2-tools"):
        t.startup()


def test_ecc_p384_ek_public_converts_to_a_key():
    # Coverage for a curve other than P-256 in the TPMT_PUBLIC → key path.
    key = ec.generate_private_key(ec.SECP384R1()).public_key()
    from security.tpm.structures import Alg, EccParms, Scheme, SymDef, marshal_tpm2b_public, marshal_tpmt_public

    nums = key.public_numbers()
    pub = marshal_tpm2b_public(
        marshal_tpmt_public(
            type=Alg.ECC,
            name_alg=Alg.SHA384,
            object_attributes=0x000300B2,
            parameters=EccParms(SymDef(Alg.AES, 256, Alg.CFB), Scheme(), 0x0004, Scheme()),
            unique=(nums.x.to_bytes(48, "big"), nums.y.to_bytes(48, "big")),
        )
    )
    assert public_key_from_tpmt(pub).public_numbers() == nums
