"""The curation output folder: kept pairs as webdataset shards, one stats row per input sample.

Layout under the output root (a local folder or any fsspec URL, e.g. ``s3://bucket/cat``)::

    shards/NNNNN.tar          kept samples of input shard NNNNN (original image bytes, txt, json)
    shards/sizes.json         {"NNNNN.tar": kept count}: open_clip's sample count file
    stats/NNNNN.parquet       one row per input sample of shard NNNNN (every status)
    shard_summaries/NNNNN.json  the shard's counts (funnel, kept, bytes), written at commit
    summary.json              the funnel, resolved config, model versions, elapsed time
    _tmp/                     files being written; never read as output

Writing happens in the cluster, never on the driver: the pipeline's last stage writes each block
of decided rows as a *part* (``_tmp/parts/NNNNN/FIRST-LAST.{tar,parquet}``, named by the rows'
positions in the input shard, so a retried task overwrites rather than duplicates), and the task
whose part completes a shard *finalizes* it: it concatenates the parts in input order into
``shards/NNNNN.tar``, writes ``shard_summaries/NNNNN.json``, and commits by writing
``stats/NNNNN.parquet`` last.

**Commit rule:** a shard is committed exactly when its stats object exists. Nothing relies on an
atomic rename: on object storage each file is one PUT that becomes visible whole, and the stats
object is written after everything else of its shard; on a local disk files are renamed into
place. An interrupted run leaves at most a tar or summary without stats, which the re-run
overwrites, so a re-run never duplicates or loses samples. End-of-job aggregates (funnel,
``sizes.json``) read the per-shard summaries, so the driver's work grows with the number of
shards, never with the number of samples.
"""

from __future__ import annotations

import io
import json
import posixpath
import tarfile
import uuid
from typing import Iterable

import fsspec
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
from webdataset import TarWriter

from curation.ingest import DROPPED, ERROR, KEPT, NOT_DOWNLOADED, PENDING, SHARD_END
from curation.common.storage import is_remote
from curation.filters import (EVALUATED, NOT_EVALUATED, OFF, Filter, default_filters,  # noqa: F401
                               filter_columns)
from curation.images import TRAINABLE_FORMATS

# A filter's status column (text_spotting_status): EVALUATED when it scored the sample (kept or
# dropped), NOT_EVALUATED when the cascade skipped it, OFF when the filter is off; null for errors
# and failed downloads. EVALUATED, NOT_EVALUATED and OFF are imported from here by the readers.

BASE_COLUMNS = [("key", pa.string()), ("shard", pa.string()), ("url", pa.string()),
                ("caption", pa.string()), ("status", pa.string()), ("drop_reason", pa.string()),
                ("error", pa.string())]
IMAGE_COLUMNS = [("width", pa.int32()), ("height", pa.int32()), ("image_format", pa.string()),
                 ("image_bytes", pa.int64())]


def stats_schema(filters: list[Filter] | None = None) -> pa.Schema:
    """One stats row per input sample: the sample, each filter's columns (cascade order; see
    :func:`curation.filters.filter_columns`), the image's size and format. ``filters``: the job's
    cascade (None: every registered filter)."""
    filters = default_filters() if filters is None else filters
    return pa.schema(BASE_COLUMNS + filter_columns(filters) + IMAGE_COLUMNS)


def score_columns(filters: list[Filter] | None = None) -> tuple[str, ...]:
    """The score columns a kept sample's json carries under ``cat``."""
    filters = default_filters() if filters is None else filters
    return tuple(c for f in filters for c, _ in f.scores)


# The CAT filters' names, stats and sample-json scores (the registered filters at import time:
# complexity, action, text_spotting)
FILTERS = tuple(f.name for f in default_filters())
STATS_SCHEMA = stats_schema()
SCORE_COLUMNS = score_columns()


