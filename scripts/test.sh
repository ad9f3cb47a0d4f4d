#!/usr/bin/env bash
# `make test`: the same services as `make run`, then the whole pytest suite against real
# PostgreSQL and Redis. Services this script started are stopped again at the end.
source "$(dirname "$0")/lib.sh"
cd "$ROOT"
started_pg=0; started_redis=0
[ -z "${DATABASE_URL:-}" ] && ! pg_running && started_pg=1
[ -z "${REDIS_URL:-}" ] && ! redis_running && started_redis=1
"$ROOT/scripts/services.sh" up
cleanup() {
  [ "$started_redis" = 1 ] && "$ROOT/scripts/services.sh" down redis
  [ "$started_pg" = 1 ] && "$ROOT/scripts/services.sh" down pg
  return 0
}
trap cleanup EXIT
say "Lint"
.venv/bin/ruff check . || die "ruff found problems (see above)"
.venv/bin/python manage.py collectstatic --noinput -v0
say "Running the test suite"
.venv/bin/python -m pytest --durations=25 "$@"
