"""Prompt editing and alternation schedules, against A1111 1.10's documented
examples (its prompt_parser doctests, restated) and the rules in
../shared/background/prompts-a1111.md section 2."""

from __future__ import annotations

import pytest

from sbrender import editing


@pytest.mark.parametrize("prompt, expected", [
    ("test", [(10, "test")]),
    ("a [b:3]", [(3, "a "), (10, "a b")]),
    ("a [b: 3]", [(3, "a "), (10, "a b")]),
    ("a [[[b]]:2]", [(2, "a "), (10, "a [[b]]")]),
    ("[(a:2):3]", [(3, ""), (10, "(a:2)")]),
    ("a [b : c : 1] d", [(1, "a b  d"), (10, "a  c  d")]),
    ("a[b:[c:d:2]:1]e", [(1, "abe"), (2, "ace"), (10, "ade")]),
    ("a [unbalanced", [(10, "a [unbalanced")]),
    ("a [b:.5] c", [(5, "a  c"), (10, "a b c")]),
    ("a [b:1.5] c", [(10, "a  c")]),  # a fraction past the end: never reached
    ("[from::4] x", [(4, "from x"), (10, " x")]),
    ("(masterpiece:1.2), [cat:dog:0.5] (sitting)", [(5, "(masterpiece:1.2), cat (sitting)"),
                                                   (10, "(masterpiece:1.2), dog (sitting)")]),
    ("(a [b:c:2])", [(2, "(a b)"), (10, "(a c)")]),  # inside emphasis
    ("[a:b:0]", [(10, "b")]),  # a boundary below 1 is no boundary
    ("a | b [c:d:2]", [(10, "a | b [c:d:2]")]),  # "|" outside brackets: A1111 uses the text verbatim
    (r"\[a:b:2\]", [(10, r"\[a:b:2\]")]),  # escaped: literal
    ("[a:b]", [(10, "[a:b]")]),  # not a form: literal, for the emphasis parser
    ("x) y] z:", [(10, "x) y] z:")]),
])
def test_schedules_match_a1111(prompt: str, expected: list[tuple[int, str]]) -> None:
    assert editing.schedule(prompt, 10) == expected


def test_the_documented_landscape_at_100_steps() -> None:
    prompt = ("fantasy landscape with a [mountain:lake:0.25] and [an oak:a christmas tree:0.75]"
              "[ in foreground::0.6][: in background:0.25] [shoddy:masterful:0.5]")
    assert editing.schedule(prompt, 100) == [
        (25, "fantasy landscape with a mountain and an oak in foreground shoddy"),
        (50, "fantasy landscape with a lake and an oak in foreground in background shoddy"),
        (60, "fantasy landscape with a lake and an oak in foreground in background masterful"),
        (75, "fantasy landscape with a lake and an oak in background masterful"),
        (100, "fantasy landscape with a lake and a christmas tree in background masterful"),
    ]


def test_fractions_and_step_numbers_at_20_steps() -> None:
    assert editing.schedule("[red:green:0.25]", 20) == [(5, "red"), (20, "green")]
    assert editing.schedule("[red:green:1.0]", 20) == [(20, "red")]
    assert editing.schedule("[red:green:25]", 20) == [(20, "red")]


def test_alternation_changes_at_every_step() -> None:
    entries = editing.schedule("a [cat|dog|] b", 4)
    assert entries == [(1, "a cat b"), (2, "a dog b"), (3, "a  b"), (4, "a cat b")]
    # Call k uses the first entry ending at or after k: A1111 draws cat, cat, dog, (empty).
    assert [entries[editing.at_call(entries, k)][1] for k in range(4)] == ["a cat b", "a cat b", "a dog b", "a  b"]


def test_call_k_uses_the_first_entry_ending_at_or_after_k() -> None:
    entries = editing.schedule("[red:green:5]", 20)
    assert [editing.at_call(entries, k) for k in (0, 5, 6, 19)] == [0, 0, 1, 1]


@pytest.mark.parametrize("prompt, scheduled", [
    ("plain", False), ("(emphasis:1.2) [less]", False), ("[a:b:2]", True), ("[a|b]", True), ("[a:b]", False),
    ("a | [b:c:2]", False)])
def test_is_scheduled(prompt: str, scheduled: bool) -> None:
    assert editing.is_scheduled(prompt) is scheduled
