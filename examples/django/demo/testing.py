"""``manage.py test`` from any working folder (Django's default looks in ``.``)."""

from __future__ import annotations

from typing import Any

from django.conf import settings
from django.test.runner import DiscoverRunner


class ExampleRunner(DiscoverRunner):
    def build_suite(self, test_labels: Any = None, **kwargs: Any) -> Any:
        # Run from the repository root, the default would find no tests and pass.
        return super().build_suite(test_labels or [str(settings.BASE_DIR)], **kwargs)
