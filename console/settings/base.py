"""Base settings: everything comes from environment variables (see docs/configuration.md).

`make run`/`make test` write the URLs of the local services they start into `.env`; real
environment variables always win over that file.
"""

from __future__ import annotations

from pathlib import Path

import dj_database_url

from console.env import env_bool, env_float, env_int, env_list, env_str, env_url, load_dotenv, prefixed_settings

BASE_DIR = Path(__file__).resolve().parent.parent.parent
load_dotenv(BASE_DIR / ".env")

DEBUG = env_bool("DEBUG", False)
SECRET_KEY = env_str("SECRET_KEY")
ALLOWED_HOSTS = env_list("ALLOWED_HOSTS", "127.0.0.1,localhost,[::1]")
CSRF_TRUSTED_ORIGINS = env_list("CSRF_TRUSTED_ORIGINS", [])

INSTALLED_APPS = [
    "django.contrib.admin",
    "django.contrib.auth",
    "django.contrib.contenttypes",
    "django.contrib.sessions",
    "django.contrib.messages",
    "django.contrib.staticfiles",
    "django.contrib.postgres",
    "channels",
    "rest_framework",
    "rest_framework.authtoken",
    "django_filters",
    "drf_spectacular",
    "drf_spectacular_sidecar",
    "fleet",
    "security",
    "telemetry",
    "rollouts",
    "frontend",
]

MIDDLEWARE = [
    "django.middleware.security.SecurityMiddleware",
    "whitenoise.middleware.WhiteNoiseMiddleware",
    "django.contrib.sessions.middleware.SessionMiddleware",
    "django.middleware.common.CommonMiddleware",
    "django.middleware.csrf.CsrfViewMiddleware",
    "django.contrib.auth.middleware.AuthenticationMiddleware",
    "security.middleware.AuditContextMiddleware",
    "django.contrib.messages.middleware.MessageMiddleware",
    "django.middleware.clickjacking.XFrameOptionsMiddleware",
]

ROOT_URLCONF = "console.urls"
ASGI_APPLICATION = "console.asgi.application"
WSGI_APPLICATION = "console.wsgi.application"

TEMPLATES = [
    {
        "BACKEND": "django.template.backends.django.DjangoTemplates",
        "DIRS": [],
        "APP_DIRS": True,
        "OPTIONS": {
            "context_processors": [
                "django.template.context_processors.request",
                "django.contrib.auth.context_processors.auth",
                "django.contrib.messages.context_processors.messages",
            ],
        },
    },
]

DATABASE_URL = env_url("DATABASE_URL", schemes=("postgres", "postgresql"))
DATABASES = {
    "default": dj_database_url.parse(
        DATABASE_URL,
        conn_max_age=env_int("DB_CONN_MAX_AGE", 60, minimum=0),
        conn_health_checks=True,
    )
}
# A connection pool (psycopg_pool through Django's `pool` option) for the web server process.
# Under ASGI every HTTP request runs its sync code on a fresh thread, so persistent connections
# (DB_CONN_MAX_AGE) are not reused: each API call, dashboard page or artifact download opened a
# new PostgreSQL connection (a backend fork and SCRAM authentication). With DB_POOL_MAX_SIZE > 0
# threads borrow pooled connections instead (Django then requires CONN_MAX_AGE = 0). Set it for
# uvicorn processes (scripts/run.sh does); Celery workers fork and keep persistent connections.
DB_POOL_MAX_SIZE = env_int("DB_POOL_MAX_SIZE", 0, minimum=0)
if DB_POOL_MAX_SIZE:
    DATABASES["default"]["CONN_MAX_AGE"] = 0
    DATABASES["default"].setdefault("OPTIONS", {})["pool"] = {
        "min_size": min(2, DB_POOL_MAX_SIZE), "max_size": DB_POOL_MAX_SIZE,
        "timeout": env_float("DB_POOL_TIMEOUT_S", 5, minimum=0.1),
    }
DEFAULT_AUTO_FIELD = "django.db.models.BigAutoField"

REDIS_URL = env_url("REDIS_URL", schemes=("redis", "rediss"))
CACHES = {"default": {"BACKEND": "django.core.cache.backends.redis.RedisCache", "LOCATION": REDIS_URL}}

