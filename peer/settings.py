"""Django settings for the Dejima peer. Everything comes from the environment (docs/settings.md)."""

from __future__ import annotations

import os
from pathlib import Path

from peer.dejima.config import DEV_SECRET_KEY, ConfigError, secret_key

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
    "peer.dejima",
]
REST_FRAMEWORK = {
    "DEFAULT_AUTHENTICATION_CLASSES": [],
    "DEFAULT_PERMISSION_CLASSES": ["rest_framework.permissions.AllowAny"],
    "UNAUTHENTICATED_USER": None,
}
LOGGING = {
    "version": 1,
    "disable_existing_loggers": False,
    "formatters": {"plain": {"format": "%(asctime)s %(levelname)s %(threadName)s %(name)s: %(message)s"}},
    "handlers": {"stderr": {"class": "logging.StreamHandler", "formatter": "plain"}},
    "root": {"handlers": ["stderr"], "level": os.environ.get("DEJIMA_LOG_LEVEL", "INFO").upper()},
}
MIDDLEWARE: list[str] = []
ROOT_URLCONF = "peer.urls"
WSGI_APPLICATION = "peer.wsgi.application"
DATABASES: dict[str, dict[str, object]] = {}
USE_TZ = True
TIME_ZONE = "UTC"
DEFAULT_AUTO_FIELD = "django.db.models.BigAutoField"

# Client mode (PEER_MODE=client): the person-facing web app and REST API of one organization (peer/client/).
# It talks only to its peer service (DEJIMA_PEER_URL) and keeps CSRF protection on for its HTML forms.
PEER_MODE = os.environ.get("PEER_MODE", "").strip() or "peer"
TEMPLATES = [
    {
        "BACKEND": "django.template.backends.django.DjangoTemplates",
        "DIRS": [BASE_DIR / "peer" / "client" / "templates"],
        "APP_DIRS": True,
        "OPTIONS": {"context_processors": ["django.template.context_processors.request"]},
    }
]
if PEER_MODE == "client":
    MIDDLEWARE = [
        "django.middleware.security.SecurityMiddleware",
        "django.middleware.csrf.CsrfViewMiddleware",
        "django.middleware.clickjacking.XFrameOptionsMiddleware",
    ]
    CSRF_FAILURE_VIEW = "peer.client.views.csrf_failure"

# Peer type folders (manifest + generated SQL).
DEJIMA_SQL_ROOT = Path(os.environ.get("DEJIMA_SQL_ROOT", str(BASE_DIR / "sql_triggers")))
PEER_TYPE = os.environ.get("PEER_TYPE", "")
