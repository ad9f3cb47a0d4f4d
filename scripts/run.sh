#!/usr/bin/env bash
# `make run`: services, migrations, demo data, then the web server, Celery worker and
# beat, and a few simulated agents. Ctrl-C (or `make stop`) stops all of it.
source "$(dirname "$0")/lib.sh"
PORT="${PORT:-8000}"
HOST="${HOST:-127.0.0.1}"
PIDS="$RUN/pids"; LOGS="$RUN/logs"
mkdir -p "$PIDS" "$LOGS"

if pid_alive "$PIDS/web.pid"; then
  say "The console is already running (pid $(cat "$PIDS/web.pid")): http://$HOST:$(cat "$RUN/web.port" 2>/dev/null || echo "$PORT")/"
  say "Stop it with 'make stop' (or Ctrl-C in its terminal) before starting it again."
  exit 0
fi
if python3 -c "import socket,sys; s=socket.socket(); sys.exit(s.connect_ex(('$HOST',$PORT))!=0)"; then
  die "port $PORT on $HOST is in use by another program; run with PORT=8001 make run"
fi

# Stop on exit only the services this run starts; ones already running stay up.
started_pg=0; started_redis=0
[ -z "${DATABASE_URL:-}" ] && ! pg_running && started_pg=1
[ -z "${REDIS_URL:-}" ] && ! redis_running && started_redis=1
"$ROOT/scripts/services.sh" up
cd "$ROOT"
say "Migrating the database"
"$PY" manage.py migrate --noinput >"$LOGS/migrate.log" 2>&1 || { cat "$LOGS/migrate.log"; die "migrate failed"; }
"$PY" manage.py collectstatic --noinput -v0
say "Seeding the demo fleet"
login="$("$PY" manage.py seed_demo 2>>"$LOGS/seed.log")"

stop_all() {
  trap - INT TERM EXIT
  say "Stopping the console"
  stop_started
  [ "$started_redis" = 1 ] && "$ROOT/scripts/services.sh" down redis
  [ "$started_pg" = 1 ] && "$ROOT/scripts/services.sh" down pg
  return 0
}
trap stop_all INT TERM EXIT

# start NAME CMD...: run in its own process group (so a stop reaches its children).
start() {
  local name="$1"; shift
  setsid "$@" >"$LOGS/$name.log" 2>&1 &
  echo $! > "$PIDS/$name.pid"
  disown  # we track it by pid file; no "Killed" job notices from bash
}

echo "$PORT" > "$RUN/web.port"
start web env DB_POOL_MAX_SIZE="${DB_POOL_MAX_SIZE:-20}" .venv/bin/uvicorn console.asgi:application --host "$HOST" --port "$PORT" \
  --ws websockets-sansio --ws-per-message-deflate false --ws-max-size 1048576 --ws-ping-interval 0 \
  --lifespan off --no-access-log --log-level warning
start worker .venv/bin/celery -A console worker --loglevel INFO --concurrency 2
start beat .venv/bin/celery -A console beat --loglevel INFO --schedule "$RUN/celerybeat-schedule"

for _ in $(seq 100); do
  http_ok "http://$HOST:$PORT/healthz" && break
  pid_alive "$PIDS/web.pid" || { tail -n 30 "$LOGS/web.log"; die "the web server exited; log above"; }
  sleep 0.2
done
http_ok "http://$HOST:$PORT/healthz" || { tail -n 30 "$LOGS/web.log"; die "the web server is not healthy"; }

if [ -f "$ROOT/agent_stub/__main__.py" ] && "$PY" manage.py help create_enrollment_token >/dev/null 2>&1; then
  token="$("$PY" manage.py create_enrollment_token --auto-approve --uses 1000 --label demo=simulated \
            --expires-in 30d 2>>"$LOGS/seed.log" | tail -n 1)"
  start agents "$PY" -m agent_stub simulate --server "ws://$HOST:$PORT/ws/agent/v1/" \
    --devices "${AGENTS:-12}" --enroll-token "$token" --state-dir "$RUN/agents" --uid-prefix sim
fi

cat <<MSG

  Console ready at http://$HOST:$PORT/
  $login
  Admin: http://$HOST:$PORT/admin/    API docs: http://$HOST:$PORT/api/v1/docs/
  Logs in .run/logs/. Press Ctrl-C to stop (or run 'make stop' elsewhere).

MSG

# Stay in the foreground; if a process dies, say which one and stop the rest.
while true; do
  [ -f "$RUN/stopping" ] && { rm -f "$RUN/stopping"; exit 0; }
  for f in "$PIDS"/*.pid; do
    [ -f "$f" ] || continue
    if ! pid_alive "$f"; then
      name="$(basename "$f" .pid)"
      [ -f "$RUN/stopping" ] && exit 0
      say "$name exited unexpectedly; last lines of .run/logs/$name.log:"; tail -n 20 "$LOGS/$name.log"
      exit 1
    fi
  done
  sleep 1
done
