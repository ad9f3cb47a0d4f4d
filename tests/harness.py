"""Real servers for tests: uvicorn serving the console on a loopback port, against the
test database, in its own process (so tests can kill and restart it)."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
import uuid
from pathlib import Path
from urllib.parse import quote

ROOT = Path(__file__).resolve().parents[1]


def _die_with_parent() -> None:
    """In the child: get SIGTERM when the test process dies, even by SIGKILL, so a killed
    test run leaves no server behind (Linux prctl PR_SET_PDEATHSIG)."""
    import ctypes

    libc = ctypes.CDLL("libc.so.6", use_errno=True)
    libc.prctl(1, signal.SIGTERM)  # 1 = PR_SET_PDEATHSIG


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def database_url_for(settings_dict: dict) -> str:
    user = quote(settings_dict["USER"] or "", safe="")
    password = quote(settings_dict["PASSWORD"] or "", safe="")
    return (f"postgres://{user}:{password}@{settings_dict['HOST'] or '127.0.0.1'}:{settings_dict['PORT'] or 5432}"
            f"/{settings_dict['NAME']}")


def shared_listener() -> socket.socket:
    """A listening TCP socket on a free loopback port, for several servers to share (`sock=`)."""
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    sock.listen(1024)
    sock.set_inheritable(True)
    return sock


class ConsoleServer:
    """uvicorn + the console's ASGI app in a subprocess.

    With `sock`, the server does not bind its own port: it serves on that inherited listening
    socket (uvicorn `--fd`), so several servers started with the same socket share one port and
    the kernel hands each new connection to one of them — the "N processes behind one port"
    layout. Readiness is then read from the server's own log, since /healthz on the shared port
    may be answered by a sibling.
    """

    def __init__(self, settings_dict: dict, *, extra_env: dict | None = None, log_dir: Path | None = None,
                 sock: socket.socket | None = None) -> None:
        self.sock = sock
        self.port = sock.getsockname()[1] if sock is not None else free_port()
        self.env = {
            **os.environ,
            "DATABASE_URL": database_url_for(settings_dict),
            "DB_CONN_MAX_AGE": "0",
            "DB_POOL_MAX_SIZE": "20",  # as scripts/run.sh runs the web server
            **(extra_env or {}),
        }
        name = f"test-server-{self.port}" + (f"-fd-{uuid.uuid4().hex[:8]}" if sock is not None else "")
        self.log_path = (log_dir or ROOT / ".run" / "logs") / f"{name}.log"
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        self.proc: subprocess.Popen | None = None

    @property
    def http_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def ws_url(self) -> str:
        return f"ws://127.0.0.1:{self.port}/ws/agent/v1/"

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc else None

    def start(self, timeout: float = 30) -> ConsoleServer:
        return self.launch().wait_ready(timeout)

    def launch(self) -> ConsoleServer:
        """Start the process without waiting for it, so several servers can boot at once. Call it
        from the thread that stays alive: the child is killed when its parent thread exits."""
        log = self.log_path.open("ab")
        self._log_offset = log.tell()
        if self.sock is not None:
            bind, pass_fds = ["--fd", str(self.sock.fileno())], (self.sock.fileno(),)
        else:
            bind, pass_fds = ["--host", "127.0.0.1", "--port", str(self.port)], ()
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "uvicorn", "console.asgi:application", *bind, "--ws", "websockets-sansio",
             "--ws-per-message-deflate", "false", "--lifespan", "off", "--no-access-log",
             "--ws-max-size", str(1024 * 1024), "--ws-ping-interval", "0",
             "--timeout-graceful-shutdown", "3"],
            cwd=ROOT, env=self.env, stdout=log, stderr=subprocess.STDOUT, preexec_fn=_die_with_parent,
            pass_fds=pass_fds,
        )
        return self

    def wait_ready(self, timeout: float = 30) -> ConsoleServer:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"console server exited with {self.proc.returncode}:\n{self.log_tail()}")
            if self.sock is not None:
                with self.log_path.open("rb") as started:
                    started.seek(self._log_offset)
                    if b"Uvicorn running on" in started.read():
                        return self
                time.sleep(0.1)
                continue
            try:
                with urllib.request.urlopen(f"{self.http_url}/healthz", timeout=1) as response:
                    if response.status == 200:
                        return self
            except OSError:
                time.sleep(0.1)
        raise RuntimeError(f"console server not healthy after {timeout}s:\n{self.log_tail()}")

    def kill(self) -> None:
        """SIGKILL: no goodbye, no flush — the crash case."""
        if self.proc and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(10)

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.kill()

    def log_tail(self, lines: int = 40) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no log)"
