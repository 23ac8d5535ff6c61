"""Reading img2dataset output (local paths or any fsspec URL).

Two of img2dataset's output formats are supported:

* ``webdataset``: ``NNNNN.tar`` (``KEY.jpg|png|webp``, ``KEY.txt``, ``KEY.json``) with a sidecar
  ``NNNNN.parquet`` that lists every input URL of the shard, failed downloads included.
* ``parquet``: ``NNNNN.parquet`` with the encoded image in a binary column (``jpg``, ``png`` or
  ``webp``), null for failed downloads.

Each shard is read as a stream of Arrow tables (:data:`ROW_SCHEMA`), one row per input sample,
and then one marker row that carries the shard's row count. Image bytes are kept exactly as
stored; they are only probed (header, and optionally a draft decode) to turn corrupt, truncated
and oversized images into per-sample errors.
"""

from __future__ import annotations

import json
import posixpath
from dataclasses import asdict, dataclass
from typing import Iterator

import fsspec
import pyarrow as pa
import pyarrow.parquet as pq
from webdataset.tariterators import group_by_keys, tar_file_iterator

from curation.images import DEFAULT_MAX_PIXELS, IMAGE_EXTENSIONS, BadImage, probe_image

PENDING, KEPT, DROPPED, ERROR, NOT_DOWNLOADED = "pending", "kept", "dropped", "error", "not_downloaded"
SHARD_END = "shard_end"  # status of the marker row closing each shard's stream

ROW_SCHEMA = pa.schema([
    ("key", pa.string()),
    ("shard", pa.string()),
    ("url", pa.string()),
    ("caption", pa.string()),
    ("status", pa.string()),
    ("error", pa.string()),
    ("width", pa.int32()),
    ("height", pa.int32()),
    ("image_format", pa.string()),
    ("image_bytes", pa.int64()),
    ("image", pa.binary()),
    ("shard_rows", pa.int64()),
    ("row_index", pa.int64()),     # position in the shard's stream (orders the output shard)
    ("meta_json", pa.binary()),    # the sample's metadata (KEY.json / parquet columns), as read
    ("node", pa.string()),         # marker row only: the Ray node that read the shard
])

PARQUET_IMAGE_COLUMNS = ("jpg", "png", "webp")


class InputError(ValueError):
    """The input folder is not img2dataset output."""


@dataclass(frozen=True)
class InputShard:
    name: str            # shard id, e.g. "00012"
    format: str          # "webdataset" or "parquet"
    data_url: str        # the tar (webdataset) or the parquet file (parquet)
    meta_url: str | None = None  # webdataset's sidecar parquet, when present

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass(frozen=True)
class IngestOptions:
    max_caption_chars: int = 4096
    max_image_pixels: int = DEFAULT_MAX_PIXELS
    decode_images: bool = True
    rows_per_block: int = 256

    @classmethod
    def from_config(cls, cfg: dict) -> "IngestOptions":
        return cls(**{k: cfg[k] for k in cls.__dataclass_fields__ if k in cfg})


def _stem(path: str) -> str:
    base = posixpath.basename(path)
    return base.split(".", 1)[0]


def discover_shards(input_url: str, input_format: str = "auto") -> list[InputShard]:
    """List the shards of an img2dataset output folder, sorted by name."""
    fs, root = fsspec.core.url_to_fs(input_url)
    if not fs.exists(root):
        raise InputError(f"input folder does not exist: {input_url}")
    names = [p for p in fs.ls(root, detail=False)]
    tars = sorted(p for p in names if p.endswith(".tar"))
    parquets = {_stem(p): p for p in names if p.endswith(".parquet")}
    if input_format == "auto":
        input_format = "webdataset" if tars else "parquet"
    if input_format == "webdataset":
        if not tars:
            raise InputError(f"no webdataset shards (*.tar) in {input_url}")
        shards = [InputShard(_stem(t), "webdataset", fs.unstrip_protocol(t),
                             fs.unstrip_protocol(parquets[_stem(t)]) if _stem(t) in parquets else None)
                  for t in tars]
        # A shard whose every download failed has a parquet but no tar.
        tar_stems = {s.name for s in shards}
        for stem, p in parquets.items():
            if stem not in tar_stems:
                shards.append(InputShard(stem, "webdataset", None, fs.unstrip_protocol(p)))
    elif input_format == "parquet":
        if not parquets:
            raise InputError(f"no img2dataset shards (*.tar or *.parquet) in {input_url}")
        shards = [InputShard(stem, "parquet", fs.unstrip_protocol(p)) for stem, p in parquets.items()]
    else:
        raise InputError(f"input_format must be auto, webdataset or parquet, not {input_format!r}")
    return sorted(shards, key=lambda s: s.name)


