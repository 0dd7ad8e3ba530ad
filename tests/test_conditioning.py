"""Prompt embeddings by A1111's rules, against the rules written out here by hand,
on the tiny-random model's real CLIP text encoder and tokenizer; and end to end
through `sbrender run --once`."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch

from conftest import Spool, daemon_env, sbrender
from sbrender import conditioning, editing, prompts
from sbrender.conditioning import Chunk
from sbrender.models import BUILTINS, ensure_builtin


@pytest.fixture(scope="module")
def tiny(model_cache: Path) -> tuple[Any, Any]:
    """The tiny model's tokenizer and text encoder, its final LayerNorm given a
    random affine (with weight 1 and bias 0 a chunk's mean is ~0 and the mean
    restoration divides by ~0)."""
    from transformers import CLIPTextModel, CLIPTokenizer

    folder = ensure_builtin(BUILTINS["tiny-random"], model_cache)
    tokenizer = CLIPTokenizer.from_pretrained(folder / "tokenizer")
    encoder = CLIPTextModel.from_pretrained(folder / "text_encoder").eval()
    norm = conditioning.text_model(encoder).final_layer_norm
    with torch.no_grad(), torch.random.fork_rng(devices=[]):
        torch.manual_seed(1)
        norm.weight.copy_(torch.rand_like(norm.weight) + 0.5)
        norm.bias.copy_(0.5 * torch.randn_like(norm.bias) + 0.3)
    return tokenizer, encoder


def ids(tokenizer: Any, word: str) -> list[int]:
    """The byte-level tokenizer's ids of one word: a token per character, the last one ending the word."""
    return tokenizer.convert_tokens_to_ids([*word[:-1], word[-1] + "</w>"])


def layout(tokenizer: Any, *chunks: list[tuple[int, float]]) -> list[Chunk]:
    """Chunks written by hand: BOS, the tokens, EOS padding to 75, EOS."""
    bos, eos = tokenizer.bos_token_id, tokenizer.eos_token_id
    out = []
    for chunk in chunks:
        pad = 75 - len(chunk)
        out.append(Chunk((bos, *[t for t, _ in chunk], *[eos] * (pad + 1)),
                         (1.0, *[w for _, w in chunk], *[1.0] * (pad + 1))))
    return out


def chunks_of(tokenizer: Any, text: str) -> list[Chunk]:
    return conditioning.chunks(prompts.parse(text), tokenizer)


def weighted(tokenizer: Any, words: list[str], weight: float = 1.0) -> list[tuple[int, float]]:
    return [(t, weight) for word in words for t in ids(tokenizer, word)]


# --- chunks ---------------------------------------------------------------------------


def test_the_empty_prompt_is_bos_and_76_eos(tiny: tuple[Any, Any]) -> None:
    tokenizer, _ = tiny
    assert chunks_of(tokenizer, "") == layout(tokenizer, [])
    assert chunks_of(tokenizer, "")[0].tokens == (tokenizer.bos_token_id, *[tokenizer.eos_token_id] * 76)


def test_a_chunk_filling_near_a_comma_moves_the_last_tag_to_the_next(tiny: tuple[Any, Any]) -> None:
    tokenizer, _ = tiny
    # 12 tags of 7 letters + a comma: 8 tokens each. Nine tags fill 72 tokens (last comma
    # at 71); the tenth's fourth letter would be token 76: its first three letters move on.
    tags = [chr(ord("a") + k) * 7 for k in range(12)]
    words = [w for tag in tags for w in (tag, ",")]
    assert chunks_of(tokenizer, ", ".join(tags) + ",") == layout(
        tokenizer, weighted(tokenizer, words[:18]), weighted(tokenizer, words[18:]))


