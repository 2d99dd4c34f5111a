from django.apps import AppConfig


class DejimaConfig(AppConfig):
    name = "peer.dejima"
    label = "dejima"
    verbose_name = "Dejima peer"

    def ready(self) -> None:
        from peer.dejima import (
            checks,  # noqa: F401  (registers the system checks)
            schema,  # noqa: F401  (the API tokens' security scheme in the OpenAPI schema)
        )
