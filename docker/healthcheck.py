"""HEALTHCHECK of the dejima-peer image: GET /health on the port of DEJIMA_BIND; exit 0 on 200, else 1.

The peer answers 503 while its database is down; the client app answers 200 while it serves."""

from __future__ import annotations

import os
import sys
import urllib.error
import urllib.request


def health_url(bind: str) -> str:
    port = bind.strip().rsplit(":", 1)[-1] or "8000"
    return f"http://127.0.0.1:{port}/health"


def main() -> int:
    url = health_url(os.environ.get("DEJIMA_BIND", "127.0.0.1:8000"))
    try:
        with urllib.request.urlopen(url, timeout=4) as resp:  # noqa: S310  (a fixed http URL on loopback)
            return 0 if resp.status == 200 else 1
    except (urllib.error.URLError, OSError) as exc:
        print(f"unhealthy: {url}: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