def decide(rows: pa.Table, filters: list[Filter] | None = None) -> pa.Table:
    """Final status and drop reason of each sample, as a table in :func:`stats_schema`.

    A pending sample is dropped by the first filter (in cascade order) whose ``passed_*`` is
    False; a filter that is off or was not evaluated (None) does not drop. A pending sample that
    a filter with a status column never saw gets "off" there.
    """
    records = decide_records(rows.to_pylist(), filters)
    records.sort(key=lambda r: (r["key"] is None, r["key"] or ""))
    return pa.Table.from_pylist(records, schema=stats_schema(filters))


def decide_records(records: list[dict], filters: list[Filter] | None = None) -> list[dict]:
    """:func:`decide` on row dicts, in place and in order (other fields are kept)."""
    filters = default_filters() if filters is None else filters
    status_columns = [f.status_column for f in filters if f.status_column]
    for r in records:
        r.setdefault("drop_reason", None)
        if r["status"] != PENDING:
            continue
        for col in status_columns:
            if r.get(col) is None:
                r[col] = OFF
        reason = next((f.name for f in filters if r.get(f.verdict) is False), None)
        r["status"], r["drop_reason"] = (DROPPED, reason) if reason else (KEPT, None)
    return records


class OutputFolder:
    PARTS = "_tmp/parts"

    def __init__(self, root: str):
        self.fs, self.root = fsspec.core.url_to_fs(root)
        self.url = root
        self.remote = is_remote(root)

    def path(self, *parts: str) -> str:
        return posixpath.join(self.root, *parts)

    def prepare(self) -> None:
        for sub in ("shards", "stats", "shard_summaries", "_tmp"):
            self.fs.makedirs(self.path(sub), exist_ok=True)

    def clean_tmp(self) -> None:
        """Remove leftovers of an interrupted run (parts, half-written files)."""
        if self.fs.exists(self.path("_tmp")):
            self.fs.rm(self.path("_tmp"), recursive=True)
        self.fs.makedirs(self.path("_tmp"), exist_ok=True)

    def _list(self, sub: str, suffix: str) -> list[str]:
        """Names (without ``suffix``) under ``sub``: one listing call (paginated on S3)."""
        folder = self.path(sub)
        self.fs.invalidate_cache(folder)
        try:
            entries = self.fs.ls(folder, detail=False)
        except FileNotFoundError:
            return []
        return sorted(posixpath.basename(p)[: -len(suffix)] for p in entries if p.endswith(suffix))

    def committed(self) -> set[str]:
        return set(self._list("stats", ".parquet"))

    # what the job writes at the output's top level (besides the folders of prepare())
    JOB_FILES = ("summary.json", "report.html", "job_settings.json")

    def clear(self) -> None:
        """Delete what the job wrote here (not other files a user keeps in the folder)."""
        for sub in ("shards", "stats", "shard_summaries", "_tmp"):
            if self.fs.exists(self.path(sub)):
                self.fs.rm(self.path(sub), recursive=True)
        for name in self.JOB_FILES:
            if self.fs.exists(self.path(name)):
                self.fs.rm(self.path(name))
        self.fs.invalidate_cache(self.root)

    def put(self, data: bytes, final: str) -> None:
        """Write ``final`` so that readers see either nothing or the whole file."""
        if self.remote:  # one PUT (or multipart upload) becomes visible only when complete
            with self.fs.open(final, "wb") as f:
                f.write(data)
            return
        self._commit(data, self.tmp_path(posixpath.basename(final)), final)

    def _commit(self, data: bytes | None, tmp: str, final: str) -> None:
        if data is not None:
            with self.fs.open(tmp, "wb") as f:
                f.write(data)
        self.fs.mv(tmp, final)

    def tmp_path(self, name: str) -> str:
        return self.path("_tmp", f"{name}.{uuid.uuid4().hex}")

    def write_json(self, name: str, obj) -> None:
        self.put(json.dumps(obj, indent=2, sort_keys=False).encode(), self.path(name))

    def read_json(self, name: str, default=None):
        try:
            with self.fs.open(self.path(name), "rb") as f:
                return json.loads(f.read())
        except FileNotFoundError:
            return default

    def stats_files(self) -> list[str]:
        return [self.path("stats", f"{n}.parquet") for n in self._list("stats", ".parquet")]

    def read_stats(self, columns: Iterable[str] | None = None, names: Iterable[str] | None = None) -> pa.Table:
        """Stats rows of the given committed shards (all of them when ``names`` is None).

        Tests and small outputs only: the job and the report never call this on a whole output.
        """
        files = (self.stats_files() if names is None
                 else [self.path("stats", f"{n}.parquet") for n in names])
        if not files:
            return stats_schema().empty_table()
        tables = []
        for p in files:
            with self.fs.open(p, "rb") as f:
                tables.append(pq.read_table(f, columns=list(columns) if columns else None))
        return pa.concat_tables(tables, promote_options="default")

    def iter_summaries(self, names: Iterable[str], chunk: int = 2000) -> Iterable[dict]:
        """The per-shard summaries of committed shards, fetched ``chunk`` at a time (concurrent
        GETs on object storage). A shard committed by an older version without a summary gets
        one computed from its stats file."""
        names = sorted(names)
        for i in range(0, len(names), chunk):
            part = names[i:i + chunk]
            paths = [self.path("shard_summaries", f"{n}.json") for n in part]
            got = self.fs.cat(paths, on_error="omit")
            got = {posixpath.basename(k): v for k, v in got.items()}
            for n in part:
                raw = got.get(f"{n}.json")
                if raw is not None:
                    yield json.loads(raw)
                else:
                    yield shard_summary(n, self.read_stats(names=[n]), tar_bytes=None)


