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
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from . import prompts

CHUNK = 75  # tokens per chunk, without BOS and EOS
BACKTRACK = 20  # A1111's comma_padding_backtrack default


@dataclass(frozen=True)
class Chunk:
    """77 token ids (BOS, 75 tokens or EOS padding, EOS) and their weights."""

    tokens: tuple[int, ...]
    weights: tuple[float, ...]


def chunks(prompt: prompts.Prompt, tokenizer: Any, backtrack: int = BACKTRACK) -> list[Chunk]:
    """The prompt's chunks, built by A1111's rules; an empty prompt is one chunk of BOS + 76 EOS."""
    bos, eos = tokenizer.bos_token_id, tokenizer.eos_token_id
    comma = tokenizer.get_vocab().get(",</w>")
    texts = [text for text, _ in prompt.segments]
    ids = tokenizer(texts, truncation=False, add_special_tokens=False)["input_ids"]
    out: list[Chunk] = []
    tokens: list[int] = []
    weights: list[float] = []
    last_comma = -1

    def close() -> None:
        nonlocal tokens, weights, last_comma
        pad = CHUNK - len(tokens)
        out.append(Chunk((bos, *tokens, *[eos] * pad, eos), (1.0, *weights, *[1.0] * pad, 1.0)))
        tokens, weights, last_comma = [], [], -1

    for segment_ids, (text, weight) in zip(ids, prompt.segments):
        if text == "BREAK" and weight == prompts.BREAK_WEIGHT:
            close()
            continue
        for token in segment_ids:
            if token == comma:
                last_comma = len(tokens)
            elif backtrack and len(tokens) == CHUNK and last_comma != -1 and CHUNK - last_comma <= backtrack:
                cut = last_comma + 1
                moved = tokens[cut:], weights[cut:]
                tokens, weights = tokens[:cut], weights[:cut]
                close()
                tokens, weights = list(moved[0]), list(moved[1])
            if len(tokens) == CHUNK:
                close()
            tokens.append(token)
            weights.append(weight)
    if tokens or not out:
        close()
    return out


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


def encode(text_encoder: Any, prompt_chunks: list[Chunk], clip_skip: int) -> torch.Tensor:
    """A prompt's embeddings, (1, 77*k, C) in float32, on the text encoder's device.
    ``text_encoder`` must be in float32."""
    if clip_skip > layers(text_encoder):
        raise ValueError(f"clip skip {clip_skip} is more than the text encoder's {layers(text_encoder)} layers")
    device = next(text_encoder.parameters()).device
    parts = []
    for chunk in prompt_chunks:
        tokens = torch.tensor([chunk.tokens], dtype=torch.long, device=device)
        weights = torch.tensor([chunk.weights], dtype=torch.float32, device=device)
        parts.append(encode_chunk(text_encoder, tokens, weights, clip_skip))
    return torch.cat(parts, dim=1)


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
