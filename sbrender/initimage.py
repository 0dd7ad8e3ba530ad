"""Init images for img2img: hostile bytes in, a checked image out, prepared as A1111 does.

A job carries its init image inside the document, as base64 (``init_image``;
a ``data:image/...;base64,`` prefix is dropped). ``decode`` turns that into an
``InitImage`` under two caps: decoded bytes (``limits.max_image_bytes``) and
pixels (``limits.max_image_pixels``, read from the header before any pixel is
decoded: a 50 KB PNG can claim 20000x20000). Only PNG, JPEG and WebP are
opened, each by its own PIL plugin (an animated one: its first frame); anything
else is named ("a GIF image", "text", "an SVG") in a ``JobError`` on the field.
The pixels are decoded once at intake, so a truncated file fails its job when
it is queued, not when it renders.

``prepare`` gives the RGB image a render starts from, as A1111's img2img makes
it: EXIF orientation applied, transparency flattened onto white, then resized to
the job's size by ``resize_mode`` (``images.resize_image``). ``a1111_steps`` is
A1111's step rule, as the ``strength`` to hand diffusers.

PIL is imported inside the functions: the client and CLI import this module,
and must stay light for jobs without an image.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import io
import math
import os
import re
import stat
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from .errors import JobError

if TYPE_CHECKING:
    from PIL import Image

FIELD = "init_image"
ACCEPTED = "PNG, JPEG or WebP"
WHITE = (255, 255, 255)  # A1111's img2img_background_color default, "#ffffff"

# --- what a file is, by its first bytes ----------------------------------------------

_PNG = b"\x89PNG\r\n\x1a\n"


def _is_webp(data: bytes) -> bool:
    return data[:4] == b"RIFF" and data[8:12] == b"WEBP"


def _is_isobmff_image(data: bytes) -> bool:  # AVIF, HEIC: an ISO media file with an image brand
    return data[4:8] == b"ftyp" and data[8:12] in (b"avif", b"avis", b"heic", b"heix", b"mif1", b"msf1", b"hevc")


# (test, format accepted or None, description for a refusal), first match wins.
SIGNATURES: tuple[tuple[Callable[[bytes], bool], str | None, str], ...] = (
    (lambda d: d.startswith(_PNG), "PNG", "a PNG image"),
    (lambda d: d.startswith(b"\xff\xd8\xff"), "JPEG", "a JPEG image"),
    (_is_webp, "WEBP", "a WebP image"),
    (lambda d: d[:6] in (b"GIF87a", b"GIF89a"), None, "a GIF image"),
    (lambda d: d[:4] in (b"II*\x00", b"MM\x00*"), None, "a TIFF image"),
    (lambda d: d[:2] == b"BM", None, "a BMP image"),
    (lambda d: d[:4] == b"\x00\x00\x01\x00", None, "an ICO icon"),
    (lambda d: d[:4] == b"8BPS", None, "a Photoshop (PSD) file"),
    (_is_isobmff_image, None, "an AVIF or HEIC image"),
    (lambda d: d[:2] == b"\xff\x0a" or d[4:12] == b"JXL \r\n\x87\n", None, "a JPEG XL image"),
    (lambda d: d[4:12] == b"jP  \r\n\x87\n", None, "a JPEG 2000 image"),
    (lambda d: d[:4] == b"%PDF", None, "a PDF document"),
    (lambda d: d[:4] == b"PK\x03\x04", None, "a ZIP archive"),
    (lambda d: d[:2] == b"\x1f\x8b", None, "a gzip archive"),
)
_SVG = re.compile(rb"<svg[\s>]", re.IGNORECASE)


def identify(data: bytes) -> tuple[str | None, str]:
    """``(format, description)``: the accepted PIL format name ("PNG", "JPEG",
    "WEBP") or None, and what the bytes are, for a person."""
    for test, fmt, description in SIGNATURES:
        if test(data):
            return fmt, description
    head = data[:4096]
    if _SVG.search(head):
        return None, "an SVG (vector) image"
    try:
        text = head.decode("utf-8")
    except UnicodeDecodeError as err:
        if err.start < len(head) - 3:  # not just a character cut at the 4 KB mark
            return None, f"binary data of an unknown kind (it starts with {data[:8].hex(' ')})"
        text = head[:err.start].decode("utf-8")
    stripped = text.lstrip("\ufeff \t\r\n")
    if stripped.startswith("<"):
        return None, "an HTML or XML document"
    sample = " ".join(stripped.split())[:40]
    return None, f"text ({sample!r}...)" if sample else "blank text"


# --- the checked image ---------------------------------------------------------------

@dataclass(frozen=True)
class InitImage:
    """An init image that passed every check: its bytes, as the job gave them."""

    data: bytes = field(repr=False)
    sha256: str
    format: str  # PIL's name: "PNG", "JPEG", "WEBP"
    width: int  # as stored; an EXIF rotation swaps them in ``prepare``
    height: int
    frames: int = 1  # an animated PNG or WebP: the first frame is used

    def record(self) -> dict[str, Any]:
        """What a result records of it (never the bytes: results stay small)."""
        out: dict[str, Any] = {"sha256": self.sha256, "width": self.width, "height": self.height,
                               "format": self.format, "bytes": len(self.data)}
        if self.frames > 1:
            out["frames"] = self.frames
        return out

    def as_base64(self) -> str:
        """The bytes as a job document's ``init_image`` holds them."""
        return base64.b64encode(self.data).decode("ascii")