@pytest.mark.parametrize("lead, moved", [(55, True), (54, False)])
def test_the_backtrack_reaches_20_tokens_back_and_no_further(tiny: tuple[Any, Any], lead: int, moved: bool) -> None:
    tokenizer, _ = tiny
    # A word of `lead` letters, a comma at index `lead`, then one long word: the chunk fills
    # with 75 - lead - 1 of its letters. 75 - 55 = 20 moves; 75 - 54 = 21 does not.
    first, second = "x" * lead, "y" * 40
    got = chunks_of(tokenizer, f"{first}, {second}")
    head = weighted(tokenizer, [first, ","])
    tail = weighted(tokenizer, [second])
    if moved:
        assert got == layout(tokenizer, head, tail)
    else:
        split = 75 - len(head)
        assert got == layout(tokenizer, head + tail[:split], tail[split:])


def test_without_a_comma_a_chunk_is_cut_at_75(tiny: tuple[Any, Any]) -> None:
    tokenizer, _ = tiny
    tokens = weighted(tokenizer, ["q" * 80])
    assert chunks_of(tokenizer, "q" * 80) == layout(tokenizer, tokens[:75], tokens[75:])


def test_break_closes_a_chunk_but_not_inside_brackets(tiny: tuple[Any, Any]) -> None:
    tokenizer, _ = tiny
    assert chunks_of(tokenizer, "cat BREAK dog") == layout(
        tokenizer, weighted(tokenizer, ["cat"]), weighted(tokenizer, ["dog"]))
    assert chunks_of(tokenizer, "cat BREAK BREAK dog") == layout(
        tokenizer, weighted(tokenizer, ["cat"]), [], weighted(tokenizer, ["dog"]))
    assert chunks_of(tokenizer, "cat BREAK") == layout(tokenizer, weighted(tokenizer, ["cat"]))
    # inside brackets BREAK is a word, with the weight -1.1 (as A1111 does; CLIP lowercases it)
    assert chunks_of(tokenizer, "(cat BREAK dog)") == layout(tokenizer, [
        *weighted(tokenizer, ["cat"], 1.1), *weighted(tokenizer, ["break"], -1.1), *weighted(tokenizer, ["dog"], 1.1)])


def test_weights_and_escapes_reach_their_tokens(tiny: tuple[Any, Any]) -> None:
    tokenizer, _ = tiny
    got = chunks_of(tokenizer, r"\(a\) ((b:1.3)) [c] d <lora:x:1>")
    expected = [*weighted(tokenizer, ["(", "a", ")"]), *weighted(tokenizer, ["b"], 1.3 * 1.1),
                *weighted(tokenizer, ["c"], 1 / 1.1), *weighted(tokenizer, ["d"])]
    (chunk,) = got
    assert chunk.tokens == layout(tokenizer, expected)[0].tokens
    assert chunk.weights == pytest.approx(layout(tokenizer, expected)[0].weights)


# --- encoding -------------------------------------------------------------------------


def reference(encoder: Any, layout_: list[Chunk], clip_skip: int) -> torch.Tensor:
    """The formulas, written out: per chunk, CLIP's last hidden state (or the final
    LayerNorm of hidden state -N), times the weights, rescaled to the chunk's own mean."""
    model = conditioning.text_model(encoder)
    parts = []
    for chunk in layout_:
        tokens = torch.tensor([chunk.tokens])
        out = model(input_ids=tokens, output_hidden_states=True)
        z = out.last_hidden_state if clip_skip == 1 else model.final_layer_norm(out.hidden_states[-clip_skip])
        weighted_z = z * torch.tensor([chunk.weights])[:, :, None]
        parts.append(weighted_z * (z.mean() / weighted_z.mean()))
    return torch.cat(parts, dim=1)


PROMPT = ("masterpiece, (best quality:1.3), a [[quiet]] harbour at dusk, (boats:0.7), gulls, "
          "\\(old\\) lighthouse, ((warm light)), BREAK fog, [distant hills], calm sea")


