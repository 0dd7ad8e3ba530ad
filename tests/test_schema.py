"""`sbrender schema` agrees with the daemon's own checks on a corpus of jobs."""

from __future__ import annotations

import json
import subprocess
import sys
from typing import Any

import jsonschema
import pytest

from sbrender.jobs import BadJob, Rules, json_schema, parse_entries

def _png() -> str:
    import base64
    import io

    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", (16, 16), (9, 99, 199)).save(buf, "PNG")
    return base64.b64encode(buf.getvalue()).decode()


PNG = _png()

CASES: list[tuple[Any, bool]] = [
    ({"prompt": "a", "init_image": PNG, "denoising_strength": 0.6, "resize_mode": 2}, True),
    ({"prompt": "a", "init_image": PNG, "strength": 1}, True),
    ({"defaults": {"init_image": PNG}, "jobs": [{"prompt": "a", "strength": 0.3}, {"prompt": "b"}]}, True),
    ({"prompt": "a", "init_image": PNG, "denoising_strength": 1.5}, False),
    ({"prompt": "a", "init_image": PNG, "resize_mode": 3}, False),
    ({"prompt": "a", "init_image": ""}, False),
    ({"prompt": "a", "denoising_strength": 0.5}, False),
    ({"prompt": "a", "resize_mode": 1}, False),
    ({"prompt": "a cat"}, True),
    ({"prompt": "a cat", "steps": 20, "cfg_scale": 5, "width": 512, "height": 768, "seed": -1, "count": 2,
      "sampler": "Euler a", "priority": 3, "metadata": {"pk": 1}, "negative_prompt": None}, True),
    ([{"prompt": "a"}, {"prompt": "b", "seed": 3}], True),
    ({"defaults": {"steps": 10}, "jobs": [{"prompt": "a"}]}, True),
    ({"prompt": ""}, False),
    ({"steps": 10}, False),
    ({"prompt": "a", "steps": 151}, False),
    ({"prompt": "a", "width": 65}, False),
    ({"prompt": "a", "height": 32}, False),
    ({"prompt": "a", "stepz": 3}, False),
    ({"prompt": "a", "sampler": "Fastest"}, False),
    ({"prompt": "a", "seed": 2**32}, False),
    ({"prompt": "a", "count": 17}, False),
    ({"prompt": "a", "metadata": [1]}, False),
    ({"defaults": {"steps": 0}, "jobs": [{"prompt": "a"}]}, False),
    ([], False),
    ({"prompt": "a <lora:x:0.5>", "loras": {"y": 0.5, "z": {"te": 1, "unet": -0.2}, "w": {"unet": 2}}}, True),
    ({"prompt": "a", "loras": None}, True),
    ({"prompt": "a", "loras": {"x": "0.5"}}, False),
    ({"prompt": "a", "loras": {"x": {"te": 1, "dyn": 4}}}, False),
    ({"prompt": "a", "loras": {"x": {}}}, False),
    ({"prompt": "a", "loras": {"": 1}}, False),
    ({"prompt": "a", "loras": ["x"]}, False),
]


@pytest.mark.parametrize("document, valid", CASES)
def test_schema_and_daemon_agree(document: Any, valid: bool) -> None:
    rules = Rules()
    schema_ok = jsonschema.Draft202012Validator(json_schema(rules)).is_valid(document)
    try:
        entries = parse_entries("job.json", document, rules)
        daemon_ok = not any(isinstance(e, BadJob) for e in entries)
    except Exception:  # noqa: BLE001 - a file-level JobError
        daemon_ok = False
    assert (schema_ok, daemon_ok) == (valid, valid)


def test_schema_command_prints_a_valid_schema_with_configured_limits(tmp_path: Any) -> None:
    env = {"SBRENDER_LIMITS_MAX_STEPS": "40", "PATH": "/usr/bin:/bin"}
    proc = subprocess.run([sys.executable, "-m", "sbrender", "schema"], capture_output=True, text=True, env=env,
                          cwd=tmp_path, check=True)
    schema = json.loads(proc.stdout)
    jsonschema.Draft202012Validator.check_schema(schema)
    assert schema["$defs"]["job"]["properties"]["steps"]["maximum"] == 40