def base64_chars(max_bytes: int) -> int:
    """Characters of base64 that ``max_bytes`` bytes take (padded, without line breaks)."""
    return 4 * math.ceil(max_bytes / 3)


_DATA_URL = re.compile(r"data:([^,;]*)((?:;[^,;]*)*),", re.IGNORECASE)
_NOT_BASE64 = re.compile(r"[^A-Za-z0-9+/=\s]")
_NOT_URLSAFE = re.compile(r"[^A-Za-z0-9\-_=\s]")


def decode(value: Any, *, max_bytes: int, max_pixels: int, name: str = FIELD, pixels: bool = True) -> InitImage:
    """The init image a job's field holds (base64, maybe a data URL); ``JobError`` naming ``name``.
    ``pixels=False`` checks all but the pixel data (a listing of queued jobs)."""
    if not isinstance(value, str):
        kind = {bool: "a boolean", int: "a number", float: "a number", list: "a list",
                dict: "a mapping"}.get(type(value), type(value).__name__)
        raise JobError(f"{name} must be a string of base64 (the image file's bytes), not {kind}", field=name)
    payload = value
    url = _DATA_URL.match(payload)
    if url:
        if ";base64" not in url.group(2).lower():
            raise JobError(f"{name} is a data: URL without ;base64", field=name,
                           hint="write data:image/png;base64,<base64 of the file>")
        payload = payload[url.end():]
    # Line-wrapped base64 (base64(1), YAML block scalars): str methods, not a regex
    # (a Unicode \s scan of 20 MB takes 0.2 s).
    text = "".join(payload.split()) if any(c in payload for c in " \n\r\t\f\v") else payload
    if not text:
        raise JobError(f"{name} is empty", field=name, hint="give the image file's bytes in base64")
    limit = base64_chars(max_bytes)
    if len(text) > limit:
        raise JobError(f"{name} holds about {len(text) // 4 * 3} bytes, more than the limit of {max_bytes} "
                       f"(limits.max_image_bytes)", field=name, hint="send a smaller image (PNG, JPEG or WebP)")
    return from_bytes(_b64decode(text, payload, name), max_bytes=max_bytes, max_pixels=max_pixels, name=name,
                      pixels=pixels)


def _b64decode(text: str, payload: str, name: str) -> bytes:
    """``text``: ``payload`` without whitespace. Decoded strictly; only a failure is
    looked at closely, to say which character is wrong (offsets in ``payload``)."""
    urlsafe = ("-" in text or "_" in text) and not ("+" in text or "/" in text)  # JavaScript's base64url
    try:
        return base64.b64decode(text, altchars=b"-_" if urlsafe else None, validate=True)
    except (binascii.Error, ValueError) as err:
        bad = (_NOT_URLSAFE if urlsafe else _NOT_BASE64).search(payload)
        if bad is None:
            raise JobError(f"{name} is not valid base64: {err}", field=name,
                           hint="it may be cut short; send the whole file's base64, padded with '='") from None
        hint = ("the field holds the image itself, not a file name or URL: `sbrender submit --init-image PATH` "
                "and Client.submit(init_image=Path(...)) read a file for you"
                if len(payload) < 4096 and bad.group() in ".:\\~" else "give the image file's bytes in base64")
        raise JobError(f"{name} is not base64: {bad.group()!r} at character {bad.start() + 1}", field=name,
                       hint=hint) from None