@pytest.mark.parametrize("clip_skip", [1, 2, 3])
def test_embeddings_follow_the_formulas(tiny: tuple[Any, Any], clip_skip: int) -> None:
    tokenizer, encoder = tiny
    layout_ = chunks_of(tokenizer, PROMPT)
    assert len(layout_) == 3  # 75 tokens, the rest up to BREAK, the rest
    with torch.no_grad():
        got = conditioning.encode(encoder, layout_, clip_skip)
        want = reference(encoder, layout_, clip_skip)
    assert got.shape == (1, 3 * 77, 32) and got.dtype == torch.float32
    torch.testing.assert_close(got, want, rtol=0, atol=1e-5)
    if clip_skip > 1:  # the wrong layer is far off: the test can fail
        assert (got - reference(encoder, layout_, clip_skip - 1)).abs().max() > 1e-2


def test_emphasis_changes_the_weighted_tokens_and_keeps_the_chunk_mean(tiny: tuple[Any, Any]) -> None:
    tokenizer, encoder = tiny
    with torch.no_grad():
        plain = conditioning.encode(encoder, chunks_of(tokenizer, "a cat on a mat"), 1)
        strong = conditioning.encode(encoder, chunks_of(tokenizer, "a (cat:1.5) on a mat"), 1)
    assert (plain - strong).abs().max() > 1e-3
    assert float(strong.mean()) == pytest.approx(float(plain.mean()), rel=1e-5)


def test_a_plain_prompt_equals_diffusers_own_encoding(tiny: tuple[Any, Any], model_cache: Path) -> None:
    from diffusers import StableDiffusionPipeline

    tokenizer, encoder = tiny
    pipe = StableDiffusionPipeline.from_pretrained(ensure_builtin(BUILTINS["tiny-random"], model_cache),
                                                   text_encoder=encoder, tokenizer=tokenizer, safety_checker=None)
    with torch.no_grad():
        theirs, _ = pipe.encode_prompt("a lighthouse at dusk, calm sea", "cpu", 1, False)
        ours = conditioning.encode(encoder, chunks_of(tokenizer, "a lighthouse at dusk, calm sea"), 1)
    torch.testing.assert_close(ours, theirs, rtol=0, atol=1e-6)


def test_a_too_deep_clip_skip_is_refused(tiny: tuple[Any, Any]) -> None:
    tokenizer, encoder = tiny
    with pytest.raises(ValueError, match="clip skip 6 is more than the text encoder's 5 layers"):
        conditioning.encode(encoder, chunks_of(tokenizer, "cat"), 6)


def test_padding_with_a_mask_is_as_if_unpadded(tiny: tuple[Any, Any], model_cache: Path) -> None:
    """A prompt of 2 chunks and a negative of 1 in one UNet call, the negative padded
    and masked, give what each gives alone; unmasked, the padding shows."""
    from diffusers import UNet2DConditionModel

    tokenizer, encoder = tiny
    unet = UNet2DConditionModel.from_pretrained(ensure_builtin(BUILTINS["tiny-random"], model_cache) / "unet")
    with torch.no_grad():
        cond = conditioning.encode(encoder, chunks_of(tokenizer, "cat BREAK dog"), 1)
        uncond = conditioning.encode(encoder, chunks_of(tokenizer, "blurry"), 1)
        empty = conditioning.encode(encoder, chunks_of(tokenizer, ""), 1)
        c = conditioning.for_call([cond], [uncond], empty)
        assert c.cond.shape == c.uncond.shape == (1, 154, 32)
        assert c.uncond_mask.tolist() == [[1.0] * 77 + [0.0] * 77] and c.cond_mask.tolist() == [[1.0] * 154]
        latents = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0))
        alone = [unet(latents, 10, encoder_hidden_states=e).sample for e in (uncond, cond)]
        states = torch.cat([c.uncond, c.cond])
        with conditioning.MaskedUnet(unet, c):
            masked = unet(torch.cat([latents] * 2), 10, encoder_hidden_states=states).sample
            cond_only = unet(latents, 10, encoder_hidden_states=c.cond).sample
        unmasked = unet(torch.cat([latents] * 2), 10, encoder_hidden_states=states).sample
    assert "forward" not in vars(unet)  # put back as it was
    torch.testing.assert_close(masked, torch.cat(alone), rtol=0, atol=1e-5)
    torch.testing.assert_close(cond_only, alone[1], rtol=0, atol=1e-5)
    assert (unmasked[:1] - alone[0]).abs().max() > 1e-4


