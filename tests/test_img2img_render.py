"""img2img through the real renderer: the same loaded modules as txt2img, A1111's
step rule, and pixels equal to diffusers' own img2img pipeline fed the same
prompts, image, strength and noise."""

from __future__ import annotations

import io
import random
from pathlib import Path
from typing import Any

import pytest
from PIL import Image

from sbrender import initimage
from sbrender.jobs import Rules, build_job


def _png(width: int, height: int, seed: int) -> bytes:
    image = Image.frombytes("RGB", (width, height), random.Random(seed).randbytes(width * height * 3))
    buf = io.BytesIO()
    image.save(buf, "PNG")
    return buf.getvalue()


@pytest.fixture(scope="module")
def renderer(model_cache: Path, tmp_path_factory: pytest.TempPathFactory) -> Any:
    from sbrender.config import load_settings
    from sbrender.pipeline import DiffusersRenderer

    empty = tmp_path_factory.mktemp("img2img") / "empty.yaml"
    empty.write_text("")
    r = DiffusersRenderer(load_settings(empty, env={}, overrides={
        "model": "tiny-random", "cache": str(model_cache), "offline": True, "device": "cpu", "dtype": "float32"}))
    r.load()
    return r


def _job(renderer: Any, **fields: Any) -> Any:
    import base64

    data = {"prompt": "a harbour at dawn", "negative_prompt": "blurry", "steps": 10, "width": 64, "height": 72,
            "seed": 3, "sampler": "Euler", "init_image": base64.b64encode(_png(80, 80, 1)).decode(),
            "denoising_strength": 0.55, "resize_mode": 1, **fields}
    return build_job("i", {k: v for k, v in data.items() if v is not None}, Rules.from_settings(renderer.settings))


@pytest.mark.parametrize("sampler, strength", [("Euler", 0.55), ("DPM++ 2M", 0.3), ("Euler", 1.0)])
def test_img2img_equals_diffusers_fed_a1111s_steps(renderer: Any, sampler: str, strength: float) -> None:
    import numpy as np
    import torch
    from diffusers import StableDiffusionImg2ImgPipeline

    job = _job(renderer, sampler=sampler, denoising_strength=strength)
    steps: list[tuple[int, int]] = []
    out = renderer.render(job, [3], on_step=lambda i, n: steps.append((i, n)) and False)
    plan = initimage.a1111_steps(10, strength)
    assert plan.steps_run == int(min(strength, 0.999) * 10) + 1  # A1111: one more than diffusers' int(10 * s)
    assert steps == [(k, plan.steps_run) for k in range(1, plan.steps_run + 1)]
    assert out.images[0].size == (64, 72)

    model = renderer.model
    assert model.img2img.unet is model.pipe.unet and model.img2img.vae is model.pipe.vae  # no second copy
    reference = StableDiffusionImg2ImgPipeline(**{**model.pipe.components, "scheduler": model.pipe.scheduler})
    with torch.inference_mode():
        schedule, _ = renderer._conditioning([(job, [3])])
        cond = schedule.at(0)
        expected = reference(prompt_embeds=cond.cond, negative_prompt_embeds=cond.uncond,
                             image=[initimage.prepare(job.init_image, 64, 72, 1)], strength=plan.strength,
                             num_inference_steps=10, guidance_scale=job.guidance_scale,
                             generator=[torch.Generator().manual_seed(3)], output_type="pil").images[0]
    assert np.array_equal(np.asarray(out.images[0]), np.asarray(expected))
    # One step fewer (diffusers' own rule at this strength) draws another picture.
    if plan.steps_run < 10:
        with torch.inference_mode():
            fewer = reference(prompt_embeds=cond.cond, negative_prompt_embeds=cond.uncond,
                              image=[initimage.prepare(job.init_image, 64, 72, 1)], strength=(plan.steps_run - 0.5) / 10,
                              num_inference_steps=10, guidance_scale=job.guidance_scale,
                              generator=[torch.Generator().manual_seed(3)], output_type="pil").images[0]
        assert not np.array_equal(np.asarray(out.images[0]), np.asarray(fewer))


def test_img2img_jobs_batch_and_keep_their_own_images(renderer: Any) -> None:
    import base64

    import numpy as np

    first = _job(renderer)
    second = _job(renderer, init_image=base64.b64encode(_png(64, 72, 9)).decode(), resize_mode=0)
    txt2img = _job(renderer, init_image=None, denoising_strength=None, resize_mode=None)
    assert renderer.batch_key(first) == renderer.batch_key(second) != renderer.batch_key(txt2img)
    together = renderer.render_batch([(first, [3]), (second, [3])])
    alone = [renderer.render(first, [3]), renderer.render(second, [3])]
    for batched, single in zip(together, alone):
        difference = np.abs(np.asarray(batched.images[0], dtype=int) - np.asarray(single.images[0], dtype=int))
        assert difference.max() <= 1  # batched float math may differ in the last bit
    assert not np.array_equal(np.asarray(together[0].images[0]), np.asarray(together[1].images[0]))