def from_bytes(data: bytes, *, max_bytes: int, max_pixels: int, name: str = FIELD, pixels: bool = True) -> InitImage:
    """Check an image file's bytes: size, kind, pixel count (before decoding), then (``pixels``)
    every pixel."""
    if not data:
        raise JobError(f"{name} is empty (0 bytes)", field=name, hint="give the image file's bytes in base64")
    if len(data) > max_bytes:
        raise JobError(f"{name} is {len(data)} bytes, more than the limit of {max_bytes} (limits.max_image_bytes)",
                       field=name, hint="send a smaller image (PNG, JPEG or WebP)")
    fmt, description = identify(data)
    if fmt is None:
        if any(word in description for word in ("image", "icon", "Photoshop")):
            raise JobError(f"{name} is {description}; only {ACCEPTED} images are accepted", field=name,
                           hint="convert it to PNG")
        raise JobError(f"{name} is not an image: it is {description}", field=name,
                       hint=f"give a {ACCEPTED} file's bytes in base64")
    image = _open(data, fmt, description, name)
    width, height = image.size
    if width < 1 or height < 1:
        raise JobError(f"{name} is {description} of {width}x{height} pixels", field=name)
    if width * height > max_pixels:
        raise JobError(f"{name} is {width}x{height} pixels ({width * height:,}), more than the limit of "
                       f"{max_pixels:,} (limits.max_image_pixels)", field=name,
                       hint="scale it down: it is resized to the job's width and height anyway")
    try:
        frames = int(getattr(image, "n_frames", 1) or 1)
        if pixels:
            image.load()  # every pixel of the first frame: a truncated file fails now, not at render
    except Exception as err:  # PIL's decoders raise OSError, SyntaxError, ValueError, zlib.error...
        raise JobError(f"{name} is {description} that is truncated or damaged: {_first_line(err)}",
                       field=name, hint="send the whole file") from None
    finally:
        image.close()
    return InitImage(data=data, sha256=hashlib.sha256(data).hexdigest(), format=fmt, width=width,
                     height=height, frames=frames)


def _open(data: bytes, fmt: str, description: str, name: str) -> Image.Image:
    """The image's header, read by the plugin of its format only. The plugin class,
    not ``Image.open``: no other decoder is tried, and PIL's own bomb check (a
    warning, then an error at twice 89 M pixels) stays out of the way of ours."""
    from PIL import JpegImagePlugin, PngImagePlugin, WebPImagePlugin

    plugins = {"PNG": PngImagePlugin.PngImageFile, "JPEG": JpegImagePlugin.JpegImageFile,
               "WEBP": WebPImagePlugin.WebPImageFile}
    try:
        return plugins[fmt](io.BytesIO(data))
    except Exception as err:
        raise JobError(f"{name} is {description} whose header cannot be read: {_first_line(err)}",
                       field=name, hint="the file is damaged or not what its first bytes say") from None


def _first_line(err: BaseException) -> str:
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__


def read_file(path: str | os.PathLike[str], *, max_bytes: int, max_pixels: int, name: str = FIELD) -> InitImage:
    """An init image from a file the caller names (the CLI, the client): a regular
    file, not followed through a symbolic link, no larger than ``max_bytes``."""
    flags = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0)
    try:
        fd = os.open(path, flags)
    except OSError as err:
        why = "is a symbolic link (not followed)" if os.path.islink(path) else f"cannot be opened: {err.strerror}"
        raise JobError(f"{name} file {os.fspath(path)} {why}", field=name,
                       hint="name the image file itself") from None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise JobError(f"{name} file {os.fspath(path)} is not a regular file", field=name)
        if st.st_size > max_bytes:
            raise JobError(f"{name} file {os.fspath(path)} is {st.st_size} bytes, more than the limit of "
                           f"{max_bytes} (limits.max_image_bytes)", field=name, hint="send a smaller image")
        with os.fdopen(os.dup(fd), "rb") as f:
            data = f.read(max_bytes + 1)
    finally:
        os.close(fd)
    return from_bytes(data, max_bytes=max_bytes, max_pixels=max_pixels, name=name)


# --- the image a render starts from ----------------------------------------------------

RESIZE_MODES: dict[int, str] = {0: "just resize", 1: "crop and resize", 2: "resize and fill"}
REFUSED_RESIZE_MODES: dict[int, str] = {
    3: "3 is A1111's \"just resize (latent upscale)\", which resizes the latents, not the image; "
       "it is not supported: use 0 (just resize), 1 (crop and resize) or 2 (resize and fill)",
}


def prepare(init: InitImage, width: int, height: int, resize_mode: int) -> Image.Image:
    """The RGB image of ``width`` x ``height`` that img2img starts from, as A1111
    makes it: EXIF orientation applied, alpha flattened onto white, then resized
    by ``resize_mode`` (0 just resize, 1 crop and resize, 2 resize and fill)."""
    from PIL import Image, ImageOps

    image = Image.open(io.BytesIO(init.data), formats=[init.format])
    image.seek(0)
    image = ImageOps.exif_transpose(image)
    return RESIZERS[resize_mode](flatten(image), width, height)


