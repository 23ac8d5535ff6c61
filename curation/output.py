"""The curation output folder: kept pairs as webdataset shards, one stats row per input sample.

Layout under the output root::

    shards/NNNNN.tar      kept samples of input shard NNNNN (original image bytes, txt, json)
    shards/sizes.json     {"NNNNN.tar": kept count}: open_clip's sample count file
    stats/NNNNN.parquet   one row per input sample of shard NNNNN (every status)
    summary.json          the funnel, resolved config, model versions, elapsed time
    _tmp/                 files being written; never read

An output shard is committed when its stats file exists. The tar is written under ``_tmp/`` and
renamed into ``shards/`` first, then the stats file is written (also via ``_tmp/``), so an
interrupted run never leaves a partial tar under ``shards/`` and a re-run redoes exactly the
shards without stats.
"""

from __future__ import annotations

import io
import json
import posixpath
import uuid
from typing import Iterable

import fsspec
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
from webdataset import TarWriter

from curation.ingest import (DROPPED, ERROR, KEPT, NOT_DOWNLOADED, PENDING, InputShard,
                             iter_tar_samples)

FILTERS = ("complexity", "action", "text_spotting")

# text_spotting_status of an evaluated sample (kept or dropped); null for errors and failed downloads
EVALUATED = "evaluated"          # OCR ran: ocr_text, ocr_boxes, text_overlap, passed_text_spotting set
NOT_EVALUATED = "not_evaluated"  # the cascade skipped it: it had already failed C or A
OFF = "off"                      # filters.text_spotting.enabled is false

STATS_SCHEMA = pa.schema([
    ("key", pa.string()),
    ("shard", pa.string()),
    ("url", pa.string()),
    ("caption", pa.string()),
    ("status", pa.string()),
    ("drop_reason", pa.string()),
    ("error", pa.string()),
    ("complexity", pa.int32()),
    ("num_actions", pa.int32()),
    ("passed_complexity", pa.bool_()),
    ("passed_action", pa.bool_()),
    ("ocr_text", pa.string()),
    ("ocr_boxes", pa.int32()),
    ("text_overlap", pa.float32()),
    ("passed_text_spotting", pa.bool_()),
    ("text_spotting_status", pa.string()),
    ("width", pa.int32()),
    ("height", pa.int32()),
    ("image_format", pa.string()),
    ("image_bytes", pa.int64()),
])
SCORE_COLUMNS = ("complexity", "num_actions", "ocr_text", "ocr_boxes", "text_overlap")


def decide(rows: pa.Table) -> pa.Table:
    """Final status and drop reason of each sample, as a table in :data:`STATS_SCHEMA`.

    A pending sample is dropped by the first filter (in C, A, T order) whose ``passed_*`` is
    False; a filter that is off or was not evaluated (None) does not drop. A pending sample that
    no text-spotting stage saw gets ``text_spotting_status`` "off".
    """
    records = rows.to_pylist()
    for r in records:
        r.setdefault("drop_reason", None)
        if r["status"] != PENDING:
            continue
        if r.get("text_spotting_status") is None:
            r["text_spotting_status"] = OFF
        reason = next((f for f in FILTERS if r.get(f"passed_{f}") is False), None)
        r["status"], r["drop_reason"] = (DROPPED, reason) if reason else (KEPT, None)
    records.sort(key=lambda r: (r["key"] is None, r["key"] or ""))
    return pa.Table.from_pylist(records, schema=STATS_SCHEMA)


class OutputFolder:
    def __init__(self, root: str):
        self.fs, self.root = fsspec.core.url_to_fs(root)
        self.url = root

    def path(self, *parts: str) -> str:
        return posixpath.join(self.root, *parts)

    def prepare(self) -> None:
        for sub in ("shards", "stats", "_tmp"):
            self.fs.makedirs(self.path(sub), exist_ok=True)

    def clean_tmp(self) -> None:
        """Remove leftovers of an interrupted run."""
        if self.fs.exists(self.path("_tmp")):
            self.fs.rm(self.path("_tmp"), recursive=True)
        self.fs.makedirs(self.path("_tmp"), exist_ok=True)

    def committed(self) -> set[str]:
        if not self.fs.exists(self.path("stats")):
            return set()
        return {posixpath.basename(p)[: -len(".parquet")]
                for p in self.fs.ls(self.path("stats"), detail=False) if p.endswith(".parquet")}

    def _commit(self, data: bytes | None, tmp: str, final: str) -> None:
        if data is not None:
            with self.fs.open(tmp, "wb") as f:
                f.write(data)
        self.fs.mv(tmp, final)

    def tmp_path(self, name: str) -> str:
        return self.path("_tmp", f"{name}.{uuid.uuid4().hex}")

    def write_json(self, name: str, obj) -> None:
        data = json.dumps(obj, indent=2, sort_keys=False).encode()
        self._commit(data, self.tmp_path(posixpath.basename(name)), self.path(name))

    def stats_files(self) -> list[str]:
        return sorted(self.path("stats", f"{n}.parquet") for n in self.committed())

    def read_stats(self, columns: Iterable[str] | None = None) -> pa.Table:
        files = self.stats_files()
        if not files:
            return STATS_SCHEMA.empty_table()
        tables = []
        for p in files:
            with self.fs.open(p, "rb") as f:
                tables.append(pq.read_table(f, columns=list(columns) if columns else None))
        return pa.concat_tables(tables, promote_options="default")


