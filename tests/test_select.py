"""Re-selection (pipelines/cat_select.py): new thresholds over a scored output, with spaCy and OCR
only for samples whose stored score does not hold. The session's demo curation (text spotting
on) is the scored output; every selection is compared with it."""

import io
import json
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pyarrow.parquet as pq
import pytest

from curation.caption_filters import CaptionScores
from curation.common.config import CONFIG_DIR, build_config
from curation.demo_data import build_demo_dataset
from curation.ingest import PENDING
from curation.pipeline import SettingsError, curate
from curation.reselect import SelectPlan, build_select_config, reselect_records, select
from curation.settings import curation_config

from helpers import count_sidecar_rows, read_output_samples
from pipelines import cat_select

REPO = Path(__file__).resolve().parents[1]
QUIET = ["progress=false", "report=false"]


def _stats(out) -> pd.DataFrame:
    return pd.read_parquet(out / "stats").sort_values("key").reset_index(drop=True)


def _kept(stats: pd.DataFrame) -> set:
    return set(stats.key[stats.status == "kept"])


def _summary(out) -> dict:
    return json.loads((out / "summary.json").read_text())


@pytest.fixture(scope="module")
def scored(default_demo):
    """The session's demo curation (the default settings: complexity.min 1, the T cascade, 300
    samples in 3 shards; read only): (input, output)."""
    _, inp, out = default_demo
    return inp, out


@pytest.fixture(scope="module")
def strict(scored, tmp_path_factory):
    """The README's command: a stricter C and T over the scored output, through the CLI."""
    out = tmp_path_factory.mktemp("strict") / "c2"
    rc = cat_select.main([f"from={scored[1]}", f"output={out}", "filters.complexity.min=2",
                          "filters.text_spotting.threshold=0.3", "progress=false"])
    assert rc == 0
    return out


def test_same_thresholds_reproduce_the_scored_output(scored, tmp_path):
    inp, base = scored
    out = tmp_path / "same"
    summary = select(build_select_config(str(base), None, [f"output={out}", *QUIET]), log=lambda *_: None)
    stats = _stats(out)
    # every input sample once, and the whole stats table (scores, decisions, OCR text) as scored
    assert len(stats) == count_sidecar_rows(inp) == 300 and stats.key.is_unique
    pd.testing.assert_frame_equal(stats, _stats(base))
    assert set(read_output_samples(out)) == _kept(stats) == set(read_output_samples(base))
    assert json.loads((out / "shards" / "sizes.json").read_text()) == \
        json.loads((base / "shards" / "sizes.json").read_text())
    sel = summary["selection"]
    assert sel["changed"] == [] and sel["ocr_stage"] is False and sel["scored_now"] == {"spacy": 0, "ocr": 0}
    assert summary["funnel"] == _summary(base)["funnel"] and summary["input"] == str(inp)
    assert json.loads((out / "job_settings.json").read_text())["selected_from"] == str(base)

    # resume: the same command again has nothing to do; other thresholds into it are refused
    logs = []
    select(build_select_config(str(base), None, [f"output={out}", *QUIET]), log=logs.append)
    assert any("3 already done, 0 to process" in line for line in logs)
    with pytest.raises(SettingsError, match="filters.complexity.min: 1 -> 2"):
        select(build_select_config(str(base), None, [f"output={out}", "filters.complexity.min=2", *QUIET]),
               log=lambda *_: None)


def test_stricter_thresholds_give_a_subset_without_ocr(scored, strict):
    base = _stats(scored[1])
    stats = _stats(strict)
    sel = _summary(strict)["selection"]
    # no OCR: the OCR stage was not even built, and no image was counted through it
    assert sel["ocr_stage"] is False and sel["scored_now"] == {"spacy": 0, "ocr": 0}
    assert sel["changed"] == ["filters.complexity.min: 1 -> 2", "filters.text_spotting.threshold: 0.4 -> 0.3"]
    kept = base[base.status == "kept"]
    expected = set(kept.key[(kept.complexity >= 2) & (kept.text_overlap < 0.3)])
    assert _kept(stats) == expected and 0 < len(expected) < len(kept)
    assert set(read_output_samples(strict)) == expected
    # the cascade as a fresh run would record it: OCR results only where C and A passed
    evaluated = stats.text_spotting_status == "evaluated"
    assert (evaluated == ((stats.passed_complexity == True) & (stats.passed_action == True))).all()  # noqa: E712
    assert (stats.ocr_text[evaluated] == base.ocr_text[evaluated]).all()
    assert (stats.text_rule[evaluated] == "partial>=0.3").all()
    assert (strict / "report.html").stat().st_size > 0