# redis-py 8 caps an async pool at 100 connections and its 5 s socket timeout equals the
# layer's blocking-pop timeout; both crash consumers under load (see DESIGN.md pitfalls).
CHANNEL_LAYERS = {
    "default": {
        "BACKEND": "console.channel_layer.BatchingRedisChannelLayer",
        "CONFIG": {
            "hosts": [{"address": REDIS_URL, "max_connections": 2000, "socket_timeout": 30}],
            # All connections of a server process share one Redis queue (channels_redis's
            # process channel): a rollout step pushes up to ROLLOUTS_OFFER_BATCH (500) offers
            # at once, plus commands and status doorbells, so 500 would refuse part of a burst.
            "capacity": 5000,
            "expiry": 30,
        },
    }
}

CELERY_BROKER_URL = env_url("CELERY_BROKER_URL", REDIS_URL, schemes=("redis", "rediss"))
CELERY_TASK_ACKS_LATE = True  # a task whose worker dies is redelivered, not lost
CELERY_TASK_REJECT_ON_WORKER_LOST = True
CELERY_WORKER_PREFETCH_MULTIPLIER = 1
CELERY_TASK_ALWAYS_EAGER = env_bool("CELERY_TASK_ALWAYS_EAGER", False)
CELERY_BROKER_CONNECTION_RETRY_ON_STARTUP = True
CELERY_TIMEZONE = "UTC"

# Password logins (dashboard and admin) go through a throttled backend (security/throttle.py).
AUTHENTICATION_BACKENDS = ["security.throttle.ThrottledModelBackend"]
LOGIN_MAX_FAILURES = env_int("LOGIN_MAX_FAILURES", 5, minimum=1)
LOGIN_LOCKOUT_S = env_int("LOGIN_LOCKOUT_S", 900, minimum=1)

AUTH_PASSWORD_VALIDATORS = [
    {"NAME": "django.contrib.auth.password_validation.UserAttributeSimilarityValidator"},
    {"NAME": "django.contrib.auth.password_validation.MinimumLengthValidator"},
    {"NAME": "django.contrib.auth.password_validation.CommonPasswordValidator"},
    {"NAME": "django.contrib.auth.password_validation.NumericPasswordValidator"},
]

LANGUAGE_CODE = "en-us"
TIME_ZONE = "UTC"
USE_I18N = True
USE_TZ = True

STATIC_URL = "static/"
STATIC_ROOT = BASE_DIR / ".run" / "static"
STORAGES = {
    "default": {"BACKEND": "django.core.files.storage.FileSystemStorage"},
    "staticfiles": {"BACKEND": "whitenoise.storage.CompressedManifestStaticFilesStorage"},
}
MEDIA_ROOT = Path(env_str("MEDIA_ROOT", str(BASE_DIR / ".run" / "media")))
LOGIN_URL = "/login/"
LOGIN_REDIRECT_URL = "/"

SESSION_COOKIE_HTTPONLY = True
SESSION_COOKIE_SAMESITE = "Lax"
CSRF_COOKIE_SAMESITE = "Lax"
X_FRAME_OPTIONS = "DENY"
SECURE_CONTENT_TYPE_NOSNIFF = True
SECURE_REFERRER_POLICY = "same-origin"

REST_FRAMEWORK = {
    # Token first: its WWW-Authenticate header turns "not logged in" into 401, not 403.
    "DEFAULT_AUTHENTICATION_CLASSES": [
        "rest_framework.authentication.TokenAuthentication",
        "rest_framework.authentication.SessionAuthentication",
    ],
    "DEFAULT_PERMISSION_CLASSES": ["fleet.api.permissions.RolePermission"],
    "DEFAULT_PAGINATION_CLASS": "fleet.api.pagination.CursorPagination",
    "PAGE_SIZE": 50,
    "DEFAULT_FILTER_BACKENDS": [
        "django_filters.rest_framework.DjangoFilterBackend",
        "rest_framework.filters.SearchFilter",
        "rest_framework.filters.OrderingFilter",
    ],
    "DEFAULT_SCHEMA_CLASS": "drf_spectacular.openapi.AutoSchema",
    "EXCEPTION_HANDLER": "fleet.api.errors.exception_handler",
    "DEFAULT_THROTTLE_CLASSES": [
        "rest_framework.throttling.UserRateThrottle",
        "rest_framework.throttling.AnonRateThrottle",
    ],
    "DEFAULT_THROTTLE_RATES": {
        "user": env_str("API_THROTTLE_USER", "6000/min"),
        "anon": env_str("API_THROTTLE_ANON", "120/min"),
    },
}