# --- per-sample helpers -------------------------------------------------------------------------

def decode_caption(raw, max_chars: int) -> tuple[str | None, str | None]:
    """Return ``(caption, error)``; the caption is kept (lossily decoded) even when in error."""
    if raw is None:
        return None, "missing caption"
    if isinstance(raw, (bytes, bytearray, memoryview)):
        raw = bytes(raw)
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError as exc:
            return raw.decode("utf-8", errors="replace"), f"caption is not valid UTF-8: {exc}"
    else:
        text = str(raw)
    if not text.strip():
        return text, "empty caption"
    if len(text) > max_chars:
        return text, f"caption too long: {len(text)} characters (limit {max_chars})"
    return text, None


def make_row(key, shard, url=None, caption=None, status=PENDING, error=None, image=None,
             image_format=None, width=None, height=None, meta_json=None) -> dict:
    return {"key": key, "shard": shard, "url": url, "caption": caption, "status": status,
            "error": error, "width": width, "height": height, "image_format": image_format,
            "image_bytes": None if image is None else len(image), "image": image,
            "shard_rows": None, "row_index": None, "meta_json": meta_json, "node": None}


def sample_row(key: str, shard: str, raw_caption, image: bytes | None, image_ext: str | None,
               url: str | None, opts: IngestOptions, meta_json: bytes | None = None) -> dict:
    """One input sample that was downloaded: validate its caption and image."""
    caption, err = decode_caption(raw_caption, opts.max_caption_chars)
    row = make_row(key, shard, url=url, caption=caption, image=image, image_format=image_ext,
                   meta_json=meta_json)
    if image is None:
        err = err or "sample has no image"
    else:
        try:
            w, h, _fmt = probe_image(image, opts.max_image_pixels, opts.decode_images)
            row["width"], row["height"] = w, h
        except BadImage as exc:
            err = err or str(exc)
    if err:
        row["status"], row["error"], row["image"], row["meta_json"] = ERROR, err, None, None
    return row


def _batched(rows: Iterator[dict], n: int) -> Iterator[pa.Table]:
    buf = []
    for i, row in enumerate(rows):
        row["row_index"] = i
        buf.append(row)
        if len(buf) >= n:
            yield pa.Table.from_pylist(buf, schema=ROW_SCHEMA)
            buf = []
    if buf:
        yield pa.Table.from_pylist(buf, schema=ROW_SCHEMA)


def end_marker(shard: str, count: int) -> pa.Table:
    row = make_row(None, shard, status=SHARD_END)
    row["shard_rows"] = count
    return pa.Table.from_pylist([row], schema=ROW_SCHEMA)


# --- shard readers ------------------------------------------------------------------------------

def read_sidecar(meta_url: str | None) -> dict[str, dict]:
    """img2dataset's per-shard parquet (webdataset format), key -> metadata, in file order."""
    if not meta_url:
        return {}
    with fsspec.open(meta_url, "rb") as f:
        table = pq.read_table(f, columns=None)
    cols = [c for c in ("key", "url", "caption", "status", "error_message", "width", "height")
            if c in table.column_names]
    return {r["key"]: r for r in table.select(cols).to_pylist() if r.get("key") is not None}


def iter_tar_samples(data_url: str, errors: list) -> Iterator[dict]:
    """webdataset samples (``__key__`` plus one entry per extension) of one tar.

    A read error (truncated or corrupt tar) ends the iteration and is appended to ``errors``.
    """
    def record(exc):
        errors.append(f"{type(exc).__name__}: {exc}")
        return False  # stop: nothing after a broken member can be trusted

    try:
        with fsspec.open(data_url, "rb") as f:
            files = ({**d, "__url__": data_url} for d in tar_file_iterator(f, handler=record))
            yield from group_by_keys(files, handler=record)
    except Exception as exc:  # the tar header iterator raises outside the handler
        record(exc)


def image_entry(sample: dict) -> tuple[str | None, bytes | None]:
    for ext in IMAGE_EXTENSIONS:
        if ext in sample:
            return ext, sample[ext]
    return None, None


