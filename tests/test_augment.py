"""Multi-view data of the improved-CLIP recipe: image views, offline text views, thesauri."""

from __future__ import annotations

import dataclasses
import pickle
import random
import socket

import numpy as np
import pytest
import torch
from PIL import Image

from curation.common.config import ConfigError, as_dict
from training.augment import thesaurus as thesaurus_mod
from training.augment.image import ImageViews, normalization
from training.augment.text import (TextAugmenter, random_deletion, random_swap, remove_stopwords,
                                   stopwords, synonym_replacement)
from training.augment.thesaurus import ThesaurusNotFoundError, load_thesaurus
from training.augment.views import MultiViewTransform, sample_seed, views_config
from training.settings import ImageViewsConfig, SynonymsConfig, TextViewsConfig

PP = {"size": 32, "mean": (0.5, 0.4, 0.3), "std": (0.2, 0.25, 0.3)}
CAR_SYNONYMS = {"auto", "automobile", "machine", "motorcar", "railcar", "railway car",
                "railroad car", "cable car", "gondola", "elevator car"}
CAPTIONS = ["a dog sitting on a red couch next to the car",
            "two people riding bicycles along the river at sunset",
            "the old man is reading a newspaper in the park"]
NO_OPS = {"synonym": 0.0, "swap": 0.0, "delete": 0.0}  # views.text.strong.ops: no EDA op


