#!/usr/bin/env bash
# Starts or stops the private PostgreSQL cluster and Redis server under .run/.
#   scripts/services.sh up     start what is missing (idempotent), write URLs to .env
#   scripts/services.sh down   stop what `up` started
# When DATABASE_URL / REDIS_URL are set in the environment, those servers are used
# and nothing local is started for them.
source "$(dirname "$0")/lib.sh"

RDIR="$RUN/redis"

pg_bin() { local d; d="$(pg_config --bindir 2>/dev/null || true)"
  for c in "$d" /usr/lib/postgresql/*/bin; do [ -x "$c/postgres" ] && { echo "$c"; return; }; done
  die "PostgreSQL server binaries not found (apt-get install postgresql)"; }

# PostgreSQL refuses to run as root: run its tools as the `postgres` OS user then.
as_pg() { if is_root; then (cd / && runuser -u postgres -- "$@"); else "$@"; fi; }

pg_up() {
  local bin port pw; bin="$(pg_bin)"
  mkdir -p "$PGDIR"
  if [ ! -f "$PGDIR/data/PG_VERSION" ]; then
    say "Creating a private PostgreSQL cluster in ${PGDIR#"$ROOT/"}"
    pw="$(random_secret 24)"; port="$(free_port)"
    echo "$pw" > "$PGDIR/pwfile"; echo "$port" > "$PGDIR/port"
    mkdir -p "$PGDIR/data" "$PGDIR/sock"
    if is_root; then
      chmod 755 "$(dirname "$PGDIR")"
      chown -R postgres: "$PGDIR"; chmod 600 "$PGDIR/pwfile"
      runuser -u postgres -- test -x "$PGDIR" \
        || die "the postgres OS user cannot reach $PGDIR; set DATABASE_URL to a server you run, or clone elsewhere"
    fi
    as_pg "$bin/initdb" -D "$PGDIR/data" -U console --pwfile="$PGDIR/pwfile" \
      --auth=scram-sha-256 --encoding=UTF8 --locale=C.UTF-8 >"$PGDIR/initdb.log" 2>&1 \
      || die "initdb failed; see $PGDIR/initdb.log"
    # Sized for a 2-core development box running the test suite and benchmarks.
    cat >>"$PGDIR/data/postgresql.conf" <<CONF
listen_addresses = '127.0.0.1'
port = $port
unix_socket_directories = '$PGDIR/sock'
max_connections = 400
shared_buffers = 512MB
work_mem = 16MB
maintenance_work_mem = 256MB
max_wal_size = 4GB
checkpoint_timeout = 15min
wal_compression = on
CONF
  fi
  port="$(cat "$PGDIR/port")"; pw="$(cat "$PGDIR/pwfile")"
  if ! as_pg "$bin/pg_ctl" -D "$PGDIR/data" status >/dev/null 2>&1; then
    say "Starting PostgreSQL on 127.0.0.1:$port"
    as_pg "$bin/pg_ctl" -D "$PGDIR/data" -l "$PGDIR/postgres.log" -w -t 60 start >/dev/null \
      || die "PostgreSQL did not start; see $PGDIR/postgres.log"
  fi
  PGPASSWORD="$pw" "$bin/psql" -h 127.0.0.1 -p "$port" -U console -d postgres -tAc \
    "SELECT 1 FROM pg_database WHERE datname='console'" | grep -q 1 \
    || PGPASSWORD="$pw" "$bin/createdb" -h 127.0.0.1 -p "$port" -U console console
  env_set DATABASE_URL "postgres://console:$pw@127.0.0.1:$port/console"
}

pg_down() {
  [ -f "$PGDIR/data/PG_VERSION" ] || return 0
  local bin; bin="$(pg_bin)"
  if as_pg "$bin/pg_ctl" -D "$PGDIR/data" status >/dev/null 2>&1; then
    say "Stopping PostgreSQL"; as_pg "$bin/pg_ctl" -D "$PGDIR/data" -m fast -w stop >/dev/null
  fi
}

redis_up() {
  command -v redis-server >/dev/null || die "redis-server not found (apt-get install redis-server)"
  mkdir -p "$RDIR"
  [ -f "$RDIR/port" ] || { free_port > "$RDIR/port"; random_secret 24 > "$RDIR/password"; }
  local port pw; port="$(cat "$RDIR/port")"; pw="$(cat "$RDIR/password")"
  if ! pid_alive "$RDIR/redis.pid"; then
    say "Starting Redis on 127.0.0.1:$port"
    # Persistence off: Redis only carries doorbells and the task queue; state of
    # record lives in PostgreSQL.
    redis-server --bind 127.0.0.1 --port "$port" --requirepass "$pw" --save '' \
      --appendonly no --dir "$RDIR" --daemonize yes --pidfile "$RDIR/redis.pid" \
      --logfile "$RDIR/redis.log" --maxclients 20000
    for _ in $(seq 50); do pid_alive "$RDIR/redis.pid" && break; sleep 0.1; done
    pid_alive "$RDIR/redis.pid" || die "Redis did not start; see .run/redis/redis.log"
  fi
  env_set REDIS_URL "redis://:$pw@127.0.0.1:$port/0"
}

redis_down() {
  pid_alive "$RDIR/redis.pid" || return 0
  say "Stopping Redis"; kill "$(cat "$RDIR/redis.pid" 2>/dev/null)" 2>/dev/null || true
  for _ in $(seq 50); do pid_alive "$RDIR/redis.pid" || break; sleep 0.1; done
}

case "${1:-up}" in
  up)
    mkdir -p "$RUN"
    [ -n "$(env_get SECRET_KEY)" ] || env_set SECRET_KEY "$(random_secret 48)"
    if [ -n "${DATABASE_URL:-}" ]; then say "Using DATABASE_URL from the environment"; else pg_up; fi
    if [ -n "${REDIS_URL:-}" ]; then say "Using REDIS_URL from the environment"; else redis_up; fi
    ;;
  down)
    # `down` alone stops both; `down redis` / `down pg` stop one.
    case "${2:-all}" in
      redis) redis_down ;;
      pg) pg_down ;;
      *) redis_down; pg_down ;;
    esac ;;
  *) die "usage: $0 up | down [pg|redis]" ;;
esac
