"""Django settings for the Dejima peer. Everything comes from the environment (docs/settings.md)."""

from __future__ import annotations

import os
import re
from pathlib import Path

from peer.dejima.config import DEV_SECRET_KEY, ConfigError, client_db, secret_key

BASE_DIR = Path(__file__).resolve().parent.parent

DEBUG = os.environ.get("DEJIMA_DEBUG", "").strip() == "1"
try:
    SECRET_KEY = secret_key(os.environ)
except ConfigError:
    # A peer or client refuses to start (gunicorn's on_starting runs load_config, which raises this same error) and
    # `manage.py check` reports it; other management commands (dejima_sql, …) need no secret.
    SECRET_KEY = DEV_SECRET_KEY
ALLOWED_HOSTS = ["*"]

INSTALLED_APPS = [
    "django.contrib.contenttypes",
    "django.contrib.auth",
    "rest_framework",
    "drf_spectacular",
    "peer.dejima",
]
PEER_MODE = os.environ.get("PEER_MODE", "").strip() or "peer"
REST_FRAMEWORK: dict[str, object] = {
    "DEFAULT_AUTHENTICATION_CLASSES": [],
    "DEFAULT_PERMISSION_CLASSES": ["rest_framework.permissions.AllowAny"],
    "UNAUTHENTICATED_USER": None,
    "DEFAULT_SCHEMA_CLASS": "drf_spectacular.openapi.AutoSchema",
    "DEFAULT_PARSER_CLASSES": ["rest_framework.parsers.JSONParser"],
    "DEFAULT_RENDERER_CLASSES": ["rest_framework.renderers.JSONRenderer"],
    "DEFAULT_METADATA_CLASS": None,  # OPTIONS is 405 like any method an endpoint does not take
}
if PEER_MODE == "peer":
    # Every endpoint of a peer needs an API token (peer/dejima/apiauth.py), a new one too, unless it opts out as
    # /health and /peer/v1/message do; DRF's own 401 and 403 come out in the API's error shape.
    REST_FRAMEWORK.update(
        {
            "DEFAULT_AUTHENTICATION_CLASSES": ["peer.dejima.apiauth.BearerTokenAuthentication"],
            "DEFAULT_PERMISSION_CLASSES": ["peer.dejima.apiauth.TokenScope"],
            "EXCEPTION_HANDLER": "peer.dejima.apiauth.exception_handler",
        }
    )
LOGGING = {
    "version": 1,
    "disable_existing_loggers": False,
    "formatters": {"plain": {"format": "%(asctime)s %(levelname)s %(threadName)s %(name)s: %(message)s"}},
    "handlers": {"stderr": {"class": "logging.StreamHandler", "formatter": "plain"}},
    "root": {"handlers": ["stderr"], "level": os.environ.get("DEJIMA_LOG_LEVEL", "INFO").upper()},
}
MIDDLEWARE: list[str] = [  # peer/middleware.py
    "peer.middleware.content_length",
    "peer.middleware.RecursionIsBadRequest",
]
ROOT_URLCONF = "peer.urls"
WSGI_APPLICATION = "peer.wsgi.application"
DATABASES: dict[str, dict[str, object]] = {}
USE_TZ = True
TIME_ZONE = "UTC"
DEFAULT_AUTO_FIELD = "django.db.models.BigAutoField"

