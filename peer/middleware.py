"""Django middleware shared by both modes (peer service and client app).

`content_length`: every response whose body is known gets a Content-Length header. Without one, gunicorn sends the
body chunked: the headers, the chunk and the closing empty chunk, three writes to the socket where two do, and the
client decodes chunks. Streaming responses, and those that have no body by definition (1xx, 204, 304: RFC 9110
forbids the header on 1xx and 204), are left as they are.
"""

from __future__ import annotations

from collections.abc import Callable

from django.http import HttpRequest, HttpResponseBase

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
