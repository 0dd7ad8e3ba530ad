"""Test helper: a diffusers SD pipeline folder -> one original (LDM/CompVis)
single-file checkpoint, the form A1111 users download.

The key mapping is driven by the models' configs (block counts,
``layers_per_block``), so it fits the tiny test pipeline as well as SD1.5. It is
the inverse of what diffusers' single-file loader expects
(``diffusers.loaders.single_file_utils``: ``convert_ldm_unet_checkpoint``,
``convert_ldm_vae_checkpoint``, ``convert_ldm_clip_checkpoint``).
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

UNET_PREFIX = "model.diffusion_model."
VAE_PREFIX = "first_stage_model."
CLIP_PREFIX = "cond_stage_model.transformer."

UNET_RESNET = {"norm1": "in_layers.0", "conv1": "in_layers.2", "time_emb_proj": "emb_layers.1",
               "norm2": "out_layers.0", "conv2": "out_layers.3", "conv_shortcut": "skip_connection"}
UNET_TOP = {"conv_in": "input_blocks.0.0", "time_embedding.linear_1": "time_embed.0",
            "time_embedding.linear_2": "time_embed.2", "conv_norm_out": "out.0", "conv_out": "out.2"}
VAE_TOP = {"conv_norm_out": "norm_out"}  # conv_in, conv_out keep their names
VAE_RESNET = {"conv_shortcut": "nin_shortcut"}
VAE_ATTENTION = {"group_norm": "norm", "to_q": "q", "to_k": "k", "to_v": "v", "to_out.0": "proj_out"}


def _rename(rest: str, table: Mapping[str, str]) -> str:
    """``rest`` with its leading module path renamed by ``table`` (longest match first)."""
    for old in sorted(table, key=len, reverse=True):
        if rest == old or rest.startswith(old + "."):
            return table[old] + rest[len(old):]
    return rest


def unet_key(key: str, config: Mapping[str, Any]) -> str:
    """A ``UNet2DConditionModel`` state-dict key -> its LDM ``model.diffusion_model.*`` key."""
    per = int(config["layers_per_block"]) + 1  # LDM slots per block: the resnets, then the resampler
    rules: list[tuple[str, Callable[[re.Match[str]], str]]] = [
        (r"down_blocks\.(\d+)\.resnets\.(\d+)\.(.+)",
         lambda m: f"input_blocks.{per * int(m[1]) + int(m[2]) + 1}.0.{_rename(m[3], UNET_RESNET)}"),
        (r"down_blocks\.(\d+)\.attentions\.(\d+)\.(.+)",
         lambda m: f"input_blocks.{per * int(m[1]) + int(m[2]) + 1}.1.{m[3]}"),
        (r"down_blocks\.(\d+)\.downsamplers\.0\.conv\.(.+)",
         lambda m: f"input_blocks.{per * (int(m[1]) + 1)}.0.op.{m[2]}"),
        (r"mid_block\.resnets\.(\d+)\.(.+)",
         lambda m: f"middle_block.{2 * int(m[1])}.{_rename(m[2], UNET_RESNET)}"),
        (r"mid_block\.attentions\.0\.(.+)", lambda m: f"middle_block.1.{m[1]}"),
        (r"up_blocks\.(\d+)\.resnets\.(\d+)\.(.+)",
         lambda m: f"output_blocks.{per * int(m[1]) + int(m[2])}.0.{_rename(m[3], UNET_RESNET)}"),
        (r"up_blocks\.(\d+)\.attentions\.(\d+)\.(.+)",
         lambda m: f"output_blocks.{per * int(m[1]) + int(m[2])}.1.{m[3]}"),
        # The upsampler follows the block's last resnet (and its attention, when it has one).
        (r"up_blocks\.(\d+)\.upsamplers\.0\.conv\.(.+)",
         lambda m: f"output_blocks.{per * int(m[1]) + per - 1}."
                   f"{2 if 'CrossAttn' in config['up_block_types'][int(m[1])] else 1}.conv.{m[2]}"),
    ]
    for pattern, to_ldm in rules:
        match = re.fullmatch(pattern, key)
        if match:
            return UNET_PREFIX + to_ldm(match)
    renamed = _rename(key, UNET_TOP)
    if renamed == key:
        raise KeyError(f"no LDM name for UNet key {key}")
    return UNET_PREFIX + renamed


def vae_key(key: str, config: Mapping[str, Any]) -> str:
    """An ``AutoencoderKL`` state-dict key -> its LDM ``first_stage_model.*`` key."""
    blocks = len(config["up_block_types"])
    rules: list[tuple[str, Callable[[re.Match[str]], str]]] = [
        (r"encoder\.down_blocks\.(\d+)\.resnets\.(\d+)\.(.+)",
         lambda m: f"encoder.down.{m[1]}.block.{m[2]}.{_rename(m[3], VAE_RESNET)}"),
        (r"encoder\.down_blocks\.(\d+)\.downsamplers\.0\.conv\.(.+)", lambda m: f"encoder.down.{m[1]}.downsample.conv.{m[2]}"),
        # LDM numbers the decoder's blocks from the lowest resolution up; diffusers the other way.
        (r"decoder\.up_blocks\.(\d+)\.resnets\.(\d+)\.(.+)",
         lambda m: f"decoder.up.{blocks - 1 - int(m[1])}.block.{m[2]}.{_rename(m[3], VAE_RESNET)}"),
        (r"decoder\.up_blocks\.(\d+)\.upsamplers\.0\.conv\.(.+)",
         lambda m: f"decoder.up.{blocks - 1 - int(m[1])}.upsample.conv.{m[2]}"),
        (r"(encoder|decoder)\.mid_block\.resnets\.(\d+)\.(.+)",
         lambda m: f"{m[1]}.mid.block_{int(m[2]) + 1}.{_rename(m[3], VAE_RESNET)}"),
        (r"(encoder|decoder)\.mid_block\.attentions\.0\.(.+)", lambda m: f"{m[1]}.mid.attn_1.{_rename(m[2], VAE_ATTENTION)}"),
        (r"(encoder|decoder)\.(.+)", lambda m: f"{m[1]}.{_rename(m[2], VAE_TOP)}"),
        (r"(quant_conv|post_quant_conv)\.(.+)", lambda m: m[0]),
    ]
    for pattern, to_ldm in rules:
        match = re.fullmatch(pattern, key)
        if match:
            return VAE_PREFIX + to_ldm(match)
    raise KeyError(f"no LDM name for VAE key {key}")


def clip_key(key: str) -> str:
    """A ``CLIPTextModel`` key -> ``cond_stage_model.transformer.text_model.*`` (transformers
    5.6+ dropped the ``text_model.`` level from the model; checkpoints keep it)."""
    return CLIP_PREFIX + (key if key.startswith("text_model.") else "text_model." + key)


def ldm_state_dict(pipe: Any) -> dict[str, Any]:
    """The pipeline's UNet, VAE and text encoder as one LDM state dict (tensors copied)."""
    out: dict[str, Any] = {}
    parts: list[tuple[Any, Callable[[str], str]]] = [
        (pipe.unet, lambda k: unet_key(k, pipe.unet.config)),
        (pipe.vae, lambda k: vae_key(k, pipe.vae.config)),
        (pipe.text_encoder, clip_key),
    ]
    for model, to_ldm in parts:
        for key, tensor in model.state_dict().items():
            name = to_ldm(key)
            assert name not in out, f"two keys map to {name}"
            if name.startswith(VAE_PREFIX) and ".mid.attn_1." in name and tensor.ndim == 2:
                tensor = tensor[:, :, None, None]  # LDM's VAE attention projections are 1x1 convolutions
            out[name] = tensor.detach().clone().contiguous()
    return out


def write_checkpoint(model_folder: Path, target: Path) -> Path:
    """Save the diffusers pipeline in ``model_folder`` as one LDM ``.safetensors`` file."""
    from diffusers import StableDiffusionPipeline
    from safetensors.torch import save_file

    pipe = StableDiffusionPipeline.from_pretrained(model_folder, local_files_only=True)
    save_file(ldm_state_dict(pipe), str(target))
    return target
