"""gunicorn settings for a peer: one process (it owns the open global transactions' connections), many threads.

Run: `gunicorn -c python:peer.gunicorn_conf peer.wsgi` with PEER_TYPE and DEJIMA_* set (docs/settings.md).
"""

import os
import sys

from gunicorn.arbiter import Arbiter
from gunicorn.workers.base import Worker

bind = os.environ.get("DEJIMA_BIND", "127.0.0.1:8000")
worker_class = "gthread"
workers = 1
threads = int(os.environ.get("DEJIMA_THREADS", "32"))
timeout = 60
graceful_timeout = 10
keepalive = 30
accesslog = None
errorlog = "-"
loglevel = os.environ.get("DEJIMA_LOG_LEVEL", "info")


def on_starting(server: Arbiter) -> None:
    """Validate the settings before anything starts: a bad value stops the peer with a message naming it."""
    from peer.dejima.config import ConfigError, load_config

    try:
        load_config()
    except ConfigError as exc:
        print(f"dejima peer: bad setting {exc}", file=sys.stderr)
        sys.exit(2)


def post_worker_init(worker: Worker) -> None:
    """Build the peer (install SQL, pool, discovery and recovery loops) before the first request.

    In client mode (PEER_MODE=client) there is no peer database: load the manifest the client app shows and prepare
    the client's own user store (migrate DEJIMA_CLIENT_DB, create the initial user) instead; a failure stops it."""
    if os.environ.get("PEER_MODE", "").strip() == "client":
        from peer.client.auth import prepare_user_store
        from peer.client.context import get_context
        from peer.dejima.config import ConfigError

        try:
            prepare_user_store(get_context().config)
        except ConfigError as exc:
            print(f"dejima client: bad setting {exc}", file=sys.stderr)
            sys.exit(Arbiter.WORKER_BOOT_ERROR)  # the arbiter stops too
        return
    from peer.dejima.config import ConfigError
    from peer.dejima.runtime import get_runtime

    try:
        get_runtime()
    except ConfigError as exc:  # the database or its logins (checked once connected): a message, no traceback
        print(f"dejima peer: bad setting {exc}", file=sys.stderr)
        sys.exit(Arbiter.WORKER_BOOT_ERROR)  # the arbiter stops too
