#!/usr/bin/env bash
# `make stop`: stop what `make run` started (from any terminal), then PostgreSQL and Redis.
source "$(dirname "$0")/lib.sh"
PIDS="$RUN/pids"
mkdir -p "$RUN"; touch "$RUN/stopping"
for f in "$PIDS"/*.pid; do
  [ -f "$f" ] || continue
  kill -TERM -- "-$(cat "$f")" 2>/dev/null || true
done
sleep 1
for f in "$PIDS"/*.pid; do
  [ -f "$f" ] || continue
  kill -KILL -- "-$(cat "$f")" 2>/dev/null || true; rm -f "$f"
done
"$ROOT/scripts/services.sh" down
# A `make run` still waiting in another terminal sees the flag and exits quietly.
( sleep 3; rm -f "$RUN/stopping" ) &
