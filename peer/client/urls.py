"""URL routes of the client app (PEER_MODE=client): the web app at / and the REST API under /client/api/v1/.

Pages and statuses: peer/client/views.py; API endpoints and statuses: peer/client/api.py.
"""

from django.urls import URLPattern, URLResolver, include, path

from peer.client import api, views

api_urlpatterns: list[URLPattern | URLResolver] = [
    path("tables", api.TablesView.as_view(), name="client-api-tables"),
    path("tables/<str:table>", api.TableView.as_view(), name="client-api-table"),
    path("tables/<str:table>/rows", api.RowsView.as_view(), name="client-api-rows"),
    path("tables/<str:table>/rows/<int:row_id>", api.RowView.as_view(), name="client-api-row"),
]

urlpatterns: list[URLPattern | URLResolver] = [
    path("", views.home, name="client-home"),
    path("health", views.health, name="client-health"),
    path("tables/<str:table>/", views.table_rows, name="client-table"),
    path("tables/<str:table>/add", views.row_add, name="client-row-add"),
    path("tables/<str:table>/rows/<int:row_id>/edit", views.row_edit, name="client-row-edit"),
    path("tables/<str:table>/rows/<int:row_id>/delete", views.row_delete, name="client-row-delete"),
    path("client/api/v1/", include(api_urlpatterns)),
]
