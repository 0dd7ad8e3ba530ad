"""Prompt editing and alternation, scheduled over the steps as AUTOMATIC1111 1.10 does.

Torch-free. ``[from:to:when]`` draws ``from`` until step ``when``, then ``to``;
``[to:when]`` adds ``to`` from then on and ``[from::when]`` removes ``from``.
``when`` with a ``.`` is a fraction of the steps, else a step number. ``[a|b]``
alternates a and b step by step. Both nest, inside emphasis too; every other
bracket is kept verbatim for the emphasis parser (``sbrender.prompts``).

``schedule(text, steps)`` gives A1111's list of ``(end_at_step, text)``: the
denoiser's call k (0-based) uses the first entry whose ``end_at_step >= k``
(so ``[red:green:5]`` draws red for calls 0 to 5, as A1111 does). A prompt
that does not parse (a ``|`` outside brackets, say) is one entry, verbatim.

A1111 reads these with a lark grammar; this is our own recursive descent with
the same result on the forms people write. Where a bracket does not make one
of the forms at the top level it stays literal text, as A1111's grammar allows;
inside another bracket it spoils that bracket, which then stays literal.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

_NUMBER = re.compile(r"\s*([+-]?(?:\d+(?:\.\d*)?|\.\d+)(?:[eE][+-]?\d+)?)\s*")
_ENDS = ")]:|"  # characters that end a prompt inside a bracket


@dataclass(frozen=True)
class Edit:
    before: tuple[Node, ...]
    after: tuple[Node, ...]
    when: str  # as written: "5", "0.25"


@dataclass(frozen=True)
class Alternate:
    options: tuple[tuple[Node, ...], ...]


Node = str | Edit | Alternate


class _Unparsed(Exception):
    pass


class _Parser:
    def __init__(self, text: str) -> None:
        self.text = text

    def sequence(self, at: int, top: bool) -> tuple[list[Node], int]:
        """Nodes from ``at`` up to an unbalanced end character (or the end of the text)."""
        nodes: list[Node] = []
        text = self.text
        while at < len(text):
            c = text[at]
            if c == "\\":
                nodes.append(text[at:at + 2])
                at += 2
            elif c in "([":
                try:
                    node, at = self.bracket(at)
                    nodes.extend(node)
                except _Unparsed:
                    if not top:
                        raise
                    nodes.append(c)  # a stray bracket, as A1111's grammar allows at the top
                    at += 1
            elif c in _ENDS:
                if not top:
                    return nodes, at
                if c == "|":
                    raise _Unparsed()  # A1111's grammar has no place for it: the prompt stays verbatim
                nodes.append(c)
                at += 1
            else:
                end = at
                while end < len(text) and text[end] not in "\\([" + _ENDS:
                    end += 1
                nodes.append(text[at:end])
                at = end
        if not top:
            raise _Unparsed()  # a bracket left open
        return nodes, at

    def bracket(self, at: int) -> tuple[list[Node], int]:
        """The bracket opening at ``at``: emphasis (kept as text), an edit or an alternation."""
        opening = self.text[at]
        first, at = self.sequence(at + 1, top=False)
        end = self.text[at]
        if opening == "(":
            if end == ")":
                return ["(", *first, ")"], at + 1
            if end == ":":
                weight, at = self.sequence(at + 1, top=False)
                if self.text[at] == ")":
                    return ["(", *first, ":", *weight, ")"], at + 1
            raise _Unparsed()
        if end == "]":
            return ["[", *first, "]"], at + 1
        if end == "|":
            options = [tuple(first)]
            while self.text[at] == "|":
                option, at = self.sequence(at + 1, top=False)
                options.append(tuple(option))
            if self.text[at] == "]":
                return [Alternate(tuple(options))], at + 1
            raise _Unparsed()
        if end == ":":
            second, at = self.sequence(at + 1, top=False)
            if self.text[at] == "]" and (when := _number(second)) is not None:
                return [Edit((), tuple(first), when)], at + 1  # [to:when]
            if self.text[at] == ":":
                close = self.text.find("]", at + 1)
                when = _NUMBER.fullmatch(self.text, at + 1, close) if close != -1 else None
                if when is not None:
                    return [Edit(tuple(first), tuple(second), when.group(1))], close + 1
        raise _Unparsed()


def _number(nodes: list[Node]) -> str | None:
    if len(nodes) != 1 or not isinstance(nodes[0], str):
        return None
    match = _NUMBER.fullmatch(nodes[0])
    return match.group(1) if match else None


def parse(text: str) -> tuple[Node, ...] | None:
    """The prompt's nodes, or None where A1111 would use the text verbatim."""
    try:
        nodes, _ = _Parser(text).sequence(0, top=True)
    except _Unparsed:
        return None
    return tuple(nodes)


def _walk(nodes: tuple[Node, ...]) -> list[Node]:
    out: list[Node] = []
    for node in nodes:
        out.append(node)
        if isinstance(node, Edit):
            out += _walk(node.before) + _walk(node.after)
        elif isinstance(node, Alternate):
            for option in node.options:
                out += _walk(option)
    return out


def _end_step(when: str, steps: int) -> int:
    value = float(when) * steps if "." in when else float(when)
    return min(steps, int(value))


def _text_at(nodes: tuple[Node, ...], step: int, steps: int) -> str:
    parts: list[str] = []
    for node in nodes:
        if isinstance(node, str):
            parts.append(node)
        elif isinstance(node, Edit):
            parts.append(_text_at(node.before if step <= _end_step(node.when, steps) else node.after, step, steps))
        else:
            parts.append(_text_at(node.options[(step - 1) % len(node.options)], step, steps))
    return "".join(parts)


def is_scheduled(text: str) -> bool:
    """Whether the prompt edits or alternates (a cheap test before ``schedule``)."""
    nodes = parse(text) if "[" in text else None
    return nodes is not None and any(isinstance(n, (Edit, Alternate)) for n in _walk(nodes))


def schedule(text: str, steps: int) -> list[tuple[int, str]]:
    """A1111's ``(end_at_step, text)`` list for a prompt over ``steps`` steps
    (A1111 counts twice the steps for second-order samplers)."""
    nodes = parse(text) if "[" in text else None
    if nodes is None:
        return [(steps, text)]
    ends = {steps}
    for node in _walk(nodes):
        if isinstance(node, Edit) and (end := _end_step(node.when, steps)) >= 1:
            ends.add(end)
        elif isinstance(node, Alternate):
            ends.update(range(1, steps + 1))
    return [(end, _text_at(nodes, end, steps)) for end in sorted(ends)]


def at_call(entries: list[tuple[int, str]], call: int) -> int:
    """The index of the entry the denoiser's ``call`` (0-based) uses (the first, past the end, as A1111)."""
    return next((k for k, (end, _) in enumerate(entries) if call <= end), 0)
