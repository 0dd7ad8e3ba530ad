from __future__ import annotations

from django.apps import AppConfig


class RendersConfig(AppConfig):
    name = "renders"
    default_auto_field = "django.db.models.BigAutoField"