# --- prompt editing ---------------------------------------------------------------------


def reference_joint(encoder: Any, variants: list[list[Chunk]], clip_skip: int, empty: Chunk) -> torch.Tensor:
    """A1111's encoding of a schedule, written out: the variants padded to one chunk
    count with the empty chunk, then per chunk index one batch over all variants,
    weighted, and rescaled to that whole batch's mean."""
    model = conditioning.text_model(encoder)
    count = max(len(v) for v in variants)
    parts = []
    for index in range(count):
        column = [v[index] if index < len(v) else empty for v in variants]
        out = model(input_ids=torch.tensor([c.tokens for c in column]), output_hidden_states=True)
        z = out.last_hidden_state if clip_skip == 1 else model.final_layer_norm(out.hidden_states[-clip_skip])
        weighted_z = z * torch.tensor([c.weights for c in column])[:, :, None]
        parts.append(weighted_z * (z.mean() / weighted_z.mean()))
    return torch.cat(parts, dim=1)


@pytest.mark.parametrize("clip_skip", [1, 2])
def test_a_schedule_is_encoded_in_one_batch_with_a_joint_mean(tiny: tuple[Any, Any], clip_skip: int) -> None:
    tokenizer, encoder = tiny
    entries = editing.schedule("a (cat:1.4) [on a mat:under a [long] table BREAK by the sea:3]", 10)
    variants = [chunks_of(tokenizer, text) for _, text in entries]
    assert [len(v) for v in variants] == [1, 2]
    empty = layout(tokenizer, [])[0]
    with torch.no_grad():
        got = conditioning.encode_variants(encoder, variants, clip_skip)
        want = reference_joint(encoder, variants, clip_skip, empty)
        alone = [reference_joint(encoder, [v], clip_skip, empty) for v in variants]
    assert got.shape == (2, 154, 32)
    torch.testing.assert_close(got, want, rtol=0, atol=1e-5)
    # Encoded one by one, the means differ: the joint batch is what A1111 does, and the test can tell.
    assert (got[1:] - alone[1]).abs().max() > 1e-5


def _render_with_switches(renderer: Any, job: Any, per_call: list[str]) -> Any:
    """The tiny pipeline called directly, the prompt's embeddings switched before the
    calls whose text changes (what prompt editing must amount to), uncond the empty prompt."""
    import numpy as np

    encoder, tokenizer = renderer._text_encoder, renderer.pipe.tokenizer
    with torch.inference_mode():
        enc = {t: conditioning.encode(encoder, chunks_of(tokenizer, t), 1) for t in set(per_call)}
        uncond = conditioning.encode(encoder, chunks_of(tokenizer, ""), 1)

        def switch(pipe: Any, i: int, t: Any, kwargs: dict[str, Any]) -> dict[str, Any]:
            if i + 1 < len(per_call) and per_call[i + 1] != per_call[i]:
                kwargs["prompt_embeds"] = torch.cat([uncond, enc[per_call[i + 1]]])
            return kwargs

        renderer._use_sampler(job.sampler, job.scheduler)
        out = renderer.pipe(prompt_embeds=enc[per_call[0]], negative_prompt_embeds=uncond,
                            num_inference_steps=job.steps, guidance_scale=job.guidance_scale, width=job.width,
                            height=job.height, generator=[torch.Generator("cpu").manual_seed(job.seed)],
                            callback_on_step_end=switch, output_type="np")
    return np.asarray(out.images[0])


