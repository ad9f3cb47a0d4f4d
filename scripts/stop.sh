#!/usr/bin/env bash
# `make stop`: stop what `make run` started (from any terminal), then PostgreSQL and Redis.
source "$(dirname "$0")/lib.sh"
PIDS="$RUN/pids"
mkdir -p "$RUN"; touch "$RUN/stopping"
stop_started
"$ROOT/scripts/services.sh" down
# A `make run` still waiting in another terminal sees the flag and exits quietly.
( sleep 3; rm -f "$RUN/stopping" ) &
