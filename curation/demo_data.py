"""A deterministic, embedded demo dataset in img2dataset's webdataset output format.

It writes ``NNNNN.tar`` + ``NNNNN.parquet`` + ``NNNNN_stats.json`` per shard, exactly as
``img2dataset --output_format webdataset`` does, with:

* captions of varied complexity, with and without actions, written from a small grammar;
* images drawn procedurally (gradients, shapes, noise) that show the caption's own words, some
  unrelated text, or no text;
* a few broken entries: failed downloads, a corrupt, a truncated and a zero-byte image, an
  empty and a non-UTF-8 caption.

Same arguments, same bytes: the generator uses its own seeded RNG and fixed tar mtimes.
"""

from __future__ import annotations

import io
import json
import random
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


def _caption(rng: random.Random) -> str:
    kind = rng.random()
    if kind < 0.35:  # complex with an action: passes C and A
        s, v, a, o, p = (rng.choice(SUBJECTS), rng.choice(VERBS_OBJ), rng.choice(ADJECTIVES),
                         rng.choice(OBJECTS), rng.choice(PLACES))
        return rng.choice([f"{s} {v} a {a} {o} in {p}", f"{s} is {v} a {a} {o} near {p}",
                           f"{s.capitalize()} {v} a {o} at {p}."])
    if kind < 0.50:  # action without objects attached
        return rng.choice([f"{rng.choice(SUBJECTS)} {rng.choice(VERBS_INTR)}",
                           f"{rng.choice(SUBJECTS)} {rng.choice(VERBS_INTR)} in {rng.choice(PLACES)}"])
    if kind < 0.70:  # objects and attributes, no action
        return rng.choice([f"a {rng.choice(ADJECTIVES)} {rng.choice(OBJECTS)} on {rng.choice(PLACES)}",
                           f"{rng.choice(ADJECTIVES)} {rng.choice(OBJECTS)} and a {rng.choice(ADJECTIVES)} "
                           f"{rng.choice(OBJECTS)}"])
    if kind < 0.85:  # product / stock-photo style word lists
        return " ".join(rng.sample(PRODUCT_WORDS, rng.randint(2, 5)))
    return rng.choice(["sunset", "IMG_%04d.JPG" % rng.randint(0, 9999), "untitled", "wallpaper",
                       rng.choice(OBJECTS)])


def _font(size: int):
    return ImageFont.load_default(size=size)


def _background(rng: random.Random, w: int, h: int) -> Image.Image:
    c1 = tuple(rng.randint(0, 255) for _ in range(3))
    c2 = tuple(rng.randint(0, 255) for _ in range(3))
    img = Image.linear_gradient("L").resize((w, h)).rotate(rng.choice([0, 90, 180, 270]), expand=False)
    img = Image.composite(Image.new("RGB", (w, h), c1), Image.new("RGB", (w, h), c2), img)
    draw = ImageDraw.Draw(img)
    for _ in range(rng.randint(2, 8)):
        x0, y0 = rng.randint(0, w - 1), rng.randint(0, h - 1)
        x1, y1 = min(w, x0 + rng.randint(10, w // 2)), min(h, y0 + rng.randint(10, h // 2))
        color = tuple(rng.randint(0, 255) for _ in range(3))
        (draw.ellipse if rng.random() < 0.5 else draw.rectangle)([x0, y0, x1, y1], fill=color)
    if rng.random() < 0.5:
        img = img.filter(ImageFilter.GaussianBlur(rng.uniform(0.5, 2.0)))
    return img


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
               fmt: str = "JPEG") -> bytes:
    w, h = size or (rng.choice([192, 224, 256, 320]), rng.choice([160, 192, 224, 256]))
    img = _background(rng, w, h)
    if text:
        draw_text(img, text, rng)
    buf = io.BytesIO()
    img.save(buf, format=fmt, quality=90) if fmt == "JPEG" else img.save(buf, format=fmt)
    return buf.getvalue()


def _tar_add(tar: tarfile.TarFile, name: str, data: bytes) -> None:
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


def demo_samples(num_samples: int, seed: int) -> list[dict]:
    """The demo pairs as dicts: key, url, caption (str or bytes), image (bytes or None), status."""
    rng = random.Random(seed)
    samples = []
    broken = {3: "failed_download", 17: "corrupt", 29: "truncated", 41: "zero_bytes",
              53: "empty_caption", 67: "bad_utf8", 89: "failed_download"}
    for i in range(num_samples):
        caption = _caption(rng)
        r = rng.random()
        text = caption if r < 0.25 else (rng.choice(UNRELATED_TEXT) if r < 0.40 else None)
        kind = broken.get(i, "text" if text == caption else ("unrelated_text" if text else "no_text"))
        image = None if kind == "failed_download" else make_image(rng, text)
        if kind == "corrupt":
            image = bytes(rng.randrange(256) for _ in range(600))
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
    output = Path(output)
    manifest = {"num_samples": num_samples, "num_shards": num_shards, "seed": seed, "version": 1}
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
                    _tar_add(tar, f"{key}.jpg", smp["image"])
                    _tar_add(tar, f"{key}.txt", cap_bytes)
                    _tar_add(tar, f"{key}.json", json.dumps(meta).encode())
        pq.write_table(pa.Table.from_pylist(rows, schema=SIDECAR_SCHEMA), output / f"{s:05d}.parquet")
        ok_count = sum(r["status"] == "success" for r in rows)
        (output / f"{s:05d}_stats.json").write_text(json.dumps(
            {"count": len(rows), "successes": ok_count, "failed_to_download": len(rows) - ok_count,
             "failed_to_resize": 0, "status_dict": {"success": ok_count}}, indent=2))
    marker.write_text(json.dumps(manifest))
    return str(output)
