"""URL routes of the peer service (endpoints and statuses: peer/dejima/views.py)."""

from django.urls import URLPattern, path

from peer.dejima import views

urlpatterns: list[URLPattern] = [
    path("health", views.health),
    path("peer/v1/message", views.message),
    path("api/v1/status", views.status),
    path("api/v1/groups", views.groups),
    path("api/v1/exec", views.exec_sql),
    path("api/v1/query", views.query),
    path("api/v1/views/<str:view>", views.view_rows),
    path("api/v1/prepared", views.prepared),
]
