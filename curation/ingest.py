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
from webdataset.tariterators import tar_file_iterator

from curation.images import IMAGE_EXTENSIONS, BadImage, probe_image

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
    """The job's ``ingest:`` section (a typed view: the defaults live in the YAML)."""

    max_caption_chars: int
    max_image_pixels: int
    decode_images: bool
    rows_per_block: int
    read_retries: int              # I/O errors reading a shard: retries (backoff doubles each time)
    retry_backoff_s: float

    @classmethod
    def defaults(cls, **changes) -> "IngestOptions":
        """The YAML's ``ingest`` section with ``changes`` (for tests and tools)."""
        from curation.common.config import typed_view
        from curation.settings import section_defaults

        return typed_view(cls, {**section_defaults("ingest"), **changes}, "ingest")


def _stem(path: str) -> str:
    """The shard name: the file name without its last suffix (``00001.old.tar`` -> ``00001.old``)."""
    return posixpath.splitext(posixpath.basename(path))[0]


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
        if tars:
            raise InputError(
                f"{input_url} holds webdataset shards (*.tar) next to img2dataset's per-shard "
                "parquet files, which list the URLs but hold no images: use input_format=webdataset "
                "(or auto), not parquet")
        first = parquets[min(parquets)]
        with fs.open(first, "rb") as f:  # one footer read: is this img2dataset's parquet format?
            names = pq.ParquetFile(f).schema_arrow.names
        if not any(c in names for c in PARQUET_IMAGE_COLUMNS):
            raise InputError(
                f"{fs.unstrip_protocol(first)} has no image column ({'/'.join(PARQUET_IMAGE_COLUMNS)}): "
                "not img2dataset's parquet output format (--output_format parquet)")
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


def _batched(rows: Iterator[dict], n: int, start: int = 0) -> Iterator[pa.Table]:
    buf = []
    for i, row in enumerate(rows, start):
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


def read_sidecar_safely(meta_url: str | None) -> tuple[dict[str, dict], str | None]:
    """:func:`read_sidecar`, with a corrupt file reported instead of raised (the tar is still
    read); I/O errors are raised as :class:`ShardReadError`."""
    try:
        return read_sidecar(meta_url), None
    except Exception as exc:  # noqa: BLE001
        if is_io_error(exc):
            raise ShardReadError(f"{type(exc).__name__}: {exc}") from exc
        return {}, f"{posixpath.basename(meta_url)} unreadable: {type(exc).__name__}: {exc}"


class ShardReadError(OSError):
    """An input shard could not be read for a reason outside its bytes (I/O: a connection reset,
    a flaky mount, a missing object). The shard is retried, and if it still cannot be read it
    stays uncommitted so that a re-run retries it; it never becomes per-sample errors."""


# Libraries whose exceptions mean "the storage or the network failed", not "the bytes are bad":
# botocore/aiobotocore (S3 connection errors arrive as botocore.exceptions.ConnectionError, not
# OSError), aiohttp, urllib3/requests (http(s):// and gcsfs), fsspec's own timeouts.
IO_ERROR_MODULES = ("botocore", "aiobotocore", "aiohttp", "urllib3", "requests", "fsspec")


def is_io_error(exc: BaseException) -> bool:
    """I/O failures (retry; never commit) as opposed to bad bytes (per-sample errors)."""
    import tarfile

    if isinstance(exc, (tarfile.TarError, EOFError, UnicodeError)):
        return False
    if isinstance(exc, (OSError, TimeoutError, ConnectionError)):
        return True
    return any(c.__module__.split(".")[0] in IO_ERROR_MODULES for c in type(exc).__mro__)


def group_members(files: Iterator[dict]) -> Iterator[dict]:
    """webdataset samples from tar members in order: members ``KEY.EXT`` with the same KEY in a
    row form one sample. Unlike webdataset's grouping, a member repeated within a sample does not
    stop the reader: the sample is marked (``__duplicate__``) and reading goes on."""
    current: dict | None = None
    for f in files:
        name = f["fname"]
        base = posixpath.basename(name)
        if "." not in base:
            continue  # no extension: not a sample member
        key, ext = base.split(".", 1)
        key = posixpath.join(posixpath.dirname(name), key) if posixpath.dirname(name) else key
        ext = ext.lower()
        if current is None or current["__key__"] != key:
            if current is not None:
                yield current
            current = {"__key__": key, "__url__": f.get("__url__")}
        if ext in current:
            current.setdefault("__duplicate__", []).append(ext)
            continue  # the first copy is used
        current[ext] = f["data"]
    if current is not None:
        yield current


def iter_tar_samples(data_url: str, errors: list) -> Iterator[dict]:
    """webdataset samples (``__key__`` plus one entry per extension) of one tar.

    Bad bytes (a truncated or corrupt tar) end the iteration and are appended to ``errors``;
    I/O errors (the file or the connection failed) are raised as :class:`ShardReadError`.
    """
    def record(exc):
        if is_io_error(exc):
            raise ShardReadError(f"{type(exc).__name__}: {exc}") from exc
        errors.append(f"{type(exc).__name__}: {exc}")
        return False  # stop: nothing after a broken member can be trusted

    try:
        with fsspec.open(data_url, "rb") as f:
            files = ({**d, "__url__": data_url} for d in tar_file_iterator(f, handler=record))
            yield from group_members(files)
    except ShardReadError:
        raise
    except Exception as exc:  # the tar header iterator raises outside the handler
        record(exc)


