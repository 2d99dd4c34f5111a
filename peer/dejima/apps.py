from django.apps import AppConfig


class DejimaConfig(AppConfig):
    name = "peer.dejima"
    label = "dejima"
    verbose_name = "Dejima peer"