SPECTACULAR_SETTINGS = {
    "TITLE": "Edge fleet console API",
    "DESCRIPTION": "Inventory, security, rollouts and telemetry for fleets of edge devices.",
    "VERSION": "1.0.0",
    "SERVE_INCLUDE_SCHEMA": False,
    "SCHEMA_PATH_PREFIX": "/api/v1",
    # Served from our own static files: no CDN.
    "SWAGGER_UI_DIST": "SIDECAR",
    "SWAGGER_UI_FAVICON_HREF": "SIDECAR",
    "REDOC_DIST": "SIDECAR",
    # Every operation's error answers (one shape, fleet.api.errors) are part of the contract.
    "POSTPROCESSING_HOOKS": ["drf_spectacular.hooks.postprocess_schema_enums", "fleet.api.schema.add_error_responses"],
    # Stable enum names where several fields share a name (component, kind).
    "ENUM_NAME_OVERRIDES": {
        "ComponentEnum": "rollouts.models.Kind",
        "PinComponentEnum": "fleet.services.COMPONENTS",
        "AlertRuleKindEnum": "telemetry.models.RuleKind",
    },
}

# Capability tiers (fleet.tiers): tier 1 runs full models, tier 2 quantized ones,
# tier 3 only aggregates sensor data.
FLEET_TIER1_MIN_RAM_MB = env_int("FLEET_TIER1_MIN_RAM_MB", 16 * 1024, minimum=1)
FLEET_TIER2_MIN_RAM_MB = env_int("FLEET_TIER2_MIN_RAM_MB", 4 * 1024, minimum=1)
# A device not heard from for this long is marked offline by the presence sweep.
FLEET_OFFLINE_AFTER_S = env_float("FLEET_OFFLINE_AFTER_S", 90, minimum=1)
FLEET_PRESENCE_HISTORY_DAYS = env_int("FLEET_PRESENCE_HISTORY_DAYS", 30, minimum=1)

# Agent protocol v1 limits (docs/protocol.md). Each refusal uses the contract's code.
AGENT_MAX_FRAME_BYTES = env_int("AGENT_MAX_FRAME_BYTES", 256 * 1024, minimum=1024)
AGENT_MAX_POINTS = env_int("AGENT_MAX_POINTS", 1000, minimum=1)
AGENT_HANDSHAKE_TIMEOUT_S = env_float("AGENT_HANDSHAKE_TIMEOUT_S", 10, minimum=0.1)
# Admission control (console/agent_consumer.py: Admission): handshakes worked on at once per
# process, how many more may wait, and the upper bound of the jittered retry_after_ms given to
# those shed with 4503 beyond that.
AGENT_HANDSHAKE_CONCURRENCY = env_int("AGENT_HANDSHAKE_CONCURRENCY", 16, minimum=1)
AGENT_HANDSHAKE_BACKLOG = env_int("AGENT_HANDSHAKE_BACKLOG", 500, minimum=0)
AGENT_HANDSHAKE_RETRY_MS = env_int("AGENT_HANDSHAKE_RETRY_MS", 5000, minimum=1000)
AGENT_HEARTBEAT_S = env_int("AGENT_HEARTBEAT_S", 30, minimum=1)
AGENT_RATE_PER_S = env_float("AGENT_RATE_PER_S", 50, minimum=0.1)  # sustained messages per second per device
AGENT_RATE_BURST = env_int("AGENT_RATE_BURST", 200, minimum=1)
AGENT_PRESENCE_FLUSH_S = env_float("AGENT_PRESENCE_FLUSH_S", 5, minimum=0.05)

# Attestation (docs/attestation.md).
SECURITY_ATTEST_INTERVAL_S = env_float("SECURITY_ATTEST_INTERVAL_S", 3600, minimum=10)
SECURITY_CHALLENGE_TTL_S = env_float("SECURITY_CHALLENGE_TTL_S", 60, minimum=1)
SECURITY_TPM_TRUST_DIR = env_str("SECURITY_TPM_TRUST_DIR", "")  # optional: <dir>/{manufacturer,test,intermediates}/*.pem

# TELEMETRY_* and ROLLOUTS_* knobs (docs/telemetry.md, docs/rollouts.md) from the environment.
globals().update(prefixed_settings("TELEMETRY_", "ROLLOUTS_"))

LOGGING = {
    "version": 1,
    "disable_existing_loggers": False,
    "formatters": {"plain": {"format": "%(asctime)s %(levelname)s %(name)s %(message)s"}},
    "handlers": {"console": {"class": "logging.StreamHandler", "formatter": "plain"}},
    "root": {"handlers": ["console"], "level": env_str("LOG_LEVEL", "INFO")},
    "loggers": {"django.db.backends": {"level": "INFO"}},
}
