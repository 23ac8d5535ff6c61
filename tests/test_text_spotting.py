"""Text spotting: the overlap measure, safe decoding, the cascade rows, the labelled set with EasyOCR."""

import io

import numpy as np
import pyarrow as pa
import pytest
from PIL import Image

from curation import textspot_data
from curation.images import BadImage, decode_rgb
from curation.ingest import ERROR, PENDING, ROW_SCHEMA, make_row
from curation.ocr import TextSpotter, TextSpottingConfig
from curation.output import EVALUATED, NOT_EVALUATED, OFF, decide
from curation.pipeline import add_text_spotting, ocr_rows_per_call, rows_to_score
from curation.text_overlap import (TextOverlapConfig, content_word_overlap, content_words,
                                   fondant_overlap, within_edits)

from helpers import png_claiming


# --- overlap measure -----------------------------------------------------------------------------

def test_content_words_ignore_case_punctuation_and_stop_words():
    assert content_words("A Dog's  red BALL, on the beach!") == ["dogs", "red", "ball", "beach"]
    assert content_words("the of and") == []


@pytest.mark.parametrize("ocr, caption, expected", [
    (["RED BALL", "ON THE BEACH"], "a red ball on the beach", 1.0),      # case, stop words
    (["red-ball;", "beach."], "A red ball on the beach", 1.0),           # punctuation
    (["Vlntage", "Coffee Shop"], "vintage coffee shop poster", 0.75),    # one misread character
    (["COFFEESHOP"], "coffee shop", 0.5),                                # run together (5+ chars)
    (["car"], "a cat", 0.0),                                             # short words stay exact
    (["SALE 50% OFF"], "a dog running on the beach", 0.0),
    ([], "a dog running", 0.0),
    (["dog"], "", 0.0),
])
def test_content_word_overlap(ocr, caption, expected):
    assert content_word_overlap(ocr, caption) == pytest.approx(expected)


def test_edit_distance_bound():
    assert within_edits("poster", "p0ster", 1) and within_edits("mountain", "mountian", 2)
    assert not within_edits("poster", "roasted", 1) and not within_edits("abc", "abcdef", 2)


def test_fondant_rule_and_thresholds():
    assert fondant_overlap(["BEACH"], "a dog on the beach") == 1.0
    assert fondant_overlap(["STOP"], "a dog on the beach") == 0.0
    fondant = TextOverlapConfig("fondant")
    assert not fondant.passes(1.0) and fondant.passes(0.0)
    cw = TextOverlapConfig("content_words", 0.5)
    assert cw.passes(0.49) and not cw.passes(0.5)
    with pytest.raises(ValueError, match="measure"):
        TextOverlapConfig("bogus")
    with pytest.raises(ValueError, match="threshold"):
        TextOverlapConfig("content_words", 1.5)


# --- decoding for OCR ------------------------------------------------------------------------------

def _encode(img, fmt):
    buf = io.BytesIO()
    img.save(buf, format=fmt)
    return buf.getvalue()


def test_decode_rgb_converts_modes_and_downscales():
    rgba = Image.new("RGBA", (800, 400), (0, 0, 0, 0))  # fully transparent: flattened on white
    img = decode_rgb(_encode(rgba, "PNG"), max_side=200)
    assert img.mode == "RGB" and img.size == (200, 100) and img.getpixel((5, 5)) == (255, 255, 255)
    gray = decode_rgb(_encode(Image.new("L", (50, 40), 7), "PNG"), max_side=200)
    assert gray.mode == "RGB" and gray.size == (50, 40)
    with pytest.raises(BadImage, match="too large"):
        decode_rgb(png_claiming(50_000, 50_000))
    with pytest.raises(BadImage):
        decode_rgb(b"not an image at all")


# --- the cascade on Arrow rows (a recording backend: what the stage asks OCR to read) ---------

class RecordingBackend:
    name = "recording"

    def __init__(self, answer):
        self.answer, self.seen = answer, 0

    def read(self, images):
        self.seen += len(images)
        return [[(self.answer, 0.9), ("noise", 0.05)] for _ in images]