@pytest.mark.parametrize("prompt, sampler, steps, per_call", [
    # [a:b:1] at 4 steps: calls 0 and 1 draw a (A1111 compares the 0-based call with the step).
    ("a lighthouse [at dawn:in a storm:1], calm sea", "DPM++ 2M", 4,
     ["a lighthouse at dawn, calm sea"] * 2 + ["a lighthouse in a storm, calm sea"] * 2),
    # A second-order sampler: scheduled over twice the steps (0.25 of 6 is step 1), 5 denoiser calls for 3 steps.
    ("[a cat:a dog:0.25] on a mat", "Heun", 3, ["a cat on a mat"] * 2 + ["a dog on a mat"] * 3),
    # Alternation: entries end at steps 1, 2, 3, 4, so calls 0 and 1 both take the first.
    ("a [cat|dog] on a mat", "Euler", 4, ["a cat on a mat", "a cat on a mat", "a dog on a mat", "a cat on a mat"]),
])
def test_prompt_editing_renders_as_the_pipeline_fed_a1111s_switches(model_cache: Path, prompt: str, sampler: str,
                                                                     steps: int, per_call: list[str]) -> None:
    import numpy as np

    from sbrender.config import load_settings
    from sbrender.jobs import Job
    from sbrender.pipeline import DiffusersRenderer

    renderer = DiffusersRenderer(load_settings(None, env={}, overrides={"model": "tiny-random",
                                                                        "cache": str(model_cache)}))
    renderer.load()
    job = Job(id="e", prompt=prompt, negative_prompt="", steps=steps, guidance_scale=7.0, width=64, height=64,
              seed=5, count=1, sampler=sampler, priority=0)
    # The float image before it becomes 8-bit: the tiny model heeds its text little, and a
    # switch at the last call moves a pixel by less than one level.
    seen: list[np.ndarray] = []
    to_pil = renderer.pipe.numpy_to_pil
    renderer.pipe.numpy_to_pil = lambda arrays: (seen.append(np.array(arrays)), to_pil(arrays))[1]
    out = renderer.render(job, [5])
    renderer.pipe.numpy_to_pil = to_pil
    assert out.prompt["schedule"]["prompt"] > 1
    got = seen[0][0]
    np.testing.assert_allclose(got, _render_with_switches(renderer, job, per_call), rtol=0, atol=1e-6)
    # Switching one call later, or never, draws another image: the test can tell.
    for other in (per_call[:1] + per_call[:-1], per_call[:1] * len(per_call)):
        assert np.abs(got - _render_with_switches(renderer, job, other)).max() > 1e-5  # 10 times the tolerance


# --- end to end -------------------------------------------------------------------------


def test_a_long_weighted_prompt_renders_and_records_its_chunks(tmp_path: Path, model_cache: Path) -> None:
    spool = Spool(tmp_path / "spool")
    spool.drop("long.json", {"prompt": PROMPT, "negative_prompt": "blurry", "seed": 3})
    spool.drop("skip.json", {"prompt": "(a cat:1.2) BREAK on a mat", "seed": 3, "clip_skip": 2})
    spool.drop("plain.json", {"prompt": "a cat BREAK on a mat", "seed": 3})
    spool.drop("edit.json", {"prompt": "a [cat:dog:0.5] on a mat", "negative_prompt": "[blurry|lowres]", "seed": 3,
                             "steps": 4})
    spool.drop("noted.json", {"prompt": "a cat", "negative_prompt": "blurry, <lora:x:1>", "seed": 3, "steps": 2})
    proc = sbrender("run", "--once", *spool.cli_args(), env=daemon_env(model_cache), cwd=spool.root)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    results = {name: json.loads((spool.outbox / f"{name}.json").read_text())
               for name in ("long", "skip", "plain", "edit", "noted")}
    for name, result in results.items():
        assert result["status"] == "succeeded", result.get("error")
    assert results["long"]["prompt"] == {"chunks": 3, "negative_chunks": 1}
    assert results["skip"]["prompt"] == {"chunks": 2, "negative_chunks": 1}
    assert results["skip"]["params"]["clip_skip"] == 2
    assert results["noted"]["warnings"] == [
        "negative_prompt: <lora:x:1> is encoded as text, as A1111 does: extra networks such as LoRAs apply from the "
        "prompt only"]
    assert "warnings" not in results["edit"] or results["edit"]["warnings"] == []
    assert results["edit"]["prompt"] == {"chunks": 1, "negative_chunks": 1,
                                         "schedule": {"prompt": 2, "negative_prompt": 4}}
    from PIL import Image

    assert Image.open(spool.outbox / "edit.png").text["parameters"].startswith(
        "a [cat:dog:0.5] on a mat\nNegative prompt: [blurry|lowres]\n")

    text = Image.open(spool.outbox / "skip.png").text["parameters"]
    assert text.startswith("(a cat:1.2) BREAK on a mat\n") and text.endswith("Clip skip: 2")
    assert "Clip skip" not in Image.open(spool.outbox / "plain.png").text["parameters"]
    # the same seed, a different conditioning: a different image
    assert Image.open(spool.outbox / "skip.png").tobytes() != Image.open(spool.outbox / "plain.png").tobytes()