# --- writing one shard from parts (runs in Ray workers) -----------------------------------------

def _sample_json(original: bytes | None, stats_row: dict, extra: dict | None = None,
                 scores: tuple[str, ...] = SCORE_COLUMNS) -> bytes:
    meta = {}
    if original:
        try:
            meta = json.loads(original)
        except (ValueError, RecursionError):
            meta = {"original_json_error": "unparseable json in the input sample"}
        if not isinstance(meta, dict):
            meta = {"original_json_error": "the input sample's json is not an object"}
    meta["cat"] = {k: stats_row[k] for k in scores if stats_row.get(k) is not None}
    meta.update(extra or {})
    try:
        return json.dumps(meta, ensure_ascii=False).encode("utf-8")
    except (ValueError, RecursionError):  # e.g. nesting too deep to write back
        return json.dumps({"original_json_error": "the input sample's json cannot be re-encoded",
                           "cat": meta["cat"]}).encode("utf-8")


def to_png(data: bytes) -> bytes:
    """Re-encode an image in another format (GIF, TIFF, BMP) once, as PNG (first frame)."""
    from PIL import Image

    with Image.open(io.BytesIO(data)) as img:
        img.seek(0)
        keep_alpha = img.mode in ("RGBA", "LA", "PA") or "transparency" in img.info
        out = io.BytesIO()
        img.convert("RGBA" if keep_alpha else "RGB").save(out, format="PNG")
    return out.getvalue()


def kept_sample(row: dict, scores: tuple[str, ...] = SCORE_COLUMNS) -> dict:
    """The webdataset sample written for a kept row: its original image bytes (converted once to
    PNG when open_clip_train could not read its format), the caption it was judged on, and the
    original metadata with the filters' ``scores`` added under ``cat``."""
    ext, image = (row["image_format"] or "").lower(), row["image"]
    extra = {}
    if ext not in TRAINABLE_FORMATS:
        image, extra = to_png(image), {"original_image_format": ext}
        ext = "png"
    return {"__key__": row["key"], ext: image, "txt": row["caption"].encode("utf-8"),
            "json": _sample_json(row.get("meta_json"), row, extra, scores)}


def part_name(rows: list[dict]) -> str:
    """A part's name from the positions of its rows in the input shard: a retried task writes
    the same name (overwrites) instead of adding a duplicate."""
    idx = [r["row_index"] for r in rows if r.get("row_index") is not None]
    if not idx:  # rows made without positions (tests, old callers): name by content
        import hashlib

        digest = hashlib.sha1("\n".join(sorted(str(r.get("key")) for r in rows)).encode()).hexdigest()
        return f"k{digest[:16]}"
    return f"{min(idx):09d}-{max(idx):09d}"


