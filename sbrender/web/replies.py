"""Error bodies in the shape each API's clients expect, chosen by path.

The old server's envelope ``{"error", "code", "detail", "meta"}`` on its routes,
A1111's ``{"error", "detail", "body", "errors"}`` under ``/sdapi``, and RFC 9457
problem details everywhere else (the job API).
"""

from __future__ import annotations

import json
from http import HTTPStatus
from typing import Any

LEGACY_PATHS = ("/generate", "/health")
A1111_PREFIX = "/sdapi/"


def family(path: str) -> str:
    if path in LEGACY_PATHS or path == "/":
        return "legacy"
    if path.startswith(A1111_PREFIX):
        return "a1111"
    return "problem"


def error_body(path: str, status: int, kind: str, message: str,
               meta: dict[str, Any] | None = None) -> tuple[bytes, str]:
    """The body and its media type for an error on ``path``."""
    shape = family(path)
    if shape == "legacy":
        body: dict[str, Any] = {"error": kind, "code": status, "detail": message, "meta": meta}
        media = "application/json"
    elif shape == "a1111":
        body = {"error": kind, "detail": message, "body": "", "errors": meta or ""}
        media = "application/json"
    else:
        body = {"type": "about:blank", "title": HTTPStatus(status).phrase, "status": status, "detail": message,
                "error": kind, **(meta or {})}
        media = "application/problem+json"
    return json.dumps(body, ensure_ascii=False).encode("utf-8"), media
