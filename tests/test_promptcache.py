"""The bounded cache of encoded prompts: its budget and order, and through the real
renderer: a repeated prompt costs no text-encoder call, a changed setting does."""

from __future__ import annotations

from pathlib import Path

import pytest

from sbrender.promptcache import PromptCache


def test_the_least_recently_used_leaves_first_within_the_byte_budget() -> None:
    cache: PromptCache[bytes] = PromptCache(10, len)
    made: list[str] = []

    def get(key: str, size: int) -> bytes:
        return cache.get(key, lambda: (made.append(key), b"x" * size)[1])

    get("a", 4), get("b", 4), get("a", 4)  # a is now the most recent
    get("c", 4)  # 12 > 10: b leaves
    assert made == ["a", "b", "c"] and cache.used == 8 and len(cache) == 2
    get("a", 4)
    get("b", 4)
    assert made == ["a", "b", "c", "b"]
    assert (cache.hits, cache.misses) == (2, 4)
    get("big", 11)  # larger than the whole budget: made, never kept
    assert "big" in made and cache.used <= 10


def test_a_repeated_prompt_skips_the_text_encoder(model_cache: Path) -> None:
    from sbrender.config import load_settings
    from sbrender.jobs import Job
    from sbrender.pipeline import DiffusersRenderer

    renderer = DiffusersRenderer(load_settings(None, env={}, overrides={"model": "tiny-random",
                                                                        "cache": str(model_cache)}))
    renderer.load()
    calls: list[int] = []
    renderer._text_encoder.register_forward_hook(lambda *args: calls.append(1))

    def render(prompt: str, **fields: object) -> list[int]:
        before = len(calls)
        job = Job(**{"id": "c", "prompt": prompt, "negative_prompt": "blurry", "steps": 2, "guidance_scale": 7.0,
                     "width": 64, "height": 64, "seed": 1, "count": 1, "sampler": "Euler", "priority": 0, **fields})
        image = renderer.render(job, [1]).images[0].tobytes()
        return [len(calls) - before, hash(image)]

    first = render("a cat BREAK on a mat")
    assert first[0] == 4  # the prompt's two chunks, the negative's one, the empty prompt (padding filler)
    again = render("a cat BREAK on a mat")
    assert again == [0, first[1]]  # from the cache, and the same image
    assert render("a cat BREAK on a mat", clip_skip=2)[0] == 4  # another clip skip: all encoded again
    assert render("a [cat:dog:1] on a mat", steps=2)[0] == 1  # its schedule is one call over both variants
    assert render("a [cat:dog:1] on a mat", steps=3)[0] == 1  # another step count, another schedule
    assert render("a cat BREAK on a mat")[0] == 0
    assert renderer._prompts.hits >= 3
