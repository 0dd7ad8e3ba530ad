"""The PNG `parameters` chunk read back the way AUTOMATIC1111's PNG Info and
civitai read it (A1111's parse_generation_parameters, restated here)."""

from __future__ import annotations

import io
import json
import re

import pytest
from PIL import Image

from sbrender.outputs import encode_png, infotext

# A1111: "key: value" pairs, a value either JSON-quoted or up to the next comma.
PARAM = re.compile(r'\s*(\w[\w \-/]+):\s*("(?:\\.|[^\\"])+"|[^,]*)(?:,|$)')


def parse_generation_parameters(text: str) -> dict[str, str]:
    *lines, last = text.strip().split("\n")
    if len(PARAM.findall(last)) < 3:  # A1111: a params line has at least 3 pairs
        lines.append(last)
        last = ""
    prompt, negative, in_negative = [], [], False
    for line in lines:
        line = line.strip()
        if line.startswith("Negative prompt:"):
            in_negative = True
            line = line[len("Negative prompt:"):].strip()
        (negative if in_negative else prompt).append(line)
    out = {"Prompt": "\n".join(prompt), "Negative prompt": "\n".join(negative)}
    for key, value in PARAM.findall(last):
        out[key] = json.loads(value) if value[:1] == '"' == value[-1:] else value
    return out


@pytest.mark.parametrize("prompt, negative", [
    ("a cat on a mat", ""),
    ("masterpiece, a lighthouse: at dusk\nsecond line", "blurry, lowres"),
    ("ünïcode prompt", "no: colons, please"),
])
def test_png_info_reads_our_parameters(prompt: str, negative: str) -> None:
    params = {"prompt": prompt, "negative_prompt": negative, "steps": 28, "sampler": "DPM++ 2M Karras",
              "guidance_scale": 7.5, "width": 512, "height": 768}
    data = encode_png(Image.new("RGB", (8, 8)), {"parameters": infotext(params, 1234, "my-model, v2")})
    text = Image.open(io.BytesIO(data)).text["parameters"]
    assert "Steps: " in text  # civitai's test for "has generation data"
    parsed = parse_generation_parameters(text)
    assert parsed["Prompt"] == prompt and parsed["Negative prompt"] == negative
    assert (parsed["Steps"], parsed["Sampler"], parsed["CFG scale"], parsed["Seed"], parsed["Size"]) == (
        "28", "DPM++ 2M Karras", "7.5", "1234", "512x768")
    assert parsed["Model"] == "my-model, v2"


def test_model_hash_comes_right_before_model_as_in_a1111() -> None:
    params = {"prompt": "a cat", "negative_prompt": "", "steps": 20, "sampler": "Euler a",
              "guidance_scale": 7, "width": 512, "height": 512}
    text = infotext(params, 7, "dreamshaper_8", "879db523c3")
    assert text.endswith("Size: 512x512, Model hash: 879db523c3, Model: dreamshaper_8")
    parsed = parse_generation_parameters(text)
    assert parsed["Model hash"] == "879db523c3" and parsed["Model"] == "dreamshaper_8"
    assert "Model hash" not in parse_generation_parameters(infotext(params, 7, "tiny-random"))


def test_clip_skip_comes_after_model_and_only_above_1_as_in_a1111() -> None:
    params = {"prompt": "a cat", "negative_prompt": "", "steps": 20, "sampler": "Euler a",
              "guidance_scale": 7, "width": 512, "height": 512, "clip_skip": 2}
    text = infotext(params, 7, "dreamshaper_8", "879db523c3")
    assert text.endswith("Model hash: 879db523c3, Model: dreamshaper_8, Clip skip: 2")
    assert parse_generation_parameters(text)["Clip skip"] == "2"
    assert "Clip skip" not in infotext({**params, "clip_skip": 1}, 7, "dreamshaper_8")
