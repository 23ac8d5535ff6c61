"""A generated, labelled set for the Text-spotting filter: which image-caption pairs must be dropped.

Each pair is a caption from a small grammar and an image drawn for it, of one of five kinds:

================  ==================================================================  =========
kind              what the image shows                                                must_drop
================  ==================================================================  =========
``full``          the whole caption, wrapped over lines                               yes
``partial``       a run of the caption covering at least 60% of its content words     yes
``one_word``      a single content word of a caption with 5 or more of them           no
``unrelated``     text that shares no content word with the caption                   no
``none``          no text                                                             no
================  ==================================================================  =========

Text is drawn in varied fonts (Lato and Caladea from the ``font-lato``/``font-caladea`` wheels
when installed, and Pillow's built-in scalable font), sizes, colours (contrasting with the
background), rotations (up to 15 degrees), cases and positions, over flat, gradient and
photo-like backgrounds. Same seed, same bytes (on the same Pillow and fonts).
"""

from __future__ import annotations

import io
import random
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFilter, ImageFont

from curation.images import decode_rgb
from curation.text_overlap import content_words, tokens

KINDS = ("full", "partial", "one_word", "unrelated", "none")
MUST_DROP = {"full": True, "partial": True, "one_word": False, "unrelated": False, "none": False}

SUBJECTS = ["a dog", "a young woman", "an old fisherman", "two children", "a brown horse", "a cat",
            "a cyclist", "a chef", "three students", "a little girl", "a surfer", "a farmer"]
ADJECTIVES = ["red", "small", "wooden", "green", "vintage", "bright", "tall", "blue", "rusty",
              "golden", "cozy", "modern"]
OBJECTS = ["table", "bicycle", "truck", "boat", "house", "bridge", "guitar", "ball", "kite",
           "bench", "lamp", "garden"]
PLACES = ["the beach", "a park", "the kitchen", "a snowy mountain", "the city street",
          "a quiet lake", "a crowded market", "the old harbor"]
VERBS = ["riding", "holding", "painting", "repairing", "carrying", "watching", "kicking"]
PRODUCTS = ["Coffee Shop", "Summer Festival", "Birthday Party", "Organic Farm", "Craft Beer",
            "Yoga Studio", "Pizza Kitchen", "Book Club", "Jazz Night", "Flower Market"]
PRODUCT_TAILS = ["Poster Template", "Logo Design", "Flyer", "Banner Vector", "Sign",
                 "Invitation Card", "T-Shirt Print", "Label"]
UNRELATED = ["OPEN 24 HOURS", "SALE 50% OFF", "WELCOME", "NO PARKING", "HAPPY NEW YEAR", "EXIT",
             "www.example.com", "MENU", "STOP", "FRESH BREAD", "DO NOT ENTER", "LIVE MUSIC",
             "THANK YOU", "PRIVATE PROPERTY", "ZONE 7", "BEST PRICE"]


@dataclass(frozen=True)
class LabelledPair:
    key: str
    caption: str
    image: bytes          # JPEG
    kind: str
    shown_text: str       # what was drawn ("" for none)
    must_drop: bool


def make_caption(rng: random.Random) -> str:
    r = rng.random()
    if r < 0.5:
        s, v, a, o, p = (rng.choice(SUBJECTS), rng.choice(VERBS), rng.choice(ADJECTIVES),
                         rng.choice(OBJECTS), rng.choice(PLACES))
        return rng.choice([f"{s} {v} a {a} {o} in {p}", f"{s.capitalize()} {v} a {o} near {p}",
                           f"{s} is {v} a {a} {o} at {p}."])
    if r < 0.8:
        return f"{rng.choice(ADJECTIVES).capitalize()} {rng.choice(PRODUCTS)} {rng.choice(PRODUCT_TAILS)}"
    return (f"{rng.choice(ADJECTIVES)} {rng.choice(OBJECTS)} and {rng.choice(ADJECTIVES)} "
            f"{rng.choice(OBJECTS)} in {rng.choice(PLACES)}")


@lru_cache(maxsize=None)
def font_files() -> tuple[str, ...]:
    """TTF files shipped by the optional font wheels (empty when they are not installed)."""
    files = []
    for mod in ("font_lato", "font_caladea"):
        try:
            pkg = __import__(mod)
        except ImportError:
            continue
        folder = Path(pkg.__file__).parent / "files"
        files += sorted(str(p) for p in folder.glob("*.ttf")
                        if not any(w in p.name for w in ("Thin", "Light", "Hairline")))
    return tuple(files)


