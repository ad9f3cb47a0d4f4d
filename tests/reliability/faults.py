"""Things to break on purpose: a private PostgreSQL cluster, a private Redis, and a loopback
TCP proxy that can partition the connections going through it.

Every piece is a real server or socket started by the test on a free loopback port in a
temporary directory; the shared PostgreSQL and Redis of the machine are never touched.
A missing binary fails loudly (RuntimeError), it never skips.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import pwd
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import psycopg

from tests.harness import ROOT, _die_with_parent, free_port

PG_BIN = Path(os.environ.get("PG_BIN", "/usr/lib/postgresql/15/bin"))


def _require(path: Path | str) -> str:
    found = shutil.which(str(path))
    if not found:
        raise RuntimeError(f"{path} is missing: the fault tests need it (apt-get install postgresql-15 redis-server)")
    return found


class PgCluster:
    """A throwaway PostgreSQL cluster (initdb + pg_ctl) on a free loopback port.

    As root, the cluster runs as the `postgres` system user (PostgreSQL refuses root).
    `stop()` defaults to `-m immediate`: the crash case, no checkpoint, clients cut off."""

    def __init__(self) -> None:
        for tool in ("initdb", "pg_ctl"):
            _require(PG_BIN / tool)
        self.base = Path(tempfile.mkdtemp(prefix="fault-pg-"))
        self.data = self.base / "data"
        self.log = self.base / "server.log"
        self.port = free_port()
        self.user = "postgres"
        self._as_user: list[str] = []
        if os.geteuid() == 0:
            pwd.getpwnam("postgres")  # KeyError: no postgres system user to run the cluster as
            shutil.chown(self.base, "postgres", "postgres")
            self._as_user = ["runuser", "-u", "postgres", "--"]

    def _run(self, *args: str, timeout: float = 120) -> str:
        result = subprocess.run([*self._as_user, *args], capture_output=True, text=True, timeout=timeout)
        if result.returncode != 0:
            raise RuntimeError(f"{' '.join(args)} failed ({result.returncode}):\n{result.stdout}\n{result.stderr}\n"
                               f"{self.log_tail()}")
        return result.stdout

    def init(self) -> PgCluster:
        self._run(str(PG_BIN / "initdb"), "-D", str(self.data), "-U", self.user, "--auth=trust", "-E", "UTF8",
                  "--no-sync", "--locale=C")
        with (self.data / "postgresql.conf").open("a") as conf:
            conf.write(f"\nport = {self.port}\nlisten_addresses = '127.0.0.1'\nunix_socket_directories = '{self.base}'\n"
                       "max_connections = 300\nfsync = on\nsynchronous_commit = on\nshared_buffers = 32MB\n"
                       "log_min_messages = warning\n")
        return self

    def start(self) -> PgCluster:
        self._run(str(PG_BIN / "pg_ctl"), "-D", str(self.data), "-l", str(self.log), "-w", "-t", "60", "start")
        return self

    def stop(self, mode: str = "immediate") -> None:
        self._run(str(PG_BIN / "pg_ctl"), "-D", str(self.data), "-m", mode, "-w", "stop")

    @property
    def running(self) -> bool:
        result = subprocess.run([*self._as_user, str(PG_BIN / "pg_ctl"), "-D", str(self.data), "status"],
                                capture_output=True)
        return result.returncode == 0

    def settings_dict(self, dbname: str) -> dict:
        """What `tests.harness.ConsoleServer` takes (a Django DATABASES entry)."""
        return {"NAME": dbname, "USER": self.user, "PASSWORD": "", "HOST": "127.0.0.1", "PORT": self.port}

    def url(self, dbname: str) -> str:
        return f"postgres://{self.user}@127.0.0.1:{self.port}/{dbname}"

    def connect(self, dbname: str = "postgres") -> psycopg.Connection:
        return psycopg.connect(host="127.0.0.1", port=self.port, user=self.user, dbname=dbname, autocommit=True,
                               connect_timeout=5)

    def create_database(self, dbname: str) -> None:
        with self.connect() as conn:
            conn.execute(f'CREATE DATABASE "{dbname}"')

    def manage(self, dbname: str, *args: str, extra_env: dict | None = None, timeout: float = 300) -> str:
        """`manage.py ARGS` against a database of this cluster (a subprocess: the test's own
        Django keeps its own test database)."""
        env = {**os.environ, "DATABASE_URL": self.url(dbname), **(extra_env or {})}
        result = subprocess.run([sys.executable, "manage.py", *args], cwd=ROOT, env=env, capture_output=True,
                                text=True, timeout=timeout)
        if result.returncode != 0:
            raise RuntimeError(f"manage.py {' '.join(args)} failed:\n{result.stdout}\n{result.stderr}")
        return result.stdout

    def log_tail(self, lines: int = 20) -> str:
        try:
            return "\n".join(self.log.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no postgres log)"

    def destroy(self) -> None:
        with contextlib.suppress(Exception):
            if self.data.exists() and self.running:
                self.stop("immediate")
        shutil.rmtree(self.base, ignore_errors=True)


class RedisServer:
    """A throwaway redis-server on a free loopback port, no persistence. stop() is SIGKILL."""

    def __init__(self) -> None:
        self.binary = _require("redis-server")
        self.port = free_port()
        self.dir = Path(tempfile.mkdtemp(prefix="fault-redis-"))
        self.proc: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self, timeout: float = 10) -> RedisServer:
        self.proc = subprocess.Popen(
            [self.binary, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
             "--dir", str(self.dir), "--protected-mode", "no"],
            stdout=(self.dir / "redis.log").open("ab"), stderr=subprocess.STDOUT, preexec_fn=_die_with_parent,
        )
        from redis import Redis

        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            with contextlib.suppress(Exception):
                if Redis(host="127.0.0.1", port=self.port, socket_connect_timeout=0.5).ping():
                    return self
            if self.proc.poll() is not None:
                raise RuntimeError(f"redis-server exited: {(self.dir / 'redis.log').read_text(errors='replace')}")
            time.sleep(0.1)
        raise RuntimeError("redis-server did not answer PING")

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)

    def destroy(self) -> None:
        self.stop()
        shutil.rmtree(self.dir, ignore_errors=True)


def call_in_loop(loop: asyncio.AbstractEventLoop, fn, *, timeout: float) -> bool:
    """Run `fn` on the event loop of another thread and wait (at most `timeout`) until it ran."""
    done = threading.Event()

    def run() -> None:
        try:
            fn()
        finally:
            done.set()

    loop.call_soon_threadsafe(run)
    return done.wait(timeout)


class PartitionProxy:
    """A TCP proxy on loopback (its own event loop in a thread) that can cut the network.

    `partition()`: every connection stays open but bytes are silently dropped both ways, and
    a connection opened meanwhile is accepted and never reaches the server — like packets
    lost in a network that is down. `heal()`: bytes flow again; a connection that lost bytes
    mid-stream is reset (a TCP stream cannot have a hole: a real one would be reset by the
    first peer to notice), which is what the endpoints see once a long partition ends."""

    def __init__(self, upstream_port: int, upstream_host: str = "127.0.0.1") -> None:
        self.upstream = (upstream_host, upstream_port)
        self.port = free_port()
        self.partitioned = False
        self.dropped_bytes = 0
        self.connections = 0
        self._conns: set[_Pair] = set()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._server: asyncio.base_events.Server | None = None
        self._ready = threading.Event()
        self._thread = threading.Thread(target=self._main, daemon=True, name=f"proxy-{self.port}")

    def url(self, path: str = "/ws/agent/v1/") -> str:
        return f"ws://127.0.0.1:{self.port}{path}"

    def start(self) -> PartitionProxy:
        self._thread.start()
        if not self._ready.wait(10):
            raise RuntimeError("proxy did not start")
        return self

    def _main(self) -> None:
        self._loop = asyncio.new_event_loop()
        self._server = self._loop.run_until_complete(asyncio.start_server(self._accept, "127.0.0.1", self.port))
        self._ready.set()
        self._loop.run_forever()

    def _call(self, fn) -> None:
        call_in_loop(self._loop, fn, timeout=10)

    def partition(self) -> None:
        def cut() -> None:
            self.partitioned = True
        self._call(cut)

    def heal(self) -> None:
        def mend() -> None:
            self.partitioned = False
            for pair in list(self._conns):
                if pair.damaged or pair.blackholed:
                    pair.reset()
        self._call(mend)

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        pair = _Pair(self, writer)
        self._conns.add(pair)
        try:
            if self.partitioned:
                pair.blackholed = True
                while await reader.read(65536):  # never reaches the server; the client gives up
                    pass
                return
            try:
                up_reader, up_writer = await asyncio.open_connection(*self.upstream)
            except OSError:
                return
            pair.upstream = up_writer
            await asyncio.gather(self._pump(reader, up_writer, pair), self._pump(up_reader, writer, pair),
                                 return_exceptions=True)
        finally:
            pair.close()
            self._conns.discard(pair)

    async def _pump(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, pair: _Pair) -> None:
        try:
            while data := await reader.read(65536):
                if self.partitioned:
                    self.dropped_bytes += len(data)
                    pair.damaged = True
                    continue
                if pair.damaged:
                    break
                writer.write(data)
                await writer.drain()
        finally:
            pair.close()

    def stop(self) -> None:
        if self._loop is None:
            return

        def shutdown() -> None:
            self._server.close()
            for pair in list(self._conns):
                pair.reset()
        self._call(shutdown)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)


class _Pair:
    def __init__(self, proxy: PartitionProxy, client: asyncio.StreamWriter) -> None:
        self.proxy = proxy
        self.client = client
        self.upstream: asyncio.StreamWriter | None = None
        self.damaged = False
        self.blackholed = False

    def close(self) -> None:
        for writer in (self.client, self.upstream):
            if writer is not None:
                with contextlib.suppress(Exception):
                    writer.close()

    def reset(self) -> None:
        """Abort both sides (RST), as a peer does when a stream it cannot repair goes on."""
        for writer in (self.client, self.upstream):
            if writer is not None:
                with contextlib.suppress(Exception):
                    writer.transport.abort()
