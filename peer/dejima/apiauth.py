"""API tokens on the gunicorn front (Django + DRF): the default authentication and permission of every endpoint of a
peer (REST_FRAMEWORK in peer/settings.py), so that a new endpoint needs a token unless it opts out as `/health` and
`/peer/v1/message` do (`authentication_classes([])`, `permission_classes([AllowAny])`).

- `BearerTokenAuthentication`: `Authorization: Bearer <token>` -> the token's `Principal` (peer.dejima.tokens), or
  401 for a malformed, unknown or revoked token; no header: nobody (the permission then answers 401).
- `TokenScope`: the principal's token has the scope the method and path need (`tokens.needed_scope`: `read` for
  every GET and for query, `write` for anything else), else 403.
- `exception_handler`: DRF's own 401 / 403 (and 503 when the tokens cannot be read) in the project's error shape
  `{"status": "error", "kind": "unauthorized" | "forbidden", "error": …}`, with `WWW-Authenticate: Bearer` on a
  401; each refusal is logged with the remote address and the path, never the token.

The lean client listener (DEJIMA_API_BIND) refuses with the same `tokens.authorize`: the same statuses and bodies.
"""

from __future__ import annotations

from typing import Any

from rest_framework import exceptions
from rest_framework.authentication import BaseAuthentication
from rest_framework.permissions import BasePermission
from rest_framework.request import Request
from rest_framework.response import Response

from peer.dejima import tokens
from peer.dejima.runtime import get_runtime
from peer.dejima.tokens import Principal, Refusal


class TokenRefused(exceptions.AuthenticationFailed):
    """A 401 (or 503) of `tokens.identify`, carried through DRF to `exception_handler`."""

    def __init__(self, refusal: Refusal) -> None:
        self.refusal = refusal
        super().__init__(refusal.message)
        self.status_code = refusal.status


class BearerTokenAuthentication(BaseAuthentication):
    def authenticate(self, request: Request) -> tuple[Principal, None] | None:
        header = request.META.get("HTTP_AUTHORIZATION")
        if header is None:
            return None  # nobody: TokenScope refuses, DRF answers 401 with this class's header
        verdict = tokens.identify(get_runtime().tokens, header)
        if isinstance(verdict, Refusal):
            raise TokenRefused(verdict)
        return verdict, None

    def authenticate_header(self, request: Request) -> str:
        return tokens.WWW_AUTHENTICATE


class TokenScope(BasePermission):
    def has_permission(self, request: Request, view: Any) -> bool:
        principal = request.user
        if not isinstance(principal, Principal):
            return False  # DRF: NotAuthenticated (401), as no authenticator succeeded
        refusal = tokens.permitted(principal, request.method or "", request.path_info)
        if refusal is None:
            return True
        self.message = refusal.message
        return False


def _refusal(exc: Exception) -> Refusal | None:
    if isinstance(exc, TokenRefused):
        return exc.refusal
    if isinstance(exc, exceptions.NotAuthenticated):
        return Refusal(401, "unauthorized", tokens.NO_TOKEN)
    if isinstance(exc, exceptions.AuthenticationFailed):
        return Refusal(401, "unauthorized", str(exc.detail))
    if isinstance(exc, exceptions.PermissionDenied):
        return Refusal(403, "forbidden", str(exc.detail))
    return None


def exception_handler(exc: Exception, context: dict[str, Any]) -> Response | None:
    """DRF's handler, with its 401 / 403 in the project's error shape, logged."""
    from rest_framework.views import exception_handler as drf_exception_handler  # (this module loads with DRF's views)

    response = drf_exception_handler(exc, context)
    refusal = _refusal(exc)
    if response is None or refusal is None:
        return response
    response.data = refusal.body()
    response.status_code = refusal.status
    if refusal.status != 401 and response.has_header("WWW-Authenticate"):
        del response["WWW-Authenticate"]  # (DRF adds it to any failed authentication; a 503 is none)
    for name, value in refusal.headers().items():
        response[name] = value
    request = context.get("request")
    if request is not None:
        tokens.log_refusal(refusal, request.method, request.path, request.META.get("REMOTE_ADDR", ""))
    return response
