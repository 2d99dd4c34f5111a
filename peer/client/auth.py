"""Login for the client app (PEER_MODE=client).

Users live in the client's own small SQLite database (DEJIMA_CLIENT_DB), never in the organization's peer
database: Django's auth (users, password hashes) and its sessions. `prepare_user_store()` runs at start (gunicorn's
post_worker_init): it migrates that database (idempotent) and creates the initial user DEJIMA_CLIENT_USER with the
password of DEJIMA_CLIENT_PASSWORD[_FILE], or sets that password when the user exists with another one (the
setting is the source of truth for the initial user). More users: `manage.py createsuperuser` / `changepassword`
with the same environment.

- pages (/, /tables/…): anonymous → 302 to /login?next=…; logged in: as in peer/client/views.py.
- /login: GET the form; POST username + password + CSRF token → 302 to `next` (or /); a wrong password → 200 with
  the error and no session. /logout: POST with the CSRF token ends the session (server side) → 302 to /login.
- /client/api/v1/…: HTTP Basic, or the session cookie (+ an X-CSRFToken header for POST, PATCH and DELETE, else
  403 `permission_denied`); anonymous → 401 JSON `not_authenticated` with WWW-Authenticate: Basic.
- /health: public.

Cookies: HttpOnly session cookie, SameSite=Lax (session and CSRF), `Secure` with DEJIMA_CLIENT_SECURE_COOKIES=1.
"""

from __future__ import annotations

import logging
import threading

from django.contrib.auth import get_user_model
from django.core.management import call_command
from django.db import connections

from peer.dejima.config import DEV_CLIENT_PASSWORD, ConfigError, PeerConfig

log = logging.getLogger(__name__)
_lock = threading.Lock()
_ready = False


def prepare_user_store(config: PeerConfig) -> None:
    """Migrate the client's SQLite database and create (or update the password of) the initial user. Raises
    ConfigError naming DEJIMA_CLIENT_DB when the database cannot be created or migrated."""
    global _ready
    with _lock:
        if _ready:
            return
        path = config.client_db
        try:
            path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
            if not path.exists():
                path.touch(mode=0o600)
            call_command("migrate", interactive=False, verbosity=0, skip_checks=True)
        except Exception as exc:  # noqa: BLE001  (any failure here is a bad DEJIMA_CLIENT_DB)
            raise ConfigError("DEJIMA_CLIENT_DB", f"cannot create or migrate {path}: {exc}") from None
        finally:
            connections.close_all()
        user_model = get_user_model()
        user = user_model.objects.filter(username=config.client_user).first()
        if user is None:
            user = user_model.objects.create_user(config.client_user, password=config.client_password)
            user.is_staff = user.is_superuser = True
            user.save()
            log.info("client user %r created in %s", config.client_user, path)
        elif not user.check_password(config.client_password):
            user.set_password(config.client_password)
            user.save(update_fields=["password"])
            log.info("client user %r: password set from the settings", config.client_user)
        if config.client_password == DEV_CLIENT_PASSWORD:  # only accepted in debug (DEJIMA_DEBUG=1)
            log.warning("debug: client user %r has the password %r", config.client_user, DEV_CLIENT_PASSWORD)
        connections.close_all()
        _ready = True
