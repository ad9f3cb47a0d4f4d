# The two set-up commands of the README are `make run` and `make test`; the rest are
# helpers for developers.
.PHONY: run test soak stop lint lock services migrate bench clean

SHELL := /bin/bash
PY := .venv/bin/python

run:
	@scripts/bootstrap.sh run
	@scripts/run.sh

test:
	@scripts/bootstrap.sh test
	@scripts/test.sh $(ARGS)

# The long fault and soak tests (marked `slow`), which `make test` leaves out.
soak:
	@scripts/bootstrap.sh test
	@scripts/test.sh -m slow $(ARGS)

# The benchmark runner: starts the real stack, prints a table, updates docs/benchmarks.md.
bench:
	@scripts/bootstrap.sh test
	@scripts/services.sh up
	@.venv/bin/python -m benchmarks.run $(ARGS)

stop:
	@scripts/stop.sh

# Start PostgreSQL and Redis only (e.g. to run a single test file by hand).
services:
	@scripts/bootstrap.sh run
	@scripts/services.sh up

lint:
	.venv/bin/ruff check .
	.venv/bin/ruff format --check .

# Re-pin every Python dependency after changing requirements.in.
lock:
	$(PY) -m pip install -q -r requirements.in
	$(PY) -m pip freeze --exclude-editable | grep -v '^pkg_resources' > requirements.lock

clean: stop
	rm -rf .run .env
