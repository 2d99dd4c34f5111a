"""URL routes of the peer service (endpoints and statuses: peer/dejima/views.py; OpenAPI schema: /api/v1/openapi.json).

In client mode (PEER_MODE=client) only the client app is served instead (peer/client/urls.py)."""

from django.conf import settings
from django.urls import URLPattern, URLResolver, path
from drf_spectacular.views import SpectacularJSONAPIView

from peer.dejima import views

urlpatterns: list[URLPattern | URLResolver] = [
    path("health", views.health),
    path("peer/v1/message", views.message),
    path("api/v1/status", views.status),
    path("api/v1/groups", views.groups),
    path("api/v1/exec", views.exec_sql),
    path("api/v1/query", views.query),
    path("api/v1/views/<str:view>", views.view_rows),
    path("api/v1/prepared", views.prepared),
    path("api/v1/txlog", views.txlog_view),
    path("api/v1/machinery", views.machinery_view),
    path("api/v1/openapi.json", SpectacularJSONAPIView.as_view(), name="openapi"),
]

handler404 = "peer.dejima.views.not_found"  # JSON, not Django's page

if settings.PEER_MODE == "client":
    from peer.client.urls import urlpatterns as client_urlpatterns

    urlpatterns = client_urlpatterns
    handler404 = "peer.client.api.not_found"
    handler400 = "peer.client.api.bad_request"
