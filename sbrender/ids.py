"""Job ids: the only thing output file names are made from."""

from __future__ import annotations

import hashlib
import re
import secrets
import time

ID_MAX = 128
ID_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")
JOB_SUFFIXES = (".yaml", ".yml", ".json")
IGNORED_SUFFIXES = (".tmp", ".part")


def is_valid_id(text: str) -> bool:
    return ID_PATTERN.fullmatch(text) is not None


def id_problem(text: str) -> str | None:
    """Why ``text`` is not a job id, or None when it is one."""
    if not text:
        return "a job id must not be empty"
    if len(text) > ID_MAX:
        return f"a job id has at most {ID_MAX} characters, this one has {len(text)}"
    if not text[0].isascii() or not text[0].isalnum():
        return "a job id must start with a letter or a digit"
    if not is_valid_id(text):
        return "a job id may hold only letters, digits, '.', '_' and '-'"
    return None


def is_job_file_name(name: str) -> bool:
    """Whether a name in the inbox is a job file (not hidden, not a temp file)."""
    return (
        not name.startswith(".")
        and not name.endswith(IGNORED_SUFFIXES)
        and name.lower().endswith(JOB_SUFFIXES)
    )


def stem(name: str) -> str:
    """``cat-42.yaml`` -> ``cat-42``."""
    return name.rsplit(".", 1)[0]


def safe_id_for(name: str) -> str:
    """A valid id for a file whose own name is not one, stable for the same name.

    Unusable characters become ``_`` and a short hash of the original name keeps
    two different bad names apart.
    """
    digest = hashlib.sha256(name.encode("utf-8", "surrogateescape")).hexdigest()[:8]
    cleaned = re.sub(r"[^A-Za-z0-9._-]", "_", stem(name)).lstrip("._-")[: ID_MAX - 18]
    return f"invalid-{cleaned}-{digest}" if cleaned else f"invalid-{digest}"


def batch_id(file_id: str, index: int, total: int) -> str:
    """The id of job ``index`` (0-based) of a batch of ``total``: ``<stem>-001``."""
    width = max(3, len(str(total)))
    return f"{file_id}-{index + 1:0{width}d}"


def new_id(prefix: str = "job") -> str:
    """A fresh, sortable, unique id for ``sbrender submit``."""
    stamp = time.strftime("%Y%m%d-%H%M%S", time.gmtime())
    return f"{prefix}-{stamp}-{secrets.token_hex(3)}"