# Client mode (PEER_MODE=client): the person-facing web app and REST API of one organization (peer/client/).
# It talks only to its peer service (DEJIMA_PEER_URL) and keeps CSRF protection on for its HTML forms.
PEER_TYPE = os.environ.get("PEER_TYPE", "")
TEMPLATES = [
    {
        "BACKEND": "django.template.backends.django.DjangoTemplates",
        "DIRS": [BASE_DIR / "peer" / "client" / "templates"],
        "APP_DIRS": True,
        "OPTIONS": {"context_processors": ["django.template.context_processors.request"]},
    }
]
if PEER_MODE == "client":
    # Every page and every /client/api/v1/ endpoint needs a logged-in user (peer/client/auth.py): Django's auth and
    # sessions in the client's own small SQLite database (DEJIMA_CLIENT_DB), never the organization's peer database.
    INSTALLED_APPS.insert(2, "django.contrib.sessions")
    DATABASES = {
        "default": {
            "ENGINE": "django.db.backends.sqlite3",
            "NAME": str(client_db(os.environ)),
            "OPTIONS": {
                "timeout": 20,
                "transaction_mode": "IMMEDIATE",
                "init_command": "PRAGMA journal_mode=WAL; PRAGMA synchronous=NORMAL;",
            },
        }
    }
    MIDDLEWARE = [
        "peer.middleware.content_length",
        "django.middleware.security.SecurityMiddleware",
        "django.contrib.sessions.middleware.SessionMiddleware",
        "django.middleware.csrf.CsrfViewMiddleware",
        "django.contrib.auth.middleware.AuthenticationMiddleware",
        "django.contrib.auth.middleware.LoginRequiredMiddleware",
        "django.middleware.clickjacking.XFrameOptionsMiddleware",
        "peer.middleware.RecursionIsBadRequest",
    ]
    CSRF_FAILURE_VIEW = "peer.client.views.csrf_failure"
    LOGIN_URL = "client-login"
    LOGIN_REDIRECT_URL = "client-home"
    LOGOUT_REDIRECT_URL = "client-login"
    SESSION_ENGINE = "django.contrib.sessions.backends.db"
    # Browsers share cookies across the ports of one host: each client (named by DEJIMA_PEER_NAME) has its own.
    _cookie = re.sub(r"[^a-z0-9_-]", "_", (os.environ.get("DEJIMA_PEER_NAME", "") or PEER_TYPE or "dejima").strip())
    SESSION_COOKIE_NAME = f"dejima_{_cookie}_session"
    SESSION_COOKIE_HTTPONLY = True
    SESSION_COOKIE_SAMESITE = "Lax"
    SESSION_COOKIE_AGE = 12 * 3600  # seconds
    CSRF_COOKIE_NAME = f"dejima_{_cookie}_csrftoken"
    CSRF_COOKIE_SAMESITE = "Lax"
    # Behind TLS (a proxy that terminates HTTPS) the cookies should only travel over HTTPS.
    SESSION_COOKIE_SECURE = CSRF_COOKIE_SECURE = os.environ.get("DEJIMA_CLIENT_SECURE_COOKIES", "").strip() == "1"

# The OpenAPI schema of the API this process serves (drf-spectacular): GET /api/v1/openapi.json at a peer,
# GET /client/api/v1/openapi.json at a client (login required, as for the rest of its API).
SPECTACULAR_SETTINGS = {
    "TITLE": "Dejima client API" if PEER_MODE == "client" else "Dejima peer API",
    "DESCRIPTION": (
        "REST API of a Dejima client app (PEER_MODE=client): the organization's base tables, every write one global "
        "transaction at its peer. Statuses: peer/client/api.py."
        if PEER_MODE == "client"
        else "HTTP API of a Dejima peer: global transactions, queries, dejima views and groups, the signed "
        "peer-to-peer protocol. Statuses: peer/dejima/views.py."
    ),
    "VERSION": "1",
    "SERVE_INCLUDE_SCHEMA": False,
    "COMPONENT_SPLIT_REQUEST": True,
    "SCHEMA_PATH_PREFIX": r"/(client/)?api/v1",
    "ENUM_NAME_OVERRIDES": {
        "ErrorKindEnum": "peer.dejima.serializers.ERROR_KINDS",
        "MessageKindEnum": "peer.dejima.serializers.MESSAGE_KINDS",
    },
    # a peer's schema needs a token like every endpoint (drf-spectacular's own default would be AllowAny)
    "SERVE_PERMISSIONS": (
        ["peer.dejima.apiauth.TokenScope"] if PEER_MODE == "peer" else ["rest_framework.permissions.AllowAny"]
    ),
    # a peer: every operation behind an API token documents its 401 and 403 (peer/dejima/schema.py)
    "POSTPROCESSING_HOOKS": [
        "drf_spectacular.hooks.postprocess_schema_enums",
        *(["peer.dejima.schema.document_token_refusals"] if PEER_MODE == "peer" else []),
    ],
}

# Peer type folders (manifest + generated SQL).
DEJIMA_SQL_ROOT = Path(os.environ.get("DEJIMA_SQL_ROOT", str(BASE_DIR / "sql_triggers")))
