#!/usr/bin/env bash
# Installs what the console needs on a Debian/Ubuntu machine: OS packages (as root,
# only the missing ones) and the Python virtualenv from the pinned requirements.lock.
#   scripts/bootstrap.sh run    PostgreSQL + Redis (what `make run` needs)
#   scripts/bootstrap.sh test   + swtpm, tpm2-tools and Chromium (what `make test` needs)
source "$(dirname "$0")/lib.sh"
profile="${1:-run}"

pkgs=(postgresql redis-server)
if [ "$profile" = test ] || [ "$profile" = all ]; then
  pkgs+=(swtpm swtpm-tools tpm2-tools libtss2-tcti-swtpm0 libtss2-tctildr0 chromium)
fi

missing=()
for p in "${pkgs[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
# python3 -m venv needs ensurepip, which Debian ships separately.
python3 -c 'import ensurepip' 2>/dev/null || missing+=(python3-venv)

if [ ${#missing[@]} -gt 0 ]; then
  if is_root; then
    say "Installing OS packages: ${missing[*]}"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
  elif [ "$profile" = run ] && [ -n "${DATABASE_URL:-}" ] && [ -n "${REDIS_URL:-}" ]; then
    : # external PostgreSQL and Redis given: the local servers are not needed
  else
    die "missing OS packages: ${missing[*]}
  Not running as root, so they cannot be installed here. Either run:
      sudo apt-get install -y ${missing[*]}
  and try again, or point DATABASE_URL and REDIS_URL at servers you already have."
  fi
fi

# Python environment, rebuilt only when requirements.lock changes.
stamp="$ROOT/.venv/.lock-sha256"
want="$(sha256sum "$ROOT/requirements.lock" | cut -d' ' -f1)"
if [ ! -x "$PY" ]; then
  say "Creating virtualenv .venv"
  python3 -m venv "$ROOT/.venv"
fi
if [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
  say "Installing Python packages from requirements.lock"
  "$PY" -m pip install -q --disable-pip-version-check -r "$ROOT/requirements.lock" 2>&1 \
    | grep -v "^WARNING: Location" || true
  "$PY" -c 'import django, channels, celery, psycopg' || die "Python packages did not install"
  echo "$want" > "$stamp"
fi
