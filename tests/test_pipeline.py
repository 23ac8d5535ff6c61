"""The curation job end to end under local Ray: accounting, bad input, resume."""

import hashlib
import json
import tarfile

import pandas as pd
import pyarrow.parquet as pq
import pytest

from curation.common.config import CONFIG_DIR, build_config
from curation.demo_data import build_demo_dataset
from curation.pipeline import curate

from helpers import (count_sidecar_rows, jpeg, noisy_jpeg, png, png_claiming, read_output_samples,
                     write_wds_shard)

STATUSES = {"kept", "dropped", "error", "not_downloaded"}


def make_cfg(input_dir, out_dir, *overrides, ocr=False):
    """The default config on small inputs; text spotting (slow on CPU) only where asked."""
    return build_config(CONFIG_DIR / "curation" / "cat_filter.yaml",
                        overrides=[f"input={input_dir}", f"output={out_dir}", "progress=false",
                                   "report=false", f"filters.text_spotting.enabled={str(ocr).lower()}",
                                   *overrides])


def assert_text_spotting_columns(stats):
    """Every row says whether T was evaluated; only evaluated rows carry OCR results."""
    ev = stats.status.isin(["kept", "dropped"])
    ts = stats.text_spotting_status
    assert ts[ev].isin(["evaluated", "not_evaluated", "off"]).all()
    assert ts[~ev].isna().all()
    evaluated = ts == "evaluated"
    for col in ("text_overlap", "passed_text_spotting", "ocr_boxes", "ocr_text"):
        assert (stats[col].notna() == evaluated).all(), col
    assert stats.text_overlap[evaluated].between(0, 1).all()
    skipped = stats[ts == "not_evaluated"]
    assert ((skipped.passed_complexity == False) | (skipped.passed_action == False)).all()  # noqa: E712
    t_dropped = stats[stats.drop_reason == "text_spotting"]
    assert (t_dropped.passed_text_spotting == False).all()  # noqa: E712
    assert (t_dropped.passed_complexity != False).all() and (t_dropped.passed_action != False).all()  # noqa: E712
    assert (stats[stats.status == "kept"].passed_text_spotting != False).all()  # noqa: E712


def assert_accounting(input_dir, out_dir):
    """stats rows == input rows; kept rows == samples in the shards == sizes.json."""
    stats = pd.read_parquet(out_dir / "stats")
    assert len(stats) == count_sidecar_rows(input_dir)
    assert set(stats.status) <= STATUSES
    assert stats.key.is_unique
    # drop_reason is set exactly for dropped rows, error exactly for error rows
    assert (stats.drop_reason.notna() == (stats.status == "dropped")).all()
    assert stats[stats.status == "error"].error.notna().all()
    samples = read_output_samples(out_dir)
    kept = stats[stats.status == "kept"]
    assert set(samples) == set(kept.key)
    sizes = json.loads((out_dir / "shards" / "sizes.json").read_text())
    assert sum(sizes.values()) == len(kept) == len(samples)
    for shard, n in sizes.items():
        with tarfile.open(out_dir / "shards" / shard) as tar:
            assert len([m for m in tar.getnames() if m.endswith(".txt")]) == n
    summary = json.loads((out_dir / "summary.json").read_text())
    assert summary["funnel"]["input"] == len(stats)
    assert summary["funnel"]["kept"] == len(kept)
    assert_text_spotting_columns(stats)
    return stats, samples


@pytest.fixture(scope="module")
def demo_input(tmp_path_factory):
    return build_demo_dataset(tmp_path_factory.mktemp("demo") / "in", num_samples=120, num_shards=3)


def test_demo_end_to_end(default_demo):
    summary, demo_in, out = default_demo
    stats, samples = assert_accounting(demo_in, out)
    f = summary["funnel"]
    # the cascade: OCR ran exactly on the samples that passed C and A
    assert f["text_spotting_evaluated"] == f["passed_action"] > 0
    assert (stats.text_spotting_status == "not_evaluated").sum() == f["evaluated"] - f["passed_action"]
    assert f["input"] == 300 and 0 < f["kept"] < f["passed_complexity"] <= f["evaluated"]
    assert f["dropped"]["complexity"] > 0 and f["dropped"]["action"] > 0 and f["dropped"]["text_spotting"] > 0
    assert summary["versions"]["spacy"] and summary["config"]["filters"]["complexity"]["min"] == 1
    # the demo's broken entries are per-sample errors / failed downloads
    assert (stats.status == "error").sum() == 5 and (stats.status == "not_downloaded").sum() == 2
    # the filters' verdicts follow the scores
    ev = stats[stats.status.isin(["kept", "dropped"])]
    assert ((ev.complexity >= 1) == ev.passed_complexity).all()
    assert ((ev.num_actions >= 1) == ev.passed_action).all()
    assert (ev[ev.status == "kept"].passed_complexity & ev[ev.status == "kept"].passed_action).all()
    # image bytes travel unchanged, json carries source metadata + scores
    originals = {}
    for tar_path in sorted(demo_in.glob("*.tar")):
        with tarfile.open(tar_path) as tar:
            originals.update({m.name[:-4]: tar.extractfile(m).read() for m in tar if m.name.endswith(".jpg")})
    checked = 0
    for key, s in samples.items():
        if key in originals:
            assert hashlib.sha256(s["jpg"]).digest() == hashlib.sha256(originals[key]).digest()
            checked += 1
    assert checked == len(samples)
    meta = json.loads(next(iter(samples.values()))["json"])
    assert "url" in meta and meta["cat"]["complexity"] >= 1
    assert (out / "report.html").stat().st_size > 0


