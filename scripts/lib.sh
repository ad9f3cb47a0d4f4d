# Shared helpers for the set-up scripts (sourced, not run).
# Everything the scripts start lives under .run/ (git-ignored); the URLs of the
# services go into .env, which the Django settings read.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
RUN="$ROOT/.run"
ENVFILE="$ROOT/.env"
PY="$ROOT/.venv/bin/python"

# PostgreSQL runs as the `postgres` OS user when we are root, and that user must be able
# to reach its data directory. A checkout under a private directory (mode 0700, e.g. a
# mktemp -d) is not reachable, so the cluster then lives under /var/tmp instead, in a
# folder named after this checkout.
PGDIR="$RUN/pg"
if [ "$(id -u)" = 0 ] && id postgres >/dev/null 2>&1; then
  mkdir -p "$RUN"
  if ! runuser -u postgres -- test -x "$RUN" 2>/dev/null; then
    PGDIR="/var/tmp/edge-console-$(printf %s "$ROOT" | sha256sum | cut -c1-12)/pg"
  fi
fi

say()  { printf '\033[1m==>\033[0m %s\n' "$*" >&2; }
die()  { printf '\033[31merror:\033[0m %s\n' "$*" >&2; exit 1; }
is_root() { [ "$(id -u)" = 0 ]; }

# free_port: ask the kernel for an unused loopback port.
free_port() {
  python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'
}

# env_get KEY: a value from .env (empty when absent).
env_get() {
  [ -f "$ENVFILE" ] || return 0
  sed -n "s/^$1=//p" "$ENVFILE" | tail -n 1
}

# env_set KEY VALUE: write or replace one line of .env (mode 0600: it holds secrets).
env_set() {
  touch "$ENVFILE"; chmod 600 "$ENVFILE"
  local tmp; tmp="$(mktemp)"
  grep -v "^$1=" "$ENVFILE" > "$tmp" || true
  printf '%s=%s\n' "$1" "$2" >> "$tmp"
  cat "$tmp" > "$ENVFILE"; rm -f "$tmp"
}

random_secret() { python3 -c 'import secrets; print(secrets.token_urlsafe('"${1:-32}"'))'; }

pid_alive() { [ -f "$1" ] && kill -0 "$(cat "$1" 2>/dev/null)" 2>/dev/null; }

# http_ok URL: true when the URL answers 2xx (no curl on a fresh machine).
http_ok() {
  python3 -c 'import sys, urllib.request
try:
    sys.exit(0 if urllib.request.urlopen(sys.argv[1], timeout=2).status < 300 else 1)
except Exception:
    sys.exit(1)' "$1"
}

# stop_started: TERM every process group `make run` recorded, give them up to 10 s to
# finish (the agents flush their outboxes, Celery finishes its task), then KILL the rest.
stop_started() {
  local dir="$RUN/pids" f
  for f in "$dir"/*.pid; do
    [ -f "$f" ] && { kill -TERM -- "-$(cat "$f")" 2>/dev/null || true; }
  done
  for _ in $(seq 100); do
    local alive=0
    for f in "$dir"/*.pid; do [ -f "$f" ] && pid_alive "$f" && alive=1; done
    [ "$alive" = 0 ] && break
    sleep 0.1
  done
  for f in "$dir"/*.pid; do
    [ -f "$f" ] || continue
    kill -KILL -- "-$(cat "$f")" 2>/dev/null || true; rm -f "$f"
  done
  return 0
}

# Which local services are running now (so a script stops only what it started).
pg_running() { [ -f "$PGDIR/data/postmaster.pid" ] && kill -0 "$(head -n 1 "$PGDIR/data/postmaster.pid")" 2>/dev/null; }
redis_running() { pid_alive "$RUN/redis/redis.pid"; }
