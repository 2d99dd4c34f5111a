"""Django middleware shared by both modes (peer service and client app).

`content_length`: every response whose body is known gets a Content-Length header. Without one, gunicorn sends the
body chunked: the headers, the chunk and the closing empty chunk, three writes to the socket where two do, and the
client decodes chunks. Streaming responses, and those that have no body by definition (1xx, 204, 304: RFC 9110
forbids the header on 1xx and 204), are left as they are.

`RecursionIsBadRequest`: a view that fails with RecursionError (input nested too deeply for the code that handles
it; request bodies nested deeper than `jsonvalues.MAX_DEPTH` are refused before they are decoded) is answered 400
in the API's error shape, not 500.
"""

from __future__ import annotations

from collections.abc import Callable

from django.http import HttpRequest, HttpResponseBase, JsonResponse

from peer.dejima.jsonvalues import TOO_DEEP_TO_HANDLE

NO_BODY = frozenset({204, 304})


def content_length(
    get_response: Callable[[HttpRequest], HttpResponseBase],
) -> Callable[[HttpRequest], HttpResponseBase]:
    def middleware(request: HttpRequest) -> HttpResponseBase:
        response = get_response(request)
        if (
            not response.streaming
            and response.status_code not in NO_BODY
            and response.status_code >= 200
            and not response.has_header("Content-Length")
        ):
            response.headers["Content-Length"] = str(len(response.content))  # type: ignore[attr-defined]
        return response

    return middleware


class RecursionIsBadRequest:
    def __init__(self, get_response: Callable[[HttpRequest], HttpResponseBase]) -> None:
        self.get_response = get_response

    def __call__(self, request: HttpRequest) -> HttpResponseBase:
        return self.get_response(request)

    def process_exception(self, request: HttpRequest, exception: Exception) -> HttpResponseBase | None:
        if not isinstance(exception, RecursionError):
            return None
        return JsonResponse({"status": "error", "kind": "bad_request", "error": TOO_DEEP_TO_HANDLE}, status=400)
