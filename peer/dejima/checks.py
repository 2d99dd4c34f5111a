"""Django system checks: `python manage.py check` validates the peer's settings like the peer does at start."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from django.apps import AppConfig
from django.core.checks import CheckMessage, Error, register

from peer.dejima.config import ConfigError, load_config


@register("dejima")
def check_settings(app_configs: Sequence[AppConfig] | None, **kwargs: Any) -> list[CheckMessage]:
    try:
        load_config()
    except ConfigError as exc:
        return [Error(str(exc), hint="see docs/settings.md", id="dejima.E001", obj=exc.setting)]
    return []