def _sample_json(original: bytes | None, stats_row: dict) -> bytes:
    meta = {}
    if original:
        try:
            meta = json.loads(original)
        except ValueError:
            meta = {"original_json_error": "unparseable json in the input sample"}
    meta["cat"] = {k: stats_row[k] for k in SCORE_COLUMNS if stats_row.get(k) is not None}
    return json.dumps(meta, ensure_ascii=False).encode("utf-8")


def _kept_samples(shard: InputShard, kept: dict[str, dict]) -> Iterable[dict]:
    """Re-read the input shard and yield the kept samples with their original bytes."""
    if shard.format == "webdataset":
        errors: list[str] = []
        done = set()
        for sample in iter_tar_samples(shard.data_url, errors):
            key = posixpath.basename(sample["__key__"])
            if key not in kept or key in done:
                continue
            done.add(key)
            out = {k: v for k, v in sample.items() if not k.startswith("__")}
            out["json"] = _sample_json(sample.get("json"), kept[key])
            out["__key__"] = key
            yield out
        return
    with fsspec.open(shard.data_url, "rb") as f:
        pf = pq.ParquetFile(f)
        names = pf.schema_arrow.names
        image_col = next(c for c in ("jpg", "png", "webp") if c in names)
        for batch in pf.iter_batches(batch_size=256):
            for r in batch.to_pylist():
                key = r.get("key")
                if key not in kept:
                    continue
                meta = {k: v for k, v in r.items() if k != image_col and not isinstance(v, bytes)}
                caption = kept[key]["caption"]
                yield {"__key__": key, image_col: r[image_col], "txt": caption.encode("utf-8"),
                       "json": _sample_json(json.dumps(meta).encode(), kept[key])}


def write_shard(shard: InputShard, rows: pa.Table, out_url: str) -> dict:
    """Decide, write ``shards/NAME.tar`` with the kept samples, then commit ``stats/NAME.parquet``.

    Returns the shard's counts by status.
    """
    out = OutputFolder(out_url)
    stats = decide(rows)
    kept = {r["key"]: r for r in stats.filter(pc.equal(stats["status"], KEPT)).to_pylist()}

    tmp_tar = out.tmp_path(f"{shard.name}.tar")
    written = 0
    with out.fs.open(tmp_tar, "wb") as f:
        with TarWriter(f, encoder=False, mtime=0.0) as sink:
            for sample in _kept_samples(shard, kept) if kept else ():
                sink.write(sample)
                written += 1
    if written != len(kept):
        out.fs.rm(tmp_tar)
        raise RuntimeError(f"shard {shard.name}: {len(kept)} samples kept but {written} found when "
                           "re-reading the input; did the input change during the run?")
    out._commit(None, tmp_tar, out.path("shards", f"{shard.name}.tar"))

    buf = io.BytesIO()
    pq.write_table(stats, buf)
    out._commit(buf.getvalue(), out.tmp_path(f"{shard.name}.parquet"),
                out.path("stats", f"{shard.name}.parquet"))
    counts = {s: 0 for s in (KEPT, DROPPED, ERROR, NOT_DOWNLOADED)}
    for s in stats["status"].to_pylist():
        counts[s] = counts.get(s, 0) + 1
    return {"shard": shard.name, "rows": stats.num_rows, **counts}


def funnel(stats: pa.Table) -> dict:
    """The curation funnel over a stats table (all committed shards)."""
    status = stats["status"]

    def count(mask) -> int:
        return int(pc.sum(pc.cast(pc.fill_null(mask, False), pa.int64())).as_py() or 0)

    evaluated = pc.is_in(status, pa.array([KEPT, DROPPED]))
    out = {
        "input": stats.num_rows,
        "downloaded": count(pc.not_equal(status, NOT_DOWNLOADED)),
        "not_downloaded": count(pc.equal(status, NOT_DOWNLOADED)),
        "errors": count(pc.equal(status, ERROR)),
        "evaluated": count(evaluated),
    }
    # Passed each filter, cumulatively in cascade order (a disabled filter passes everything).
    alive = evaluated
    for f in FILTERS:
        col = stats[f"passed_{f}"]
        alive = pc.and_(alive, pc.fill_null(col, True))
        out[f"passed_{f}"] = count(alive)
    if "text_spotting_status" in stats.column_names:  # absent in stats written before it existed
        out["text_spotting_evaluated"] = count(pc.equal(stats["text_spotting_status"], EVALUATED))
    out["kept"] = count(pc.equal(status, KEPT))
    out["dropped"] = {f: count(pc.equal(stats["drop_reason"], f)) for f in FILTERS}
    return out


def sizes(stats: pa.Table) -> dict[str, int]:
    kept = stats.filter(pc.equal(stats["status"], KEPT))
    counts = {}
    for shard in stats["shard"].unique().to_pylist():
        counts[f"{shard}.tar"] = 0
    for shard in kept["shard"].to_pylist():
        counts[f"{shard}.tar"] += 1
    return dict(sorted(counts.items()))


def format_funnel(f: dict) -> str:
    lines = [
        f"  input samples        {f['input']:>9}",
        f"  not downloaded       {f['not_downloaded']:>9}",
        f"  errors               {f['errors']:>9}",
        f"  evaluated            {f['evaluated']:>9}",
        f"  passed complexity    {f['passed_complexity']:>9}",
        f"  passed action        {f['passed_action']:>9}",
        f"  passed text spotting {f['passed_text_spotting']:>9}",
        f"  kept                 {f['kept']:>9}",
    ]
    return "\n".join(lines)
