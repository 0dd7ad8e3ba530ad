"""The PNG `parameters` chunk read back the way AUTOMATIC1111's PNG Info and
civitai read it (A1111's parse_generation_parameters, restated here)."""

from __future__ import annotations

import io
import json
import re

import pytest
from PIL import Image

from sbrender.models import infotext_name
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


def test_sampler_and_schedule_type_as_a1111_1_9_writes_them() -> None:
    params = {"prompt": "a cat", "negative_prompt": "", "steps": 20, "sampler": "DPM++ 2M", "scheduler": "Karras",
              "guidance_scale": 7, "width": 512, "height": 512}
    text = infotext(params, 7, "dreamshaper_8")
    assert "Steps: 20, Sampler: DPM++ 2M, Schedule type: Karras, CFG scale: 7, " in text
    parsed = parse_generation_parameters(text)
    assert (parsed["Sampler"], parsed["Schedule type"]) == ("DPM++ 2M", "Karras")


def test_lora_and_ti_hashes_follow_clip_skip_in_a1111_order() -> None:
    """`Lora hashes` then `TI hashes`, each `name: hash` pairs quoted as one value;
    an embedding used in the prompt and the negative is listed twice, the prompt's first."""
    params = {"prompt": "a cat, <lora:add_detail:0.8>", "negative_prompt": "easynegative", "steps": 20,
              "sampler": "Euler a", "scheduler": "Automatic", "guidance_scale": 7, "width": 512, "height": 512,
              "clip_skip": 2}
    resources = {"chunks": 1,
                 "loras": [{"name": "add_detail", "te": 0.8, "unet": 0.8, "hash": "7c6bad76eb54"},
                           {"name": "odd,name", "te": 1.0, "unet": 1.0, "hash": "0123456789ab"}],
                 "embeddings": [{"name": "style", "hash": "aaaaaaaaaaaa", "in": "prompt"},
                                {"name": "easynegative", "hash": "c74b4e810b03", "in": "negative_prompt"}]}
    text = infotext(params, 7, "dreamshaper_8", "879db523c3", resources)
    assert text.endswith('Model: dreamshaper_8, Clip skip: 2, '
                         'Lora hashes: "add_detail: 7c6bad76eb54, oddname: 0123456789ab", '
                         'TI hashes: "style: aaaaaaaaaaaa, easynegative: c74b4e810b03"')
    parsed = parse_generation_parameters(text)
    assert parsed["Lora hashes"] == "add_detail: 7c6bad76eb54, oddname: 0123456789ab"
    assert parsed["TI hashes"] == "style: aaaaaaaaaaaa, easynegative: c74b4e810b03"
    # the tags stay in the prompt, as in A1111; a LoRA of the loras field joins them
    assert parsed["Prompt"] == "a cat, <lora:add_detail:0.8> <lora:odd,name:1>"
    assert "hashes" not in infotext(params, 7, "m", "", {"chunks": 1, "loras": [], "embeddings": []})


@pytest.mark.parametrize("record, name", [
    ({"name": "/srv/models/dreamshaper-8/", "source": "folder", "location": "/srv/models/dreamshaper-8"},
     "dreamshaper-8"),
    ({"name": "./models/anime", "source": "folder", "location": "/home/u/models/anime"}, "anime"),
    ({"name": "/srv/ckpt/realisticVision_v51.safetensors", "source": "checkpoint",
      "location": "/srv/ckpt/realisticVision_v51.safetensors"}, "realisticVision_v51"),
    ({"name": "stable-diffusion-v1-5/stable-diffusion-v1-5", "source": "hub",
      "location": "stable-diffusion-v1-5/stable-diffusion-v1-5"}, "stable-diffusion-v1-5"),
    ({"name": "tiny-random", "source": "builtin", "location": "/cache/models/tiny-random-v2"}, "tiny-random"),
])
def test_model_is_a_name_never_a_server_path(record: dict[str, str], name: str) -> None:
    assert infotext_name(record) == name


def test_sd_parsers_reads_our_png_as_an_a1111_image() -> None:
    """sd-parsers (image browsers, civitai-like tools) on a PNG with every key we write."""
    from sd_parsers import ParserManager
    from sd_parsers.data import Generators

    params = {"prompt": "masterpiece, (a cat:1.2), <lora:add_detail:0.8>", "negative_prompt": "easynegative, blurry",
              "steps": 28, "sampler": "DPM++ 2M", "scheduler": "Karras", "guidance_scale": 7,
              "width": 512, "height": 768, "clip_skip": 2}
    resources = {"loras": [{"name": "add_detail", "hash": "7c6bad76eb54"}],
                 "embeddings": [{"name": "easynegative", "hash": "c74b4e810b03", "in": "negative_prompt"}]}
    data = encode_png(Image.new("RGB", (8, 8)),
                      {"parameters": infotext(params, 1234, "dreamshaper_8", "879db523c3", resources)})
    info = ParserManager().parse(Image.open(io.BytesIO(data)))
    assert info is not None and info.generator == Generators.AUTOMATIC1111
    (sampler,) = info.samplers
    assert sampler.name == "DPM++ 2M"
    assert sampler.parameters["scheduler"] == "Karras"
    assert (sampler.parameters["cfg_scale"], sampler.parameters["seed"], sampler.parameters["steps"]) == (
        "7", "1234", "28")
    assert (sampler.model.name, sampler.model.hash) == ("dreamshaper_8", "879db523c3")
    assert [p.value for p in sampler.prompts] == [params["prompt"]]
    assert [p.value for p in sampler.negative_prompts] == [params["negative_prompt"]]
    assert info.metadata["Size"] == "512x768" and info.metadata["Clip skip"] == "2"


def test_loras_of_the_field_join_the_prompt_as_tags_so_a1111_renders_them_too() -> None:
    params = {"prompt": "a cat <lora:add_detail:0.8>", "negative_prompt": "", "steps": 20, "sampler": "Euler a",
              "scheduler": "Automatic", "guidance_scale": 7, "width": 512, "height": 512}
    loras = [{"name": "add_detail", "te": 0.8, "unet": 0.8, "hash": "7c6bad76eb54"},
             {"name": "film", "te": 0.5, "unet": 0.5, "hash": "0123456789ab"},
             {"name": "ink wash", "te": 0.1234567, "unet": 1.0, "hash": "ba9876543210"}]
    text = infotext(params, 7, "m", "", {"loras": loras})
    assert text.startswith("a cat <lora:add_detail:0.8> <lora:film:0.5> <lora:ink wash:0.1234567:1>\nSteps: 20, ")
    assert parse_generation_parameters(text)["Lora hashes"] == (
        "add_detail: 7c6bad76eb54, film: 0123456789ab, ink wash: ba9876543210")
