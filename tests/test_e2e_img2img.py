"""img2img through a real daemon (tiny-random): hostile init images each earn one failed result
that names the field and says what to fix, their files are archived as they came, the daemon
goes on serving; a good one is recorded by its sha256 and survives `sbrender retry`."""

from __future__ import annotations

import base64
import hashlib
import io
import json
import random
import struct
import zlib
from collections.abc import Callable
from pathlib import Path

import pytest
from PIL import Image

from conftest import DaemonProcess, Spool, daemon_env, sbrender, wait_for

MAX_IMAGE_BYTES = 64 * 1024  # the daemon's cap in these tests, so "too large" stays small


def encode(image: Image.Image, fmt: str = "PNG") -> bytes:
    buf = io.BytesIO()
    image.save(buf, fmt)
    return buf.getvalue()


def noise(width: int, height: int, seed: int = 0) -> Image.Image:
    return Image.frombytes("RGB", (width, height), random.Random(seed).randbytes(width * height * 3))


def _chunk(kind: bytes, body: bytes) -> bytes:
    return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))


def bomb_png(side: int = 20000) -> bytes:
    """A 1-bit PNG of side x side pixels in about 50 KB."""
    rows = (b"\x00" * (1 + (side + 7) // 8)) * side
    return (b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", struct.pack(">IIBBBBB", side, side, 1, 0, 0, 0, 0))
            + _chunk(b"IDAT", zlib.compress(rows, 9)) + _chunk(b"IEND", b""))


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


GOOD = encode(noise(96, 64, seed=1))
TRUNCATED = encode(noise(96, 96, seed=2))[:3000]
HUGE = encode(noise(160, 160, seed=3))  # about 77 KB of noise, over the 64 KB cap

# (file, its init_image and other fields, the field named, what the message says)
HOSTILE: list[tuple[str, dict[str, object], str, str]] = [
    ("bomb.json", {"init_image": b64(bomb_png())}, "init_image",
     "is 20000x20000 pixels (400,000,000), more than the limit of 16,777,216 (limits.max_image_pixels)"),
    ("truncated.json", {"init_image": b64(TRUNCATED)}, "init_image", "is a PNG image that is truncated or damaged"),
    ("text.yaml", {"init_image": b64(b"prompt: not a picture\n")}, "init_image",
     "is not an image: it is text ('prompt: not a picture'...)"),
    ("gif.json", {"init_image": b64(encode(noise(8, 8), "GIF"))}, "init_image", "is a GIF image; only PNG, JPEG or WebP"),
    ("tiff.json", {"init_image": b64(encode(noise(8, 8), "TIFF"))}, "init_image", "is a TIFF image"),
    ("svg.json", {"init_image": "data:image/svg+xml;base64," + b64(b'<svg xmlns="http://www.w3.org/2000/svg"/>')},
     "init_image", "is an SVG (vector) image"),
    ("badb64.json", {"init_image": "iVBORw0KGgo***"}, "init_image", "is not base64: '*' at character 12"),
    ("huge.json", {"init_image": b64(HUGE)}, "init_image",
     f"more than the limit of {MAX_IMAGE_BYTES} (limits.max_image_bytes)"),
    ("path.json", {"init_image": "../../etc/passwd"}, "init_image", "not a file name or URL"),
    ("alone.json", {"denoising_strength": 0.5}, "denoising_strength", "is given without init_image"),
    ("latent.json", {"init_image": b64(GOOD), "resize_mode": 3}, "resize_mode", "latent upscale"),
]


def _write(spool: Spool, name: str, fields: dict[str, object]) -> bytes:
    job = {"prompt": f"img2img {name}", **fields}  # a prompt in fields wins
    text = json.dumps(job) if name.endswith(".json") else "".join(f"{k}: {json.dumps(v)}\n" for k, v in job.items())
    spool.drop(name, text)
    return text.encode()


@pytest.fixture
def daemon(spool: Spool, start_daemon: Callable[..., DaemonProcess]) -> DaemonProcess:
    return start_daemon(spool, SBRENDER_LIMITS_MAX_IMAGE_BYTES=str(MAX_IMAGE_BYTES),
                        SBRENDER_TEST_FAULTS="img-poison=error")


def test_hostile_init_images_fail_alone_and_the_daemon_goes_on(spool: Spool, daemon: DaemonProcess) -> None:
    dropped = {name: _write(spool, name, fields) for name, fields, _, _ in HOSTILE}
    good = _write(spool, "img-good.json", {"init_image": "data:image/png;base64," + b64(GOOD),
                                           "denoising_strength": 0.6, "resize_mode": 1, "seed": 7})
    spool.drop("after.yaml", "prompt: still serving\n")

    for name, _, field, message in HOSTILE:
        result = spool.result(name.rsplit(".", 1)[0])
        assert result["status"] == "failed", name
        error = result["error"]
        assert (error["type"], error.get("field")) == ("invalid_job", field), (name, error)
        assert message in error["message"], (name, error["message"])
    assert spool.result("after")["status"] == "succeeded"
    result = spool.result("img-good")
    assert result["status"] == "succeeded", result
    assert result["params"]["init_image"] == {"sha256": hashlib.sha256(GOOD).hexdigest(), "width": 96,
                                              "height": 64, "format": "PNG", "bytes": len(GOOD)}
    assert (result["params"]["denoising_strength"], result["params"]["resize_mode"]) == (0.6, 1)
    assert b64(GOOD)[:64] not in json.dumps(result)  # the result names the image, never holds it

    # Every input archived as it came, the image inline: the failed ones and the good one.
    archived = wait_for(lambda: {p.name: p.read_bytes() for p in (spool.state / "failed").iterdir()}
                        if len(list((spool.state / "failed").iterdir())) == len(HOSTILE) else None,
                        message=lambda: str(sorted((spool.state / "failed").iterdir())))
    assert archived == dropped
    done = wait_for(lambda: (spool.state / "done" / "img-good.json").exists() or None)
    assert done and (spool.state / "done" / "img-good.json").read_bytes() == good
    assert not [line for line in daemon.lines() if line.get("level") == "error"]


def test_a_failed_img2img_job_is_retried_with_its_archived_image(spool: Spool, daemon: DaemonProcess,
                                                                 model_cache: Path) -> None:
    image = encode(noise(64, 64, seed=4), "WEBP")
    _write(spool, "img-poison.json", {"init_image": b64(image), "strength": 0.4})
    first = spool.result("img-poison")
    assert first["status"] == "failed" and first["error"]["type"] == "render"
    sha = hashlib.sha256(image).hexdigest()
    assert first["params"]["init_image"]["sha256"] == sha
    env = daemon_env(model_cache)
    wait_for(lambda: (spool.state / "failed" / "img-poison.json").exists() or None)
    retried = sbrender("retry", "img-poison", *spool.cli_args(), env=env, cwd=spool.root)
    assert retried.returncode == 0, retried.stderr
    second = wait_for(lambda: json.loads((spool.outbox / "img-poison.json").read_text())
                      if (spool.outbox / "img-poison.json").exists() and
                      (spool.state / "retried" / "img-poison.1.json").exists() else None)
    assert second["params"]["init_image"]["sha256"] == sha  # the same picture, from the archive
    assert second["params"]["denoising_strength"] == 0.4


def test_the_init_image_shapes_the_render(spool: Spool, daemon: DaemonProcess) -> None:
    """Two jobs alike (seed, prompt, strength) but for their init images: img2img starts
    from each picture, so their PNGs differ; txt2img would draw the same pixels twice.
    (tiny-random's VAE has random weights: only a difference can be asserted here.)"""
    for name, colour in (("img-black", (0, 0, 0)), ("img-white", (255, 255, 255))):
        _write(spool, f"{name}.json", {"prompt": "same prompt", "seed": 11, "steps": 5, "denoising_strength": 0.2,
                                       "init_image": b64(encode(Image.new("RGB", (64, 64), colour)))})
    pixels = []
    for name in ("img-black", "img-white"):
        result = spool.result(name)
        assert result["status"] == "succeeded", result
        with Image.open(spool.outbox / result["images"][0]["file"]) as png:
            pixels.append(png.convert("RGB").tobytes())
    assert pixels[0] != pixels[1]
