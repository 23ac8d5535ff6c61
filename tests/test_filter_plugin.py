"""A filter is one unit: a toy filter registered only in this test flows through the pipeline's
stages, the stats, the funnel, summary.json, the kept samples' json and the report."""

import json
import re

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from curation.common.config import CONFIG_DIR, build_config
from curation.demo_data import build_demo_dataset
from curation.filters import FILTER_TYPES, Filter, Histogram, register_filter
from curation.output import format_funnel
from curation.pipeline import curate

from helpers import read_output_samples

MIN_WORDS = 9


@pytest.fixture
def caption_length():
    """Registered for this test only (a local class: Ray ships it to the workers by value)."""

    @register_filter
    class CaptionLength(Filter):
        name = "caption_length"
        scores = (("caption_words", pa.int32()),)
        histogram = Histogram("caption_words", "caption length (evaluated)", "words", cap=15)

        def score(self, rows, shared, memo):
            return {"caption_words": [len(r["caption"].split()) for r in rows]}

        def keep(self, scores, rows):
            return [n >= int(self.cfg.get("min", 1)) for n in scores["caption_words"]]

        def threshold(self):
            return float(self.cfg.get("min", 1))

    yield CaptionLength
    FILTER_TYPES.pop("caption_length")


def test_a_toy_filter_flows_through_stats_funnel_summary_and_report(ray_session, caption_length, tmp_path):
    inp = build_demo_dataset(tmp_path / "in", num_samples=60, num_shards=2)
    cfg = build_config(CONFIG_DIR / "curation" / "cat_filter.yaml",
                       overrides=[f"input={inp}", f"output={tmp_path / 'out'}", "progress=false",
                                  "filters.text_spotting.enabled=false"])
    # the config's `filters:` order is the cascade: C, A, then the toy filter, then T
    f = cfg["filters"]
    cfg["filters"] = {"complexity": f["complexity"], "action": f["action"],
                      "caption_length": {"enabled": True, "min": MIN_WORDS},
                      "text_spotting": f["text_spotting"]}
    cfg["stages"]["caption_length"] = {"actors": 0, "num_cpus": 0.25}  # Ray tasks, not an actor pool
    logged = []
    summary = curate(cfg, log=logged.append)

    stats = pa.concat_tables([pq.read_table(p) for p in sorted((tmp_path / "out" / "stats").glob("*.parquet"))])
    names = stats.column_names
    assert names.index("passed_action") < names.index("caption_words") < names.index("passed_caption_length") \
        < names.index("ocr_text")
    rows = stats.to_pylist()
    for r in rows:
        alive = r["status"] in ("kept", "dropped") and r["passed_complexity"] and r["passed_action"]
        if alive:  # scored only where C and A passed (the cascade)
            assert r["caption_words"] == len(r["caption"].split())
            assert r["passed_caption_length"] == (r["caption_words"] >= MIN_WORDS)
        else:
            assert r["caption_words"] is None and r["passed_caption_length"] is None
    dropped = [r for r in rows if r["drop_reason"] == "caption_length"]
    kept = [r for r in rows if r["status"] == "kept"]
    assert dropped and kept and all(r["caption_words"] < MIN_WORDS for r in dropped)

    funnel = summary["funnel"]
    assert list(k for k in funnel if k.startswith("passed_")) == [
        "passed_complexity", "passed_action", "passed_caption_length", "passed_text_spotting"]
    assert funnel["passed_caption_length"] == len(kept) == funnel["kept"]
    assert funnel["dropped"]["caption_length"] == len(dropped)
    on_disk = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert on_disk["funnel"] == funnel
    text = format_funnel(funnel)
    assert f"  passed caption length {len(kept):>9}" in text
    assert text.index("passed action") < text.index("passed caption length") < text.index("passed text spotting")
    assert any(text in line for line in logged)

    samples = read_output_samples(tmp_path / "out")
    assert len(samples) == len(kept)
    assert all(json.loads(s["json"])["cat"]["caption_words"] >= MIN_WORDS for s in samples.values())

    page = (tmp_path / "out" / "report.html").read_text()
    assert "caption length (evaluated)" in page  # its chart
    assert "<td>passed caption length</td>" in page  # its funnel row
    assert "<h3>dropped: caption_length</h3>" in page  # its examples
    assert re.search(r"C=\d+ A=\d+ caption_words=\d+ T off</div>", page)  # its score on their cards


class CountingScorer:
    """Stands in for the spaCy scorer: counts the parses."""

    def __init__(self):
        self.calls = 0

    def score(self, captions):
        from curation.caption_filters import CaptionScores

        self.calls += 1
        n = [len(c.split()) for c in captions]
        return CaptionScores(n, [k - 2 for k in n], [None] * len(n), [None] * len(n))


def test_complexity_and_action_share_one_stage_and_one_parse():
    from curation.filters import build_filters, stage_groups
    from curation.ingest import ERROR, ROW_SCHEMA, make_row
    from curation.pipeline import score_stage

    cfg = build_config(CONFIG_DIR / "curation" / "cat_filter.yaml", overrides=["filters.complexity.min=3"])
    groups = stage_groups(build_filters(cfg))
    assert [[f.name for f in g] for g in groups] == [["complexity", "action"], ["text_spotting"]]
    rows = [make_row("a", "0", caption="a dog runs fast", image=b"x"),
            make_row("b", "0", caption="two dogs", image=b"y"),
            make_row("c", "0", caption="gone", status=ERROR, error="empty image")]
    scorer = CountingScorer()
    out = score_stage(pa.Table.from_pylist(rows, schema=ROW_SCHEMA), groups[0], {"caption_scorer": scorer})
    assert scorer.calls == 1  # one parse serves both filters
    assert out.column_names[-4:] == ["complexity", "num_actions", "passed_complexity", "passed_action"]
    assert out["complexity"].to_pylist() == [4, 2, None] and out["num_actions"].to_pylist() == [2, 0, None]
    assert out["passed_complexity"].to_pylist() == [True, False, None]
    assert out["passed_action"].to_pylist() == [True, False, None]
    assert out["image"].to_pylist() == [b"x", None, None]  # b cannot be kept any more


def test_an_unknown_filter_section_is_a_settings_error(tmp_path):
    from curation.pipeline import SettingsError

    cfg = build_config(CONFIG_DIR / "curation" / "cat_filter.yaml", overrides=[f"output={tmp_path / 'out'}"])
    cfg["filters"]["caption_lenght"] = {"min": 3}
    with pytest.raises(SettingsError, match="filters.caption_lenght: no such filter"):
        curate(cfg, log=lambda *_: None)