def _webdataset_rows(shard: InputShard, opts: IngestOptions) -> Iterator[dict]:
    meta = read_sidecar(shard.meta_url)
    seen = set()
    tar_errors: list[str] = []
    if shard.data_url:
        for sample in iter_tar_samples(shard.data_url, tar_errors):
            key = posixpath.basename(sample["__key__"])
            if key in seen:  # img2dataset never repeats a key; a hand-made tar might
                yield make_row(key, shard.name, status=ERROR,
                               error=f"duplicate key {key} in {shard.name}.tar: only the first copy is used")
                continue
            seen.add(key)
            m = meta.get(key, {})
            url = m.get("url")
            if url is None and "json" in sample:
                try:
                    url = json.loads(sample["json"]).get("url")
                except (ValueError, AttributeError):
                    url = None
            ext, image = image_entry(sample)
            raw_caption = sample.get("txt", m.get("caption"))
            yield sample_row(key, shard.name, raw_caption, image, ext, url, opts,
                             meta_json=sample.get("json"))
    tar_error = f"{shard.name}.tar unreadable: {tar_errors[0]}" if tar_errors else None
    for key, m in meta.items():
        if key in seen:
            continue
        caption, _ = decode_caption(m.get("caption"), opts.max_caption_chars)
        if m.get("status") == "success":
            err = tar_error or f"listed as downloaded in {shard.name}.parquet but missing from the tar"
            yield make_row(key, shard.name, url=m.get("url"), caption=caption, status=ERROR, error=err)
        else:
            yield make_row(key, shard.name, url=m.get("url"), caption=caption,
                           status=NOT_DOWNLOADED, error=m.get("error_message"))
    if tar_error and not meta:
        # Without img2dataset's parquet the samples after the break are unknown: record the loss.
        yield make_row(f"{shard.name}/unreadable-tail", shard.name, status=ERROR,
                       error=tar_error + " (no sidecar parquet: samples after this point unknown)")


def _parquet_rows(shard: InputShard, opts: IngestOptions) -> Iterator[dict]:
    with fsspec.open(shard.data_url, "rb") as f:
        pf = pq.ParquetFile(f)
        names = pf.schema_arrow.names
        image_col = next((c for c in PARQUET_IMAGE_COLUMNS if c in names), None)
        if image_col is None:
            raise InputError(f"{shard.data_url} has no image column ({'/'.join(PARQUET_IMAGE_COLUMNS)})")
        caption_col = "caption" if "caption" in names else ("txt" if "txt" in names else None)
        for i, batch in enumerate(pf.iter_batches(batch_size=opts.rows_per_block)):
            for j, r in enumerate(batch.to_pylist()):
                key = r.get("key") or f"{shard.name}-{i * opts.rows_per_block + j:06d}"
                raw_caption = r.get(caption_col) if caption_col else None
                if r.get("status", "success") != "success" or r.get(image_col) is None:
                    caption, _ = decode_caption(raw_caption, opts.max_caption_chars)
                    yield make_row(key, shard.name, url=r.get("url"), caption=caption,
                                   status=NOT_DOWNLOADED,
                                   error=r.get("error_message") or "no image bytes")
                else:
                    meta = {k: v for k, v in r.items()
                            if k != image_col and not isinstance(v, (bytes, bytearray))}
                    yield sample_row(key, shard.name, raw_caption, r[image_col], image_col,
                                     r.get("url"), opts,
                                     meta_json=json.dumps(meta, default=str).encode("utf-8"))


def read_shard(shard: InputShard, opts: IngestOptions) -> Iterator[pa.Table]:
    """Stream one shard as Arrow tables of at most ``opts.rows_per_block`` rows, then the marker.

    Never raises for bad data: a shard that cannot be opened at all becomes one error row.
    """
    rows = _webdataset_rows(shard, opts) if shard.format == "webdataset" else _parquet_rows(shard, opts)
    count = 0
    try:
        for table in _batched(rows, opts.rows_per_block):
            count += table.num_rows
            yield table
    except Exception as exc:  # e.g. an unreadable parquet file
        err = make_row(f"{shard.name}/unreadable", shard.name, status=ERROR,
                       error=f"cannot read shard {shard.name}: {type(exc).__name__}: {exc}")
        err["row_index"] = count
        count += 1
        yield pa.Table.from_pylist([err], schema=ROW_SCHEMA)
    yield end_marker(shard.name, count)
