"""Prompt embeddings the way AUTOMATIC1111 1.10 builds them for SD1.

Each parsed segment (``sbrender.prompts``) is tokenized on its own and each
token carries its segment's weight. Tokens are cut into chunks of 75 (a chunk
that fills up within ``backtrack`` tokens of a comma moves the words after the
comma to the next chunk; ``BREAK`` closes a chunk), each sent to CLIP as
BOS + 75 + EOS with EOS as padding. Each chunk is encoded alone, in float32;
clip skip N > 1 takes the N-th hidden state from the end through the final
LayerNorm; the weights scale the chunk's vectors and the chunk is scaled back
to its unweighted mean ("Original" emphasis). The chunks are joined along the
sequence: a prompt of k chunks is a (1, 77*k, C) tensor.

Textual-inversion embeddings (``sbrender.embeddings``) are found by name inside
each segment's tokens, as A1111's ``sd_hijack_clip``/``textual_inversion`` do:
a name is matched as the token ids the tokenizer gives it (CLIP lower-cases, so
the match ignores case but needs the same BPE split), the longest name first,
and replaced by n placeholder tokens with the segment's weight (a chunk that
cannot hold all n is closed first). When the chunk is encoded, the placeholders'
input token embeddings are overwritten by the embedding's vectors (A1111's
``EmbeddingsWithFixes``), and the weights apply as to any token.
"""

from __future__ import annotations

import bisect

from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch

from . import prompts

CHUNK = 75  # tokens per chunk, without BOS and EOS
BACKTRACK = 20  # A1111's comma_padding_backtrack default
PLACEHOLDER = 0  # the token id A1111 writes where an embedding's vectors go (its input embedding is replaced)


@dataclass(frozen=True)
class Fix:
    """An embedding's vectors placed in a chunk from ``offset`` on, counted in the
    chunk's 75 tokens (position ``offset + 1`` of the 77, after BOS): A1111's PromptChunkFix."""

    offset: int
    name: str


@dataclass(frozen=True)
class Chunk:
    """77 token ids (BOS, 75 tokens or EOS padding, EOS), their weights, and the
    embeddings whose vectors replace placeholder tokens."""

    tokens: tuple[int, ...]
    weights: tuple[float, ...]
    fixes: tuple[Fix, ...] = ()


class EmbeddingNames:
    """Embedding names as token-id sequences, to find them inside a segment's tokens.

    Each name is tokenized alone, like a prompt segment (A1111's ``register_embedding``);
    the candidates for a first token are tried longest first, and of equally long ones
    the first registered (``vectors``' order) wins, as A1111's stable sort does."""

    def __init__(self, tokenizer: Any, vectors: Mapping[str, int]) -> None:
        self.vectors = dict(vectors)  # name -> how many vectors (placeholder tokens) it takes
        self._by_first: dict[int, list[tuple[tuple[int, ...], str]]] = {}
        names = list(self.vectors)
        encoded = tokenizer(names, truncation=False, add_special_tokens=False)["input_ids"] if names else []
        for name, name_ids in zip(names, encoded):
            if not name_ids:
                continue  # a name of no tokens (all whitespace) can never be written
            candidates = self._by_first.setdefault(name_ids[0], [])
            candidates.append((tuple(name_ids), name))
            candidates.sort(key=lambda c: len(c[0]), reverse=True)

    def at(self, tokens: Sequence[int], position: int) -> tuple[str, int] | None:
        """The embedding whose name starts at ``position``: its name and length in tokens."""
        for ids, name in self._by_first.get(tokens[position], ()):
            if tuple(tokens[position:position + len(ids)]) == ids:
                return name, len(ids)
        return None


def chunks(prompt: prompts.Prompt, tokenizer: Any, backtrack: int = BACKTRACK,
           embeddings: EmbeddingNames | None = None) -> list[Chunk]:
    """The prompt's chunks, built by A1111's rules; an empty prompt is one chunk of BOS + 76 EOS."""
    bos, eos = tokenizer.bos_token_id, tokenizer.eos_token_id
    comma = tokenizer.get_vocab().get(",</w>")
    texts = [text for text, _ in prompt.segments]
    ids = tokenizer(texts, truncation=False, add_special_tokens=False)["input_ids"]
    out: list[Chunk] = []
    tokens: list[int] = []
    weights: list[float] = []
    fixes: list[Fix] = []
    last_comma = -1

    def close() -> None:
        nonlocal tokens, weights, fixes, last_comma
        pad = CHUNK - len(tokens)
        out.append(Chunk((bos, *tokens, *[eos] * pad, eos), (1.0, *weights, *[1.0] * pad, 1.0), tuple(fixes)))
        tokens, weights, fixes, last_comma = [], [], [], -1

    for segment_ids, (text, weight) in zip(ids, prompt.segments):
        if text == "BREAK" and weight == prompts.BREAK_WEIGHT:
            close()
            continue
        position = 0
        while position < len(segment_ids):
            token = segment_ids[position]
            if token == comma:
                last_comma = len(tokens)
            elif backtrack and len(tokens) == CHUNK and last_comma != -1 and CHUNK - last_comma <= backtrack:
                # As A1111: the tokens after the comma move to the next chunk, but a Fix
                # among them stays with the closed chunk (its vectors then land on the
                # padding there, and the moved placeholders keep their own token embedding).
                cut = last_comma + 1
                moved = tokens[cut:], weights[cut:]
                tokens, weights = tokens[:cut], weights[:cut]
                close()
                tokens, weights = list(moved[0]), list(moved[1])
            if len(tokens) == CHUNK:
                close()
            found = embeddings.at(segment_ids, position) if embeddings is not None else None
            if found is None:
                tokens.append(token)
                weights.append(weight)
                position += 1
                continue
            name, length = found
            count = embeddings.vectors[name]  # type: ignore[union-attr]
            if len(tokens) + count > CHUNK:
                close()
            fixes.append(Fix(len(tokens), name))
            tokens += [PLACEHOLDER] * count
            weights += [weight] * count
            position += length
    if tokens or not out:
        close()
    return out