def _rows(image):
    rows = [make_row("a", "00000", caption="red ball on the beach", image=image),
            make_row("b", "00000", caption="red ball on the beach", image=image),
            make_row("c", "00000", caption="a dog", image=image),
            make_row("d", "00000", caption="broken", image=b"garbage bytes"),
            make_row("e", "00000", caption="x", status=ERROR, error="empty image")]
    t = pa.Table.from_pylist(rows, schema=ROW_SCHEMA)
    t = t.append_column("passed_complexity", pa.array([True, False, True, True, None]))
    return t.append_column("passed_action", pa.array([True, True, True, True, None]))


@pytest.mark.parametrize("evaluate_all", [False, True])
def test_cascade_rows(evaluate_all):
    image = _encode(Image.new("RGB", (64, 48), "white"), "JPEG")
    batch = _rows(image)
    assert rows_to_score(batch, evaluate_all) == ([0, 1, 2, 3] if evaluate_all else [0, 2, 3])
    backend = RecordingBackend("RED BALL BEACH")
    spotter = TextSpotter(TextSpottingConfig.defaults(evaluate_all=evaluate_all), backend)
    out = add_text_spotting(batch, spotter)
    # only the sample that may still be kept (c) carries its image bytes on to the writer
    assert out["image"].to_pylist() == [None, None, image, None, None] and out.num_rows == 5
    assert backend.seen == (3 if evaluate_all else 2)  # the broken image never reaches OCR
    stats = {r["key"]: r for r in decide(out).to_pylist()}
    a, b, c, d, e = (stats[k] for k in "abcde")
    assert a["text_spotting_status"] == EVALUATED and a["ocr_text"] == "RED BALL BEACH"
    assert a["ocr_boxes"] == 1 and a["text_overlap"] == 1.0 and a["passed_text_spotting"] is False
    # what decided: the backend's name, the detector's size, the rule; nothing where OCR did not run
    assert (a["ocr_engine"], a["ocr_side"], a["text_rule"]) == ("recording", 512, "partial>=0.4")
    assert (d["ocr_engine"], e["ocr_engine"]) == (None, None)
    assert a["status"] == "dropped" and a["drop_reason"] == "text_spotting"
    assert c["text_overlap"] == 0.0 and c["passed_text_spotting"] is True and c["status"] == "kept"
    if evaluate_all:
        assert b["text_spotting_status"] == EVALUATED and b["passed_text_spotting"] is False
    else:
        assert b["text_spotting_status"] == NOT_EVALUATED and b["text_overlap"] is None
        assert b["ocr_engine"] is None and b["ocr_side"] is None and b["text_rule"] is None
    assert b["status"] == "dropped" and b["drop_reason"] == "complexity"  # C comes first
    assert d["status"] == ERROR and "not a recognised image" in d["error"]
    assert d["text_spotting_status"] is None and e["text_spotting_status"] is None


class FailingBackend:
    name = "failing"

    def read(self, images):
        if any(a.shape[0] < 20 for a in images):
            raise RuntimeError("image too small for the detector")
        return [[("HELLO", 0.99)] for _ in images]


def test_an_ocr_failure_is_a_per_sample_error():
    ok, tiny = (_encode(Image.new("RGB", size, "white"), "PNG") for size in ((64, 48), (64, 8)))
    res = TextSpotter(TextSpottingConfig.defaults(), FailingBackend()).spot([ok, tiny], ["hello world", "x"])
    assert res[0].ocr_text == "HELLO" and res[0].text_overlap == 0.5 and res[0].error is None
    assert res[1].error == "OCR failed: RuntimeError: image too small for the detector"


def test_rows_without_text_stage_are_marked_off():
    t = pa.Table.from_pylist([make_row("a", "00000", caption="c", status=PENDING)], schema=ROW_SCHEMA)
    assert decide(t.drop_columns(["image", "shard_rows"]))["text_spotting_status"].to_pylist() == [OFF]


def test_ocr_rows_per_call_defaults_by_device():
    from dataclasses import replace

    from curation.common.config import CONFIG_DIR, build_config
    from curation.settings import curation_config

    ocr = curation_config(build_config(CONFIG_DIR / "curation" / "cat_filter.yaml", overrides=[])).stages.ocr
    assert ocr.batch_size is None and ocr_rows_per_call(ocr) == 4            # CPU: even tails
    assert ocr_rows_per_call(replace(ocr, num_gpus=0.5)) == 64               # GPU: batched inference
    assert ocr_rows_per_call(replace(ocr, batch_size=8, num_gpus=1)) == 8    # explicit wins


# --- the generated labelled set ----------------------------------------------------------------

