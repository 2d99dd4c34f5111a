"""URL routes of the client app (PEER_MODE=client): the web app at / and the REST API under /client/api/v1/.

Pages and statuses: peer/client/views.py; API endpoints and statuses: peer/client/api.py; login: peer/client/auth.py
(every page needs a logged-in user: LoginRequiredMiddleware; the API checks its own, session or HTTP Basic).
"""

from collections.abc import Callable
from typing import Any

from django.contrib.auth import views as auth_views
from django.contrib.auth.decorators import login_not_required
from django.urls import URLPattern, URLResolver, include, path
from rest_framework.views import APIView

from peer.client import api, views


def _api(view: type[APIView]) -> Callable[..., Any]:
    """The API authenticates itself (401 JSON, HTTP Basic or session), not with the pages' redirect to /login."""
    return login_not_required(view.as_view())


api_urlpatterns: list[URLPattern | URLResolver] = [
    path("tables", _api(api.TablesView), name="client-api-tables"),
    path("tables/<str:table>", _api(api.TableView), name="client-api-table"),
    path("tables/<str:table>/rows", _api(api.RowsView), name="client-api-rows"),
    path("tables/<str:table>/rows/<int:row_id>", _api(api.RowView), name="client-api-row"),
    path("openapi.json", _api(api.SchemaView), name="client-api-openapi"),
]

urlpatterns: list[URLPattern | URLResolver] = [
    path("", views.home, name="client-home"),
    path("health", views.health, name="client-health"),
    path(
        "login",
        auth_views.LoginView.as_view(template_name="client/login.html", redirect_authenticated_user=True),
        name="client-login",
    ),
    path("logout", auth_views.LogoutView.as_view(), name="client-logout"),
    path("tables/<str:table>/", views.table_rows, name="client-table"),
    path("tables/<str:table>/add", views.row_add, name="client-row-add"),
    path("tables/<str:table>/rows/<int:row_id>/edit", views.row_edit, name="client-row-edit"),
    path("tables/<str:table>/rows/<int:row_id>/delete", views.row_delete, name="client-row-delete"),
    path("client/api/v1/", include(api_urlpatterns)),
]
