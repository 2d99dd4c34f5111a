"""The API tokens in the peer's OpenAPI schema (drf-spectacular; loaded by the app's `ready`).

- `BearerTokenScheme`: the security scheme `bearerToken` (HTTP bearer) of `apiauth.BearerTokenAuthentication`, so
  every operation behind it says `security: [{bearerToken: []}]`; the two open ones (`/health`, `/peer/v1/message`)
  have no authentication class and say none.
- `document_token_refusals` (a postprocessing hook, SPECTACULAR_SETTINGS): each of those operations documents its
  401 (with WWW-Authenticate) and 403, the scope it needs included.
"""

from __future__ import annotations

from typing import Any

from drf_spectacular.extensions import OpenApiAuthenticationExtension
from drf_spectacular.openapi import AutoSchema

from peer.dejima import tokens

SCHEME = "bearerToken"
ERROR = {"application/json": {"schema": {"$ref": "#/components/schemas/Error"}}}


class BearerTokenScheme(OpenApiAuthenticationExtension):  # type: ignore[no-untyped-call]
    target_class = "peer.dejima.apiauth.BearerTokenAuthentication"
    name = SCHEME

    def get_security_definition(self, auto_schema: AutoSchema) -> dict[str, str]:
        return {
            "type": "http",
            "scheme": "bearer",
            "description": "An API token of this peer (`python manage.py dejima_token create NAME --scope read "
            "--scope write`): `read` for queries and every GET, `write` for exec.",
        }


def document_token_refusals(result: dict[str, Any], generator: Any, request: Any, public: bool) -> dict[str, Any]:
    for path, operations in result.get("paths", {}).items():
        for method, operation in operations.items():
            if not any(SCHEME in requirement for requirement in operation.get("security", [])):
                continue
            scope = tokens.needed_scope(method.upper(), path)
            responses = operation.setdefault("responses", {})
            responses["401"] = {
                "description": "no API token, or a malformed, unknown or revoked one; nothing was done",
                "headers": {"WWW-Authenticate": {"schema": {"type": "string"}, "description": tokens.WWW_AUTHENTICATE}},
                "content": ERROR,
            }
            forbidden = f"the API token lacks the '{scope}' scope this needs; nothing was done"
            if "403" in responses:  # the endpoint's own 403 stays documented beside it
                responses["403"]["description"] = f"{forbidden}. Or: {responses['403'].get('description', '')}"
            else:
                responses["403"] = {"description": forbidden, "content": ERROR}
            operation["responses"] = dict(sorted(responses.items()))
    return result