def _font(rng: random.Random, size: int) -> ImageFont.FreeTypeFont:
    choices = list(font_files()) + [None]
    path = rng.choice(choices)
    return ImageFont.truetype(path, size) if path else ImageFont.load_default(size=size)


def _background(rng: random.Random, size: tuple[int, int]) -> Image.Image:
    w, h = size
    style = rng.choice(["flat", "gradient", "photo"])
    c1 = tuple(rng.randrange(256) for _ in range(3))
    if style == "flat":
        return Image.new("RGB", size, c1)
    c2 = tuple(rng.randrange(256) for _ in range(3))
    grad = Image.linear_gradient("L").rotate(rng.choice([0, 90, 180, 270])).resize(size)
    img = Image.composite(Image.new("RGB", size, c1), Image.new("RGB", size, c2), grad)
    if style == "photo":  # blobs, shapes and sensor noise: a photo-like clutter
        d = ImageDraw.Draw(img)
        for _ in range(rng.randint(4, 9)):
            x0, y0 = rng.randrange(w), rng.randrange(h)
            x1, y1 = x0 + rng.randint(20, w // 2), y0 + rng.randint(20, h // 2)
            fill = tuple(rng.randrange(256) for _ in range(3))
            (d.ellipse if rng.random() < 0.5 else d.rectangle)([x0, y0, x1, y1], fill=fill)
        img = img.filter(ImageFilter.GaussianBlur(rng.uniform(1.5, 4)))
        noise = np.random.default_rng(rng.randrange(2**32)).normal(128, rng.uniform(10, 30), (h, w))
        img = Image.blend(img, Image.fromarray(noise.clip(0, 255).astype(np.uint8)).convert("RGB"), 0.12)
    return img


def _wrap(words: list[str], font, max_width: int) -> list[str]:
    lines, cur = [], ""
    for w in words:
        trial = f"{cur} {w}".strip()
        if cur and font.getlength(trial) > max_width:
            lines.append(cur)
            cur = w
        else:
            cur = trial
    return lines + ([cur] if cur else [])


def _draw_text(img: Image.Image, text: str, rng: random.Random,
               heights: tuple[int, int] | None = None, min_stroke: int = 0) -> None:
    """Draw ``text`` wrapped, rotated and placed at random; ``heights``: the font size range in
    divisions of the image height (default h/14 .. h/7)."""
    w, h = img.size
    text = rng.choice([text, text.upper(), text.title(), text.lower()])
    for _ in range(12):  # shrink until the wrapped block fits
        if heights is None:
            size = rng.randint(max(16, h // 14), max(18, h // 7))
        else:
            size = rng.randint(max(12, h // heights[0]), max(14, h // heights[1]))
        font = _font(rng, size)
        lines = _wrap(text.split(), font, int(w * 0.9))
        tw = int(max(font.getlength(line) for line in lines)) + 8
        th = int(len(lines) * size * 1.25) + 8
        if tw <= w * 0.95 and th <= h * 0.9:
            break
    layer = Image.new("RGBA", (tw, th), (0, 0, 0, 0))
    # text colour contrasting with the background's mean brightness
    mean = sum(img.convert("L").resize((8, 8)).getdata()) / 64
    base = rng.randint(0, 60) if mean > 128 else rng.randint(200, 255)
    fill = tuple(min(255, max(0, base + rng.randint(-40, 40))) for _ in range(3)) + (255,)
    stroke = max(min_stroke, rng.choice([0, 0, 1, 2]))
    stroke_fill = (255 - base,) * 3 + (255,)
    d = ImageDraw.Draw(layer)
    for i, line in enumerate(lines):
        d.text((4, 4 + i * size * 1.25), line, font=font, fill=fill,
               stroke_width=stroke, stroke_fill=stroke_fill)
    layer = layer.rotate(rng.uniform(-15, 15), expand=True, resample=Image.Resampling.BICUBIC)
    if layer.width > w or layer.height > h:
        layer.thumbnail((w, h))
    x = rng.randint(0, w - layer.width)
    y = rng.randint(0, h - layer.height)
    img.paste(layer, (x, y), layer)


def _shown_text(kind: str, caption: str, rng: random.Random) -> str | None:
    words = caption.split()
    content = content_words(caption)
    if kind == "full":
        return caption
    if kind == "partial":
        # shortest runs of the caption's words that still cover >= 60% of its content words
        runs = []
        for i in range(len(words)):
            for j in range(i + 1, len(words) + 1):
                found = set(content_words(" ".join(words[i:j])))
                if len(found) >= 0.6 * len(content) and j - i < len(words):
                    runs.append((j - i, " ".join(words[i:j])))
        if not runs:
            return None
        shortest = min(n for n, _ in runs)
        return rng.choice([r for n, r in runs if n <= shortest + 1])
    if kind == "one_word":
        return rng.choice(content) if len(content) >= 5 else None
    if kind == "unrelated":
        cap = set(content)
        options = [t for t in UNRELATED if not set(tokens(t)) & cap]
        return rng.choice(options)
    return ""


def make_pair(index: int, kind: str, rng: random.Random, size=(384, 288)) -> LabelledPair:
    for _ in range(50):
        caption = make_caption(rng)
        shown = _shown_text(kind, caption, rng)
        if shown is not None:
            break
    else:
        raise RuntimeError(f"no caption fits kind {kind}")
    img = _background(rng, size)
    if shown:
        _draw_text(img, shown, rng)
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=rng.randint(75, 95))
    return LabelledPair(f"{index:05d}", caption, buf.getvalue(), kind, shown, MUST_DROP[kind])


def generate(n: int = 160, seed: int = 0, size=(384, 288)) -> list[LabelledPair]:
    """``n`` pairs, kinds in equal shares (round robin), deterministic for a seed."""
    rng = random.Random(seed)
    return [make_pair(i, KINDS[i % len(KINDS)], rng, size) for i in range(n)]


def text_image(text: str, size=(320, 240), seed: int = 0) -> bytes:
    """A JPEG showing ``text`` (empty: no text) the way :func:`generate` draws it."""
    rng = random.Random(seed)
    img = _background(rng, size)
    if text:
        _draw_text(img, text, rng)
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=90)
    return buf.getvalue()


# --- real photos with real captions -----------------------------------------------------------

def usable_caption(caption: str, min_words: int = 2, max_words: int = 14) -> bool:
    """A caption that can be rendered legibly: printable ASCII, 2-14 content words."""
    return (caption.isascii() and caption.isprintable()
            and min_words <= len(content_words(caption)) <= max_words and len(caption) <= 120)


def photo_background(photo: bytes, rng: random.Random) -> Image.Image:
    """A real photo, randomly cropped (60-100% of each side) and resized so its longest side is
    320-800 px, at the photo's aspect ratio (kept between 1:2 and 2:1)."""
    img = decode_rgb(photo, flatten_alpha=False)
    w, h = img.size
    cw, ch = int(w * rng.uniform(0.6, 1.0)), int(h * rng.uniform(0.6, 1.0))
    cw, ch = min(cw, 2 * ch), min(ch, 2 * cw)
    x, y = rng.randint(0, w - cw), rng.randint(0, h - ch)
    img = img.crop((x, y, x + cw, y + ch))
    side = rng.randint(320, 800)
    scale = side / max(cw, ch)
    return img.resize((max(1, round(cw * scale)), max(1, round(ch * scale))), Image.Resampling.BICUBIC)


def real_photo_set(photos: list[bytes], captions: list[str], n: int = 180,
                   seed: int = 0) -> list[LabelledPair]:
    """``n`` labelled pairs from real photos and real captions (kinds in equal shares, round
    robin): each photo is cropped and resized (320-800 px), and the kind's text (the caption, a
    run of it, one of its words, unrelated text or none) is drawn over it at a size between 1/24
    and 1/6 of the image height, half the time with an outline. Deterministic for a seed and the
    same inputs; the project ships no photos, callers bring them (benchmarks read
    ``../shared/data`` when present)."""
    rng = random.Random(seed)
    usable = [c.strip() for c in captions if usable_caption(c.strip())]
    if not photos or not usable:
        raise ValueError("real_photo_set needs photos and usable captions")
    out = []
    for i in range(n):
        kind = KINDS[i % len(KINDS)]
        for _ in range(200):
            caption = rng.choice(usable)
            shown = _shown_text(kind, caption, rng)
            if shown is not None:
                break
        else:
            raise RuntimeError(f"no caption fits kind {kind}")
        out.append(LabelledPair(f"r{i:05d}", caption, text_over_photo(rng.choice(photos), shown, rng),
                                kind, shown, MUST_DROP[kind]))
    return out


def text_over_photo(photo: bytes, text: str, rng: random.Random) -> bytes:
    """A JPEG of the photo (:func:`photo_background`) with ``text`` drawn over it ("" for none)
    at 1/24 to 1/6 of its height, half the time with an outline."""
    img = photo_background(photo, rng)
    if text:
        _draw_text(img, text, rng, heights=(24, 6), min_stroke=rng.choice([0, 1]))
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=rng.randint(75, 95))
    return buf.getvalue()