def test_prompts_of_different_lengths_share_a_call_as_if_alone(tmp_path: Path, model_cache: Path) -> None:
    """A 1-chunk and a 3-chunk prompt with 1- and 2-chunk negatives in one pipeline call:
    padded and masked, each image is what it is when rendered alone."""
    import numpy as np
    from PIL import Image

    jobs = [("short", {"prompt": "a cat on a mat", "seed": 5}),
            ("long", {"prompt": PROMPT, "negative_prompt": "blurry BREAK lowres", "seed": 6}),
            ("neg", {"prompt": "a (dog:1.2)", "negative_prompt": "blurry BREAK lowres", "seed": 7})]
    images: dict[int, dict[str, Any]] = {}
    for batch in (1, 4):
        spool = Spool(tmp_path / f"b{batch}")
        for name, job in jobs:
            spool.drop(f"{name}.json", job)
        proc = sbrender("run", "--once", *spool.cli_args(), cwd=spool.root,
                        env=daemon_env(model_cache, SBRENDER_PERF_BATCH_SIZE=str(batch)))
        assert proc.returncode == 0, proc.stdout + proc.stderr
        results = {name: json.loads((spool.outbox / f"{name}.json").read_text()) for name, _ in jobs}
        assert all(r["status"] == "succeeded" for r in results.values())
        if batch > 1:
            assert results["long"]["batch"]["images"] == 3
        assert results["long"]["prompt"] == {"chunks": 3, "negative_chunks": 2}
        images[batch] = {name: np.asarray(Image.open(spool.outbox / f"{name}.png"), dtype=int) for name, _ in jobs}
    for name, _ in jobs:
        assert np.abs(images[1][name] - images[4][name]).max() <= 2, name


# --- textual-inversion embeddings ------------------------------------------------------

EMBEDDINGS = {"glow": 1, "badhands": 3, "bad": 4, "bad hands": 2, "wideshot": 8}


@pytest.fixture(scope="module")
def vectors(tiny: tuple[Any, Any]) -> dict[str, torch.Tensor]:
    """Random vectors of the tiny text encoder's width, per embedding name."""
    generator = torch.Generator().manual_seed(7)
    return {name: torch.randn(n, 32, generator=generator) for name, n in EMBEDDINGS.items()}


def names(tokenizer: Any) -> conditioning.EmbeddingNames:
    return conditioning.EmbeddingNames(tokenizer, EMBEDDINGS)


def with_embeddings(tokenizer: Any, text: str, positive: bool = True) -> list[Chunk]:
    return conditioning.chunks(prompts.parse(text, positive), tokenizer, embeddings=names(tokenizer))


def placeholders(name: str, weight: float = 1.0) -> list[tuple[int, float]]:
    return [(conditioning.PLACEHOLDER, weight)] * EMBEDDINGS[name]


def fixed(chunk: Chunk, *fixes: tuple[int, str]) -> Chunk:
    return Chunk(chunk.tokens, chunk.weights, tuple(conditioning.Fix(o, n) for o, n in fixes))