def test_thresholds_and_switches(ray_session, demo_input, tmp_path):
    base = curate(make_cfg(demo_input, tmp_path / "base"), log=lambda *_: None)  # complexity.min 1
    strict = curate(make_cfg(demo_input, tmp_path / "a", "filters.complexity.min=3"), log=lambda *_: None)
    assert json.loads((tmp_path / "a" / "summary.json").read_text())["funnel"] == strict["funnel"]
    # a stricter threshold keeps exactly the base run's kept pairs whose complexity reaches it
    base_stats, strict_stats = pd.read_parquet(tmp_path / "base" / "stats"), pd.read_parquet(tmp_path / "a" / "stats")
    base_kept = base_stats[base_stats.status == "kept"]
    assert set(strict_stats[strict_stats.status == "kept"].key) == set(base_kept[base_kept.complexity >= 3].key)
    assert 0 < strict["funnel"]["kept"] < base["funnel"]["kept"]
    assert strict["funnel"]["dropped"]["complexity"] > base["funnel"]["dropped"]["complexity"]
    off = curate(make_cfg(demo_input, tmp_path / "b", "filters.complexity.enabled=false",
                          "filters.action.enabled=false"), log=lambda *_: None)
    assert off["funnel"]["kept"] == off["funnel"]["evaluated"] > strict["funnel"]["kept"]
    stats = pd.read_parquet(tmp_path / "b" / "stats")
    assert stats.complexity.isna().all() and stats.passed_action.isna().all()
    other = curate(make_cfg(demo_input, tmp_path / "c", "filters.complexity.measure=entity_edges",
                            "filters.action.measure=nsubj_verb"), log=lambda *_: None)
    assert other["funnel"]["kept"] != strict["funnel"]["kept"]


def test_bad_input_gives_per_sample_errors(ray_session, tmp_path):
    inp, out = tmp_path / "in", tmp_path / "out"
    inp.mkdir()
    good = "a young man riding a red bicycle on the road"
    write_wds_shard(inp, "00000", [
        {"key": "ok1", "caption": good, "image": jpeg()},
        {"key": "ok2", "caption": good, "image": png(), "ext": "png"},
        {"key": "corrupt", "caption": good, "image": b"\x89PNG but not really" * 20},
        {"key": "truncated", "caption": good, "image": noisy_jpeg()[:1500]},
        {"key": "zero", "caption": good, "image": b""},
        {"key": "huge", "caption": good, "image": png_claiming(50_000, 50_000), "ext": "png"},
        {"key": "nocaption", "caption": None, "image": jpeg()},
        {"key": "empty", "caption": "", "image": jpeg()},
        {"key": "latin1", "caption": "caf\xe9 au lait".encode("latin-1"), "image": jpeg()},
        {"key": "long", "caption": "a dog running " * 7200, "image": jpeg()},
        {"key": "failed", "caption": good, "status": "failed"},
    ])
    write_wds_shard(inp, "00001", [{"key": f"t{i}", "caption": good, "image": noisy_jpeg(seed=i)}
                                   for i in range(8)], truncate_to=0.55)
    summary = curate(make_cfg(inp, out, ocr=True), log=lambda *_: None)
    stats, samples = assert_accounting(inp, out)
    by_key = stats.set_index("key")
    expected = {"corrupt": "not a recognised image", "truncated": "corrupt image data",
                "zero": "empty image", "huge": "image too large: 50000x50000",
                "nocaption": "missing caption", "empty": "empty caption",
                "latin1": "not valid UTF-8", "long": "caption too long"}
    for key, msg in expected.items():
        assert by_key.loc[key, "status"] == "error", key
        assert msg in by_key.loc[key, "error"], (key, by_key.loc[key, "error"])
    assert by_key.loc["failed", "status"] == "not_downloaded"
    assert set(samples) >= {"ok1", "ok2"}
    trunc = stats[stats.shard == "00001"]
    assert len(trunc) == 8 and (trunc.status == "error").any() and (trunc.status == "kept").any()
    assert summary["funnel"]["errors"] == len(expected) + (trunc.status == "error").sum()


