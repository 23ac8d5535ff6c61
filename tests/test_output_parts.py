"""The in-cluster write path without Ray: parts, the shard tracker, finalize, per-shard summaries
and the bounded-memory aggregates they feed (funnel, sizes.json, the report's DuckDB queries)."""

import io
import json
import tarfile

import pyarrow as pa
import pytest

from curation.common.jobs import local_path_warning
from curation.ingest import ROW_SCHEMA, IngestOptions, InputShard, read_shard
from curation.output import (OutputFolder, aggregate, decide, finalize_shard, funnel, write_part,
                             write_shard)
from curation.pipeline import ShardTracker
from curation.report import INT_CAPS, OVERLAP_BINS, float_histogram, int_histogram, stats_aggregates

from helpers import jpeg, noisy_jpeg, write_wds_shard


def _rows(tmp_path, name="00000", n=7):
    """A shard's read rows (images and metadata included), with C/A verdicts filled in."""
    inp = tmp_path / "in"
    inp.mkdir(exist_ok=True)
    samples = [{"key": f"{name}k{i}", "caption": f"a dog number {i} runs", "image": noisy_jpeg(seed=i)}
               for i in range(n)]
    samples.append({"key": f"{name}bad", "caption": "broken", "image": b"not an image"})
    write_wds_shard(inp, name, samples)
    shard = InputShard(name, "webdataset", str(inp / f"{name}.tar"), str(inp / f"{name}.parquet"))
    tables = [t for t in read_shard(shard, IngestOptions.defaults()) if t["status"][0].as_py() != "shard_end"]
    rows = pa.concat_tables(tables).to_pylist()
    for i, r in enumerate(rows):
        if r["status"] == "pending":
            r["complexity"], r["num_actions"] = i % 3, 1
            r["passed_complexity"], r["passed_action"] = i % 3 >= 1, True
    return rows


def _tar_members(out, name):
    with out.fs.open(out.path("shards", f"{name}.tar"), "rb") as f:
        with tarfile.open(fileobj=io.BytesIO(f.read())) as tar:
            return [m.name for m in tar]


def test_tracker_completes_each_shard_exactly_once():
    t = ShardTracker()
    assert t.add("a", "000-009", 10, None) is None
    assert t.add("a", "000-009", 10, None) is None          # a retried task: counted once
    assert t.add("a", None, 0, 25, "node1") is None           # the marker: 25 rows expected
    assert t.open_shards() == ["a"]
    assert t.add("a", "010-024", 15, None) == (25, "node1", None)  # this call completes it
    assert t.add("a", "010-024", 15, None) is None            # a late retry never finalizes twice
    assert t.add("b", None, 0, 0, "node2", "b.parquet unreadable") == (0, "node2", "b.parquet unreadable")
    assert t.add("c", "000-004", 5, None) is None
    t.fail("c")                                               # unreadable: never finalized
    assert t.add("c", None, 0, 5, "node1") is None
    assert t.open_shards() == []


def test_parts_in_any_order_make_the_same_shard(tmp_path):
    rows = _rows(tmp_path)
    whole = OutputFolder(str(tmp_path / "whole"))
    whole.prepare()
    s1 = write_shard("00000", pa.Table.from_pylist(rows, schema=_schema(rows)), whole.url)

    split = OutputFolder(str(tmp_path / "split"))
    split.prepare()
    # the second block is written first, and the first block twice (a retried task)
    write_part(split, "00000", [dict(r) for r in rows[4:]])
    write_part(split, "00000", [dict(r) for r in rows[:4]])
    write_part(split, "00000", [dict(r) for r in rows[:4]])
    s2 = finalize_shard(split, "00000", len(rows))
    assert s1["funnel"] == s2["funnel"] and s1["kept"] == s2["kept"] > 0
    assert _tar_members(whole, "00000") == _tar_members(split, "00000")
    kept = [r["key"] for r in decide(pa.Table.from_pylist(rows, schema=_schema(rows))).to_pylist()
            if r["status"] == "kept"]
    assert [m[:-4] for m in _tar_members(split, "00000") if m.endswith(".txt")] == kept  # input order
    assert whole.read_stats().equals(split.read_stats())
    assert split.fs.ls(split.path("_tmp", "parts")) == []  # parts removed after the commit
    # a kept sample keeps its image bytes and its original metadata, plus the scores
    with split.fs.open(split.path("shards", "00000.tar"), "rb") as f:
        tar = tarfile.open(fileobj=io.BytesIO(f.read()))
        meta = json.loads(tar.extractfile(f"{kept[0]}.json").read())
    assert meta["key"] == kept[0] and meta["cat"]["complexity"] >= 1