def test_labelled_set_is_deterministic_and_balanced():
    a, b = textspot_data.generate(10, seed=3), textspot_data.generate(10, seed=3)
    assert [p.image for p in a] == [p.image for p in b]
    assert [p.image for p in a] != [p.image for p in textspot_data.generate(10, seed=4)]
    assert {p.kind for p in a} == set(textspot_data.KINDS)
    for p in a:
        assert p.must_drop == (p.kind in ("full", "partial"))
        assert Image.open(io.BytesIO(p.image)).size == (384, 288)
        shown = set(content_words(p.shown_text))
        cap = set(content_words(p.caption))
        if p.kind == "unrelated":
            assert not shown & cap
        if p.kind == "partial":
            assert len(shown & cap) >= 0.6 * len(cap)
        if p.kind == "one_word":
            assert len(shown) == 1 and len(cap) >= 5


def test_real_photo_set_is_deterministic_and_labelled():
    from helpers import noisy_jpeg

    photos = [noisy_jpeg((300, 200), seed=1), noisy_jpeg((120, 240), seed=2)]
    captions = ["Vintage Coffee Shop Poster Template with red cups and a tall wooden table",
                "Two children riding bicycles in the park", "caf\u00e9 menu", "x", "Red Mum Napkin Ring"]
    a = textspot_data.real_photo_set(photos, captions, n=10, seed=1)
    assert [p.image for p in a] == [p.image for p in textspot_data.real_photo_set(photos, captions, n=10, seed=1)]
    assert [p.kind for p in a] == list(textspot_data.KINDS) * 2
    for p in a:
        assert textspot_data.usable_caption(p.caption)          # ASCII, 2-14 content words
        assert p.must_drop == (p.kind in ("full", "partial"))
        assert 320 <= max(Image.open(io.BytesIO(p.image)).size) <= 800
        assert (p.shown_text == "") == (p.kind == "none")
    with pytest.raises(ValueError):
        textspot_data.real_photo_set(photos, ["x"], n=2)


def _precision_recall(results, pairs):
    dropped = np.array([r.passed is False for r in results])
    truth = np.array([p.must_drop for p in pairs])
    tp = int((dropped & truth).sum())
    misses = [(p.kind, p.caption, r.ocr_text, r.text_overlap) for p, r, d in zip(pairs, results, dropped)
              if d != p.must_drop]
    return tp / max(1, dropped.sum()), tp / truth.sum(), misses


def test_labelled_set_precision_recall_with_the_default_engine():
    """The default T stage (PP-OCR + partial rule, from the YAML) on 100 generated pairs; the
    benchmark measures both labelled sets in full."""
    from curation.common.config import CONFIG_DIR, build_config

    defaults = build_config(CONFIG_DIR / "curation" / "cat_filter.yaml")
    cfg = TextSpottingConfig.from_config(defaults["filters"]["text_spotting"])
    pairs = textspot_data.generate(100, seed=0, size=(320, 240))
    spotter = TextSpotter(cfg, cfg.make_backend(threads=2))
    precision, recall, misses = _precision_recall(spotter.spot([p.image for p in pairs], [p.caption for p in pairs]), pairs)
    assert precision >= 0.95 and recall >= 0.95, (precision, recall, misses)


def test_the_old_easyocr_behaviour_is_one_value_away():
    """backend=easyocr alone: EasyOCR (offline weights) with the content_words rule, on one pair of
    each kind."""
    from curation.common.config import CONFIG_DIR, build_config
    from curation.ocr import EasyOCRBackend, set_torch_threads

    set_torch_threads(2)
    defaults = build_config(CONFIG_DIR / "curation" / "cat_filter.yaml", overrides=["filters.text_spotting.backend=easyocr"])
    cfg = TextSpottingConfig.from_config(defaults["filters"]["text_spotting"])
    backend = cfg.make_backend()
    assert isinstance(backend, EasyOCRBackend) and cfg.rule == "content_words>=0.4"
    pairs = textspot_data.generate(5, seed=0, size=(320, 240))
    results = TextSpotter(cfg, backend).spot([p.image for p in pairs], [p.caption for p in pairs])
    assert [r.passed is False for r in results] == [p.must_drop for p in pairs], results
    assert {(r.engine, r.side, r.rule) for r in results} == {("easyocr", 512, "content_words>=0.4")}