def used(prompt_chunks: Sequence[Chunk]) -> list[str]:
    """The embeddings a prompt's chunks use, once each, in A1111's order (by chunk, then offset)."""
    return list(dict.fromkeys(fix.name for chunk in prompt_chunks for fix in chunk.fixes))


def text_model(text_encoder: Any) -> Any:
    """The CLIP text transformer: ``text_model`` before transformers 5.6, the model itself after."""
    return getattr(text_encoder, "text_model", text_encoder)


def encode_chunk(text_encoder: Any, chunk_tokens: torch.Tensor, weights: torch.Tensor, clip_skip: int) -> torch.Tensor:
    """One chunk index of a batch: (B, 77) tokens and weights -> (B, 77, C), weighted
    and scaled back to the unweighted mean of the whole (B, 77, C) tensor."""
    model = text_model(text_encoder)
    if clip_skip > 1:
        out = model(input_ids=chunk_tokens, output_hidden_states=True)
        z = model.final_layer_norm(out.hidden_states[-clip_skip])
    else:
        z = model(input_ids=chunk_tokens).last_hidden_state
    if bool((weights == 1).all()):
        # Unweighted: the rescale is by mean/mean = 1, or 0/0 for a chunk whose mean is 0.
        return z
    before = z.mean()
    z = z * weights[..., None]
    return z * (before / z.mean())


def layers(text_encoder: Any) -> int:
    return int(text_encoder.config.num_hidden_layers)


@contextmanager
def placed(text_encoder: Any, rows: Sequence[Sequence[Fix]], vectors: Mapping[str, torch.Tensor]) -> Iterator[None]:
    """While encoding one chunk index of a batch (one row per prompt variant): each
    row's embeddings' vectors replace the input token embeddings at ``offset + 1 ...``
    (A1111's ``EmbeddingsWithFixes``, cut at the chunk's end as it cuts them),
    through a forward hook on the token embedding."""
    if not any(rows):
        yield
        return
    missing = [fix.name for fixes in rows for fix in fixes if fix.name not in vectors]
    if missing:
        raise ValueError(f"embedding {missing[0]} is not loaded")

    def hook(module: Any, args: Any, output: torch.Tensor) -> torch.Tensor:
        output = output.clone()
        for row, fixes in enumerate(rows):
            for fix in fixes:
                vec = vectors[fix.name].to(device=output.device, dtype=output.dtype)
                start = fix.offset + 1
                count = min(output.shape[1] - start, vec.shape[0])
                output[row, start:start + count] = vec[:count]
        return output

    handle = text_model(text_encoder).embeddings.token_embedding.register_forward_hook(hook)
    try:
        yield
    finally:
        handle.remove()


def encode_variants(text_encoder: Any, variants: Sequence[Sequence[Chunk]], clip_skip: int,
                    embeddings: Mapping[str, torch.Tensor] | None = None) -> torch.Tensor:
    """Several texts of one prompt (its prompt-editing schedule) encoded together,
    (V, 77*k, C) in float32: per chunk index one text-encoder call over all V, so
    the mean restoration is over all of them, as A1111 encodes a schedule; a shorter
    variant is padded with empty chunks first. ``text_encoder`` must be in float32;
    ``embeddings`` holds the (n, C) vectors of the embeddings the chunks' fixes name."""
    if clip_skip > layers(text_encoder):
        raise ValueError(f"clip skip {clip_skip} is more than the text encoder's {layers(text_encoder)} layers")
    device = next(text_encoder.parameters()).device
    count = max(len(chunks) for chunks in variants)
    bos, eos = variants[0][0].tokens[0], variants[0][0].tokens[-1]
    empty = Chunk((bos, *[eos] * (CHUNK + 1)), (1.0,) * (CHUNK + 2))  # BOS + 76 EOS: A1111's empty_chunk
    parts = []
    for index in range(count):
        column = [chunks[index] if index < len(chunks) else empty for chunks in variants]
        tokens = torch.tensor([c.tokens for c in column], dtype=torch.long, device=device)
        weights = torch.tensor([c.weights for c in column], dtype=torch.float32, device=device)
        with placed(text_encoder, [c.fixes for c in column], embeddings or {}):
            parts.append(encode_chunk(text_encoder, tokens, weights, clip_skip))
    return torch.cat(parts, dim=1)


