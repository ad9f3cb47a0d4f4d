#!/usr/bin/env bash
# `make test`: the same services as `make run`, then the whole pytest suite against real
# PostgreSQL and Redis. Services this script started are stopped again at the end.
source "$(dirname "$0")/lib.sh"
cd "$ROOT"
started=0
if [ -z "${DATABASE_URL:-}" ] && ! { [ -f "$RUN/pg/data/postmaster.pid" ] && pid_alive "$RUN/redis/redis.pid"; }; then
  started=1
fi
"$ROOT/scripts/services.sh" up
[ "$started" = 1 ] && trap '"$ROOT/scripts/services.sh" down' EXIT
say "Lint"
.venv/bin/ruff check . || die "ruff found problems (see above)"
.venv/bin/python manage.py collectstatic --noinput -v0
say "Running the test suite"
.venv/bin/python -m pytest "$@"