def test_resume_after_interrupted_run(ray_session, demo_input, tmp_path):
    from pathlib import Path

    out = tmp_path / "out"
    curate(make_cfg(demo_input, out), log=lambda *_: None)
    first = pd.read_parquet(out / "stats").sort_values("key").reset_index(drop=True)
    mtimes = {p.name: p.stat().st_mtime_ns for p in (out / "stats").glob("*.parquet")}

    # What an interrupted run leaves: a half-written tar in _tmp, a shard renamed into place but
    # not committed (no stats), and a shard never started.
    (out / "_tmp" / "00002.tar.deadbeef").write_bytes(b"partial")
    (out / "stats" / "00001.parquet").unlink()
    tar = out / "shards" / "00001.tar"
    tar.write_bytes(tar.read_bytes()[:1000])
    (out / "stats" / "00002.parquet").unlink()
    (out / "shards" / "00002.tar").unlink()
    (out / "shards" / "sizes.json").unlink()

    logs = []
    curate(make_cfg(demo_input, out), log=logs.append)
    assert any("1 already done, 2 to process" in line for line in logs)
    assert list((out / "_tmp").iterdir()) == []
    assert (out / "stats" / "00000.parquet").stat().st_mtime_ns == mtimes["00000.parquet"]
    again = pd.read_parquet(out / "stats").sort_values("key").reset_index(drop=True)
    pd.testing.assert_frame_equal(first, again)
    assert_accounting(Path(demo_input), out)

    # a complete output is not redone
    logs.clear()
    curate(make_cfg(demo_input, out), log=logs.append)
    assert any("3 already done, 0 to process" in line for line in logs)


def test_stats_are_queryable_with_duckdb(ray_session, demo_input, tmp_path):
    duckdb = pytest.importorskip("duckdb")
    out = tmp_path / "out"
    curate(make_cfg(demo_input, out), log=lambda *_: None)
    rows = duckdb.sql(f"SELECT status, count(*) FROM '{out}/stats/*.parquet' GROUP BY status").fetchall()
    assert sum(n for _, n in rows) == 120
    assert pq.read_schema(next((out / "stats").glob("*.parquet"))).field("text_overlap")


def test_readme_demo_funnel_is_true(default_demo):
    """The funnel quoted in README.md is what the default demo produces."""
    import re

    readme = (CONFIG_DIR.parent / "README.md").read_text()
    block = readme.split("CAT filter funnel (all committed shards):", 1)[1].split("```", 1)[0]
    quoted = {name.strip(): int(n) for name, n in re.findall(r"^\s+([a-z ]+?)\s+(\d+)$", block, re.M)}
    f = default_demo[0]["funnel"]
    names = {"input samples": "input", "not downloaded": "not_downloaded", "errors": "errors",
             "evaluated": "evaluated", "passed complexity": "passed_complexity",
             "passed action": "passed_action", "passed text spotting": "passed_text_spotting",
             "kept": "kept"}
    assert quoted == {k: f[v] for k, v in names.items()}


def test_cascade_and_evaluate_all(ray_session, tmp_path):
    """T runs only after C and A by default, on every sample with evaluate_all; same decisions."""
    from curation.textspot_data import text_image

    inp = tmp_path / "in"
    inp.mkdir()
    passing = ["a dog is chasing a yellow ball in the park", "a woman riding a brown horse on the beach",
               "a chef cooking pasta in a small kitchen"]
    failing = ["vintage coffee poster", "red bicycle", "summer sale"]  # fail C or A
    samples = [{"key": f"text{i}", "caption": c, "image": text_image(c, seed=i)}
               for i, c in enumerate(passing)]
    samples += [{"key": f"plain{i}", "caption": c, "image": text_image("", seed=10 + i)}
                for i, c in enumerate(passing[:2])]
    samples += [{"key": f"fail{i}", "caption": c, "image": text_image(c, seed=20 + i)}
                for i, c in enumerate(failing)]
    write_wds_shard(inp, "00000", samples)

    cascade = curate(make_cfg(inp, tmp_path / "a", "report=true", ocr=True), log=lambda *_: None)
    stats, _ = assert_accounting(inp, tmp_path / "a")
    full = curate(make_cfg(inp, tmp_path / "b", "filters.text_spotting.evaluate_all=true", ocr=True),
                  log=lambda *_: None)
    stats_all, _ = assert_accounting(inp, tmp_path / "b")
    by_key = stats.set_index("key")
    assert set(by_key.index[by_key.drop_reason == "text_spotting"]) == {"text0", "text1", "text2"}
    assert set(by_key.index[by_key.status == "kept"]) == {"plain0", "plain1"}
    assert (by_key.loc[["fail0", "fail1", "fail2"], "text_spotting_status"] == "not_evaluated").all()
    assert cascade["funnel"]["text_spotting_evaluated"] == 5 and full["funnel"]["text_spotting_evaluated"] == 8
    all_key = stats_all.set_index("key")
    assert (all_key.loc[["fail0", "fail1", "fail2"], "text_overlap"] >= 0.5).all()
    # evaluating everything changes no decision: C and A still come first
    pd.testing.assert_series_equal(by_key.sort_index().drop_reason, all_key.sort_index().drop_reason)
    assert (tmp_path / "a" / "report.html").exists() and not (tmp_path / "b" / "report.html").exists()
