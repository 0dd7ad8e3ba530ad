"""What an init image costs at intake: parsing its job file (JSON, YAML) and checking the image
(base64, header, every pixel), and preparing it for a 512x512 render.

    .venv/bin/python tests/initimage_bench.py

Prints milliseconds per case (best of 3) and YAML's time over JSON's; no assertion: a benchmark.
"""

from __future__ import annotations

import base64
import io
import json
import time
from collections.abc import Callable

import numpy as np
from PIL import Image

from sbrender import initimage
from sbrender.jobs import Job, Rules, parse_job_bytes

RULES = Rules()


def best(fn: Callable[[], object], repeat: int = 3) -> float:
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def case(label: str, image: Image.Image, fmt: str, **options: object) -> None:
    buf = io.BytesIO()
    image.save(buf, fmt, **options)
    data = buf.getvalue()
    text = base64.b64encode(data).decode()
    files = {"json": json.dumps({"prompt": "x", "init_image": text}).encode(),
             "yaml": f"prompt: x\ninit_image: {text}\n".encode()}
    seconds = {ext: best(lambda: parse_job_bytes(f"a.{ext}", body, RULES)) for ext, body in files.items()}
    (entry,) = parse_job_bytes("a.json", files["json"], RULES)
    assert isinstance(entry, Job) and entry.init_image is not None
    init = entry.init_image
    prepare = best(lambda: initimage.prepare(init, 512, 512, 0))
    print(f"{label:34s} {len(files['json']) / 1e6:6.2f} MB  json {seconds['json'] * 1e3:6.0f} ms  "
          f"yaml {seconds['yaml'] * 1e3:6.0f} ms  yaml/json {seconds['yaml'] / seconds['json']:4.1f}  "
          f"prepare 512x512 {prepare * 1e3:5.0f} ms")


def main() -> None:
    rng = np.random.default_rng(0)
    ramp = np.linspace(0, 255, 4096, dtype=np.float32)
    gradient = Image.fromarray(np.stack([np.add.outer(ramp, ramp) / 2, np.add.outer(ramp, ramp[::-1]) / 2,
                                         np.tile(ramp, (4096, 1))], -1).astype(np.uint8))
    case("4096x4096 gradient, PNG", gradient, "PNG")
    case("4096x4096 gradient, JPEG q90", gradient, "JPEG", quality=90)
    case("2048x2048 noise, PNG (12.6 MB)", Image.fromarray(rng.integers(0, 256, (2048, 2048, 3), dtype=np.uint8)),
         "PNG")
    case("768x512 noise, PNG (1.2 MB)", Image.fromarray(rng.integers(0, 256, (768, 512, 3), dtype=np.uint8)), "PNG")


if __name__ == "__main__":
    main()
