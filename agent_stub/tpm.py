"""Agent-side TPM 2.0 access through tpm2-tools (v5 CLI).

This module owns everything the device agent does with its TPM: starting it,
provisioning and persisting the EK and AK, reading the EK certificate,
answering the enrollment credential challenge (TPM2_ActivateCredential), and
producing quotes for attestation challenges. It talks to the TPM only by
running tpm2-tools with a TCTI string (no tpm2-pytss, no native bindings), and
returns TPM structures in the raw marshaled forms PROTOCOL.md uses.

Key persistence: the EK and AK live at *persistent handles* (EK at the TCG
standard 0x81010001 RSA / 0x81010002 ECC, AK at ``ak_handle``). Saved contexts
of transient objects are invalidated by every TPM reset (reboot), and a
persistent AK avoids re-loading it (and an EK policy session) for each quote.
The AK's public and EK-wrapped private blobs are also kept in ``state_dir``:
if the persistent AK is ever evicted (e.g. TPM2_Clear wipes owner-persisted
objects, but not the endorsement seed) the *same* AK is re-loaded from them
and re-persisted, so the server-side enrollment stays valid.

Without a resource manager (swtpm over TCP, /dev/tpm0) every transient object
or session a tool leaves behind occupies one of the TPM's 3-7 slots until
flushed, so every operation that creates objects or sessions ends with
``tpm2_flushcontext -t``, ``-l`` and ``-s``, and ``ensure_keys`` starts with
them, so a crash mid-operation cannot wedge the next run. A quote with the
persistent AK and password auth creates neither; it still flushes transient
objects after each call as a cheap safety net (one extra tool run instead of
three keeps ~40 quotes/s on swtpm). The agent therefore assumes it is the TPM's only user unless it goes
through the kernel resource manager (/dev/tpmrm0), which isolates clients.
"""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import subprocess
import tempfile
import threading
from pathlib import Path

__all__ = ["Tpm", "TpmError", "TpmToolsMissing", "tcti_from_spec"]

EK_HANDLES = {"rsa": 0x81010001, "ecc": 0x81010002}
EK_CERT_NV = {"rsa": 0x01C00002, "ecc": 0x01C0000A}
DEFAULT_AK_HANDLES = {"rsa": 0x81008000, "ecc": 0x81008001}

# tpm2-tools' credential file: magic 0xBADCC0DE, version 1, then
# TPM2B_ID_OBJECT ‖ TPM2B_ENCRYPTED_SECRET (lib/files.c, files_write_header).
_CRED_HEADER = bytes.fromhex("badcc0de00000001")
_TPM_RC_INITIALIZE = "0x100"
_HASH_SIZES = {0x0004: 20, 0x000B: 32, 0x000C: 48, 0x000D: 64}
_BANKS = {"sha1": 0x0004, "sha256": 0x000B, "sha384": 0x000C, "sha512": 0x000D}


class TpmError(RuntimeError):
    """A tpm2-tools command failed; ``args`` and ``stderr`` say which and why."""

    def __init__(self, message: str, *, cmd: list[str] | None = None, stderr: str = "") -> None:
        super().__init__(message + (f": {stderr.strip()}" if stderr else ""))
        self.cmd = cmd or []
        self.stderr = stderr


class TpmToolsMissing(TpmError):
    """tpm2-tools (or the TCTI library it needs) is not installed."""


def tcti_from_spec(spec: str) -> str:
    """Map the agent's TPM setting to a TCTI string.

    ``/dev/tpmrm0`` → ``device:/dev/tpmrm0``; ``swtpm:host=…,port=…``,
    ``mssim:…``, ``device:…``, ``tabrmd:…`` pass through unchanged.
    """
    spec = spec.strip()
    if not spec:
        raise ValueError("empty TPM spec")
    if spec.startswith("/"):
        return f"device:{spec}"
    if re.match(r"^(swtpm|mssim|device|tabrmd|cmd|libtpm)(:|$)", spec):
        return spec
    raise ValueError(f"unrecognised TPM spec {spec!r} (use swtpm:host=H,port=P or a device path)")


def _tpm2b(data: bytes, what: str) -> bytes:
    """Check ``data`` is exactly one TPM2B (u16 size ‖ bytes)."""
    if len(data) < 2 or int.from_bytes(data[:2], "big") != len(data) - 2:
        raise ValueError(f"{what} is not a well-formed TPM2B")
    return data


