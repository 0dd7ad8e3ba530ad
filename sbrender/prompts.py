"""Prompts as AUTOMATIC1111 1.10 reads them: emphasis, ``BREAK``, extra-network tags.

Torch-free: the job checks use it before anything is queued, and the renderer
uses the same parse to build the conditioning (``sbrender.conditioning``).

- Emphasis: ``(x)`` multiplies x's weight by 1.1, ``[x]`` divides it by 1.1,
  ``(x:1.3)`` multiplies it by 1.3; nesting multiplies; ``\\(`` ``\\)`` ``\\[``
  ``\\]`` ``\\\\`` are literal; a bracket left open applies to the rest of the
  prompt; an unmatched ``)`` or ``]`` is literal text.
- ``BREAK`` (uppercase, outside brackets) ends a 75-token chunk.
- ``<kind:args>`` tags (``<lora:name:0.8>``) are taken out of the positive
  prompt's text and kept as data.

Prompt editing (``[a:b:N]``) and alternation (``[a|b]``) are scheduled over the
steps first (``sbrender.editing``); each scheduled text is parsed here.
Composable prompts (``AND``) and extra networks other than LoRAs (read by
``sbrender.loras``) are not rendered yet: ``problem`` names them, so a job that
uses them is refused instead of drawn differently.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

EMPHASIS = 1.1
BREAK_WEIGHT = -1.0  # the weight that marks a BREAK segment (A1111's own marker)
Segment = tuple[str, float]

_TOKEN = re.compile(r"""
    \\[()\[\]\\]                    # an escaped bracket or backslash: literal
  | \\                              # a lone backslash: dropped
  | [(\[]                           # an opening bracket
  | :\s*([+-]?[.\d]+)\s*\)          # an explicit weight closing a round bracket
  | [)\]]                           # a closing bracket
  | [^\\()\[\]:]+                   # plain text
  | :                               # a colon that is not a weight: literal
""", re.VERBOSE)
_BREAK = re.compile(r"\s*\bBREAK\b\s*")
_NETWORK = re.compile(r"<(\w+):([^>]+)>")
_AND = re.compile(r"\bAND\b")


@dataclass(frozen=True)
class Network:
    """An extra-network tag such as ``<lora:name:0.8>``: its kind and its ``:``-separated arguments."""

    kind: str
    args: tuple[str, ...]
    text: str  # as written, for messages and infotext

    @property
    def name(self) -> str:
        return self.args[0] if self.args else ""


@dataclass(frozen=True)
class Prompt:
    """A prompt as the text encoder sees it: weighted segments (a ``BREAK`` is
    ``("BREAK", -1.0)``) and the extra networks its tags named."""

    segments: tuple[Segment, ...]
    networks: tuple[Network, ...] = ()


def parse_emphasis(text: str) -> list[Segment]:
    """The text as (text, weight) runs; neighbours of equal weight are merged and
    an empty text is ``[("", 1.0)]``."""
    runs: list[list] = []
    round_open: list[int] = []
    square_open: list[int] = []

    def scale(start: int, factor: float) -> None:
        for run in runs[start:]:
            run[1] *= factor

    for match in _TOKEN.finditer(text):
        token, weight = match.group(0), match.group(1)
        if token.startswith("\\"):
            if len(token) == 2:
                runs.append([token[1], 1.0])
        elif token == "(":
            round_open.append(len(runs))
        elif token == "[":
            square_open.append(len(runs))
        elif weight is not None and round_open and _is_number(weight):
            scale(round_open.pop(), float(weight))
        elif token == ")" and round_open:
            scale(round_open.pop(), EMPHASIS)
        elif token == "]" and square_open:
            scale(square_open.pop(), 1 / EMPHASIS)
        else:
            for k, part in enumerate(_BREAK.split(token)):
                if k:
                    runs.append(["BREAK", BREAK_WEIGHT])
                runs.append([part, 1.0])
    for start in round_open:
        scale(start, EMPHASIS)
    for start in square_open:
        scale(start, 1 / EMPHASIS)

    merged: list[list] = []
    for run in runs:
        if merged and merged[-1][1] == run[1]:
            merged[-1][0] += run[0]
        else:
            merged.append(run)
    return [(t, w) for t, w in merged] or [("", 1.0)]


def _is_number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


def extract_networks(text: str) -> tuple[str, tuple[Network, ...]]:
    """The text without its ``<kind:args>`` tags (the text around them is kept), and the tags."""
    found = tuple(Network(m.group(1), tuple(m.group(2).split(":")), m.group(0)) for m in _NETWORK.finditer(text))
    return _NETWORK.sub("", text), found


def parse(text: str, positive: bool = True) -> Prompt:
    """A prompt's segments; only a positive prompt's network tags are taken out
    (in the negative, A1111 encodes them as text)."""
    networks: tuple[Network, ...] = ()
    if positive:
        text, networks = extract_networks(text)
    return Prompt(tuple(parse_emphasis(text)), networks)


def problem(text: str, positive: bool = True) -> str | None:
    """Why this prompt cannot be rendered as A1111 would render it, or None."""
    if positive:
        _, networks = extract_networks(text)
        # LoRA tags are read by sbrender.loras (their weights and names are checked there).
        other = [net for net in networks if net.kind != "lora"]
        if other:
            net = other[0]
            if net.kind.lower() == "lora":
                return f"uses the tag {net.text}: a LoRA tag is written <lora:name:weight>, in lower case"
            return (f"uses the extra-network tag {net.text}: extra networks ({net.kind}) are not supported yet; "
                    "LoRAs (<lora:name:weight>) are")
        if _AND.search(text):
            return ("uses AND (composable prompts), which is not supported yet: write one prompt (in lower case, "
                    "\"and\" is an ordinary word)")
    return None


def notes(prompt: str, negative: str) -> list[str]:
    """What A1111 (and so sbrender) reads differently from how the prompts may look,
    for the result's ``warnings``: nothing is dropped silently."""
    from . import editing

    found = []
    _, tags = extract_networks(negative)
    if tags:
        found.append(f"negative_prompt: {', '.join(t.text for t in tags)} {'is' if len(tags) == 1 else 'are'} "
                     "encoded as text, as A1111 does: extra networks such as LoRAs apply from the prompt only")
    if _AND.search(negative):
        found.append("negative_prompt: AND is encoded as text, as A1111 does: composable prompts are for the prompt")
    for field, text in (("prompt", extract_networks(prompt)[0]), ("negative_prompt", negative)):
        if "[" in text and "|" in text and editing.parse(text) is None:
            found.append(f"{field}: a | outside brackets makes A1111 read the whole text without prompt editing or "
                         "alternation; so does sbrender")
    return found