def flatten(image: Image.Image) -> Image.Image:
    """RGB, with any transparency composited onto white (A1111's ``flatten``; its
    UI hands img2img an RGBA image, so LA and palette transparency flatten too)."""
    from PIL import Image

    if image.mode.startswith("I"):  # 16-bit greyscale PNG: convert("RGB") would clip it white, as A1111's does
        import numpy as np

        image = Image.fromarray((np.clip(np.asarray(image), 0, 65535) >> 8).astype(np.uint8), "L")
    if "A" in image.mode or "transparency" in image.info:
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, WHITE)
        background.paste(rgba, mask=rgba)
        image = background
    return image.convert("RGB")


def _lanczos(image: Image.Image, width: int, height: int) -> Image.Image:
    from PIL import Image

    return image.resize((width, height), resample=Image.Resampling.LANCZOS)


def _just_resize(image: Image.Image, width: int, height: int) -> Image.Image:
    return _lanczos(image, width, height)


def _scaled(image: Image.Image, width: int, height: int, cover: bool) -> tuple[int, int]:
    """The size the image takes when scaled, aspect kept, to cover the target (or to
    fit in it): one side is the target's, the other floored, as A1111 computes it."""
    wider = width * image.height > image.width * height  # the target is wider than the image
    if wider == cover:
        return width, image.height * width // image.width
    return image.width * height // image.height, height


def _centered(image: Image.Image, width: int, height: int, size: tuple[int, int]) -> Image.Image:
    from PIL import Image

    canvas = Image.new("RGB", (width, height))
    canvas.paste(image, box=(width // 2 - size[0] // 2, height // 2 - size[1] // 2))
    return canvas


def _crop_and_resize(image: Image.Image, width: int, height: int) -> Image.Image:
    size = _scaled(image, width, height, cover=True)
    return _centered(_lanczos(image, *size), width, height, size)


def _resize_and_fill(image: Image.Image, width: int, height: int) -> Image.Image:
    """Fit inside, centred; the bands either side are the image's edge rows (or
    columns) stretched, as A1111 fills them. A band of no height is skipped (PIL
    refuses a resize to 0 pixels)."""
    size = _scaled(image, width, height, cover=False)
    resized = _lanczos(image, *size)
    canvas = _centered(resized, width, height, size)
    if size[1] < height:  # bands above and below
        band = height // 2 - size[1] // 2
        if band > 0:
            canvas.paste(resized.resize((width, band), box=(0, 0, width, 0)), box=(0, 0))
            canvas.paste(resized.resize((width, band), box=(0, size[1], width, size[1])), box=(0, band + size[1]))
    elif size[0] < width:  # bands left and right
        band = width // 2 - size[0] // 2
        if band > 0:
            canvas.paste(resized.resize((band, height), box=(0, 0, 0, height)), box=(0, 0))
            canvas.paste(resized.resize((band, height), box=(size[0], 0, size[0], height)), box=(band + size[0], 0))
    return canvas


RESIZERS: dict[int, Callable[[Image.Image, int, int], Image.Image]] = {
    0: _just_resize, 1: _crop_and_resize, 2: _resize_and_fill,
}


# --- A1111's step rule --------------------------------------------------------------------

A1111_MAX_STRENGTH = 0.999  # A1111 caps the strength so that some of the image always survives


@dataclass(frozen=True)
class Img2ImgSteps:
    """How A1111 runs img2img at ``steps`` and a denoising strength, for diffusers."""

    strength: float  # give StableDiffusionImg2ImgPipeline this, with num_inference_steps=steps
    steps_run: int  # denoising steps A1111 runs (t_enc + 1), and diffusers with ``strength``
    first_index: int  # where in the full schedule of ``steps`` they start (steps - steps_run)


def a1111_steps(steps: int, denoising_strength: float) -> Img2ImgSteps:
    """A1111's img2img steps: ``t_enc = int(min(strength, 0.999) * steps)`` (in
    floats, as A1111 computes it), then t_enc + 1 steps from sigma index steps -
    t_enc - 1. diffusers' ``get_timesteps`` runs ``int(steps * strength)`` steps
    from index steps - that, one fewer at the same strength; the strength returned
    here lies half a step inside the wanted count, so float rounding cannot move it."""
    if steps < 1:
        raise ValueError(f"steps must be at least 1, not {steps}")
    t_enc = int(min(denoising_strength, A1111_MAX_STRENGTH) * steps)
    run = max(0, t_enc) + 1
    strength = 1.0 if run >= steps else (run + 0.5) / steps
    return Img2ImgSteps(strength=strength, steps_run=run, first_index=steps - run)