def write_part(out: OutputFolder, shard: str, records: list[dict],
               filters: list[Filter] | None = None) -> str:
    """Decide one block of a shard's rows and write it as a part: the kept samples as a tar,
    then the stats rows as parquet (the part exists once its parquet does). Returns its name."""
    filters = default_filters() if filters is None else filters
    records = decide_records(records, filters)
    scores = score_columns(filters)
    records.sort(key=lambda r: (r.get("row_index") is None, r.get("row_index") or 0))
    name = part_name(records)
    folder = out.path(out.PARTS, shard)
    out.fs.makedirs(folder, exist_ok=True)
    buf = io.BytesIO()
    with TarWriter(buf, encoder=False, mtime=0.0) as sink:
        for r in records:
            if r["status"] == KEPT:
                sink.write(kept_sample(r, scores))
    with out.fs.open(posixpath.join(folder, f"{name}.tar"), "wb") as f:
        f.write(buf.getvalue())
    table = pa.Table.from_pylist(records, schema=stats_schema(filters))
    pbuf = io.BytesIO()
    pq.write_table(table, pbuf)
    with out.fs.open(posixpath.join(folder, f"{name}.parquet"), "wb") as f:
        f.write(pbuf.getvalue())
    return name


def _copy_tar_members(src, sink: tarfile.TarFile) -> int:
    n = 0
    with tarfile.open(fileobj=src, mode="r|") as part:
        for member in part:
            data = part.extractfile(member) if member.isfile() else None
            sink.addfile(member, data)
            n += member.isfile()
    return n


def finalize_shard(out: OutputFolder, shard: str, expected_rows: int,
                   nodes: dict | None = None, notes: str | None = None,
                   filters: list[Filter] | None = None) -> dict:
    """Concatenate a complete shard's parts into ``shards/NAME.tar``, write its summary, then
    commit ``stats/NAME.parquet``; remove the parts. Returns the shard's summary."""
    folder = out.path(out.PARTS, shard)
    names = out._list(posixpath.join(out.PARTS, shard), ".parquet") if expected_rows else []
    tables = []
    for n in names:
        with out.fs.open(posixpath.join(folder, f"{n}.parquet"), "rb") as f:
            tables.append(pq.read_table(f))
    stats = (pa.concat_tables(tables) if tables else stats_schema(filters).empty_table())
    if stats.num_rows != expected_rows:
        raise RuntimeError(f"shard {shard}: {stats.num_rows} rows in its parts, {expected_rows} "
                           "read from the input")
    order = pc.sort_indices(stats, sort_keys=[("key", "ascending", "at_end")])
    stats = stats.take(order)
    kept = int(pc.sum(pc.equal(stats["status"], KEPT)).as_py() or 0)

    tar_final = out.path("shards", f"{shard}.tar")
    target = tar_final if out.remote else out.tmp_path(f"{shard}.tar")
    members = 0
    with out.fs.open(target, "wb") as f:
        with tarfile.open(fileobj=f, mode="w|", format=tarfile.USTAR_FORMAT) as sink:
            for n in names:
                with out.fs.open(posixpath.join(folder, f"{n}.tar"), "rb") as src:
                    members += _copy_tar_members(src, sink)
    if not out.remote:
        out.fs.mv(target, tar_final)
    tar_bytes = out.fs.size(tar_final)
    summary = shard_summary(shard, stats, tar_bytes=tar_bytes, filters=filters)
    if nodes:
        summary["nodes"] = nodes  # which Ray nodes read and finalized it
    if notes:
        summary["input_errors"] = notes  # shard-level problems that did not stop it (bad sidecar)
    if kept and members < kept:
        raise RuntimeError(f"shard {shard}: {kept} samples kept but {members} files in its parts")
    out.write_json(posixpath.join("shard_summaries", f"{shard}.json"), summary)
    pbuf = io.BytesIO()
    pq.write_table(stats, pbuf)
    out.put(pbuf.getvalue(), out.path("stats", f"{shard}.parquet"))  # the commit
    try:
        out.fs.rm(folder, recursive=True)
    except FileNotFoundError:
        pass
    return summary