def test_looser_thresholds_ocr_only_the_newly_admitted_and_equal_a_fresh_run(scored, strict, tmp_path):
    """From the complexity.min=2 selection back to min 1: the samples with complexity 1 that pass A
    were never OCR'd there; exactly those go to OCR, and the result is the fresh min=1 run."""
    base, before = _stats(scored[1]), _stats(strict)
    out = tmp_path / "loose"
    summary = select(build_select_config(str(strict), None, [
        f"output={out}", "filters.complexity.min=1", "filters.text_spotting.threshold=0.4", *QUIET]),
        log=lambda *_: None)
    never_ocrd = (before.text_spotting_status == "not_evaluated") & (
        (base.text_spotting_status == "evaluated") | (base.status == "error"))
    assert never_ocrd.sum() > 0
    assert summary["selection"]["ocr_stage"] is True
    assert summary["selection"]["scored_now"] == {"spacy": 0, "ocr": int(never_ocrd.sum())}
    pd.testing.assert_frame_equal(_stats(out), base)
    assert set(read_output_samples(out)) == _kept(base)


def test_user_errors_are_one_line_with_exit_2(scored, tmp_path, capsys):
    inp, base = scored
    cases = [
        ([f"output={tmp_path / 'o'}"], "error: from=<curation output> is required"),
        ([f"from={inp}", f"output={tmp_path / 'o'}"], f"error: from={inp} is not a curation output"),
        ([f"from={tmp_path / 'nowhere'}", f"output={tmp_path / 'o'}"], "error: from="),
        ([f"from={base}", f"output={base}"], "error: output="),
        ([f"from={base}", f"output={tmp_path / 'o'}", f"input={tmp_path}"], "error: a re-selection reads"),
        ([f"from={base}", f"output={tmp_path / 'o'}", "filters.complexity.min=two"],
         "error: filters.complexity.min must be an integer"),
        ([f"from={base}"], "error: output=<new folder> is required"),
    ]
    for args, message in cases:
        with pytest.raises(SystemExit) as exc:
            cat_select.main([*args, *QUIET])
        err = capsys.readouterr().err
        assert exc.value.code == 2 and err.startswith(message), (args, err)
        assert len(err.strip().splitlines()) == 1, err
    assert not (tmp_path / "o" / "stats").exists()
    # the script as users run it (a script named select.py would hide Python's select module)
    proc = subprocess.run([sys.executable, "pipelines/cat_select.py", f"from={inp}", f"output={tmp_path / 'o'}"],
                          cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2 and proc.stderr.startswith("error: from=") and "Traceback" not in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1


def test_plan_decides_which_scores_hold():
    """Which stored scores a setting change keeps, and when the OCR stage is needed at all."""
    recorded = build_config(CONFIG_DIR / "curation" / "cat_filter.yaml",
                            overrides=["filters.complexity.min=2"])

    def plan(*overrides):
        cfg = build_config(CONFIG_DIR / "curation" / "cat_filter.yaml", overrides=list(overrides))
        return SelectPlan.make("x", recorded, curation_config(cfg))

    same = plan("filters.complexity.min=2")
    assert (same.reuse_complexity, same.reuse_actions, same.reuse_ocr, same.ocr_stage) == (True, True, True, False)
    assert not plan("filters.complexity.min=3", "filters.action.min=2", "filters.text_spotting.threshold=0.2",
                    "filters.text_spotting.measure=fondant").ocr_stage  # stricter, or a new rule on stored text
    assert plan("filters.complexity.min=1").ocr_stage                   # looser C
    assert plan("filters.action.enabled=false").ocr_stage               # A off admits more
    assert plan("filters.text_spotting.evaluate_all=true").ocr_stage
    assert not plan("filters.text_spotting.enabled=false").ocr_stage
    p = plan("filters.complexity.measure=max_children")                 # new C scores: spaCy, then OCR
    assert (p.reuse_complexity, p.reuse_actions, p.ocr_stage) == (False, True, True)
    p = plan("filters.text_spotting.min_confidence=0.5")                # other OCR text: OCR again
    assert (p.reuse_ocr, p.ocr_stage) == (False, True)


def test_records_take_stored_scores_and_score_only_the_rest():
    cfg = curation_config(build_config(CONFIG_DIR / "curation" / "cat_filter.yaml",
                                       overrides=["filters.complexity.min=2"]))
    stored = {"a": {"status": "kept", "complexity": 3, "num_actions": 1, "text_spotting_status": "evaluated",
                    "ocr_text": "SALE\nbig dog", "ocr_boxes": 2, "ocr_engine": "ppocr", "ocr_side": 512},
              "b": {"status": "dropped", "complexity": 0, "num_actions": 1, "text_spotting_status": "not_evaluated"},
              "c": {"status": "error", "error": "OCR failed: boom", "complexity": 2, "num_actions": 2}}
    rows = [{"key": k, "status": PENDING, "error": None, "caption": "a big dog runs", "image": b"x",
             "meta_json": b"{}"} for k in ("a", "b", "c", "d")]
    scored = []

    def spacy(captions):
        scored.extend(captions)
        return CaptionScores([5] * len(captions), [1] * len(captions), [None] * len(captions), [None] * len(captions))

    plan = SelectPlan("x", cfg.filters, cfg.spacy, True, True, True, True)
    assert reselect_records(rows, stored, plan, spacy) == 1 and len(scored) == 1  # "d": never scored
    a, b, c, d = rows
    assert (a["complexity"], a["passed_complexity"], a["text_spotting_status"], a["need_ocr"]) == (3, True, "evaluated", False)
    # the overlap recomputed from the stored OCR text: "big" and "dog" of big, dog, runs
    assert a["text_overlap"] == round(2 / 3, 4) and a["passed_text_spotting"] is False and a["text_rule"] == "partial>=0.4"
    assert (b["passed_complexity"], b["text_spotting_status"], b["image"]) == (False, "not_evaluated", None)
    assert (c["status"], c["error"]) == ("error", "OCR failed: boom")  # the stored OCR failure
    assert (d["complexity"], d["need_ocr"]) == (5, True)
    # a new complexity measure: every pending caption to spaCy
    rows = [dict(r, status=PENDING) for r in rows]
    scored.clear()
    reselect_records(rows, stored, SelectPlan("x", cfg.filters, cfg.spacy, False, True, True, True), spacy)
    assert len(scored) == 4


@pytest.mark.timeout(300)
def test_select_bucket_to_bucket(scored, strict, s3_env, tmp_path):
    """The scored output and its input in a bucket, the selection written to a bucket: the same
    rows as the local selection."""
    inp, base = scored
    bucket = s3_env.new_bucket("sel")
    fs = s3_env.filesystem()
    s3_env.upload(inp, f"s3://{bucket}/laion")
    s3_env.upload(base, f"s3://{bucket}/scored")
    settings = json.loads((base / "job_settings.json").read_text())
    fs.pipe(f"{bucket}/scored/job_settings.json", json.dumps({**settings, "input": f"s3://{bucket}/laion"}).encode())
    out = f"s3://{bucket}/c2"
    summary = select(build_select_config(f"s3://{bucket}/scored", None, [
        f"output={out}", "filters.complexity.min=2", "filters.text_spotting.threshold=0.3", *QUIET]),
        log=lambda *_: None)
    assert summary["selection"]["scored_now"] == {"spacy": 0, "ocr": 0}
    frames = [pq.read_table(io.BytesIO(fs.cat(p))).to_pandas() for p in sorted(fs.glob(f"{bucket}/c2/stats/*.parquet"))]
    remote = pd.concat(frames).sort_values("key").reset_index(drop=True)
    pd.testing.assert_frame_equal(remote, _stats(strict))
    assert summary["funnel"] == _summary(strict)["funnel"]
    assert fs.exists(f"{bucket}/c2/shards/00000.tar") and fs.exists(f"{bucket}/c2/shards/sizes.json")
