"""A deterministic, embedded demo dataset in img2dataset's webdataset output format.

It writes ``NNNNN.tar`` + ``NNNNN.parquet`` + ``NNNNN_stats.json`` per shard, exactly as
``img2dataset --output_format webdataset`` does, with:

* captions of varied complexity, with and without actions, written from a small grammar;
* images that depict their caption, so a CLIP trained on the (curated) demo can learn something:
  each object the caption names (``OBJECTS``) is drawn as its own simple icon (a car has a body,
  a cabin and wheels, a kite is a diamond with a tail, ...), in the caption's colour adjective
  when it has one (``COLOURS``; "small"/"tall" change the icon's size/shape), over varied muted
  backgrounds; some images also show the caption's own words, some unrelated text, some no text;
* a few broken entries: failed downloads, a corrupt, a truncated and a zero-byte image, an
  empty and a non-UTF-8 caption.

:func:`write_eval_dataset` writes a held-out evaluation set drawn by the same code (another
seed) in CLIP_benchmark's ``wds/`` format: the 10 ``OBJECTS`` as classes (``.cls``) and several
captions per image (``.txt``), so it serves both zero-shot classification and retrieval.

Same arguments, same bytes: captions and images use separate seeded RNGs (one per purpose and
per sample for the images, so the captions do not depend on how images are drawn) and the tars
have fixed mtimes.
"""

from __future__ import annotations

import io
import json
import os
import random
import shutil
import tarfile
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image, ImageDraw, ImageFilter, ImageFont

SUBJECTS = ["a dog", "a young woman", "an old man", "two children", "a brown horse", "a cat",
            "a cyclist", "a chef", "three students", "a little girl", "a surfer", "a fisherman"]
ADJECTIVES = ["red", "small", "wooden", "green", "old", "bright", "tall", "blue", "rusty", "golden"]
OBJECTS = ["table", "bicycle", "car", "boat", "house", "bridge", "guitar", "ball", "kite", "bench"]
PLACES = ["the beach", "a park", "the kitchen", "a snowy mountain", "the city street",
          "a quiet lake", "the garden", "a crowded market"]
VERBS_OBJ = ["riding", "holding", "painting", "repairing", "carrying", "watching", "kicking"]
VERBS_INTR = ["running", "sleeping", "jumping", "dancing", "laughing", "swimming"]
PRODUCT_WORDS = ["Vintage", "Poster", "Sale", "Premium", "Cotton", "Shirt", "Size", "XL",
                 "Wallpaper", "HD", "Logo", "Vector", "Free", "Download", "Stock", "Photo"]
UNRELATED_TEXT = ["OPEN 24 HOURS", "SALE 50% OFF", "WELCOME", "NO PARKING", "HAPPY BIRTHDAY",
                  "EXIT", "www.example.com", "COFFEE & TEA", "MENU", "STOP"]
# colour adjectives and the RGB an object gets for them
COLOURS = {"red": (215, 35, 35), "green": (35, 160, 55), "blue": (35, 75, 215),
           "golden": (235, 185, 30), "rusty": (165, 75, 30), "wooden": (135, 90, 45),
           "bright": (255, 240, 90)}
# colours an object gets when its caption names none (none of them close to COLOURS)
PLAIN_COLOURS = [(245, 245, 245), (25, 25, 30), (150, 150, 155), (140, 60, 170), (240, 130, 190),
                 (30, 170, 180), (250, 140, 20)]
EVAL_TEMPLATES = ["a photo of a {}.", "a drawing of a {}.", "a {} in the picture.",
                  "an image showing a {}."]


