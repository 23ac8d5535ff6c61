"""The cheaper T stage: the partial match rule, engine selection, and the PP-OCR backend (its ONNX
models come from the rapidocr_onnxruntime wheel; a few small generated images, no network)."""

import random

import numpy as np
import pytest
from PIL import Image

from curation import textspot_data
from curation.images import decode_rgb
from curation.ocr import TextSpotter, TextSpottingConfig
from curation.text_overlap import (TextOverlapConfig, clipped_piece, content_word_overlap,
                                   partial_word_overlap)


# --- the partial rule ------------------------------------------------------------------------------

@pytest.mark.parametrize("ocr, caption, expected", [
    (["eween Eyebal"], "Halloween Eyeball Cookies", 2 / 3),              # clipped + one letter lost
    (["tableandvintagekite"], "a red table and vintage kite in the park", 3 / 5),  # run together
    (["COOK IES", "FRESH"], "fresh cookies", 1.0),                       # split by OCR
    (["kolanternfaceblkoriginal orange"], "Jack O Lantern Face Orange Photo Card", 3 / 6),
    (["Tall"], "tall kite and small house in the beach", 1 / 5),         # "tall" is not "small"
    (["kite"], "a cyclist is painting a small kite at the kitchen.", 1 / 5),  # nor "kitchen"
    (["maggiore"], "Lake Maggiore Magic Tote Bag", 1 / 5),               # nor "magic"
    (["car"], "a cat", 0.0),                                             # short words stay exact
    ([], "a dog running", 0.0),
    (["dog"], "", 0.0),
])
def test_partial_word_overlap(ocr, caption, expected):
    assert partial_word_overlap(ocr, caption) == pytest.approx(expected)


def test_partial_finds_what_content_words_finds():
    rng = random.Random(0)
    for p in textspot_data.generate(40, seed=5):
        words = p.shown_text.split()
        # OCR-like damage: words run together, a character dropped from a long word
        noisy = ["".join(words[: len(words) // 2]), " ".join(w[:-1] if len(w) > 8 else w for w in words[len(words) // 2:])]
        for ocr in ([p.shown_text], noisy, [rng.choice(textspot_data.UNRELATED)]):
            assert partial_word_overlap(ocr, p.caption) >= content_word_overlap(ocr, p.caption), (ocr, p.caption)


def test_clipped_piece_is_an_edge_of_the_word():
    assert clipped_piece("eween", "halloween") and clipped_piece("hallo", "halloween")
    assert not clipped_piece("lowe", "halloween")                       # the middle: not clipped
    assert not clipped_piece("ween", "halloween")                       # under half the word
    assert not clipped_piece("tall", "small") and not clipped_piece("halloween", "hall")


def test_partial_measure_in_config():
    oc = TextOverlapConfig("partial", 0.4)
    assert oc.score(["eween Eyebal"], "Halloween Eyeball Cookies") == pytest.approx(2 / 3)
    assert not oc.passes(0.4) and oc.passes(0.39)


# --- engine selection -----------------------------------------------------------------------------

def test_default_engine_and_the_old_one_a_value_away():
    from curation.common.config import CONFIG_DIR, build_config

    ts = build_config(CONFIG_DIR / "curation" / "cat_filter.yaml")["filters"]["text_spotting"]
    new = TextSpottingConfig.from_config(ts)
    assert (new.backend, new.recogniser, new.overlap.measure, new.side, new.rule) == \
        ("ppocr", "ppocr", "partial", 512, "partial>=0.4")
    old = TextSpottingConfig.from_config({**ts, "backend": "easyocr"})
    assert (old.overlap.measure, old.side, old.rule) == ("content_words", 512, "content_words>=0.4")
    assert TextSpottingConfig.from_config({**ts, "measure": "fondant"}).rule == "fondant"
    assert TextSpottingConfig.defaults(det_side=320).side == 320 and TextSpottingConfig.defaults(det_side=900).side == 512
    assert TextSpottingConfig.defaults(backend="easyocr", det_side=320).side == 512  # det_side is ppocr's
    with pytest.raises(ValueError, match="recogniser"):
        TextSpottingConfig.defaults(recogniser="tesseract")
    with pytest.raises(ValueError, match="backend"):
        TextSpottingConfig.defaults(backend="tesseract")


# --- the PP-OCR backend ---------------------------------------------------------------------------

@pytest.fixture(scope="module")
def ppocr():
    return TextSpottingConfig.defaults().make_backend(threads=1)


def test_ppocr_reads_text_and_skips_recognition_without_text(ppocr):
    assert ppocr.name == "ppocr"
    calls = []
    original = ppocr.engine.text_rec
    ppocr.engine.text_rec = lambda crops, *a: calls.append(len(crops)) or original(crops, *a)
    try:
        blank = np.asarray(Image.new("RGB", (320, 240), (90, 140, 200)))
        shown = np.asarray(decode_rgb(textspot_data.text_image("SUMMER FESTIVAL", seed=3)))
        blank_found, shown_found = ppocr.read([blank, shown])
    finally:
        ppocr.engine.text_rec = original
    assert blank_found == [] and calls == [len(ppocr.detect(shown))]   # no boxes, no recognition
    text = " ".join(t for t, _conf in shown_found).lower().replace(" ", "")
    assert "summer" in text and "festival" in text, shown_found


def test_ppocr_spotter_records_engine_size_and_rule(ppocr):
    cfg = TextSpottingConfig.defaults()
    pairs = textspot_data.generate(5, seed=7, size=(320, 240))  # full, partial, one word, unrelated, none
    res = TextSpotter(cfg, ppocr).spot([p.image for p in pairs], [p.caption for p in pairs])
    assert [r.passed is False for r in res] == [p.must_drop for p in pairs], [(p.caption, r) for p, r in zip(pairs, res)]
    assert {(r.engine, r.side, r.rule) for r in res} == {("ppocr", 512, "partial>=0.4")}


def test_detector_size_and_boxes_in_image_coordinates(ppocr):
    image = np.asarray(decode_rgb(textspot_data.text_image("OPEN 24 HOURS", size=(640, 480), seed=2)))
    small = TextSpottingConfig.defaults(det_side=320).make_backend(threads=1)
    for backend in (ppocr, small):
        boxes = backend.detect(image)
        assert len(boxes) >= 1 and boxes.shape[1:] == (4, 2)
        assert boxes[..., 0].max() <= 639 and boxes[..., 1].max() <= 479
    # the box found at 320 px covers about the same region as at 512 px (scaled back)
    a, b = ppocr.detect(image), small.detect(image)
    assert abs(a[..., 0].min() - b[..., 0].min()) < 25 and abs(a[..., 1].max() - b[..., 1].max()) < 25

