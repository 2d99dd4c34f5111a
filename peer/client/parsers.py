"""The client API's JSON parser: DRF's `JSONParser`, after the nesting check of the peer's own endpoints.

A body nested deeper than `jsonvalues.MAX_DEPTH` is refused before anything decodes it (the standard decoder would
recurse once per level, up to a RecursionError): 400 `{"status": "error", "kind": "bad_request", "error": "JSON
nested deeper than 64 levels"}`, the answer of the peer's /api/v1/exec to the same body. Everything else is DRF's
(malformed JSON, NaN/Infinity: 400 `invalid`).
"""

from __future__ import annotations

import io
from collections.abc import Mapping
from typing import IO, Any

from django.conf import settings
from rest_framework.exceptions import APIException
from rest_framework.parsers import JSONParser

from peer.dejima.jsonvalues import TooDeep, check_depth


class NestedTooDeep(APIException):
    status_code = 400
    default_code = "bad_request"


class DepthCheckedJSONParser(JSONParser):
    def parse(
        self, stream: IO[Any], media_type: str | None = None, parser_context: Mapping[str, Any] | None = None
    ) -> dict[str, Any]:
        raw = stream.read() if stream is not None else b""
        encoding = (parser_context or {}).get("encoding") or settings.DEFAULT_CHARSET
        try:
            text = raw.decode(encoding)  # as DRF will decode it
        except (LookupError, UnicodeError):
            text = None  # DRF refuses the charset or the bytes itself
        if text is not None:
            try:
                check_depth(text.encode("utf-8", "surrogatepass"))
            except TooDeep as exc:
                raise NestedTooDeep(str(exc)) from None
        return super().parse(io.BytesIO(raw), media_type, parser_context)