def _caption(rng: random.Random) -> str:
    # Most captions that pass C and A name an object the image shows, so that a CLIP trained on
    # the curated demo can learn the objects; every kind of failing caption is still present.
    kind = rng.random()
    if kind < 0.55:  # complex with an action and an object: passes C and A
        s, v, a, o, p = (rng.choice(SUBJECTS), rng.choice(VERBS_OBJ), rng.choice(ADJECTIVES),
                         rng.choice(OBJECTS), rng.choice(PLACES))
        return rng.choice([f"{s} {v} a {a} {o} in {p}", f"{s} is {v} a {a} {o} near {p}",
                           f"{s.capitalize()} {v} a {o} at {p}.", f"a photo of {s} {v} a {a} {o}",
                           f"a {a} {o} that {s} is {v} in {p}", f"a {a} {o} standing in {p}",
                           f"an image showing a {a} {o} lying in {p}", f"a drawing of a {o} seen from {p}"])
    if kind < 0.65:  # action without objects attached
        return rng.choice([f"{rng.choice(SUBJECTS)} {rng.choice(VERBS_INTR)}",
                           f"{rng.choice(SUBJECTS)} {rng.choice(VERBS_INTR)} in {rng.choice(PLACES)}"])
    if kind < 0.80:  # objects and attributes, no action
        return rng.choice([f"a {rng.choice(ADJECTIVES)} {rng.choice(OBJECTS)} on {rng.choice(PLACES)}",
                           f"{rng.choice(ADJECTIVES)} {rng.choice(OBJECTS)} and a {rng.choice(ADJECTIVES)} "
                           f"{rng.choice(OBJECTS)}"])
    if kind < 0.92:  # product / stock-photo style word lists
        return " ".join(rng.sample(PRODUCT_WORDS, rng.randint(2, 5)))
    return rng.choice(["sunset", "IMG_%04d.JPG" % rng.randint(0, 9999), "untitled", "wallpaper",
                       rng.choice(OBJECTS)])


def _font(size: int):
    return ImageFont.load_default(size=size)


def _muted(rng: random.Random) -> tuple[int, int, int]:
    """A low-saturation colour, so backgrounds do not compete with the objects' colours."""
    grey = rng.randint(60, 220)
    return tuple(max(0, min(255, grey + rng.randint(-30, 30))) for _ in range(3))


