"""Init images (img2img): hostile bytes refused by name, good ones prepared as A1111 prepares them,
and A1111's step rule handed to diffusers' own img2img arithmetic."""

from __future__ import annotations

import base64
import io
import os
import random
import struct
import zlib
from collections.abc import Callable
from pathlib import Path

import pytest
from PIL import Image

from sbrender import initimage
from sbrender.errors import JobError
from sbrender.initimage import InitImage, a1111_steps, decode, prepare, read_file

LIMITS = {"max_bytes": 16 * 1024 * 1024, "max_pixels": 4096 * 4096}


def encode(image: Image.Image, fmt: str = "PNG", **options: object) -> bytes:
    buf = io.BytesIO()
    image.save(buf, fmt, **options)
    return buf.getvalue()


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def noise(width: int, height: int, mode: str = "RGB", seed: int = 0) -> Image.Image:
    bands = len(mode)
    return Image.frombytes(mode, (width, height), random.Random(seed).randbytes(width * height * bands))


def png_chunk(kind: bytes, body: bytes) -> bytes:
    return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))


def bomb_png(side: int = 20000) -> bytes:
    """A 1-bit PNG claiming side x side pixels: about 50 KB that would decode to 50 MB (and
    400 M pixels as RGB)."""
    rows = (b"\x00" + b"\x00" * ((side + 7) // 8)) * side
    ihdr = struct.pack(">IIBBBBB", side, side, 1, 0, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + png_chunk(b"IHDR", ihdr) + png_chunk(b"IDAT", zlib.compress(rows, 9))
            + png_chunk(b"IEND", b""))


def zero_width_png() -> bytes:
    return b"\x89PNG\r\n\x1a\n" + png_chunk(b"IHDR", struct.pack(">IIBBBBB", 0, 64, 8, 2, 0, 0, 0)) + \
        png_chunk(b"IEND", b"")


# --- good images -------------------------------------------------------------------------

@pytest.mark.parametrize("fmt", ["PNG", "JPEG", "WEBP"])
def test_png_jpeg_and_webp_are_accepted_with_their_size_and_hash(fmt: str) -> None:
    data = encode(noise(96, 40), fmt)
    image = decode(b64(data), **LIMITS)
    assert (image.format, image.width, image.height, image.data) == (fmt, 96, 40, data)
    import hashlib
    assert image.record() == {"sha256": hashlib.sha256(data).hexdigest(), "width": 96, "height": 40,
                              "format": fmt, "bytes": len(data)}
    assert base64.b64decode(image.as_base64()) == data


@pytest.mark.parametrize("wrap", [
    pytest.param(lambda s: "data:image/png;base64," + s, id="data-url"),
    pytest.param(lambda s: "DATA:image/png;charset=x;base64," + s, id="data-url-params"),
    pytest.param(lambda s: "\n".join(s[i:i + 76] for i in range(0, len(s), 76)) + "\n", id="line-wrapped"),
    pytest.param(lambda s: s.replace("+", "-").replace("/", "_"), id="url-safe"),
])
def test_base64_as_browsers_and_shells_write_it(wrap: Callable[[str], str]) -> None:
    data = encode(noise(64, 64, seed=3))
    assert decode(wrap(b64(data)), **LIMITS).data == data


def test_an_animated_png_gives_its_first_frame() -> None:
    frames = [Image.new("RGB", (32, 32), c) for c in ((200, 0, 0), (0, 200, 0), (0, 0, 200))]
    data = encode(frames[0], "PNG", save_all=True, append_images=frames[1:], duration=100)
    image = decode(b64(data), **LIMITS)
    assert image.frames == 3 and image.record()["frames"] == 3
    assert prepare(image, 32, 32, 0).getpixel((16, 16)) == (200, 0, 0)


# --- hostile and broken input: each a JobError on the field that says what it is ------------

def _truncated_png() -> str:
    data = encode(noise(128, 128))
    return b64(data[: len(data) // 2])


def _truncated_jpeg() -> str:
    data = encode(noise(128, 128), "JPEG")
    return b64(data[: len(data) // 2])


HOSTILE: list[tuple[str, Callable[[], object], str]] = [
    ("bomb", lambda: b64(bomb_png()), "is 20000x20000 pixels (400,000,000), more than the limit of 16,777,216"),
    ("truncated-png", _truncated_png, "is a PNG image that is truncated or damaged"),
    ("truncated-jpeg", _truncated_jpeg, "is a JPEG image that is truncated or damaged"),
    ("text", lambda: b64(b"prompt: a cat\nsteps: 20\n"), "is not an image: it is text ('prompt: a cat steps: 20'"),
    ("gif", lambda: b64(encode(noise(16, 16), "GIF")), "is a GIF image; only PNG, JPEG or WebP images are accepted"),
    ("tiff", lambda: b64(encode(noise(16, 16), "TIFF")), "is a TIFF image"),
    ("bmp", lambda: b64(encode(noise(16, 16), "BMP")), "is a BMP image"),
    ("svg", lambda: b64(b'<?xml version="1.0"?>\n<svg xmlns="http://www.w3.org/2000/svg" width="10" height="10"/>'),
     "is an SVG (vector) image"),
    ("pdf", lambda: b64(b"%PDF-1.7\n..."), "is not an image: it is a PDF document"),
    ("random-bytes", lambda: b64(bytes(range(200, 256)) * 4), "binary data of an unknown kind (it starts with c8 c9"),
    ("png-signature-only", lambda: b64(b"\x89PNG\r\n\x1a\n"), "is a PNG image whose header cannot be read"),
    ("zero-width", lambda: b64(zero_width_png()), "is a PNG image whose header cannot be read"),
    ("bad-char", lambda: "iVBORw0KGgo%%%", "is not base64: '%' at character 12"),
    ("cut-short", lambda: b64(encode(noise(8, 8)))[:-3], "is not valid base64"),
    ("empty", lambda: "", "init_image is empty"),
    ("empty-data-url", lambda: "data:image/png;base64,", "init_image is empty"),
    ("not-base64-url", lambda: "data:image/svg+xml,<svg/>", "is a data: URL without ;base64"),
    ("a-number", lambda: 42, "must be a string of base64"),
    ("a-path", lambda: "/home/me/cat.png", "file name or URL"),
]


@pytest.mark.parametrize("make, message", [pytest.param(m, msg, id=name) for name, m, msg in HOSTILE])
def test_hostile_init_images_are_refused_by_name(make: Callable[[], object], message: str) -> None:
    with pytest.raises(JobError) as caught:
        decode(make(), **LIMITS)
    assert caught.value.field == "init_image"
    assert message in str(caught.value)


def test_the_bomb_is_refused_from_its_header_without_decoding() -> None:
    data = bomb_png()
    assert len(data) < 64_000  # small on the wire...
    import tracemalloc
    tracemalloc.start()
    with pytest.raises(JobError, match="limits.max_image_pixels"):
        decode(b64(data), **LIMITS)
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert peak < 5_000_000  # ...and never decoded (its pixels alone are 50 MB as 1-bit, 1.2 GB as RGB)


def test_the_byte_cap_is_checked_before_decoding_base64_and_after() -> None:
    data = encode(noise(64, 64))  # about 12 KB of incompressible PNG
    with pytest.raises(JobError, match=rf"holds about \d+ bytes, more than the limit of 4096 \(limits.max_image_bytes\)"):
        decode(b64(data), max_bytes=4096, max_pixels=LIMITS["max_pixels"])
    exact = len(data)
    assert decode(b64(data), max_bytes=exact, max_pixels=LIMITS["max_pixels"]).data == data
    with pytest.raises(JobError, match=rf"is {exact} bytes, more than the limit of {exact - 1}"):
        initimage.from_bytes(data, max_bytes=exact - 1, max_pixels=LIMITS["max_pixels"])


def test_the_pixel_cap_is_inclusive() -> None:
    data = encode(noise(64, 32))
    assert decode(b64(data), max_bytes=LIMITS["max_bytes"], max_pixels=64 * 32).width == 64
    with pytest.raises(JobError, match="64x32 pixels \\(2,048\\), more than the limit of 2,047"):
        decode(b64(data), max_bytes=LIMITS["max_bytes"], max_pixels=64 * 32 - 1)


# --- reading a file on the client side ------------------------------------------------------

def test_read_file_takes_a_regular_file_only(tmp_path: Path) -> None:
    data = encode(noise(16, 16))
    (tmp_path / "cat.png").write_bytes(data)
    assert read_file(tmp_path / "cat.png", **LIMITS).data == data
    os.symlink(tmp_path / "cat.png", tmp_path / "link.png")
    with pytest.raises(JobError, match="is a symbolic link \\(not followed\\)"):
        read_file(tmp_path / "link.png", **LIMITS)
    with pytest.raises(JobError, match="is not a regular file"):
        read_file(tmp_path, **LIMITS)
    os.mkfifo(tmp_path / "fifo.png")
    with pytest.raises(JobError, match="is not a regular file"):
        read_file(tmp_path / "fifo.png", **LIMITS)
    with pytest.raises(JobError, match="No such file"):
        read_file(tmp_path / "missing.png", **LIMITS)
    with pytest.raises(JobError, match=f"is {len(data)} bytes, more than the limit of 100"):
        read_file(tmp_path / "cat.png", max_bytes=100, max_pixels=LIMITS["max_pixels"])


# --- prepared as A1111 prepares it ------------------------------------------------------------

def _init(image: Image.Image, fmt: str = "PNG", **options: object) -> InitImage:
    return decode(b64(encode(image, fmt, **options)), **LIMITS)


def test_exif_orientation_is_applied() -> None:
    source = Image.new("RGB", (80, 40), (255, 0, 0))
    source.paste((0, 0, 255), (0, 0, 40, 40))  # blue left half, red right half
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 CW to display"
    image = _init(source, "JPEG", exif=exif.tobytes(), quality=95)
    assert (image.width, image.height) == (80, 40)  # as stored
    shown = prepare(image, 40, 80, 0)
    top, bottom = shown.getpixel((20, 10)), shown.getpixel((20, 70))
    assert top[2] > 200 and top[0] < 60, top  # the left half is on top once turned clockwise
    assert bottom[0] > 200 and bottom[2] < 60, bottom


@pytest.mark.parametrize("source", [
    pytest.param(Image.new("RGBA", (16, 16), (255, 0, 0, 0)), id="RGBA"),
    pytest.param(Image.new("LA", (16, 16), (0, 0)), id="LA"),
    pytest.param(Image.new("P", (16, 16), 0), id="P-transparency"),
])
def test_transparency_is_flattened_onto_white(source: Image.Image) -> None:
    options = {"transparency": 0} if source.mode == "P" else {}
    assert prepare(_init(source, **options), 16, 16, 0).getpixel((8, 8)) == (255, 255, 255)


def test_half_transparent_red_becomes_pink_over_white() -> None:
    out = prepare(_init(Image.new("RGBA", (16, 16), (255, 0, 0, 128))), 16, 16, 0)
    assert out.mode == "RGB" and out.getpixel((8, 8)) == (255, 127, 127)


def test_a_16_bit_greyscale_png_keeps_its_tones() -> None:
    import numpy as np

    source = Image.fromarray(np.full((16, 16), 30000, np.uint16))
    assert source.mode == "I;16"
    assert prepare(_init(source), 16, 16, 0).getpixel((8, 8)) == (117, 117, 117)  # 30000 >> 8, not clipped to 255


def test_just_resize_is_lanczos_to_the_jobs_size() -> None:
    source = noise(100, 60, seed=1)
    out = prepare(_init(source), 64, 96, 0)
    assert out.tobytes() == source.resize((64, 96), Image.Resampling.LANCZOS).tobytes()


def test_crop_and_resize_covers_the_frame_and_crops_the_centre() -> None:
    source = noise(200, 100, seed=2)
    out = prepare(_init(source), 64, 64, 1)
    scaled = source.resize((128, 64), Image.Resampling.LANCZOS)  # the height fills; the width overflows
    assert out.size == (64, 64) and out.tobytes() == scaled.crop((32, 0, 96, 64)).tobytes()
    tall = noise(50, 100, seed=3)
    out = prepare(_init(tall), 64, 64, 1)
    scaled = tall.resize((64, 128), Image.Resampling.LANCZOS)
    assert out.tobytes() == scaled.crop((0, 32, 64, 96)).tobytes()


def test_resize_and_fill_fits_the_image_and_stretches_its_edges_into_the_bands() -> None:
    source = noise(200, 100, seed=4)
    out = prepare(_init(source), 64, 64, 2)
    scaled = source.resize((64, 32), Image.Resampling.LANCZOS)
    assert out.crop((0, 16, 64, 48)).tobytes() == scaled.tobytes()
    # Each band is the edge stretched: PIL resampling a box of no height at the edge (as
    # A1111 asks it), so every row of a band is the same row.
    top = scaled.resize((64, 1), box=(0, 0, 64, 0)).tobytes()
    bottom = scaled.resize((64, 1), box=(0, 32, 64, 32)).tobytes()
    assert top != bottom
    assert all(out.crop((0, y, 64, y + 1)).tobytes() == top for y in range(16))
    assert all(out.crop((0, y, 64, y + 1)).tobytes() == bottom for y in range(48, 64))
    tall = noise(100, 200, seed=5)
    out = prepare(_init(tall), 64, 64, 2)
    scaled = tall.resize((32, 64), Image.Resampling.LANCZOS)
    assert out.crop((16, 0, 48, 64)).tobytes() == scaled.tobytes()
    left = scaled.resize((1, 64), box=(0, 0, 0, 64)).tobytes()
    assert all(out.crop((x, 0, x + 1, 64)).tobytes() == left for x in range(16))


def test_resize_and_fill_with_no_room_for_a_band() -> None:
    # 129x64 into 128x64: scaled to 128x63, a band of 0 rows above and 1 below (A1111 would
    # ask PIL for a 0-pixel resize and fail).
    out = prepare(_init(noise(129, 64, seed=6)), 128, 64, 2)
    assert out.size == (128, 64)


def test_same_aspect_every_mode_is_just_resize() -> None:
    source = noise(128, 64, seed=7)
    init = _init(source)
    outs = {mode: prepare(init, 64, 32, mode).tobytes() for mode in initimage.RESIZERS}
    assert len(set(outs.values())) == 1


# --- A1111's step rule, handed to diffusers ------------------------------------------------------

@pytest.mark.parametrize("steps, strength, run, first", [
    (20, 0.75, 16, 4),  # A1111: t_enc 15, 16 steps from index 4 (diffusers alone: 15 steps)
    (20, 1.0, 20, 0),  # capped at 0.999: t_enc 19, so every step
    (20, 0.0, 1, 19),
    (10, 0.3, 4, 6),  # 0.3 * 10 = 3.0000000000000004 in floats: t_enc 3
    (100, 0.29, 29, 71),  # 0.29 * 100 = 28.999999999999996: A1111's int() gives 28, so 29 steps
    (1, 0.5, 1, 0),
])
def test_a1111_step_rule(steps: int, strength: float, run: int, first: int) -> None:
    plan = a1111_steps(steps, strength)
    assert (plan.steps_run, plan.first_index) == (run, first)
    assert 0.0 < plan.strength <= 1.0


def _schedulers() -> dict[str, object]:
    from diffusers import DPMSolverMultistepScheduler, EulerDiscreteScheduler, HeunDiscreteScheduler

    sd15 = {"beta_start": 0.00085, "beta_end": 0.012, "beta_schedule": "scaled_linear", "num_train_timesteps": 1000,
            "steps_offset": 1}
    return {
        "DPM++ 2M Karras": DPMSolverMultistepScheduler(**sd15, use_karras_sigmas=True),
        "Euler": EulerDiscreteScheduler(**sd15),
        "Heun (order 2)": HeunDiscreteScheduler(**sd15),
    }


def test_diffusers_get_timesteps_runs_a1111s_steps_for_many_pairs() -> None:
    """diffusers' own StableDiffusionImg2ImgPipeline.get_timesteps, on real schedulers, given
    the strength from a1111_steps: it starts where A1111 starts and runs as many steps."""
    from diffusers import StableDiffusionImg2ImgPipeline

    rng = random.Random(12)
    strengths = [k / 100 for k in range(101)] + [rng.random() for _ in range(40)] + [1 / 3, 2 / 3, 0.999, 0.9999]
    checked = 0
    for name, scheduler in _schedulers().items():
        pipe = StableDiffusionImg2ImgPipeline(vae=None, text_encoder=None, tokenizer=None, unet=None,
                                              scheduler=scheduler, safety_checker=None, feature_extractor=None,
                                              requires_safety_checker=False)
        order = scheduler.order
        for steps in [*range(1, 61), 75, 99, 100, 150]:
            scheduler.set_timesteps(steps)
            full = scheduler.timesteps.clone()
            for strength in strengths:
                plan = a1111_steps(steps, strength)
                timesteps, n = pipe.get_timesteps(steps, plan.strength, "cpu")
                assert n == plan.steps_run, (name, steps, strength)
                assert timesteps.tolist() == full[plan.first_index * order:].tolist(), (name, steps, strength)
                checked += 1
    assert checked == 3 * 64 * len(strengths)
