"""Settings of the example site: one app, sqlite, and the sbrender spool.

The spool folders are read from the same variables the daemon reads
(``SBRENDER_INBOX``, ``SBRENDER_OUTBOX``, ``SBRENDER_STATE``), so one
environment file can serve both. Unset, they are the repository's own
``inbox/``, ``outbox/`` and ``state/``: what ``make run`` uses.
"""

from __future__ import annotations

import os
from pathlib import Path

BASE_DIR = Path(__file__).resolve().parent.parent
REPO_DIR = BASE_DIR.parent.parent

SBRENDER_INBOX = os.environ.get("SBRENDER_INBOX", str(REPO_DIR / "inbox"))
SBRENDER_OUTBOX = os.environ.get("SBRENDER_OUTBOX", str(REPO_DIR / "outbox"))
SBRENDER_STATE = os.environ.get("SBRENDER_STATE", str(REPO_DIR / "state"))

# An example's defaults; a deployment sets all three.
SECRET_KEY = os.environ.get("DJANGO_SECRET_KEY", "django-insecure-sbrender-example")
DEBUG = os.environ.get("DJANGO_DEBUG", "1") == "1"
ALLOWED_HOSTS = [h for h in os.environ.get("DJANGO_ALLOWED_HOSTS", "").split(",") if h]

INSTALLED_APPS = ["renders"]
MIDDLEWARE = [
    "django.middleware.security.SecurityMiddleware",
    "django.middleware.common.CommonMiddleware",
    "django.middleware.csrf.CsrfViewMiddleware",
]
ROOT_URLCONF = "demo.urls"
TEMPLATES = [{"BACKEND": "django.template.backends.django.DjangoTemplates", "APP_DIRS": True}]
WSGI_APPLICATION = "demo.wsgi.application"
TEST_RUNNER = "demo.testing.ExampleRunner"

DATABASES = {"default": {"ENGINE": "django.db.backends.sqlite3", "NAME": BASE_DIR / "db.sqlite3"}}
DEFAULT_AUTO_FIELD = "django.db.models.BigAutoField"
USE_TZ = True
