"""Safe checks on encoded image bytes (no re-encoding: the bytes travel on unchanged)."""

from __future__ import annotations

import io

from PIL import Image, UnidentifiedImageError

# PIL's own decompression-bomb limit, used as the default.
DEFAULT_MAX_PIXELS = 89_478_485
IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp", "bmp", "gif", "tif", "tiff")


class BadImage(ValueError):
    """Raised with a message fit for the stats ``error`` column."""


def probe_image(data: bytes | None, max_pixels: int = DEFAULT_MAX_PIXELS,
                decode: bool = True) -> tuple[int, int, str]:
    """Return ``(width, height, format)`` of encoded image bytes or raise :class:`BadImage`.

    The header is read first and the pixel count checked before any decoding, so a file that
    claims 50,000 x 50,000 pixels costs nothing. With ``decode`` the image is also decoded
    (JPEG in draft mode, at reduced scale) to catch corrupt and truncated files.
    """
    if data is None:
        raise BadImage("no image")
    if len(data) == 0:
        raise BadImage("empty image (0 bytes)")
    saved = Image.MAX_IMAGE_PIXELS
    Image.MAX_IMAGE_PIXELS = None  # our own limit below reports the claimed size
    try:
        img = Image.open(io.BytesIO(data))
    except UnidentifiedImageError:
        raise BadImage(f"not a recognised image format ({len(data)} bytes)") from None
    except Exception as exc:  # PIL raises many types on malformed headers
        raise BadImage(f"unreadable image header: {type(exc).__name__}: {exc}") from None
    finally:
        Image.MAX_IMAGE_PIXELS = saved
    width, height = img.size
    fmt = (img.format or "").lower()
    if width <= 0 or height <= 0:
        raise BadImage(f"invalid image size {width}x{height}")
    if width * height > max_pixels:
        raise BadImage(f"image too large: {width}x{height} pixels (limit {max_pixels})")
    if decode:
        try:
            if fmt == "jpeg":
                img.draft("RGB", (max(1, width // 8), max(1, height // 8)))
            img.load()
        except Exception as exc:
            raise BadImage(f"corrupt image data ({fmt or 'unknown'}): {exc}") from None
    return width, height, fmt


def decode_rgb(data: bytes, max_pixels: int = DEFAULT_MAX_PIXELS, max_side: int | None = None) -> Image.Image:
    """Decode image bytes to RGB (for OCR, thumbnails): size limit by header, transparency
    flattened on white, optionally downscaled so the longest side is at most ``max_side``.
    Raises :class:`BadImage`."""
    probe_image(data, max_pixels, decode=False)
    try:
        img = Image.open(io.BytesIO(data))
        if max_side and max(img.size) > max_side and img.format == "JPEG":
            img.draft("RGB", (max_side, max_side))  # decode at 1/2, 1/4 or 1/8 scale: faster
        img.load()
        if img.mode in ("RGBA", "LA", "PA") or (img.mode == "P" and "transparency" in img.info):
            rgba = img.convert("RGBA")
            img = Image.new("RGB", rgba.size, (255, 255, 255))
            img.paste(rgba, mask=rgba.getchannel("A"))
        else:
            img = img.convert("RGB")
    except Exception as exc:
        raise BadImage(f"cannot decode image: {type(exc).__name__}: {exc}") from None
    if max_side and max(img.size) > max_side:
        img.thumbnail((max_side, max_side), Image.Resampling.BICUBIC)
    return img