def _background(rng: random.Random, w: int, h: int) -> Image.Image:
    """A muted gradient with a few faint shapes (a horizon, blobs, noise), varied per image."""
    c1, c2 = _muted(rng), _muted(rng)
    img = Image.linear_gradient("L").resize((w, h)).rotate(rng.choice([0, 90, 180, 270]), expand=False)
    img = Image.composite(Image.new("RGB", (w, h), c1), Image.new("RGB", (w, h), c2), img)
    overlay = Image.new("RGB", (w, h), _muted(rng))
    mask = Image.new("L", (w, h), 0)
    draw = ImageDraw.Draw(mask)
    if rng.random() < 0.5:  # a horizon
        y = rng.randint(h // 3, 3 * h // 4)
        draw.rectangle([0, y, w, h], fill=rng.randint(60, 140))
    for _ in range(rng.randint(1, 5)):
        x0, y0 = rng.randint(0, w - 1), rng.randint(0, h - 1)
        x1, y1 = min(w, x0 + rng.randint(10, w // 2)), min(h, y0 + rng.randint(10, h // 2))
        (draw.ellipse if rng.random() < 0.5 else draw.rectangle)([x0, y0, x1, y1],
                                                                 fill=rng.randint(30, 90))
    img = Image.composite(overlay, img, mask)
    if rng.random() < 0.3:
        noise = Image.frombytes("L", (w, h), rng.randbytes(w * h)).convert("RGB")  # seeded, unlike effect_noise
        img = Image.blend(img, noise, rng.uniform(0.05, 0.15))
    if rng.random() < 0.4:
        img = img.filter(ImageFilter.GaussianBlur(rng.uniform(0.5, 1.5)))
    return img


def _shade(c, f: float):
    return tuple(max(0, min(255, int(v * f))) for v in c)


def _draw_icon(draw: ImageDraw.ImageDraw, name: str, box, colour, rng: random.Random) -> None:
    """Draw object ``name`` filling ``box`` = (x0, y0, x1, y1) in ``colour``."""
    x0, y0, x1, y1 = box
    w, h = x1 - x0, y1 - y0
    line = max(2, int(min(w, h) * 0.07))
    dark = _shade(colour, 0.45) if sum(colour) > 150 else (200, 200, 200)
    X = lambda f: x0 + f * w  # noqa: E731
    Y = lambda f: y0 + f * h  # noqa: E731
    if name == "table":
        draw.rectangle([X(0.0), Y(0.30), X(1.0), Y(0.42)], fill=colour, outline=dark, width=line // 2)
        for fx in (0.06, 0.84):
            draw.rectangle([X(fx), Y(0.42), X(fx + 0.10), Y(1.0)], fill=colour, outline=dark, width=line // 2)
    elif name == "bicycle":
        r = 0.22 * w
        for cx in (X(0.22), X(0.78)):
            draw.ellipse([cx - r, Y(0.75) - r, cx + r, Y(0.75) + r], outline=colour, width=line)
        pts = [(X(0.22), Y(0.75)), (X(0.42), Y(0.45)), (X(0.70), Y(0.45)), (X(0.78), Y(0.75)),
               (X(0.50), Y(0.75)), (X(0.42), Y(0.45))]
        draw.line(pts, fill=colour, width=line)
        draw.line([(X(0.70), Y(0.45)), (X(0.66), Y(0.30)), (X(0.76), Y(0.28))], fill=colour, width=line)
        draw.line([(X(0.38), Y(0.36)), (X(0.50), Y(0.36))], fill=dark, width=line)
    elif name == "car":
        draw.rectangle([X(0.0), Y(0.45), X(1.0), Y(0.78)], fill=colour, outline=dark, width=line // 2)
        draw.polygon([(X(0.20), Y(0.45)), (X(0.32), Y(0.18)), (X(0.70), Y(0.18)), (X(0.84), Y(0.45))],
                     fill=colour, outline=dark)
        draw.polygon([(X(0.30), Y(0.43)), (X(0.37), Y(0.24)), (X(0.66), Y(0.24)), (X(0.74), Y(0.43))],
                     fill=(180, 215, 235))
        r = 0.12 * w
        for cx in (X(0.22), X(0.78)):
            draw.ellipse([cx - r, Y(0.80) - r, cx + r, Y(0.80) + r], fill=(20, 20, 20), outline=(90, 90, 90))
    elif name == "boat":
        draw.polygon([(X(0.0), Y(0.62)), (X(1.0), Y(0.62)), (X(0.82), Y(0.88)), (X(0.18), Y(0.88))],
                     fill=colour, outline=dark)
        draw.line([(X(0.50), Y(0.62)), (X(0.50), Y(0.05))], fill=(60, 40, 20), width=line)
        draw.polygon([(X(0.53), Y(0.08)), (X(0.53), Y(0.56)), (X(0.90), Y(0.56))], fill=(245, 245, 240),
                     outline=dark)
        draw.polygon([(X(0.47), Y(0.15)), (X(0.47), Y(0.56)), (X(0.18), Y(0.56))], fill=colour, outline=dark)
    elif name == "house":
        draw.rectangle([X(0.12), Y(0.45), X(0.88), Y(1.0)], fill=colour, outline=dark, width=line // 2)
        draw.polygon([(X(0.0), Y(0.47)), (X(0.5), Y(0.05)), (X(1.0), Y(0.47))], fill=_shade(colour, 0.7),
                     outline=dark)
        draw.rectangle([X(0.42), Y(0.68), X(0.58), Y(1.0)], fill=(70, 45, 25))
        draw.rectangle([X(0.20), Y(0.56), X(0.34), Y(0.70)], fill=(180, 215, 235), outline=dark)
        draw.rectangle([X(0.66), Y(0.56), X(0.80), Y(0.70)], fill=(180, 215, 235), outline=dark)
    elif name == "bridge":
        draw.rectangle([X(0.0), Y(0.30), X(1.0), Y(0.42)], fill=colour, outline=dark, width=line // 2)
        for a, b in ((0.0, 0.5), (0.5, 1.0)):
            draw.arc([X(a + 0.03), Y(0.42), X(b - 0.03), Y(1.30)], 180, 360, fill=colour, width=line * 2)
        for fx in (0.0, 0.47, 0.94):
            draw.rectangle([X(fx), Y(0.42), X(fx + 0.06), Y(1.0)], fill=colour, outline=dark)
        draw.line([(X(0.0), Y(0.30)), (X(1.0), Y(0.30))], fill=dark, width=line)
    elif name == "guitar":
        draw.rectangle([X(0.45), Y(0.0), X(0.55), Y(0.55)], fill=(90, 60, 30))
        draw.rectangle([X(0.41), Y(0.0), X(0.59), Y(0.10)], fill=(40, 30, 20))
        draw.ellipse([X(0.28), Y(0.42), X(0.72), Y(0.72)], fill=colour, outline=dark, width=line // 2)
        draw.ellipse([X(0.18), Y(0.58), X(0.82), Y(1.0)], fill=colour, outline=dark, width=line // 2)
        draw.ellipse([X(0.43), Y(0.62), X(0.57), Y(0.74)], fill=(25, 25, 25))
        for fx in (0.475, 0.5, 0.525):
            draw.line([(X(fx), Y(0.05)), (X(fx), Y(0.9))], fill=(230, 230, 230), width=1)
    elif name == "ball":
        side = min(w, h)
        cx, cy = X(0.5), Y(0.5)
        r = side * 0.45
        draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=colour, outline=dark, width=line)
        draw.arc([cx - r, cy - r * 0.45, cx + r, cy + r * 0.45], 0, 180, fill=dark, width=line)
        draw.arc([cx - r * 0.45, cy - r, cx + r * 0.45, cy + r], 270, 450, fill=dark, width=line)
    elif name == "kite":
        pts = [(X(0.5), Y(0.0)), (X(0.85), Y(0.32)), (X(0.5), Y(0.72)), (X(0.15), Y(0.32))]
        draw.polygon(pts, fill=colour, outline=dark)
        draw.line([pts[0], pts[2]], fill=dark, width=max(1, line // 2))
        draw.line([pts[1], pts[3]], fill=dark, width=max(1, line // 2))
        tail = [(X(0.5), Y(0.72)), (X(0.40), Y(0.82)), (X(0.55), Y(0.90)), (X(0.45), Y(1.0))]
        draw.line(tail, fill=dark, width=max(1, line // 2))
        for px, py in tail[1:]:
            draw.polygon([(px - 0.04 * w, py), (px, py - 0.03 * h), (px + 0.04 * w, py), (px, py + 0.03 * h)],
                         fill=colour)
    elif name == "bench":
        draw.rectangle([X(0.0), Y(0.15), X(1.0), Y(0.27)], fill=colour, outline=dark, width=line // 2)
        draw.rectangle([X(0.0), Y(0.33), X(1.0), Y(0.45)], fill=colour, outline=dark, width=line // 2)
        draw.rectangle([X(0.0), Y(0.58), X(1.0), Y(0.68)], fill=colour, outline=dark, width=line // 2)
        for fx in (0.08, 0.86):
            draw.rectangle([X(fx), Y(0.15), X(fx + 0.06), Y(1.0)], fill=(50, 50, 50))
    else:  # pragma: no cover - callers pass OBJECTS only
        raise ValueError(f"no icon for {name!r}")


def caption_objects(caption: str) -> list[tuple[str, str | None]]:
    """The (object, adjective or None) pairs a caption names, in order: ``"a red car and a
    tall house"`` -> ``[("car", "red"), ("house", "tall")]``. Only ``OBJECTS`` / ``ADJECTIVES``."""
    words = [w.strip(".,!?").lower() for w in caption.split()]
    found = []
    for i, word in enumerate(words):
        if word in OBJECTS:
            adj = words[i - 1] if i and words[i - 1] in ADJECTIVES else None
            found.append((word, adj))
    return found


def draw_objects(img: Image.Image, objects: list[tuple[str, str | None]], rng: random.Random) -> None:
    """Draw each (object, adjective) as its icon, side by side when there are several."""
    w, h = img.size
    n = len(objects)
    if not n:
        return
    draw = ImageDraw.Draw(img)
    slot = w / n
    for i, (name, adj) in enumerate(objects):
        colour = COLOURS.get(adj) or rng.choice(PLAIN_COLOURS)
        scale = rng.uniform(0.55, 0.85) * (0.6 if adj == "small" else 1.0)
        bw = min(slot * 0.92, w * scale) * (0.6 if adj == "tall" else 1.0)
        bh = h * scale * (1.0 if adj == "tall" else rng.uniform(0.7, 0.9))
        bw, bh = max(bw, 12), max(bh, 12)
        x0 = i * slot + rng.uniform(0, max(0.0, slot - bw))
        y0 = rng.uniform(0, max(0.0, h - bh))
        _draw_icon(draw, name, (x0, y0, x0 + bw, y0 + bh), colour, rng)


def draw_text(img: Image.Image, text: str, rng: random.Random) -> None:
    """Render ``text`` legibly (a contrasting box behind it) at a random place and size."""
    w, h = img.size
    draw = ImageDraw.Draw(img)
    size = rng.randint(max(12, h // 14), max(14, h // 7))
    font = _font(size)
    words, lines, line = text.split(), [], ""
    for word in words:
        trial = (line + " " + word).strip()
        if draw.textlength(trial, font=font) > w * 0.9 and line:
            lines.append(line)
            line = word
        else:
            line = trial
    lines.append(line)
    block = "\n".join(lines)
    box = draw.multiline_textbbox((0, 0), block, font=font)
    tw, th = box[2] - box[0], box[3] - box[1]
    x = rng.randint(0, max(0, w - tw - 8))
    y = rng.randint(0, max(0, h - th - 8))
    light = rng.random() < 0.5
    draw.rectangle([x, y, x + tw + 8, y + th + 8], fill=(250, 250, 245) if light else (20, 20, 25))
    draw.multiline_text((x + 4 - box[0], y + 4 - box[1]), block, font=font,
                        fill=(10, 10, 10) if light else (245, 245, 240))


def make_image(rng: random.Random, text: str | None, size: tuple[int, int] | None = None,
               fmt: str = "JPEG", caption: str | None = None) -> bytes:
    """An image depicting ``caption`` (default: ``text``), with ``text`` rendered on it if given."""
    w, h = size or (rng.choice([192, 224, 256, 320]), rng.choice([160, 192, 224, 256]))
    img = _background(rng, w, h)
    draw_objects(img, caption_objects(caption if caption is not None else (text or "")), rng)
    if text:
        draw_text(img, text, rng)
    buf = io.BytesIO()
    img.save(buf, format=fmt, quality=90) if fmt == "JPEG" else img.save(buf, format=fmt)
    return buf.getvalue()


def add_tar_member(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    """Add ``data`` as member ``name``, with fixed metadata (reproducible tars)."""
    info = tarfile.TarInfo(name)
    info.size, info.mtime, info.mode = len(data), 0, 0o444
    info.uname = info.gname = "bigdata"
    tar.addfile(info, io.BytesIO(data))


SIDECAR_SCHEMA = pa.schema([
    ("url", pa.string()), ("caption", pa.string()), ("key", pa.string()), ("status", pa.string()),
    ("error_message", pa.string()), ("width", pa.int32()), ("height", pa.int32()),
    ("original_width", pa.int32()), ("original_height", pa.int32()), ("exif", pa.string()),
    ("sha256", pa.string()),
])


def _image_rng(seed: int, purpose: str, index: int) -> random.Random:
    """A per-sample RNG for drawing, independent of the caption stream (str seeds are stable)."""
    return random.Random(f"cat-clip-demo/{purpose}/{seed}/{index}")


def demo_samples(num_samples: int, seed: int) -> list[dict]:
    """The demo pairs as dicts: key, url, caption (str or bytes), image (bytes or None), status."""
    rng = random.Random(seed)  # captions and which text goes on the image
    samples = []
    broken = {3: "failed_download", 17: "corrupt", 29: "truncated", 41: "zero_bytes",
              53: "empty_caption", 67: "bad_utf8", 89: "failed_download"}
    for i in range(num_samples):
        caption = _caption(rng)
        r = rng.random()
        text = caption if r < 0.25 else (rng.choice(UNRELATED_TEXT) if r < 0.40 else None)
        kind = broken.get(i, "text" if text == caption else ("unrelated_text" if text else "no_text"))
        img_rng = _image_rng(seed, "train", i)
        image = None if kind == "failed_download" else make_image(img_rng, text, caption=caption)
        if kind == "corrupt":
            image = bytes(img_rng.randrange(256) for _ in range(600))
        elif kind == "truncated":
            image = image[: len(image) // 3]
        elif kind == "zero_bytes":
            image = b""
        raw_caption = {"empty_caption": "   ", "bad_utf8": b"caf\xe9 with a \xff\xfe broken caption"}.get(kind, caption)
        samples.append({"index": i, "url": f"http://demo.invalid/images/{i:06d}.jpg",
                        "caption": raw_caption, "image": image, "kind": kind})
    return samples


def build_demo_dataset(output: str | Path, num_samples: int = 300, num_shards: int = 3,
                       seed: int = 0) -> str:
    """Write the demo dataset to ``output`` (skipped when already there); returns its path."""
    if num_samples < 1 or num_shards < 1:
        raise ValueError(f"demo dataset needs num_samples >= 1 and num_shards >= 1, got "
                         f"{num_samples} and {num_shards}")
    output = Path(output)
    manifest = {"num_samples": num_samples, "num_shards": num_shards, "seed": seed, "version": 3}
    marker = output / "_demo.json"
    if marker.exists() and json.loads(marker.read_text()) == manifest:
        return str(output)
    output.mkdir(parents=True, exist_ok=True)
    samples = demo_samples(num_samples, seed)
    per_shard = -(-num_samples // num_shards)
    for s in range(num_shards):
        chunk = samples[s * per_shard:(s + 1) * per_shard]
        rows = []
        with tarfile.open(output / f"{s:05d}.tar", "w", format=tarfile.USTAR_FORMAT) as tar:
            for j, smp in enumerate(chunk):
                key = f"{s:05d}{j:04d}"
                cap = smp["caption"]
                cap_bytes = cap if isinstance(cap, bytes) else cap.encode("utf-8")
                cap_str = cap_bytes.decode("utf-8", errors="replace")
                ok = smp["image"] is not None
                w = h = None
                if ok and smp["kind"] in ("text", "unrelated_text", "no_text"):
                    w, h = Image.open(io.BytesIO(smp["image"])).size
                meta = {"url": smp["url"], "caption": cap_str, "key": key,
                        "status": "success" if ok else "failed_to_download",
                        "error_message": None if ok else "HTTP Error 404: Not Found",
                        "width": w, "height": h, "original_width": w, "original_height": h,
                        "exif": None, "sha256": None}
                rows.append(meta)
                if ok:
                    add_tar_member(tar, f"{key}.jpg", smp["image"])
                    add_tar_member(tar, f"{key}.txt", cap_bytes)
                    add_tar_member(tar, f"{key}.json", json.dumps(meta).encode())
        pq.write_table(pa.Table.from_pylist(rows, schema=SIDECAR_SCHEMA), output / f"{s:05d}.parquet")
        ok_count = sum(r["status"] == "success" for r in rows)
        (output / f"{s:05d}_stats.json").write_text(json.dumps(
            {"count": len(rows), "successes": ok_count, "failed_to_download": len(rows) - ok_count,
             "failed_to_resize": 0, "status_dict": {"success": ok_count}}, indent=2))
    marker.write_text(json.dumps(manifest))
    return str(output)


def eval_sample(index: int, seed: int, split: str) -> dict:
    """One held-out evaluation sample: a balanced class (``index % 10``), a JPEG drawn like the
    training images, and several captions naming the object and its colour/size."""
    rng = _image_rng(seed, f"eval-{split}", index)
    label = index % len(OBJECTS)
    obj = OBJECTS[label]
    adj = rng.choice(ADJECTIVES) if rng.random() < 0.7 else None
    noun = f"{adj} {obj}" if adj else obj
    captions = [f"a {noun}", f"a photo of a {noun}.",
                f"{rng.choice(SUBJECTS)} {rng.choice(VERBS_OBJ)} a {noun} in {rng.choice(PLACES)}"]
    text = rng.choice(UNRELATED_TEXT) if rng.random() < 0.2 else None
    image = make_image(rng, text, caption=f"a {noun}")
    return {"key": f"{index:06d}", "label": label, "captions": captions, "image": image}


def write_eval_dataset(output: str | Path, splits: dict[str, int] | None = None, seed: int = 1000,
                       samples_per_shard: int = 1000) -> str:
    """Write the held-out demo evaluation set in CLIP_benchmark's ``wds/`` format.

    ``output/classnames.txt`` (the 10 ``OBJECTS``), ``output/zeroshot_classification_templates.txt``
    and per split ``output/{split}/nshards.txt`` + ``{split}/0.tar ...`` whose samples have
    ``.jpg``, ``.cls`` (class index) and ``.txt`` (several captions, one per line). ``seed``
    must differ from the training demo's so the images are held out. Skipped when present.
    """
    splits = dict(splits or {"train": 500, "test": 500})
    output = Path(output)
    manifest = {"splits": splits, "seed": seed, "samples_per_shard": samples_per_shard, "version": 1}
    marker = output / "_demo_eval.json"
    if marker.exists() and json.loads(marker.read_text()) == manifest:
        return str(output)
    if any(n < 1 for n in splits.values()):
        raise ValueError(f"every eval split needs at least one sample, got {splits}")
    # written under a temporary name, then renamed: concurrent writers never see a partial set
    final, output = output, output.with_name(f"{output.name}.tmp{os.getpid()}")
    shutil.rmtree(output, ignore_errors=True)
    output.mkdir(parents=True)
    (output / "classnames.txt").write_text("\n".join(OBJECTS) + "\n")
    (output / "zeroshot_classification_templates.txt").write_text("\n".join(EVAL_TEMPLATES) + "\n")
    for split, n in splits.items():
        folder = output / split
        folder.mkdir(exist_ok=True)
        nshards = -(-n // samples_per_shard)
        for s in range(nshards):
            with tarfile.open(folder / f"{s}.tar", "w", format=tarfile.USTAR_FORMAT) as tar:
                for i in range(s * samples_per_shard, min(n, (s + 1) * samples_per_shard)):
                    smp = eval_sample(i, seed, split)
                    add_tar_member(tar, f"{smp['key']}.jpg", smp["image"])
                    add_tar_member(tar, f"{smp['key']}.cls", str(smp["label"]).encode())
                    add_tar_member(tar, f"{smp['key']}.txt", "\n".join(smp["captions"]).encode())
        (folder / "nshards.txt").write_text(f"{nshards}\n")
    (output / marker.name).write_text(json.dumps(manifest))
    if marker.exists() and json.loads(marker.read_text()) == manifest:  # another writer won
        shutil.rmtree(output)
    else:
        shutil.rmtree(final, ignore_errors=True)
        try:
            output.rename(final)
        except OSError:
            shutil.rmtree(output)
            if not (marker.exists() and json.loads(marker.read_text()) == manifest):
                raise
    return str(final)
