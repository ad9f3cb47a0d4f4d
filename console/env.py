"""Strict reading of configuration from the environment (and the local `.env`).

Every setting the console takes from outside goes through these functions, so a bad
value stops start-up with a message that names the variable and says what is allowed,
instead of surfacing later as a confusing failure.
"""

from __future__ import annotations

import os
from pathlib import Path
from urllib.parse import urlsplit

from django.core.exceptions import ImproperlyConfigured

_TRUE = {"1", "true", "yes", "on"}
_FALSE = {"0", "false", "no", "off"}
_MISSING = object()


def load_dotenv(path: Path) -> None:
    """Read KEY=VALUE lines into os.environ without overriding variables already set.

    The file is written by `make run`/`make test` with the URLs of the services they
    started, so `manage.py` in another terminal reaches the same database and Redis.
    """
    if not path.is_file():
        return
    for lineno, raw in enumerate(path.read_text().splitlines(), 1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        key, sep, value = line.partition("=")
        if not sep or not key.strip().isidentifier():
            raise ImproperlyConfigured(f"{path}:{lineno}: expected KEY=VALUE, got {raw!r}")
        os.environ.setdefault(key.strip(), value.strip().strip("'\""))


def _raw(name: str, default: object) -> object:
    value = os.environ.get(name)
    if value is None or value == "":
        if default is _MISSING:
            raise ImproperlyConfigured(f"{name} is required but not set")
        return default
    return value


def env_str(name: str, default: object = _MISSING) -> str:
    return _raw(name, default)  # type: ignore[return-value]


def env_bool(name: str, default: object = _MISSING) -> bool:
    value = _raw(name, default)
    if isinstance(value, bool):
        return value
    lowered = str(value).strip().lower()
    if lowered in _TRUE:
        return True
    if lowered in _FALSE:
        return False
    raise ImproperlyConfigured(f"{name}={value!r} is not a boolean; use one of true/false, 1/0, yes/no, on/off")


def env_int(name: str, default: object = _MISSING, *, minimum: int | None = None, maximum: int | None = None) -> int:
    value = _raw(name, default)
    try:
        number = int(value)  # type: ignore[call-overload]
    except (TypeError, ValueError):
        raise ImproperlyConfigured(f"{name}={value!r} is not an integer") from None
    if minimum is not None and number < minimum:
        raise ImproperlyConfigured(f"{name}={number} is below the minimum {minimum}")
    if maximum is not None and number > maximum:
        raise ImproperlyConfigured(f"{name}={number} is above the maximum {maximum}")
    return number


def env_float(name: str, default: object = _MISSING, *, minimum: float | None = None) -> float:
    value = _raw(name, default)
    try:
        number = float(value)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        raise ImproperlyConfigured(f"{name}={value!r} is not a number") from None
    if number != number or number in (float("inf"), float("-inf")):
        raise ImproperlyConfigured(f"{name}={value!r} must be finite")
    if minimum is not None and number < minimum:
        raise ImproperlyConfigured(f"{name}={number} is below the minimum {minimum}")
    return number


def env_list(name: str, default: object = _MISSING) -> list[str]:
    value = _raw(name, default)
    if isinstance(value, list):
        return value
    items = [item.strip() for item in str(value).split(",")]
    if any(not item for item in items):
        raise ImproperlyConfigured(f"{name}={value!r} has an empty item; separate values with single commas")
    return items


def env_url(name: str, default: object = _MISSING, *, schemes: tuple[str, ...]) -> str:
    value = str(_raw(name, default))
    parts = urlsplit(value)
    if parts.scheme not in schemes:
        raise ImproperlyConfigured(
            f"{name} must be a URL with scheme {' or '.join(schemes)}, got scheme {parts.scheme or '(none)'!r}"
        )
    if not parts.hostname:
        raise ImproperlyConfigured(f"{name} has no host name")
    try:
        parts.port  # noqa: B018 -- raises ValueError for a non-numeric port
    except ValueError:
        raise ImproperlyConfigured(f"{name} has an invalid port") from None
    return value


def prefixed_settings(*prefixes: str) -> dict[str, object]:
    """Every environment variable starting with one of `prefixes`, as a settings value.

    For the apps' knobs (telemetry.conf, rollouts.conf), whose defaults and meaning live
    next to the code that uses them: integers and decimals become numbers, true/false
    become booleans, anything else stays text. Each app's conf module checks the type
    against its default and names the variable when it does not fit.
    """
    values: dict[str, object] = {}
    for name, raw in os.environ.items():
        if not name.startswith(prefixes) or raw == "":
            continue
        lowered = raw.strip().lower()
        if lowered in ("true", "false"):
            values[name] = lowered == "true"
            continue
        try:
            values[name] = int(raw)
            continue
        except ValueError:
            pass
        try:
            values[name] = float(raw)
        except ValueError:
            values[name] = raw
    return values