def encode(text_encoder: Any, prompt_chunks: list[Chunk], clip_skip: int,
           embeddings: Mapping[str, torch.Tensor] | None = None) -> torch.Tensor:
    """A prompt's embeddings, (1, 77*k, C) in float32, on the text encoder's device."""
    return encode_variants(text_encoder, [prompt_chunks], clip_skip, embeddings)


@dataclass(frozen=True)
class Scheduled:
    """A prompt's embeddings over the denoiser's calls: A1111's list of
    ``ScheduledPromptConditioning``. Row k of ``embeds`` serves up to call ``ends[k]``."""

    ends: tuple[int, ...]
    embeds: torch.Tensor  # (len(ends), 77*k, C)

    def index(self, call: int) -> int:
        """The row the denoiser's ``call`` (0-based) uses: the first ending at or after it
        (the first, past the end, as A1111's ``reconstruct_cond_batch``)."""
        k = bisect.bisect_left(self.ends, call)  # ends ascend; alternation has one per step
        return k if k < len(self.ends) else 0

    def at(self, call: int) -> torch.Tensor:
        k = self.index(call)
        return self.embeds[k:k + 1]


@dataclass
class Conditioning:
    """A pipeline call's embeddings: one row per image, cond and uncond padded to one
    length; the masks (1 real token, 0 padding) are None when no row was padded."""

    cond: torch.Tensor
    uncond: torch.Tensor
    cond_mask: torch.Tensor | None
    uncond_mask: torch.Tensor | None


def pad_rows(rows: list[torch.Tensor], filler: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Rows of (1, 77*k_i, C) padded with ``filler`` chunks (1, 77, C) to the longest,
    stacked; and the mask, None when every row had the same length."""
    longest = max(row.shape[1] for row in rows)
    if all(row.shape[1] == longest for row in rows):
        return torch.cat(rows), None
    padded, masks = [], []
    for row in rows:
        missing = (longest - row.shape[1]) // filler.shape[1]
        padded.append(torch.cat([row, *[filler] * missing], dim=1))
        mask = torch.zeros(1, longest, device=row.device)
        mask[:, :row.shape[1]] = 1
        masks.append(mask)
    return torch.cat(padded), torch.cat(masks)


def for_call(conds: list[torch.Tensor], unconds: list[torch.Tensor], filler: torch.Tensor) -> Conditioning:
    """Per image its prompt's and negative's embeddings, padded to one length with
    ``filler`` (the empty prompt's chunk) and masked where padded."""
    cond, cond_mask = pad_rows(conds + unconds, filler)
    if cond_mask is None:
        return Conditioning(cond[:len(conds)], cond[len(conds):], None, None)
    return Conditioning(cond[:len(conds)], cond[len(conds):], cond_mask[:len(conds)], cond_mask[len(conds):])


class CallSchedule:
    """Per image its prompt's and negative's schedules: the ``Conditioning`` of any
    denoiser call, and whether it differs from the previous call's."""

    def __init__(self, conds: list[Scheduled], unconds: list[Scheduled], filler: torch.Tensor) -> None:
        self.rows = conds + unconds
        self.count = len(conds)
        self.filler = filler
        self.changes = any(len(row.ends) > 1 for row in self.rows)
        self._last: tuple[tuple[int, ...], Conditioning] | None = None

    def at(self, call: int) -> Conditioning:
        picks = tuple(row.index(call) for row in self.rows)
        if self._last is None or self._last[0] != picks:
            rows = [row.embeds[k:k + 1] for row, k in zip(self.rows, picks)]
            self._last = picks, for_call(rows[:self.count], rows[self.count:], self.filler)
        return self._last[1]


class MaskedUnet:
    """For the duration of a ``with``, the UNet gets an ``encoder_attention_mask``
    for its cross-attention, so padded tokens are ignored. The SD pipeline passes
    none; it runs the UNet on [uncond; cond] with CFG, on cond alone without."""

    def __init__(self, unet: Any, conditioning: Conditioning) -> None:
        self.unet = unet
        self.c = conditioning

    def __enter__(self) -> MaskedUnet:
        if self.c.cond_mask is None:
            return self
        self.had_own = "forward" in vars(self.unet)
        original = self.unet.forward
        cond_mask, both = self.c.cond_mask, torch.cat([self.c.uncond_mask, self.c.cond_mask])

        def forward(*args: Any, **kwargs: Any) -> Any:
            states = kwargs.get("encoder_hidden_states", args[2] if len(args) > 2 else None)
            mask = both if states.shape[0] == both.shape[0] else cond_mask
            kwargs["encoder_attention_mask"] = mask.to(device=states.device, dtype=states.dtype)
            return original(*args, **kwargs)

        self.original = original
        self.unet.forward = forward
        return self

    def __exit__(self, *exc: Any) -> None:
        if self.c.cond_mask is None:
            return
        if self.had_own:
            self.unet.forward = self.original
        else:
            del self.unet.forward