def test_an_embedding_name_becomes_its_vectors_placeholders(tiny: tuple[Any, Any]) -> None:
    tokenizer, _ = tiny
    head = weighted(tokenizer, ["a", "cat", ","])
    (want,) = layout(tokenizer, [*head, *placeholders("badhands"), *weighted(tokenizer, ["on", "a", "mat"])])
    assert with_embeddings(tokenizer, "a cat, badhands on a mat") == [fixed(want, (len(head), "badhands"))]
    # Matched as token ids: any case (CLIP lower-cases), but not inside another word's split.
    assert with_embeddings(tokenizer, "a cat, BadHands on a mat") == [fixed(want, (len(head), "badhands"))]
    assert with_embeddings(tokenizer, "a cat, badhandsy on a mat") == chunks_of(tokenizer, "a cat, badhandsy on a mat")
    # Without the catalog the name is text.
    assert chunks_of(tokenizer, "a cat, badhands on a mat")[0].fixes == ()


def test_the_longest_name_wins_and_the_weight_reaches_every_vector(tiny: tuple[Any, Any]) -> None:
    tokenizer, _ = tiny
    # "bad" and "bad hands" start with the same tokens: the longer match is taken.
    got = with_embeddings(tokenizer, "(bad hands:1.2) [glow] bad, bad")
    (want,) = layout(tokenizer, [*placeholders("bad hands", 1.2), *placeholders("glow", 1 / 1.1),
                                 *placeholders("bad"), *weighted(tokenizer, [","]), *placeholders("bad")])
    (chunk,) = got
    assert chunk.tokens == want.tokens and chunk.weights == pytest.approx(want.weights)
    assert chunk.fixes == (conditioning.Fix(0, "bad hands"), conditioning.Fix(2, "glow"),
                           conditioning.Fix(3, "bad"), conditioning.Fix(8, "bad"))
    assert conditioning.used(got) == ["bad hands", "glow", "bad"]


def test_an_embedding_that_does_not_fit_closes_the_chunk_first(tiny: tuple[Any, Any]) -> None:
    tokenizer, _ = tiny
    # 70 letters and no comma: the 8 vectors of "wideshot" do not fit in the 5 left.
    first = weighted(tokenizer, ["x" * 70])
    got = with_embeddings(tokenizer, "x" * 70 + " wideshot glow")
    one, two = layout(tokenizer, first, [*placeholders("wideshot"), *placeholders("glow")])
    assert got == [one, fixed(two, (0, "wideshot"), (8, "glow"))]
    # 67 letters: the 8 vectors fill the chunk to exactly 75, and the next name starts the next chunk.
    first = weighted(tokenizer, ["x" * 67])
    got = with_embeddings(tokenizer, "x" * 67 + " wideshot glow")
    one, two = layout(tokenizer, [*first, *placeholders("wideshot")], placeholders("glow"))
    assert got == [fixed(one, (67, "wideshot")), fixed(two, (0, "glow"))]


def test_the_comma_backtrack_moves_placeholders_but_not_their_vectors(tiny: tuple[Any, Any]) -> None:
    """A1111 moves the tokens after the last comma to the next chunk and leaves the
    embedding's fix with the closed chunk: its vectors land on that chunk's padding,
    and the moved placeholders stay plain tokens. Reproduced, not repaired."""
    tokenizer, _ = tiny
    # 60 letters, a comma (index 60), "wideshot" (8 placeholders at 61..68), then 7 letters
    # fill the chunk to 75; the 8th letter finds it full with the comma 15 back.
    lead, tail = "x" * 60, "y" * 10
    got = with_embeddings(tokenizer, f"{lead}, wideshot {tail}")
    head = weighted(tokenizer, [lead, ","])
    letters = weighted(tokenizer, [tail])
    one, two = layout(tokenizer, head, [*placeholders("wideshot"), *letters])
    assert got == [fixed(one, (61, "wideshot")), two]


def as_new_tokens(chunk: Chunk, first_id: dict[str, int]) -> tuple[int, ...]:
    """A1111's placement written as token ids: each fix's vectors are new vocabulary
    rows (first_id[name] + k), put at offset + 1 ... and cut at the chunk's end."""
    tokens = list(chunk.tokens)
    for fix in chunk.fixes:
        for k in range(EMBEDDINGS[fix.name]):
            if fix.offset + 1 + k < len(tokens):
                tokens[fix.offset + 1 + k] = first_id[fix.name] + k
    return tuple(tokens)