def image_entry(sample: dict) -> tuple[str | None, bytes | None]:
    for ext in IMAGE_EXTENSIONS:
        if ext in sample:
            return ext, sample[ext]
    return None, None


def _sample_url(sample: dict, meta: dict) -> str | None:
    url = meta.get("url")
    if url is None and "json" in sample:
        try:
            parsed = json.loads(sample["json"])
            url = parsed.get("url") if isinstance(parsed, dict) else None
        except (ValueError, RecursionError, UnicodeError):
            url = None  # bad metadata is the sample's own matter: it is kept without a url
    return url if isinstance(url, str) or url is None else str(url)


def _webdataset_rows(shard: InputShard, opts: IngestOptions, notes: list) -> Iterator[dict]:
    meta, sidecar_error = read_sidecar_safely(shard.meta_url)
    if sidecar_error:
        notes.append(sidecar_error)
    seen: dict[str, int] = {}
    tar_errors: list[str] = []
    if shard.data_url:
        for sample in iter_tar_samples(shard.data_url, tar_errors):
            key = posixpath.basename(sample["__key__"])
            if key in seen:  # img2dataset never repeats a key; a hand-made tar might
                seen[key] += 1
                yield make_row(f"{key}/duplicate-{seen[key]}", shard.name, status=ERROR,
                               error=f"duplicate key {key} in {shard.name}.tar: only the first "
                                     "copy is used")
                continue
            seen[key] = 1
            m = meta.get(key, {})
            ext, image = image_entry(sample)
            raw_caption = sample.get("txt", m.get("caption"))
            row = sample_row(key, shard.name, raw_caption, image, ext, _sample_url(sample, m), opts,
                             meta_json=sample.get("json"))
            if sample.get("__duplicate__") and row["status"] != ERROR:
                row["status"], row["image"], row["meta_json"] = ERROR, None, None
                row["error"] = (f"duplicate member(s) {', '.join(key + '.' + e for e in sample['__duplicate__'])}"
                                f" in {shard.name}.tar")
            elif row["status"] == ERROR and sidecar_error and row["error"] == "missing caption":
                row["error"] = f"missing caption (no .txt, and {sidecar_error})"
            yield row
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
        why = " (no sidecar parquet" if not sidecar_error else f" ({sidecar_error}"
        yield make_row(f"{shard.name}/unreadable-tail", shard.name, status=ERROR,
                       error=tar_error + why + ": samples after this point unknown)")


def _parquet_rows(shard: InputShard, opts: IngestOptions, notes: list) -> Iterator[dict]:
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


SHARD_FAILED = "shard_failed"  # status of the marker that closes a shard which could not be read


def read_shard(shard: InputShard, opts: IngestOptions) -> Iterator[pa.Table]:
    """Stream one shard as Arrow tables of at most ``opts.rows_per_block`` rows, then the marker.

    Bad bytes never raise: a shard whose data cannot be parsed at all becomes one error row. An
    I/O error is retried ``opts.read_retries`` times with exponential backoff; a retry re-reads the shard
    and skips the rows already streamed (the rows of a shard come out in a fixed order). If the
    shard still cannot be read, the stream ends with a ``shard_failed`` marker: the writer then
    leaves the shard uncommitted and the job names it.
    """
    import time

    emitted, attempt, notes = 0, 0, []
    retries, backoff_s = opts.read_retries, opts.retry_backoff_s
    while True:
        notes.clear()
        rows = (_webdataset_rows(shard, opts, notes) if shard.format == "webdataset"
                else _parquet_rows(shard, opts, notes))
        try:
            for table in _batched(_skip(rows, emitted), opts.rows_per_block, start=emitted):
                emitted += table.num_rows
                yield table
            break
        except Exception as exc:  # noqa: BLE001
            if isinstance(exc, InputError):  # not this input format: never commit the shard
                yield _failed_marker(shard.name, emitted, f"cannot read shard {shard.name}: {exc}")
                return
            if is_io_error(exc):
                attempt += 1
                if attempt > retries:
                    yield _failed_marker(shard.name, emitted, f"cannot read shard {shard.name} after "
                                         f"{retries} retries: {type(exc).__name__}: {exc}")
                    return
                time.sleep(backoff_s * 2 ** (attempt - 1))
                continue
            # bad bytes that the row readers did not catch (e.g. an unreadable parquet shard)
            err = make_row(f"{shard.name}/unreadable", shard.name, status=ERROR,
                           error=f"cannot read shard {shard.name}: {type(exc).__name__}: {exc}")
            err["row_index"] = emitted
            emitted += 1
            yield pa.Table.from_pylist([err], schema=ROW_SCHEMA)
            break
    marker = end_marker(shard.name, emitted)
    if notes:  # shard-level problems that did not stop the read (e.g. a corrupt sidecar parquet)
        marker = marker.set_column(marker.schema.get_field_index("error"), "error",
                                   pa.array(["; ".join(notes)]))
    yield marker


def _failed_marker(shard_name: str, emitted: int, error: str) -> pa.Table:
    """The end marker of a shard that could not be read: the writer leaves it uncommitted."""
    marker = end_marker(shard_name, emitted)
    marker = marker.set_column(marker.schema.get_field_index("status"), "status", pa.array([SHARD_FAILED]))
    return marker.set_column(marker.schema.get_field_index("error"), "error", pa.array([error]))


def _skip(rows: Iterator[dict], n: int) -> Iterator[dict]:
    for i, row in enumerate(rows):
        if i >= n:
            yield row
