"""Fixtures for the TPM attestation tests: a real software TPM (swtpm) on loopback.

Each swtpm gets its own state dir and is manufactured by swtpm_setup with an
EK certificate issued by a *private* swtpm-localca CA under tmp (a private
swtpm_setup.conf points swtpm_localca at it), so nothing is written to
/etc or /var/lib. Missing tools make the fixture FAIL, not skip: a green run
without the TPM tests would hide that attestation was never exercised.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from agent_stub.tpm import Tpm

REQUIRED_TOOLS = ("swtpm", "swtpm_setup", "swtpm_localca", "swtpm_ioctl", "tpm2_quote", "tpm2_createak")
APT_HINT = "apt-get install swtpm swtpm-tools tpm2-tools libtss2-tcti-swtpm0 libtss2-tctildr0"


@dataclass
class SwtpmInstance:
    """A running swtpm: where to reach it and where its private CA lives."""

    port: int
    ctrl_port: int
    state_dir: Path
    ca_dir: Path
    proc: subprocess.Popen[bytes]

    @property
    def spec(self) -> str:
        return f"swtpm:host=127.0.0.1,port={self.port}"

    @property
    def root_ca_pem(self) -> bytes:
        return (self.ca_dir / "swtpm-localca-rootca-cert.pem").read_bytes()

    @property
    def issuer_ca_pem(self) -> bytes:
        return (self.ca_dir / "issuercert.pem").read_bytes()

    def tools_env(self) -> dict[str, str]:
        return dict(os.environ, TPM2TOOLS_TCTI=self.spec)

    def power_cycle(self) -> None:
        """Re-initialise the TPM without TPM2_Shutdown (an unorderly reboot)."""
        subprocess.run(
            ["swtpm_ioctl", "--tcp", f"127.0.0.1:{self.ctrl_port}", "-i"], check=True, capture_output=True, timeout=10
        )


def _require_tools() -> None:
    missing = [t for t in REQUIRED_TOOLS if shutil.which(t) is None]
    if missing:
        pytest.fail(
            f"TPM tests need a real software TPM but {', '.join(missing)} is missing. Install with: {APT_HINT}",
            pytrace=False,
        )


def _free_port_pair() -> int:
    """A port P on loopback with P+1 also free (swtpm's server and control ports)."""
    for _ in range(50):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        if port >= 65535:
            continue
        try:
            with socket.socket() as a, socket.socket() as b:
                a.bind(("127.0.0.1", port))
                b.bind(("127.0.0.1", port + 1))
        except OSError:
            continue
        return port
    raise RuntimeError("no free loopback port pair")


def _wait_listening(port: int, proc: subprocess.Popen[bytes], log: Path) -> None:
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            pytest.fail(f"swtpm exited early (rc={proc.returncode}): {log.read_text(errors='replace')}", pytrace=False)
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.2):
                return
        except OSError:
            time.sleep(0.05)
    pytest.fail(f"swtpm did not listen on 127.0.0.1:{port}", pytrace=False)


def start_swtpm(base: Path) -> SwtpmInstance:
    """Manufacture (swtpm_setup) and start one swtpm under ``base``."""
    _require_tools()
    state, ca, home = base / "state", base / "ca", base / "home"
    for d in (state, ca, home):
        d.mkdir(parents=True)
    (base / "swtpm-localca.conf").write_text(
        f"statedir = {ca}\nsigningkey = {ca}/signkey.pem\nissuercert = {ca}/issuercert.pem\ncertserial = {ca}/certserial\n"
    )
    (base / "swtpm-localca.options").write_text(
        "--platform-manufacturer EdgeFleetTest\n--platform-version 2.1\n--platform-model swtpm\n"
    )
    (base / "swtpm_setup.conf").write_text(
        f"create_certs_tool = {shutil.which('swtpm_localca')}\n"
        f"create_certs_tool_config = {base}/swtpm-localca.conf\n"
        f"create_certs_tool_options = {base}/swtpm-localca.options\n"
        "active_pcr_banks = sha256\n"
    )
    # XDG/HOME point into tmp too, so no user config is read or written.
    env = dict(os.environ, HOME=str(home), XDG_CONFIG_HOME=str(home / ".config"))
    setup = subprocess.run(
        [
            "swtpm_setup",
            "--tpm2",
            "--tpmstate",
            str(state),
            "--create-ek-cert",
            "--create-platform-cert",
            "--config",
            str(base / "swtpm_setup.conf"),
            "--logfile",
            str(base / "setup.log"),
        ],
        env=env,
        capture_output=True,
        timeout=120,
        check=False,
    )
    if setup.returncode != 0:
        log = (base / "setup.log").read_text(errors="replace") if (base / "setup.log").exists() else ""
        pytest.fail(f"swtpm_setup failed (rc={setup.returncode}): {setup.stderr.decode()} {log}", pytrace=False)

    port = _free_port_pair()
    log = base / "swtpm.log"
    proc = subprocess.Popen(
        [
            "swtpm",
            "socket",
            "--tpm2",
            "--server",
            f"type=tcp,port={port},bindaddr=127.0.0.1",
            "--ctrl",
            f"type=tcp,port={port + 1},bindaddr=127.0.0.1",
            "--flags",
            "not-need-init,startup-clear",
            "--tpmstate",
            f"dir={state}",
            "--log",
            f"file={log}",
        ],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    _wait_listening(port, proc, log)
    return SwtpmInstance(port, port + 1, state, ca, proc)


def stop_swtpm(inst: SwtpmInstance) -> None:
    inst.proc.terminate()
    try:
        inst.proc.wait(timeout=10)
    except subprocess.TimeoutExpired:
        inst.proc.kill()
        inst.proc.wait(timeout=10)


@pytest.fixture(scope="session")
def swtpm(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SwtpmInstance]:
    """The shared swtpm most tests use (PCR changes by one test are visible to others)."""
    inst = start_swtpm(tmp_path_factory.mktemp("swtpm"))
    yield inst
    stop_swtpm(inst)


@pytest.fixture
def swtpm_factory(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Callable[[], SwtpmInstance]]:
    """Start extra, private swtpm instances (for tests that reboot the TPM)."""
    started: list[SwtpmInstance] = []

    def make() -> SwtpmInstance:
        inst = start_swtpm(tmp_path_factory.mktemp("swtpm-extra"))
        started.append(inst)
        return inst

    yield make
    for inst in started:
        stop_swtpm(inst)


@pytest.fixture(scope="session")
def tpm(swtpm: SwtpmInstance, tmp_path_factory: pytest.TempPathFactory) -> Tpm:
    """Agent-side handle on the shared swtpm with EK (RSA) + AK (RSA) provisioned."""
    t = Tpm(swtpm.spec)
    t.ensure_keys(tmp_path_factory.mktemp("agent-state"))
    return t


@pytest.fixture(scope="session")
def ecc_tpm(swtpm: SwtpmInstance, tmp_path_factory: pytest.TempPathFactory) -> Tpm:
    """Same swtpm, ECC P-256 EK at 0x81010002 and an ECC AK under it."""
    t = Tpm(swtpm.spec, ek_alg="ecc", ak_alg="ecc")
    t.ensure_keys(tmp_path_factory.mktemp("agent-state-ecc"))
    return t


@pytest.fixture(scope="session")
def other_ak_tpm(swtpm: SwtpmInstance, tmp_path_factory: pytest.TempPathFactory) -> Tpm:
    """Same swtpm and EK, but a second AK at another persistent handle."""
    t = Tpm(swtpm.spec, ak_handle=0x81008010)
    t.ensure_keys(tmp_path_factory.mktemp("agent-state-other"))
    return t