def test_finalize_refuses_a_shard_with_missing_rows(tmp_path):
    rows = _rows(tmp_path)
    out = OutputFolder(str(tmp_path / "out"))
    out.prepare()
    write_part(out, "00000", rows[:3])
    with pytest.raises(RuntimeError, match="3 rows in its parts, 8 read from the input"):
        finalize_shard(out, "00000", len(rows))
    assert out.committed() == set()


def test_aggregates_equal_the_whole_table_and_duckdb_bins_match_python(tmp_path):
    out = OutputFolder(str(tmp_path / "out"))
    out.prepare()
    for name in ("00000", "00001", "00002"):
        rows = _rows(tmp_path, name, n=5 + len(name.strip("0") or ""))
        for i, r in enumerate(rows):
            if r["status"] == "pending" and i % 2:
                r["text_overlap"], r["passed_text_spotting"] = i / 7, i / 7 < 0.4
        write_shard(name, pa.Table.from_pylist(rows, schema=_schema(rows)), out.url)
    total, sizes, totals = aggregate(out, out.committed())
    stats = out.read_stats()
    assert total == funnel(stats)
    assert sizes == {f"{n}.tar": sum(1 for r in stats.to_pylist() if r["shard"] == n and r["status"] == "kept")
                     for n in ("00000", "00001", "00002")}
    assert totals["shards"] == 3 and totals["tar_bytes"] > 0
    agg = stats_aggregates(out)
    ev = [r for r in stats.to_pylist() if r["status"] in ("kept", "dropped")]
    for col, cap in INT_CAPS.items():
        assert agg[col] == int_histogram([r[col] for r in ev], cap)
    assert agg["text_overlap"] == float_histogram([r["text_overlap"] for r in ev], OVERLAP_BINS)
    for status in ("kept", "dropped"):  # the same bins split by status
        rows = [r for r in ev if r["status"] == status]
        for col, cap in INT_CAPS.items():
            assert agg["split"][col][status] == int_histogram([r[col] for r in rows], cap)[1]
        assert agg["split"]["text_overlap"][status] == float_histogram([r["text_overlap"] for r in rows], OVERLAP_BINS)[1]
    assert sum(agg["text_overlap"][1]) > 0
    assert agg["reasons"] == _python_reasons(stats) and agg["reasons"][("error", "not a recognised image format (12 bytes)")] == 3


def test_local_paths_on_several_nodes_are_named():
    assert local_path_warning({"input": "/data/in", "output": "s3://b/out"}, 1) is None
    assert local_path_warning({"input": "s3://b/in", "output": "s3://b/out"}, 4) is None
    msg = local_path_warning({"input": "/data/in", "output": "s3://b/out"}, 3)
    assert msg.startswith("warning: input=/data/in") and "3-node" in msg and "s3://" in msg


def _schema(rows):
    names = set().union(*rows)
    fields = list(ROW_SCHEMA)
    extra = {"complexity": pa.int32(), "num_actions": pa.int32(), "passed_complexity": pa.bool_(),
             "passed_action": pa.bool_(), "text_overlap": pa.float32(), "passed_text_spotting": pa.bool_()}
    return pa.schema(fields + [pa.field(k, t) for k, t in extra.items() if k in names])


def _python_reasons(stats) -> dict:
    """The reasons table the way the report built it before DuckDB: one pass in Python."""
    counts = {}
    for r in stats.to_pylist():
        if r["status"] == "dropped":
            k = ("dropped", r["drop_reason"])
        elif r["status"] == "error":
            k = ("error", (r["error"] or "").split(":")[0][:80])
        else:
            continue
        counts[k] = counts.get(k, 0) + 1
    return counts