def reference_with_vectors(encoder: Any, layout_: list[Chunk], clip_skip: int,
                           vectors: dict[str, torch.Tensor]) -> torch.Tensor:
    """The formulas on a copy of the text encoder whose spare vocabulary rows (the
    byte-level tokenizer uses 514 of 1000) hold the embeddings' vectors."""
    import copy

    widened = copy.deepcopy(encoder)
    table = conditioning.text_model(widened).embeddings.token_embedding.weight
    first_id, row = {}, 600
    with torch.no_grad():
        for name, vec in vectors.items():
            first_id[name] = row
            table[row:row + len(vec)] = vec
            row += len(vec)
    plain = [Chunk(as_new_tokens(c, first_id), c.weights) for c in layout_]
    return reference(widened, plain, clip_skip)


EMBEDDING_PROMPTS = {
    "single and multi": "a cat, badhands on a (mat:1.3), glow",
    "weighted": "(wideshot:1.2), [[bad hands]] harbour",
    "at a boundary": "x" * 70 + " wideshot glow, (sea:0.8)",
    "backtracked": "x" * 60 + ", wideshot " + "y" * 10,
    "negative": "(badhands:1.4), (worst quality:1.2), glow BREAK wideshot",
}


@pytest.mark.parametrize("clip_skip", [1, 2])
@pytest.mark.parametrize("case", list(EMBEDDING_PROMPTS))
def test_embeddings_are_encoded_as_a1111_places_them(tiny: tuple[Any, Any], vectors: dict[str, torch.Tensor],
                                                     case: str, clip_skip: int) -> None:
    tokenizer, encoder = tiny
    layout_ = with_embeddings(tokenizer, EMBEDDING_PROMPTS[case], positive=case != "negative")
    assert any(c.fixes for c in layout_)
    with torch.no_grad():
        got = conditioning.encode(encoder, layout_, clip_skip, vectors)
        want = reference_with_vectors(encoder, layout_, clip_skip, vectors)
        bare = [Chunk(c.tokens, c.weights) for c in layout_]  # the placeholders, no vectors
        as_text = conditioning.encode(encoder, bare, clip_skip)
    assert got.shape == (1, 77 * len(layout_), 32)
    torch.testing.assert_close(got, want, rtol=0, atol=1e-5)
    assert (got - as_text).abs().max() > 1e-2  # the vectors made a difference: the test can fail
    # the hook is gone after each chunk: the bare chunks encode as before
    with torch.no_grad():
        torch.testing.assert_close(conditioning.encode(encoder, bare, clip_skip), as_text, rtol=0, atol=0)
    with pytest.raises(ValueError, match="is not loaded"):
        conditioning.encode(encoder, layout_, clip_skip, {})


@pytest.mark.parametrize("prompt, clip_skip", [("a cat, (detailed:1.3)", 2), ("(hyperrealistic:1.3), a house", 1),
                                               ("(a very detailed red house:1.1) " * 20, 1)])
def test_the_built_in_tiny_model_takes_emphasis_without_inf(model_cache: Path, prompt: str, clip_skip: int) -> None:
    """The built-in model's final LayerNorm has a real scale and shift, as a trained
    CLIP's has: with 1 and 0 a chunk's mean is ~0 and emphasis divides by it."""
    from transformers import CLIPTextModel, CLIPTokenizer

    folder = ensure_builtin(BUILTINS["tiny-random"], model_cache)
    tokenizer = CLIPTokenizer.from_pretrained(folder / "tokenizer")
    encoder = CLIPTextModel.from_pretrained(folder / "text_encoder").eval()
    with torch.no_grad():
        z = conditioning.encode(encoder, chunks_of(tokenizer, prompt), clip_skip)
    assert torch.isfinite(z).all()
    assert abs(float(z.mean())) > 0.05
