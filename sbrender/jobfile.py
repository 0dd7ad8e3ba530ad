"""Reading job files as hostile input: safe open, size cap, strict decoding.

A drop folder is an attack surface. The file is opened without following
symlinks and without blocking (a FIFO must not hang the daemon), then the
*open descriptor* is checked: a regular file with one link, no larger than the
cap. YAML is read with a safe loader that also refuses anchors and aliases
(billion laughs) and duplicate keys; JSON refuses NaN, Infinity and duplicate keys.
"""

from __future__ import annotations

import json
import os
import stat
from typing import Any

import yaml

from .errors import JobError, UnsafeFileError

_OPEN_FLAGS = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0)
_KINDS = {
    stat.S_IFDIR: "a directory",
    stat.S_IFIFO: "a FIFO",
    stat.S_IFSOCK: "a socket",
    stat.S_IFCHR: "a character device",
    stat.S_IFBLK: "a block device",
    stat.S_IFLNK: "a symbolic link",
}


def read_bytes(path: str | os.PathLike[str], max_bytes: int) -> bytes:
    """The content of a job file, or ``UnsafeFileError`` saying why it was not read."""
    try:
        fd = os.open(path, _OPEN_FLAGS)
    except FileNotFoundError:
        raise  # gone (claimed by a peer, deleted): not a property of the file
    except OSError as err:
        if os.path.islink(path):
            raise UnsafeFileError("job file is a symbolic link; it was not followed",
                                  hint="put the file itself in the inbox") from None
        raise UnsafeFileError(f"cannot open job file: {err.strerror}") from None
    try:
        st = os.fstat(fd)
        kind = stat.S_IFMT(st.st_mode)
        if kind != stat.S_IFREG:
            raise UnsafeFileError(f"job file is {_KINDS.get(kind, 'not a regular file')}, not a regular file")
        if st.st_nlink != 1:
            raise UnsafeFileError(f"job file has {st.st_nlink} hard links; only a file with one link is read",
                                  hint="copy the file into the inbox instead of linking it")
        if st.st_size > max_bytes:
            raise UnsafeFileError(f"job file is {st.st_size} bytes, more than the limit of {max_bytes}",
                                  hint="split it into several files or raise limits.max_file_bytes; a file "
                                       "with an init_image may be larger by that image's base64 only, up to "
                                       "limits.max_image_bytes: a larger image needs that limit raised")
        chunks: list[bytes] = []
        total = 0
        while total <= max_bytes:
            chunk = os.read(fd, 65536)
            if not chunk:
                break
            chunks.append(chunk)
            total += len(chunk)
        if total > max_bytes:
            raise UnsafeFileError(f"job file grew past the limit of {max_bytes} bytes while being read")
        return b"".join(chunks)
    finally:
        os.close(fd)


def decode_text(data: bytes) -> str:
    """UTF-8 text (a BOM is allowed); anything else is a ``JobError`` naming the offset."""
    if not data.strip():
        raise JobError("job file is empty", hint="write a mapping with at least a prompt")
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as err:
        raise JobError(f"job file is not UTF-8 text: byte 0x{data[err.start]:02x} at offset {err.start}",
                       hint="save the file as UTF-8") from None


class _StrictLoader(getattr(yaml, "CSafeLoader", yaml.SafeLoader)):  # type: ignore[misc]
    """Safe loader that refuses duplicate keys."""


def _mapping_without_duplicates(loader: yaml.SafeLoader, node: yaml.MappingNode) -> dict[Any, Any]:
    seen: set[Any] = set()
    for key_node, _ in node.value:
        key = loader.construct_object(key_node, deep=True)
        try:
            hash(key)
        except TypeError:
            # `? [a, b]` makes a list key; `key in seen` would raise TypeError, not a JobError.
            raise JobError(f"a mapping key must be a plain value, not {type(key).__name__} "
                           f"(line {key_node.start_mark.line + 1})") from None
        if key in seen:
            raise JobError(f"key {key!r} appears twice (line {key_node.start_mark.line + 1})",
                           field=str(key))
        seen.add(key)
    return loader.construct_mapping(node, deep=True)


_StrictLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _mapping_without_duplicates)


MAX_YAML_DEPTH = 100
_OPENING = (yaml.BlockMappingStartToken, yaml.BlockSequenceStartToken, yaml.FlowMappingStartToken,
            yaml.FlowSequenceStartToken)
_CLOSING = (yaml.BlockEndToken, yaml.FlowMappingEndToken, yaml.FlowSequenceEndToken)


def parse_yaml(text: str) -> Any:
    try:
        # The C scanner where there is one: the pure-Python one is quadratic in flow
        # nesting, and 1 MB of "[" would hold the daemon for hours.
        depth = 0
        for token in yaml.scan(text, Loader=_StrictLoader):
            if isinstance(token, (yaml.AnchorToken, yaml.AliasToken)):
                line = token.start_mark.line + 1
                raise JobError(f"YAML anchors and aliases are not allowed (line {line})",
                               hint="write each value out in full")
            # Counted here, not left to a RecursionError in the constructor: how deep that
            # goes depends on the interpreter's recursion limit, which libraries raise.
            if isinstance(token, _OPENING):
                depth += 1
                if depth > MAX_YAML_DEPTH:
                    raise JobError("YAML is nested too deeply",
                                   hint=f"a job file nests at most {MAX_YAML_DEPTH} mappings and lists")
            elif isinstance(token, _CLOSING):
                depth -= 1
        return yaml.load(text, Loader=_StrictLoader)  # noqa: S506 - a SafeLoader subclass
    except yaml.constructor.ConstructorError as err:
        mark = f" (line {err.problem_mark.line + 1})" if err.problem_mark else ""
        raise JobError(f"YAML tag not allowed{mark}: {err.problem}",
                       hint="job files hold plain strings, numbers, lists and mappings") from None
    except yaml.YAMLError as err:
        raise JobError(f"not valid YAML: {' '.join(str(err).split())}") from None
    except RecursionError:
        # Nested mappings recurse through the constructor well before libyaml's depth limit.
        raise JobError("YAML is nested too deeply") from None


def _reject_constant(name: str) -> Any:
    raise JobError(f"JSON value {name} is not allowed", hint="use a finite number")


def _object_without_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in pairs:
        if key in out:
            raise JobError(f"key {key!r} appears twice", field=key)
        out[key] = value
    return out


_JSON = json.JSONDecoder(parse_constant=_reject_constant, object_pairs_hook=_object_without_duplicates)


def parse_json(text: str) -> Any:
    try:
        if text.startswith("\ufeff"):  # json.loads checks this; the decoder itself does not
            raise json.JSONDecodeError("Unexpected UTF-8 BOM (decode using utf-8-sig)", text, 0)
        return _JSON.decode(text)
    except json.JSONDecodeError as err:
        raise JobError(f"not valid JSON: {err.msg} (line {err.lineno}, column {err.colno})") from None
    except RecursionError:
        raise JobError("JSON is nested too deeply") from None


PARSERS = {".yaml": parse_yaml, ".yml": parse_yaml, ".json": parse_json}


def parse_document(name: str, data: bytes) -> Any:
    """The document a job file holds, parsed by its extension."""
    suffix = os.path.splitext(name)[1].lower()
    if suffix not in PARSERS:
        raise JobError(f"unknown job file type {suffix!r}", hint="name it .yaml, .yml or .json")
    return PARSERS[suffix](decode_text(data))