def _attest_quote_fields(attest: bytes) -> tuple[list[tuple[int, list[int]]], bytes]:
    """(PCR selection, pcrDigest) from TPMS_ATTEST bytes of a quote.

    A deliberately tiny parser: the agent must not import the server's
    security package (DESIGN.md "Which way imports run").
    """
    try:
        pos = 6
        pos += 2 + int.from_bytes(attest[pos : pos + 2], "big")  # qualifiedSigner
        pos += 2 + int.from_bytes(attest[pos : pos + 2], "big")  # extraData
        pos += 17 + 8  # TPMS_CLOCK_INFO, firmwareVersion
        count = int.from_bytes(attest[pos : pos + 4], "big")
        pos += 4
        sel = []
        for _ in range(count):
            alg = int.from_bytes(attest[pos : pos + 2], "big")
            n = attest[pos + 2]
            bitmap = attest[pos + 3 : pos + 3 + n]
            pos += 3 + n
            sel.append((alg, [i * 8 + b for i, byte in enumerate(bitmap) for b in range(8) if byte >> b & 1]))
        size = int.from_bytes(attest[pos : pos + 2], "big")
        dig = attest[pos + 2 : pos + 2 + size]
        if len(dig) != size or size == 0:
            raise ValueError("truncated pcrDigest")
        return sel, dig
    except (IndexError, ValueError) as exc:
        raise TpmError(f"tpm2_quote returned an unparsable TPMS_ATTEST ({exc})") from None


