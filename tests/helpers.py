"""Small generated inputs for the tests (no network, no shared data)."""

import io
import json
import struct
import tarfile
import zlib

import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image

from curation.demo_data import SIDECAR_SCHEMA, add_tar_member


def jpeg(color=(200, 30, 30), size=(64, 48)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, color).save(buf, format="JPEG", quality=90)
    return buf.getvalue()


def noisy_jpeg(size=(160, 120), seed=0) -> bytes:
    import random

    rng = random.Random(seed)
    img = Image.frombytes("RGB", size, bytes(rng.randrange(256) for _ in range(size[0] * size[1] * 3)))
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=90)
    return buf.getvalue()


def png(size=(40, 30)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, (10, 200, 10)).save(buf, format="PNG")
    return buf.getvalue()


def png_claiming(width: int, height: int) -> bytes:
    """A PNG whose header claims width x height pixels (valid CRC), with tiny data."""
    data = bytearray(png((4, 4)))
    ihdr = 8 + 8  # signature, then length + type of the IHDR chunk
    data[ihdr:ihdr + 8] = struct.pack(">II", width, height)
    crc = zlib.crc32(bytes(data[ihdr - 4:ihdr + 13])) & 0xFFFFFFFF
    data[ihdr + 13:ihdr + 17] = struct.pack(">I", crc)
    return bytes(data)


def write_wds_shard(folder, name, samples, sidecar=True, truncate_to=None):
    """samples: dicts with key, caption (str|bytes|None), image (bytes|None), ext, status."""
    rows = []
    path = folder / f"{name}.tar"
    with tarfile.open(path, "w", format=tarfile.USTAR_FORMAT) as tar:
        for s in samples:
            ok = s.get("status", "success") == "success"
            cap = s.get("caption")
            rows.append({"key": s["key"], "url": f"http://example.invalid/{s['key']}.jpg",
                         "caption": cap.decode("utf-8", "replace") if isinstance(cap, bytes) else cap,
                         "status": "success" if ok else "failed_to_download",
                         "error_message": None if ok else "HTTP Error 404: Not Found"})
            if not ok:
                continue
            if s.get("image") is not None:
                add_tar_member(tar, f"{s['key']}.{s.get('ext', 'jpg')}", s["image"])
            if cap is not None:
                add_tar_member(tar, f"{s['key']}.txt", cap if isinstance(cap, bytes) else cap.encode())
            add_tar_member(tar, f"{s['key']}.json", json.dumps({"key": s["key"]}).encode())
    if truncate_to is not None:
        data = path.read_bytes()
        path.write_bytes(data[: int(len(data) * truncate_to)])
    if sidecar:
        pq.write_table(pa.Table.from_pylist(rows, schema=SIDECAR_SCHEMA), folder / f"{name}.parquet")
    return rows


def count_sidecar_rows(folder) -> int:
    return sum(pq.read_metadata(p).num_rows for p in folder.glob("*.parquet"))


def read_output_samples(out_dir) -> dict:
    """key -> sample dict of every sample in the curated shards (via webdataset)."""
    import webdataset as wds

    urls = sorted(str(p) for p in (out_dir / "shards").glob("*.tar"))
    samples = {}
    for sample in wds.WebDataset(urls, shardshuffle=False):
        assert sample["__key__"] not in samples, "duplicate sample in the shards"
        samples[sample["__key__"]] = sample
    return samples
