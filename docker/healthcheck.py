"""HEALTHCHECK of the dejima-peer image: GET /health on the port of DEJIMA_BIND; exit 0 on 200, else 1.

The peer answers 503 while its database is down; the client app answers 200 while it serves. With TLS
(DEJIMA_TLS_CA_FILE) the check is https, the certificate verified against that CA for 127.0.0.1 (every certificate
peer.deploygen issues names it)."""

from __future__ import annotations

import os
import ssl
import sys
import urllib.error
import urllib.request


def health_url(bind: str, tls: bool = False) -> str:
    port = bind.strip().rsplit(":", 1)[-1] or "8000"
    return f"{'https' if tls else 'http'}://127.0.0.1:{port}/health"


def main() -> int:
    ca_file = os.environ.get("DEJIMA_TLS_CA_FILE", "").strip()
    url = health_url(os.environ.get("DEJIMA_BIND", "127.0.0.1:8000"), tls=bool(ca_file))
    context = ssl.create_default_context(cafile=ca_file) if ca_file else None
    try:
        with urllib.request.urlopen(url, timeout=4, context=context) as resp:  # noqa: S310  (a fixed URL on loopback)
            return 0 if resp.status == 200 else 1
    except (urllib.error.URLError, OSError) as exc:
        print(f"unhealthy: {url}: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