def write_shard(name: str, rows: pa.Table, out_url: str, filters: list[Filter] | None = None) -> dict:
    """Write and commit one whole shard from its rows (with ``image`` and ``meta_json`` for the
    samples that may be kept), without Ray: one part, then :func:`finalize_shard`."""
    out = OutputFolder(out_url)
    records = [r for r in rows.to_pylist() if r.get("status") != SHARD_END]
    if records:
        write_part(out, name, records, filters)
    return finalize_shard(out, name, len(records), filters=filters)


def shard_summary(shard: str, stats: pa.Table, tar_bytes: int | None,
                  filters: list[Filter] | None = None) -> dict:
    """A committed shard's counts: its funnel, kept samples, bytes of its tar and kept images."""
    f = funnel(stats, filters)
    kept_mask = pc.equal(stats["status"], KEPT)
    image_bytes = pc.sum(pc.if_else(kept_mask, stats["image_bytes"], 0)).as_py() if stats.num_rows else 0
    return {"shard": shard, "rows": stats.num_rows, "kept": f["kept"], "funnel": f,
            "tar_bytes": tar_bytes, "kept_image_bytes": int(image_bytes or 0)}


def add_funnels(total: dict | None, f: dict) -> dict:
    """Sum two funnels (every count is additive over shards)."""
    if total is None:
        return json.loads(json.dumps(f))
    for k, v in f.items():
        if isinstance(v, dict):
            total[k] = add_funnels(total.get(k), v)
        else:
            total[k] = total.get(k, 0) + v
    return total


def aggregate(out: OutputFolder, names: Iterable[str],
              filters: list[Filter] | None = None) -> tuple[dict, dict[str, int], dict]:
    """``(funnel, sizes, totals)`` over the committed shards, from their per-shard summaries:
    memory and time grow with the number of shards only."""
    total, sizes_, totals = None, {}, {"shards": 0, "tar_bytes": 0, "kept_image_bytes": 0}
    for s in out.iter_summaries(names):
        total = add_funnels(total, s["funnel"])
        sizes_[f"{s['shard']}.tar"] = int(s["kept"])
        totals["shards"] += 1
        totals["tar_bytes"] += int(s.get("tar_bytes") or 0)
        totals["kept_image_bytes"] += int(s.get("kept_image_bytes") or 0)
    empty = funnel(stats_schema(filters).empty_table(), filters)
    return (total if total is not None else empty), sizes_, totals


def funnel(stats: pa.Table, filters: list[Filter] | None = None) -> dict:
    """The curation funnel over a stats table (all committed shards)."""
    filters = default_filters() if filters is None else filters
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
    for f in filters:
        alive = pc.and_(alive, pc.fill_null(stats[f.verdict], True))
        out[f.verdict] = count(alive)
    for f in filters:  # a status column is absent in stats written before it existed
        if f.status_column and f.status_column in stats.column_names:
            out[f"{f.name}_evaluated"] = count(pc.equal(stats[f.status_column], EVALUATED))
    out["kept"] = count(pc.equal(status, KEPT))
    out["dropped"] = {f.name: count(pc.equal(stats["drop_reason"], f.name)) for f in filters}
    return out


def funnel_rows(f: dict) -> list[tuple[str, int]]:
    """The funnel's stages as (label, samples): one ``passed <filter>`` row per filter, in
    cascade order (the order of ``passed_*`` in ``f``)."""
    rows = [("input samples", f["input"]), ("not downloaded", f["not_downloaded"]),
            ("errors", f["errors"]), ("evaluated", f["evaluated"])]
    rows += [("passed " + k[len("passed_"):].replace("_", " "), v) for k, v in f.items()
             if k.startswith("passed_")]
    return rows + [("kept", f["kept"])]


def format_funnel(f: dict) -> str:
    return "\n".join(f"  {label:<20} {n:>9}" for label, n in funnel_rows(f))
