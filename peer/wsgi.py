"""WSGI entry point (`gunicorn -c python:peer.gunicorn_conf peer.wsgi`)."""

import os

from django.core.handlers.wsgi import WSGIHandler
from django.core.wsgi import get_wsgi_application

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "peer.settings")
application: WSGIHandler = get_wsgi_application()