class Tpm:
    """One TPM reached through a TCTI (``swtpm:host=127.0.0.1,port=2321`` or ``/dev/tpmrm0``).

    Not safe for concurrent use from several processes on a TPM without a
    resource manager; calls from threads of one process are serialised.
    """

    def __init__(
        self,
        spec: str,
        *,
        ek_alg: str = "rsa",
        ak_alg: str = "rsa",
        ak_handle: int | None = None,
        timeout: float = 60.0,
        max_quote_attempts: int = 5,
    ) -> None:
        if ek_alg not in EK_HANDLES or ak_alg not in DEFAULT_AK_HANDLES:
            raise ValueError("ek_alg and ak_alg must be 'rsa' or 'ecc'")
        self.tcti = tcti_from_spec(spec)
        self.ek_alg = ek_alg
        self.ak_alg = ak_alg
        self.ek_handle = EK_HANDLES[ek_alg]
        self.ak_handle = ak_handle if ak_handle is not None else DEFAULT_AK_HANDLES[ak_alg]
        self.timeout = timeout
        self.max_quote_attempts = max_quote_attempts
        self.state_dir: Path | None = None
        self._lock = threading.RLock()
        self._env = dict(os.environ, TPM2TOOLS_TCTI=self.tcti)
        # Keep the tools quiet about optional features; warnings go to stderr
        # which we only show on failure.
        self._env.pop("TSS2_LOG", None)

    # ---------------------------------------------------------------- plumbing

    def _run(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[bytes]:
        tool = args[0]
        if shutil.which(tool, path=self._env.get("PATH")) is None:
            raise TpmToolsMissing(
                f"{tool} not found: install tpm2-tools (Debian: apt-get install tpm2-tools"
                " libtss2-tcti-swtpm0 libtss2-tctildr0)"
            )
        try:
            proc = subprocess.run(list(args), env=self._env, capture_output=True, timeout=self.timeout, check=False)
        except subprocess.TimeoutExpired as exc:
            raise TpmError(f"{tool} timed out after {self.timeout}s (is the TPM at {self.tcti} up?)") from exc
        if check and proc.returncode != 0:
            err = proc.stderr.decode(errors="replace")
            if "Could not load tcti" in err or ("tcti" in err.lower() and "not found" in err.lower()):
                raise TpmToolsMissing(
                    f"{tool} cannot load the TCTI for {self.tcti!r} (Debian: libtss2-tcti-swtpm0 / libtss2-tcti-device0)",
                    cmd=list(args),
                    stderr=err,
                )
            raise TpmError(f"{tool} failed (exit {proc.returncode})", cmd=list(args), stderr=err)
        return proc

    def flush_all(self) -> None:
        """Flush every transient object, loaded session and saved session.

        Three separate calls: tpm2_flushcontext (5.x) keeps only the *last* of
        -t/-l/-s when given together. Failures are ignored: an empty class is
        fine, and a TPM too broken to flush will fail the next real command.
        """
        with self._lock:
            for flag in ("-t", "-l", "-s"):
                self._run("tpm2_flushcontext", flag, check=False)

    def transient_handles(self) -> list[int]:
        """Handles of transient objects currently loaded (for leak checks)."""
        return self._getcap_handles("handles-transient")

    def session_handles(self) -> list[int]:
        """Handles of loaded and saved (context-saved) sessions (for leak checks)."""
        return self._getcap_handles("handles-loaded-session") + self._getcap_handles("handles-saved-session")

    def _getcap_handles(self, what: str) -> list[int]:
        out = self._run("tpm2_getcap", what).stdout.decode()
        return [int(h, 16) for h in re.findall(r"0x[0-9a-fA-F]+", out)]

    def _persistent(self, handle: int) -> bool:
        return handle in self._getcap_handles("handles-persistent")

    def _read_public(self, handle: int, tmp: str) -> bytes:
        out = os.path.join(tmp, f"{handle:08x}.pub")
        self._run("tpm2_readpublic", "-c", hex(handle), "-f", "tss", "-o", out)
        return Path(out).read_bytes()

    def _ek_policy_session(self, tmp: str) -> str:
        """Policy session satisfying the EK's PolicySecret(TPM_RH_ENDORSEMENT)."""
        sess = os.path.join(tmp, "session.ctx")
        self._run("tpm2_startauthsession", "--policy-session", "-S", sess)
        self._run("tpm2_policysecret", "-S", sess, "-c", "e")
        return sess

    # ---------------------------------------------------------------- API

    def startup(self) -> None:
        """TPM2_Startup(CLEAR) if the TPM has not been started yet (a no-op otherwise)."""
        with self._lock:
            proc = self._run("tpm2_startup", "-c", check=False)
            err = proc.stderr.decode(errors="replace")
            # TPM_RC_INITIALIZE: already started (the platform or swtpm did it).
            if proc.returncode != 0 and _TPM_RC_INITIALIZE not in err:
                raise TpmError("tpm2_startup failed", cmd=["tpm2_startup", "-c"], stderr=err)

    def ensure_keys(self, state_dir: str | os.PathLike[str]) -> None:
        """Create (first run) or re-use (later runs) the EK and AK; idempotent.

        Writes ``ek.pub``, ``ak.pub``, ``ak.priv`` and ``ak.name`` to
        ``state_dir``. Raises TpmError if ``state_dir`` belongs to another TPM.
        """
        state = Path(state_dir)
        state.mkdir(parents=True, exist_ok=True)
        with self._lock, tempfile.TemporaryDirectory(prefix="tpm-") as tmp:
            self.startup()
            self.flush_all()  # leftovers of a crashed earlier run
            try:
                self._ensure_ek(state, tmp)
                self._ensure_ak(state, tmp)
            finally:
                self.flush_all()
            self.state_dir = state

    def _ensure_ek(self, state: Path, tmp: str) -> None:
        if not self._persistent(self.ek_handle):
            # tpm2_createek uses the TCG default EK template (L-1 RSA-2048 /
            # L-2 ECC P-256), so the key matches a manufacturer's EK cert.
            self._run(
                "tpm2_createek",
                "-c",
                hex(self.ek_handle),
                "-G",
                self.ek_alg,
                "-u",
                os.path.join(tmp, "ek.new.pub"),
                "-f",
                "tss",
            )
        ek_pub = self._read_public(self.ek_handle, tmp)
        saved = state / "ek.pub"
        if saved.exists() and saved.read_bytes() != ek_pub:
            raise TpmError(f"{state} holds keys of a different TPM (EK differs); use a fresh state dir")
        _atomic_write(saved, ek_pub)

    def _ensure_ak(self, state: Path, tmp: str) -> None:
        pub, priv = state / "ak.pub", state / "ak.priv"
        have_blobs = pub.exists() and priv.exists()
        if self._persistent(self.ak_handle):
            current = self._read_public(self.ak_handle, tmp)
            if have_blobs and current == pub.read_bytes():
                return
            if not have_blobs:
                raise TpmError(
                    f"persistent handle {self.ak_handle:#x} is in use by an unknown object;"
                    " choose another ak_handle or evict it"
                )
            raise TpmError(f"persistent handle {self.ak_handle:#x} holds a different key than {pub}")
        ctx = os.path.join(tmp, "ak.ctx")
        if have_blobs:
            # Same AK as enrolled: re-load the EK-wrapped private blob.
            sess = self._ek_policy_session(tmp)
            self._run(
                "tpm2_load",
                "-C",
                hex(self.ek_handle),
                "-u",
                str(pub),
                "-r",
                str(priv),
                "-c",
                ctx,
                "-P",
                f"session:{sess}",
            )
        else:
            new_pub, new_priv, new_name = (os.path.join(tmp, n) for n in ("ak.pub", "ak.priv", "ak.name"))
            scheme = "rsassa" if self.ak_alg == "rsa" else "ecdsa"
            self._run(
                "tpm2_createak",
                "-C",
                hex(self.ek_handle),
                "-c",
                ctx,
                "-G",
                self.ak_alg,
                "-g",
                "sha256",
                "-s",
                scheme,
                "-u",
                new_pub,
                "-f",
                "tss",
                "-r",
                new_priv,
                "-n",
                new_name,
            )
            _atomic_write(priv, Path(new_priv).read_bytes())
            _atomic_write(pub, Path(new_pub).read_bytes())
            _atomic_write(state / "ak.name", Path(new_name).read_bytes())
        self._run("tpm2_evictcontrol", "-C", "o", "-c", ctx, hex(self.ak_handle))

    def ek_public(self) -> bytes:
        """The EK's TPM2B_PUBLIC."""
        with self._lock, tempfile.TemporaryDirectory(prefix="tpm-") as tmp:
            return self._read_public(self.ek_handle, tmp)

    def ak_public(self) -> bytes:
        """The AK's TPM2B_PUBLIC."""
        with self._lock, tempfile.TemporaryDirectory(prefix="tpm-") as tmp:
            return self._read_public(self.ak_handle, tmp)

    def ek_certificate(self) -> bytes | None:
        """DER EK certificate from its TCG NV index, or None if the TPM has none."""
        index = EK_CERT_NV[self.ek_alg]
        with self._lock, tempfile.TemporaryDirectory(prefix="tpm-") as tmp:
            listing = self._run("tpm2_getcap", "handles-nv-index").stdout.decode()
            if index not in {int(h, 16) for h in re.findall(r"0x[0-9a-fA-F]+", listing)}:
                return None
            out = os.path.join(tmp, "ekcert.der")
            self._run("tpm2_nvread", hex(index), "-C", "o", "-o", out)
            data = Path(out).read_bytes()
        return _trim_der(data)

    def activate_credential(self, credential_blob: bytes, encrypted_secret: bytes) -> bytes:
        """TPM2_ActivateCredential with the AK and EK; returns the raw secret.

        Inputs are the protocol's TPM2B_ID_OBJECT and TPM2B_ENCRYPTED_SECRET;
        tpm2-tools wants them in its own headered file, built here.
        """
        blob = _tpm2b(bytes(credential_blob), "credential_blob")
        secret = _tpm2b(bytes(encrypted_secret), "encrypted_secret")
        with self._lock, tempfile.TemporaryDirectory(prefix="tpm-") as tmp:
            cred = os.path.join(tmp, "cred.in")
            Path(cred).write_bytes(_CRED_HEADER + blob + secret)
            out = os.path.join(tmp, "secret.out")
            try:
                sess = self._ek_policy_session(tmp)
                self._run(
                    "tpm2_activatecredential",
                    "-c",
                    hex(self.ak_handle),
                    "-C",
                    hex(self.ek_handle),
                    "-i",
                    cred,
                    "-o",
                    out,
                    "-P",
                    f"session:{sess}",
                )
                return Path(out).read_bytes()
            finally:
                self.flush_all()

    def read_pcrs(self, pcrs: list[int], bank: str = "sha256") -> dict[str, dict[str, str]]:
        """Current PCR values as ``{"sha256": {"0": hex, …}}``."""
        size = _HASH_SIZES[_BANKS[bank]]
        idx = sorted(set(pcrs))
        with self._lock, tempfile.TemporaryDirectory(prefix="tpm-") as tmp:
            out = os.path.join(tmp, "pcrs.bin")
            self._run("tpm2_pcrread", f"{bank}:{','.join(map(str, idx))}", "-o", out)
            raw = Path(out).read_bytes()
        if len(raw) != size * len(idx):
            raise TpmError(f"tpm2_pcrread returned {len(raw)} bytes for {len(idx)} PCRs")
        return {bank: {str(i): raw[k * size : (k + 1) * size].hex() for k, i in enumerate(idx)}}

    def quote(
        self, qualifying_data: bytes, pcrs: list[int], bank: str = "sha256"
    ) -> tuple[bytes, bytes, dict[str, dict[str, str]]]:
        """TPM2_Quote over ``pcrs`` with the AK.

        Returns (TPMS_ATTEST bytes, TPMT_SIGNATURE bytes, PCR values). The
        values are read right after the quote; if a PCR was extended in between
        they would not hash to the quoted pcrDigest, so the quote is retried.
        """
        if bank not in _BANKS:
            raise ValueError(f"unsupported PCR bank {bank!r}")
        if not pcrs:
            raise ValueError("at least one PCR must be quoted")
        idx = sorted({int(i) for i in pcrs})
        if idx[0] < 0 or idx[-1] > 23:
            raise ValueError("PCR indices must be 0..23")
        if len(qualifying_data) > 64:
            raise ValueError("qualifying_data is at most 64 bytes")
        size = _HASH_SIZES[_BANKS[bank]]
        with self._lock, tempfile.TemporaryDirectory(prefix="tpm-") as tmp:
            files = {n: os.path.join(tmp, n) for n in ("attest", "sig", "pcrs")}
            for _ in range(self.max_quote_attempts):
                try:
                    # -F values: -o gets the bare PCR digests in selection
                    # order, read by the same tool right after TPM2_Quote.
                    self._run(
                        "tpm2_quote",
                        "-c",
                        hex(self.ak_handle),
                        "-l",
                        f"{bank}:{','.join(map(str, idx))}",
                        "-q",
                        qualifying_data.hex(),
                        "-g",
                        "sha256",
                        "-m",
                        files["attest"],
                        "-s",
                        files["sig"],
                        "-o",
                        files["pcrs"],
                        "-F",
                        "values",
                    )
                except TpmError:
                    self.flush_all()
                    raise
                # A persistent AK with password auth creates no session, and no
                # transient object unless something loaded one: flush -t only.
                self._run("tpm2_flushcontext", "-t", check=False)
                attest = Path(files["attest"]).read_bytes()
                signature = Path(files["sig"]).read_bytes()
                raw = Path(files["pcrs"]).read_bytes()
                sel, pcr_digest = _attest_quote_fields(attest)
                if sel != [(_BANKS[bank], idx)] or len(raw) != size * len(idx):
                    raise TpmError("tpm2_quote output does not match the requested selection")
                if hashlib.sha256(raw).digest() == pcr_digest:
                    values = {str(i): raw[k * size : (k + 1) * size].hex() for k, i in enumerate(idx)}
                    return attest, signature, {bank: values}
            raise TpmError(f"PCRs kept changing during {self.max_quote_attempts} quote attempts")

    def extend_pcr(self, index: int, data: bytes, bank: str = "sha256") -> None:
        """Extend PCR ``index`` with H(data) (tests and demos)."""
        dig = hashlib.new(bank, data).hexdigest()
        with self._lock:
            self._run("tpm2_pcrextend", f"{index}:{bank}={dig}")


def _atomic_write(path: Path, data: bytes) -> None:
    """Write via rename so a crash never leaves a half-written key file."""
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)


def _trim_der(data: bytes) -> bytes:
    """Cut NV padding after the outer DER SEQUENCE (NV indices are often sized up)."""
    if len(data) < 2 or data[0] != 0x30:
        return data
    first = data[1]
    if first < 0x80:
        total = 2 + first
    else:
        n = first & 0x7F
        if n == 0 or n > 4 or len(data) < 2 + n:
            return data
        total = 2 + n + int.from_bytes(data[2 : 2 + n], "big")
    return data[:total] if total <= len(data) else data
