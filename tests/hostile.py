"""A generator of hostile img2dataset output (webdataset format), for the reliability tests.

Every case is a real file on disk: broken and odd images, pixel bombs, bad captions, bad
per-sample metadata, repeated keys and members, path-traversal member names, a truncated tar, a
corrupt sidecar parquet beside a good tar, a shard name with dots. :func:`build` returns the folder.
"""

from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image

from curation.demo_data import SIDECAR_SCHEMA

from helpers import jpeg, noisy_jpeg, png_claiming

ACTION = "a man riding a brown horse on the beach"  # passes C and A


def _image(fmt: str, size=(48, 32)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, (30, 120, 200)).save(buf, format=fmt)
    return buf.getvalue()


def _tar(path: Path, members: list[tuple[str, bytes]]) -> None:
    with tarfile.open(path, "w", format=tarfile.GNU_FORMAT) as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size, info.mtime = len(data), 0
            tar.addfile(info, io.BytesIO(data))


def _sidecar(path: Path, keys: list[str], captions: dict | None = None) -> None:
    captions = captions or {}
    rows = [{"key": k, "url": f"http://example.invalid/{k}.jpg", "caption": captions.get(k, ACTION),
             "status": "success", "error_message": None} for k in keys]
    pq.write_table(pa.Table.from_pylist(rows, schema=SIDECAR_SCHEMA), path)


def _sample(key: str, image: bytes | None, caption: bytes | None, meta: bytes | None = b"{}",
            ext: str = "jpg") -> list[tuple[str, bytes]]:
    out = []
    if image is not None:
        out.append((f"{key}.{ext}", image))
    if caption is not None:
        out.append((f"{key}.txt", caption))
    if meta is not None:
        out.append((f"{key}.json", meta))
    return out


def build(root: Path) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    good = noisy_jpeg(seed=7)
    # 00000: images and captions
    s0 = [
        ("a_ok", good, ACTION.encode(), "jpg"),
        ("a_truncated", good[: len(good) // 2], ACTION.encode(), "jpg"),
        ("a_empty_img", b"", ACTION.encode(), "jpg"),
        ("a_random", b"\x00\x01garbage" * 10, ACTION.encode(), "jpg"),
        ("a_bomb", png_claiming(50_000, 50_000), ACTION.encode(), "png"),
        ("a_gif", _image("GIF"), ACTION.encode(), "gif"),
        ("a_tiff", _image("TIFF"), ACTION.encode(), "tiff"),
        ("a_bmp", _image("BMP"), ACTION.encode(), "bmp"),
        ("a_not_utf8", good, b"\xff\xfe a man \xc3\x28 riding", "jpg"),
        ("a_empty_cap", good, b"   ", "jpg"),
        ("a_long_cap", good, ("a man riding " * 500).encode(), "jpg"),
        ("a_html", good, b"<script>alert(1)</script> a man riding a horse <img src=x onerror=1>", "jpg"),
    ]
    members = []
    for key, img, cap, ext in s0:
        members += _sample(key, img, cap, ext=ext)
    members += _sample("a_no_txt", good, None)  # caption only in the sidecar
    _tar(root / "00000.tar", members)
    _sidecar(root / "00000.parquet", [k for k, *_ in s0] + ["a_no_txt"])

    # 00001: bad per-sample metadata
    deep = b"[" * 100_000 + b"]" * 100_000
    metas = {"m_list": b"[]", "m_null": b"null", "m_string": b'"just a string"', "m_deep": deep,
             "m_invalid": b"{not json", "m_binary": b"\xff\x00\xfe", "m_ok": json.dumps({"k": 1}).encode()}
    members = []
    for key, meta in metas.items():
        members += _sample(key, good, ACTION.encode(), meta=meta)
    _tar(root / "00001.tar", members)
    _sidecar(root / "00001.parquet", list(metas))

    # 00002: repeated members and keys, path traversal
    members = (_sample("d_ok", good, ACTION.encode())
               + [("d_twice.jpg", good), ("d_twice.jpg", good), ("d_twice.txt", ACTION.encode())]
               + _sample("d_after", good, ACTION.encode())       # must still be read
               + _sample("d_again", good, ACTION.encode())
               + _sample("d_mid", good, ACTION.encode())
               + _sample("d_again", good, ACTION.encode())       # the same key, later
               + _sample("../d_escape", good, ACTION.encode())   # path traversal
               + _sample("/abs/d_abs", good, ACTION.encode())
               + _sample("d_last", good, ACTION.encode()))
    _tar(root / "00002.tar", members)
    _sidecar(root / "00002.parquet", ["d_ok", "d_twice", "d_after", "d_again", "d_mid",
                                      "d_escape", "d_abs", "d_last"])

    # 00003: a truncated tar (its lost samples are known from the sidecar)
    members = []
    for i in range(6):
        members += _sample(f"t_{i}", noisy_jpeg(seed=20 + i), ACTION.encode())
    _tar(root / "00003.tar", members)
    data = (root / "00003.tar").read_bytes()
    (root / "00003.tar").write_bytes(data[: int(len(data) * 0.55)])
    _sidecar(root / "00003.parquet", [f"t_{i}" for i in range(6)])

    # 00004: a good tar beside a corrupt sidecar parquet
    members = []
    for i in range(3):
        members += _sample(f"p_{i}", noisy_jpeg(seed=30 + i), ACTION.encode())
    members += _sample("p_no_txt", good, None)  # needed the sidecar for its caption
    _tar(root / "00004.tar", members)
    (root / "00004.parquet").write_bytes(b"PAR1 this is not a parquet file PAR1")

    # 00005 and 00005.old: names that share a prefix up to the first dot
    for name, prefix in (("00005", "n_"), ("00005.old", "o_")):
        members = _sample(f"{prefix}1", good, ACTION.encode())
        _tar(root / f"{name}.tar", members)
        _sidecar(root / f"{name}.parquet", [f"{prefix}1"])
    return root


def tar_member_keys(path: Path) -> list[str]:
    """The sample key of every member group in a tar, in order (a key repeated later appears
    again), read with tarfile directly: what the stats must account for."""
    keys, last = [], None
    try:
        with tarfile.open(path) as tar:
            for m in tar:
                base = m.name.rsplit("/", 1)[-1]
                key = base.split(".", 1)[0]
                if key != last:
                    keys.append(key)
                    last = key
    except (tarfile.TarError, OSError):
        pass  # a truncated tar: the groups read so far
    return keys
