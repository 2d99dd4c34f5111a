"""Django system checks: `python manage.py check` validates the peer's settings like the peer does at start."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from django.apps import AppConfig
from django.core.checks import CheckMessage, Error, Warning, register

from peer.dejima.config import ConfigError, check_transport, load_config


@register("dejima")
def check_settings(app_configs: Sequence[AppConfig] | None, **kwargs: Any) -> list[CheckMessage]:
    try:
        warnings = check_transport(load_config())
    except ConfigError as exc:
        return [Error(str(exc), hint="see docs/settings.md", id="dejima.E001", obj=exc.setting)]
    return [Warning(text, hint="see docs/settings.md", id="dejima.W001") for text in warnings]
