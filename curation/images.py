"""Safe checks on encoded image bytes (no re-encoding: the bytes travel on unchanged)."""

from __future__ import annotations

import io

from PIL import Image, UnidentifiedImageError

# PIL's own decompression-bomb limit, used as the default.
DEFAULT_MAX_PIXELS = 89_478_485
# The image extensions (webdataset member names) of the project: open_clip_train's loader and
# CLIP_benchmark read the first four, so a curated shard holds only those (output.kept_sample
# converts the others to PNG); the curation reads all of them.
TRAINABLE_FORMATS = ("jpg", "jpeg", "png", "webp")
IMAGE_EXTENSIONS = TRAINABLE_FORMATS + ("bmp", "gif", "tif", "tiff")


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


def decode_rgb(data: bytes, max_pixels: int = DEFAULT_MAX_PIXELS, max_side: int | None = None, *,
               min_side: int | None = None, flatten_alpha: bool = True) -> Image.Image:
    """Decode image bytes to RGB; the one decoder of the project (curation's OCR and report,
    training's data path, evaluation sets and concept teacher). Raises :class:`BadImage`.

    * The size limit is checked on the header first (:func:`probe_image`): a decompression bomb
      costs nothing.
    * ``max_side``: downscaled so that the longest side is at most ``max_side`` (OCR, thumbnails).
    * ``min_side``: a JPEG is decoded at the smallest scale (PIL draft mode: 1/2, 1/4, 1/8) that
      keeps both sides >= ``min_side``, much cheaper for large photos and small models.
    * ``flatten_alpha``: transparency flattened on white (OCR reads dark text on white); else the
      alpha channel is dropped, as ``PIL.Image.convert("RGB")`` does in open_clip's and
      CLIP_benchmark's loaders (training and evaluation decode as they do).
    """
    probe_image(data, max_pixels, decode=False)
    try:
        img = Image.open(io.BytesIO(data))
        draft = min_side or (max_side if max_side and max(img.size) > max_side else None)
        if draft and img.format == "JPEG":
            img.draft("RGB", (draft, draft))  # decode at 1/2, 1/4 or 1/8 scale: faster
        img.load()
        if flatten_alpha and (img.mode in ("RGBA", "LA", "PA")
                              or (img.mode == "P" and "transparency" in img.info)):
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
