"""Text chunks of a PNG, read and dropped without decoding the image."""

from __future__ import annotations

import struct
import zlib

SIGNATURE = b"\x89PNG\r\n\x1a\n"
_TEXT_TYPES = (b"tEXt", b"iTXt", b"zTXt")


def _chunks(data: bytes) -> list[tuple[int, int, bytes]]:
    """``(start, end, type)`` of each chunk; raises ``ValueError`` on a broken file."""
    if not data.startswith(SIGNATURE):
        raise ValueError("not a PNG")
    out = []
    pos = len(SIGNATURE)
    while pos + 8 <= len(data):
        (length,) = struct.unpack(">I", data[pos:pos + 4])
        kind = data[pos + 4:pos + 8]
        end = pos + 12 + length
        if end > len(data):
            raise ValueError("truncated PNG chunk")
        out.append((pos, end, kind))
        pos = end
        if kind == b"IEND":
            break
    return out


def _decode(kind: bytes, body: bytes) -> tuple[str, str]:
    key, _, rest = body.partition(b"\0")
    if kind == b"tEXt":
        return key.decode("latin-1"), rest.decode("latin-1")
    if kind == b"zTXt":
        return key.decode("latin-1"), zlib.decompress(rest[1:]).decode("latin-1")
    compressed, rest = rest[0], rest[2:]
    _lang, _, rest = rest.partition(b"\0")
    _translated, _, text = rest.partition(b"\0")
    return key.decode("latin-1"), (zlib.decompress(text) if compressed else text).decode("utf-8")


def text_chunks(data: bytes) -> dict[str, str]:
    """Every text chunk's keyword and text (A1111's ``parameters`` among them)."""
    out = {}
    for start, end, kind in _chunks(data):
        if kind in _TEXT_TYPES:
            key, text = _decode(kind, data[start + 8:end - 4])
            out[key] = text
    return out


def without_text(data: bytes, keyword: str) -> bytes:
    """The PNG with the text chunks named ``keyword`` left out (pixels and other
    chunks byte for byte as they were)."""
    parts = [data[:len(SIGNATURE)]]
    for start, end, kind in _chunks(data):
        if kind in _TEXT_TYPES and _decode(kind, data[start + 8:end - 4])[0] == keyword:
            continue
        parts.append(data[start:end])
    return b"".join(parts)
