"""gunicorn settings for a peer: one process (it owns the open global transactions' connections), many threads.

Run: `gunicorn -c python:peer.gunicorn_conf peer.wsgi` with PEER_TYPE and DEJIMA_* set (docs/settings.md).

TLS (peer.dejima.tls): with DEJIMA_TLS_CERT_FILE and DEJIMA_TLS_KEY_FILE gunicorn serves HTTPS (`certfile`,
`keyfile`; `ca_certs` is the CA of DEJIMA_TLS_CA_FILE). Its callers are this organization's own (the CLI, the client
app, an operator's curl) and authenticate with API tokens, so it asks for no client certificate (`cert_reqs`
CERT_NONE); a partner's messages go to the message listener, which does with DEJIMA_TLS_CLIENT_CERTS=require (and
gunicorn then refuses them, peer/dejima/views.py). gunicorn would build a new SSL context for every connection:
`ssl_context` hands it one context, built once, so that a client coming back resumes its session.
"""

import os
import ssl
import sys
from collections.abc import Callable

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
certfile = os.environ.get("DEJIMA_TLS_CERT_FILE", "").strip() or None
keyfile = os.environ.get("DEJIMA_TLS_KEY_FILE", "").strip() or None
ca_certs = os.environ.get("DEJIMA_TLS_CA_FILE", "").strip() or None
cert_reqs = ssl.CERT_NONE
_context: ssl.SSLContext | None = None


def ssl_context(config: object, default_ssl_context_factory: Callable[[], ssl.SSLContext]) -> ssl.SSLContext:
    """One server context for every connection (peer.dejima.tls.server_context, the listeners' own), built at the
    first connection from the settings load_config checked in on_starting."""
    global _context
    if _context is None:
        from peer.dejima.config import load_config
        from peer.dejima.tls import server_context

        settings = load_config().tls
        _context = server_context(settings) if settings is not None else default_ssl_context_factory()
    return _context


def on_starting(server: Arbiter) -> None:
    """Validate the settings before anything starts: a bad value stops the peer with a message naming it."""
    from peer.dejima.config import ConfigError, check_transport, load_config

    try:
        config = load_config()
        warnings = check_transport(config)  # TLS, or clear text allowed explicitly (or debug)
    except ConfigError as exc:
        print(f"dejima {os.environ.get('PEER_MODE', '').strip() or 'peer'}: bad setting {exc}", file=sys.stderr)
        sys.exit(2)
    for warning in warnings:
        server.log.warning("dejima %s %s: %s", config.mode, config.name, warning)


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