def _image(h=48, w=48, seed=0) -> Image.Image:
    """A colourful, asymmetric picture: a gradient plus random coloured blocks."""
    rs = np.random.RandomState(seed)
    y, x = np.mgrid[0:h, 0:w]
    arr = np.stack([x * 255 // w, y * 255 // h, (x + y) * 255 // (h + w)], -1).astype(np.uint8)
    for _ in range(6):
        r, c = rs.randint(0, h - 8), rs.randint(0, w - 8)
        arr[r:r + 8, c:c + 8] = rs.randint(0, 255, 3)
    return Image.fromarray(arr)


class _Tokenizer:
    """Stands in for open_clip's tokenizer: hashes words to ids, pads to 16."""

    def __call__(self, texts):
        out = torch.zeros(len(texts), 16, dtype=torch.long)
        for i, t in enumerate(texts):
            ids = [sum(map(ord, w)) % 1000 + 1 for w in t.split()][:16]
            out[i, :len(ids)] = torch.tensor(ids, dtype=torch.long)
        return out


def _unnormalize(x: torch.Tensor) -> torch.Tensor:
    mean = torch.tensor(PP["mean"]).view(3, 1, 1)
    std = torch.tensor(PP["std"]).view(3, 1, 1)
    return x * std + mean


def _identity_image_cfg(**strong) -> ImageViewsConfig:
    """Views that keep the whole (square) picture: crops cover it all, all strong ops off."""
    full = {"scale": [1.0, 1.0], "ratio": [1.0, 1.0], "hflip": 0.0}
    off = {"color_jitter": {"p": 0.0}, "grayscale_p": 0.0, "blur": {"p": 0.0}}
    return views_config({"image": {"weak": dict(full), "strong": {**full, **off, **strong}}}).image


def _text_cfg(text: dict) -> TextViewsConfig:
    """The typed ``views.text`` section with ``text`` merged over the recipe's."""
    return views_config({"text": text}).text


# ---- thesauri (first: they load WordNet with the network switched off) --------------------

@pytest.fixture
def no_network(monkeypatch):
    def refuse(*args, **kwargs):
        raise OSError("network access attempted in an offline test")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)
    import nltk

    monkeypatch.setattr(nltk, "download", refuse)


def test_text_views_work_without_network(no_network):
    thesaurus_mod._load.cache_clear()
    cfg = views_config({"text": {"strong": {"ops": {**NO_OPS, "synonym": 1.0}}}})
    for source in ("wordnet", "mythes"):
        aug = TextAugmenter(dataclasses.replace(cfg.text, synonyms=SynonymsConfig(source, None)))
        weak, strong = aug.views("a red car parked near a small house", random.Random(0))
        assert weak and len(strong) == 2
        assert all(s != "a red car parked near a small house" for s in strong)


@pytest.mark.parametrize("source", ["wordnet", "mythes"])
def test_thesaurus_gives_real_synonyms(source):
    th = load_thesaurus({"source": source, "path": None})
    syns = th.synonyms("car")
    assert {"auto", "automobile", "motorcar"} <= set(syns)
    assert "car" not in syns and len(syns) == len(set(syns))
    assert th.synonyms("Car") == syns  # lookups are case-insensitive
    assert th.synonyms("qwzxv") == []
    if source == "mythes":  # hypernyms/antonyms marked in the file are not synonyms
        assert "motor vehicle" not in syns and "wheeled vehicle" not in syns
    assert "large" in th.synonyms("big")


@pytest.mark.parametrize("source,package", [("wordnet", "wordnet-base"),
                                            ("mythes", "mythes-en-us")])
def test_missing_thesaurus_is_a_clear_error(tmp_path, source, package):
    with pytest.raises(ThesaurusNotFoundError, match=package):
        load_thesaurus({"source": source, "path": str(tmp_path / "absent")})
    with pytest.raises(ThesaurusNotFoundError, match=package):  # fails at construction
        TextAugmenter({"strong": {"ops": {"synonym": 0.4}},
                       "synonyms": {"source": source, "path": str(tmp_path / "absent")}})
    (tmp_path / "wn").mkdir()
    (tmp_path / "wn" / "data.noun").write_text("")
    if source == "wordnet":
        with pytest.raises(ThesaurusNotFoundError, match="index.noun"):
            load_thesaurus({"source": "wordnet", "path": str(tmp_path / "wn")})
    with pytest.raises(ValueError, match="wordnet"):
        load_thesaurus({"source": "thesaurus.com"})


def test_thesaurus_not_needed_when_synonyms_off(tmp_path):
    absent = {"source": "wordnet", "path": str(tmp_path / "absent")}
    aug = TextAugmenter(_text_cfg({"strong": {"ops": {**NO_OPS, "swap": 1.0}}, "synonyms": absent}))
    assert sorted(aug.strong("red car", random.Random(0)).split()) == ["car", "red"]


# ---- text operations -----------------------------------------------------------------------

def test_remove_stopwords_uses_spacy_list():
    stop = stopwords()
    assert {"a", "the", "on", "is"} <= stop
    words = "A dog, sitting on the red couch.".split()
    assert remove_stopwords(words, stop) == ["dog,", "sitting", "red", "couch."]
    assert remove_stopwords("the of a".split(), stop) == ["the", "of", "a"]  # nothing left


def test_random_swap_and_deletion():
    words = "one two three four five six".split()
    for seed in range(10):
        swapped = random_swap(words, 1, random.Random(seed))
        assert sorted(swapped) == sorted(words)
        assert sum(a != b for a, b in zip(words, swapped)) == 2
    assert random_swap(["solo"], 3, random.Random(0)) == ["solo"]
    assert random_deletion(words, 0.0, random.Random(0)) == words
    left = random_deletion(words, 1.0, random.Random(0))
    assert len(left) == 1 and left[0] in words
    kept = [len(random_deletion(words * 50, 0.1, random.Random(s))) for s in range(4)]
    assert all(240 <= k <= 300 for k in kept) and len(set(kept)) > 1


def test_synonym_replacement_replaces_n_words_keeping_punctuation():
    table = {"car": ["automobile"], "house": ["home", "dwelling"], "red": ["crimson"]}
    words = "the red car, near the car.".split()
    out = synonym_replacement(words, 1, random.Random(3), lambda w: table.get(w, []),
                              stopwords())
    changed = [(a, b) for a, b in zip(words, out) if a != b]
    assert len({a.strip(",.") for a, _ in changed}) == 1  # one distinct word, all occurrences
    if changed[0][0].startswith("car"):
        assert out == "the red automobile, near the automobile.".split()
    else:
        assert out == "the crimson car, near the car.".split()
    assert synonym_replacement(words, 1, random.Random(0), lambda w: []) == words


@pytest.mark.parametrize("source", ["wordnet", "mythes"])
def test_strong_text_synonym_view_picks_real_synonyms(source):
    aug = TextAugmenter(_text_cfg({"weak": {"stopwords_p": 0.0},
                                   "strong": {"stopwords_p": 1.0, "synonym_n": 1,
                                              "ops": {**NO_OPS, "synonym": 1.0}},
                                   "synonyms": {"source": source, "path": None}}))
    outs = {aug.strong("the car", random.Random(s)) for s in range(20)}
    assert outs <= CAR_SYNONYMS and len(outs) > 1


def test_text_views_deterministic_under_seed_and_as_configured():
    aug = TextAugmenter(_text_cfg({"synonyms": {"source": "mythes"}}))
    for caption in CAPTIONS:
        first = aug.views(caption, random.Random(42))
        assert aug.views(caption, random.Random(42)) == first
        outs = {(w, *ss) for w, ss in (aug.views(caption, random.Random(s)) for s in range(20))}
        assert len(outs) > 3
    # all probabilities 0: every view is the caption itself
    off = _text_cfg({"weak": {"stopwords_p": 0.0},
                     "strong": {"stopwords_p": 0.0, "ops": NO_OPS}})
    assert TextAugmenter(off).views(CAPTIONS[0], random.Random(1)) == (CAPTIONS[0],
                                                                       [CAPTIONS[0]] * 2)
    # stopword removal always, no EDA op: weak and strong are the caption without stopwords
    sw = _text_cfg({"weak": {"stopwords_p": 1.0},
                    "strong": {"stopwords_p": 1.0, "ops": NO_OPS}})
    assert TextAugmenter(sw).views(CAPTIONS[0], random.Random(1)) == (
        "dog sitting red couch car", ["dog sitting red couch car"] * 2)
    # swap always: the strong views are permutations of the (stopword-free) weak view
    swap = _text_cfg({"weak": {"stopwords_p": 1.0},
                      "strong": {"stopwords_p": 1.0, "ops": {**NO_OPS, "swap": 1.0}}})
    weak, strong = TextAugmenter(swap).views(CAPTIONS[1], random.Random(5))
    assert all(sorted(s.split()) == sorted(weak.split()) and s != weak for s in strong)


def test_text_config_errors():
    with pytest.raises(ValueError, match="sum to more than 1"):
        TextAugmenter({"strong": {"ops": {"synonym": 0.6, "swap": 0.6}}})
    with pytest.raises(ValueError, match="unknown config key 'views.text.strong.ops.shuffle'"):
        TextAugmenter({"strong": {"ops": {"shuffle": 0.5}}})
    with pytest.raises(ValueError, match="probability"):
        TextAugmenter({"weak": {"stopwords_p": 1.5}})
    with pytest.raises(TypeError, match="caption"):
        TextAugmenter({}).views(None, random.Random(0))


# ---- image views ---------------------------------------------------------------------------

def test_image_views_shapes_and_normalisation():
    views = ImageViews(views_config().image, {"size": (32, 24), "mean": PP["mean"],
                                                 "std": PP["std"]})
    weak, strong = views(_image(60, 40), seed=0)
    assert weak.shape == (3, 32, 24) and weak.dtype == torch.float32
    assert strong.shape == (2, 3, 32, 24)
    assert normalization({"image_size": 64})[0] == (64, 64)
    # identity views: un-normalising gives back the resized picture in [0, 1]
    ident = ImageViews(_identity_image_cfg(), PP)
    w, _ = ident(_image(32, 32), seed=0)
    expected = torch.from_numpy(np.array(_image(32, 32))).permute(2, 0, 1).float() / 255
    assert torch.allclose(_unnormalize(w), expected, atol=1e-5)


def test_strong_views_differ_from_weak_as_configured():
    img = _image()
    # strong ops off and full-image crops: weak and strong views are the same picture
    weak, strong = ImageViews(_identity_image_cfg(), PP)(img, seed=1)
    assert torch.allclose(strong[0], weak) and torch.allclose(strong[1], weak)
    # flip with p=1: strong = mirrored weak
    weak, strong = ImageViews(_identity_image_cfg(hflip=1.0), PP)(img, seed=1)
    assert torch.allclose(strong[0], weak.flip(-1)) and not torch.allclose(strong[0], weak)
    # grayscale with p=1: the strong views' channels are equal, the weak view's are not
    weak, strong = ImageViews(_identity_image_cfg(grayscale_p=1.0), PP)(img, seed=1)
    gray = _unnormalize(strong[0])
    assert torch.allclose(gray[0], gray[1], atol=1e-5) and torch.allclose(gray[1], gray[2],
                                                                         atol=1e-5)
    rgb = _unnormalize(weak)
    assert not torch.allclose(rgb[0], rgb[1], atol=1e-2)
    # colour jitter with p=1 changes colours; blur with p=1 smooths (less total variation)
    jit = {"p": 1.0, "brightness": 0.4, "contrast": 0.4, "saturation": 0.4, "hue": 0.1}
    weak, strong = ImageViews(_identity_image_cfg(color_jitter=jit), PP)(img, seed=2)
    assert not torch.allclose(strong[0], weak, atol=1e-3)

    def tv(x):
        return ((x[..., 1:, :] - x[..., :-1, :]).abs().mean()
                + (x[..., 1:] - x[..., :-1]).abs().mean())

    for kernel in (None, 5):  # PIL's blur (default) and torchvision's
        blur = {"p": 1.0, "sigma": [1.5, 2.0], "kernel_size": kernel}
        weak, strong = ImageViews(_identity_image_cfg(blur=blur), PP)(img, seed=2)
        assert tv(strong[0]) < 0.8 * tv(weak) and tv(strong[1]) < 0.8 * tv(weak)
    # defaults: two strong views differ from each other and from the weak view
    weak, strong = ImageViews(views_config().image, PP)(img, seed=3)
    assert not torch.allclose(strong[0], strong[1]) and not torch.allclose(strong[0], weak)


def test_image_views_seeded_and_leave_global_rng_alone():
    views = ImageViews(views_config().image, PP)
    img = _image()
    a, b = views(img, seed=7), views(img, seed=7)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    c = views(img, seed=8)
    assert not torch.equal(a[1], c[1])
    torch.manual_seed(0)
    expected = torch.rand(3)
    torch.manual_seed(0)
    views(img, seed=9)
    assert torch.equal(torch.rand(3), expected)
    with pytest.raises(TypeError, match="PIL"):
        views(np.zeros((8, 8, 3), np.uint8), seed=0)


# ---- all views of a pair -------------------------------------------------------------------

def test_multiview_transform_outputs_and_determinism():
    cfg = views_config({"text": {"synonyms": {"source": "mythes"}}})
    mv = MultiViewTransform(cfg, PP, _Tokenizer(), seed=5)
    out = mv(_image().convert("L"), CAPTIONS[0])  # grayscale input is converted to RGB
    assert out["image"].shape == (3, 32, 32) and out["image_strong"].shape == (2, 3, 32, 32)
    assert out["text"].shape == (16,) and out["text_strong"].shape == (2, 16)
    assert out["text"].dtype == torch.long and out["text_strong"].dtype == torch.long
    # the same seed gives the same sequence of views, in another process too (pickled)
    clone = pickle.loads(pickle.dumps(MultiViewTransform(cfg, PP, _Tokenizer(), seed=5)))
    again = MultiViewTransform(cfg, PP, _Tokenizer(), seed=5)
    for _ in range(2):
        x, y = again(_image(), CAPTIONS[1]), clone(_image(), CAPTIONS[1])
        assert all(torch.equal(x[k], y[k]) for k in x)
    other = MultiViewTransform(cfg, PP, _Tokenizer(), seed=6)(_image(), CAPTIONS[1])
    assert not torch.equal(other["image_strong"], x["image_strong"])
    # an explicit per-sample seed makes views independent of call order
    s = sample_seed(0, "000001234", epoch=1)
    assert s == sample_seed(0, "000001234", epoch=1) != sample_seed(0, "000001234", epoch=2)
    p, q = mv(_image(), CAPTIONS[2], seed=s), again(_image(), CAPTIONS[2], seed=s)
    assert all(torch.equal(p[k], q[k]) for k in p)


def test_multiview_config_defaults_and_errors():
    cfg = views_config()
    assert cfg.image.weak.scale == (0.5, 1.0) and cfg.image.strong.hflip == 0.5
    assert as_dict(cfg.text.strong.ops) == {"synonym": 0.4, "swap": 0.4, "delete": 0.2}
    assert views_config({"views": {"num_strong": 3}}).num_strong == 3
    with pytest.raises(ConfigError, match="views.image.strong.grayscale"):
        views_config({"image": {"strong": {"grayscale": 1.0}}})
    mv = MultiViewTransform({"num_strong": 3, "text": {"synonyms": {"source": "mythes"}}}, PP,
                            _Tokenizer())
    out = mv(_image(), CAPTIONS[0])
    assert out["image_strong"].shape[0] == 3 and out["text_strong"].shape[0] == 3
    with pytest.raises(TypeError, match="caption"):
        mv(_image(), b"bytes caption")
