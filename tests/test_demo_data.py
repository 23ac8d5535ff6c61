"""The generated demo data: images depict their captions, determinism, the held-out eval set."""

import io
import random
import tarfile

import numpy as np
import pytest
from PIL import Image

from curation import demo_data
from curation.demo_data import (COLOURS, OBJECTS, build_demo_dataset, caption_objects, demo_samples,
                                make_image, write_eval_dataset)


def _pixels(data: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(data)).convert("RGB"), dtype=np.int32)


def _near(px: np.ndarray, colour, tol=40) -> float:
    """Fraction of pixels within ``tol`` (per channel) of ``colour``."""
    return float((np.abs(px - np.array(colour)).max(axis=-1) <= tol).mean())


def test_caption_objects_finds_objects_and_their_adjectives():
    assert caption_objects("A dog riding a red bicycle in a park.") == [("bicycle", "red")]
    assert caption_objects("golden guitar and a tall house") == [("guitar", "golden"), ("house", "tall")]
    assert caption_objects("An old man watching a ball at the beach.") == [("ball", None)]
    assert caption_objects("a dog running") == []


@pytest.mark.parametrize("adj", ["red", "green", "blue", "golden"])
def test_image_shows_the_caption_colour(adj):
    """A coloured object covers a visible part of the image; without it that colour is rare."""
    for obj in ("car", "house", "ball"):
        with_obj = [_near(_pixels(make_image(random.Random(s), None, caption=f"a {adj} {obj}")), COLOURS[adj])
                    for s in range(4)]
        without = [_near(_pixels(make_image(random.Random(s), None, caption="a dog running")), COLOURS[adj])
                   for s in range(4)]
        assert min(with_obj) > 0.03, (adj, obj, with_obj)
        assert max(without) < 0.01, (adj, without)


def test_each_object_has_its_own_icon():
    """Same seed, background and colour: the drawn shapes differ between every pair of objects."""
    masks = {}
    for obj in OBJECTS:
        px = _pixels(make_image(random.Random(7), None, size=(128, 128), fmt="PNG", caption=f"a blue {obj}"))
        masks[obj] = np.abs(px - np.array(COLOURS["blue"])).max(axis=-1) <= 30
        assert masks[obj].mean() > 0.02, obj
    for i, a in enumerate(OBJECTS):
        for b in OBJECTS[i + 1:]:
            iou = (masks[a] & masks[b]).sum() / (masks[a] | masks[b]).sum()
            assert iou < 0.8, (a, b, iou)


def test_same_seed_same_bytes_and_captions_do_not_depend_on_drawing(monkeypatch):
    a, b = demo_samples(40, seed=3), demo_samples(40, seed=3)
    assert [(s["caption"], s["image"]) for s in a] == [(s["caption"], s["image"]) for s in b]
    assert [s["caption"] for s in demo_samples(40, seed=4)] != [s["caption"] for s in a]
    # the caption stream is independent of how (and whether) images are drawn
    monkeypatch.setattr(demo_data, "make_image", lambda rng, text, **kw: bytes([rng.randrange(256)] * 9))
    c = demo_samples(40, seed=3)
    assert [(s["caption"], s["kind"]) for s in c] == [(s["caption"], s["kind"]) for s in a]


def test_broken_entries_and_text_kinds_are_kept():
    samples = demo_samples(120, seed=0)
    kinds = {s["kind"] for s in samples}
    assert {"failed_download", "corrupt", "truncated", "zero_bytes", "empty_caption", "bad_utf8",
            "text", "unrelated_text", "no_text"} <= kinds
    by_kind = {s["kind"]: s for s in samples}
    assert by_kind["zero_bytes"]["image"] == b"" and by_kind["failed_download"]["image"] is None
    with pytest.raises(Exception):
        Image.open(io.BytesIO(by_kind["truncated"]["image"])).load()


def test_build_demo_dataset_is_deterministic(tmp_path):
    a = build_demo_dataset(tmp_path / "a", num_samples=30, num_shards=2, seed=1)
    build_demo_dataset(tmp_path / "b", num_samples=30, num_shards=2, seed=1)
    for name in ("00000.tar", "00001.tar"):
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes()
    assert a.endswith("a")
    with pytest.raises(ValueError, match="num_samples"):
        build_demo_dataset(tmp_path / "c", num_samples=0)


def test_eval_dataset_format_balance_and_held_out(tmp_path):
    root = write_eval_dataset(tmp_path / "ev", {"train": 20, "test": 30}, seed=1000, samples_per_shard=16)
    root2 = write_eval_dataset(tmp_path / "ev2", {"train": 20, "test": 30}, seed=1000, samples_per_shard=16)
    assert (tmp_path / "ev" / "classnames.txt").read_text().split() == OBJECTS
    templates = (tmp_path / "ev" / "zeroshot_classification_templates.txt").read_text().splitlines()
    assert templates and all("{}" in t for t in templates)
    assert (tmp_path / "ev" / "test" / "nshards.txt").read_text().strip() == "2"
    labels, images = [], []
    for shard in ("0.tar", "1.tar"):
        assert (tmp_path / "ev" / "test" / shard).read_bytes() == (tmp_path / "ev2" / "test" / shard).read_bytes()
        with tarfile.open(tmp_path / "ev" / "test" / shard) as tar:
            files = {m.name: tar.extractfile(m).read() for m in tar}
        for name, data in files.items():
            key, ext = name.split(".")
            if ext == "cls":
                label = int(data)
                labels.append(label)
                caps = files[f"{key}.txt"].decode().splitlines()
                assert len(caps) == 3 and all(OBJECTS[label] in c for c in caps)
                images.append(files[f"{key}.jpg"])
    assert len(labels) == 30 and sorted(set(labels)) == list(range(10))
    assert max(labels.count(c) for c in range(10)) - min(labels.count(c) for c in range(10)) <= 1
    # held out: no test image equals a training-demo image, and train/test splits differ
    train_imgs = {s["image"] for s in demo_samples(30, seed=0)}
    assert not train_imgs & set(images)
    with tarfile.open(tmp_path / "ev" / "train" / "0.tar") as tar:
        assert not {tar.extractfile(m).read() for m in tar if m.name.endswith(".jpg")} & set(images)
    assert root != root2
