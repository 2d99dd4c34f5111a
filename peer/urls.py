"""URL routes of the peer service."""

from django.http import HttpRequest, JsonResponse
from django.urls import URLPattern, path


def health(request: HttpRequest) -> JsonResponse:
    return JsonResponse({"status": "ok"})


urlpatterns: list[URLPattern] = [path("health", health)]
