"""Same numbers as the reference client: a tiny random-init open_clip checkpoint evaluated on a
generated classification set and a generated retrieval set in CLIP_benchmark's ``wds/`` layout,
once with ``clip_benchmark eval`` (its CLI entry point, in process, on CPU, fp32) and once with
``pipelines/evaluate.py``; acc1, acc5, mean per-class recall and recall@k must be equal.

The generated-data writers here are also used by ``tests/test_eval_suites.py``.
"""

import importlib.util
import io
import json
import sys

import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw

ARCH = "micro-vit-32"  # configs/models/micro-vit-32.json: a 32 px ViT with one layer
CLASSES = ["red circle", "green square", "blue triangle", "yellow star", "white cross", "black ring"]
# imbalanced on purpose, so that acc1 and mean per-class recall differ
CLASS_COUNTS = [9, 6, 5, 4, 3, 3]
TEMPLATES = ["a photo of a {c}.", "a drawing of the {c}.", "{c}"]


def _image(seed: int, size: int = 40) -> bytes:
    """A distinct generated picture: coloured noise with a few random shapes."""
    rng = np.random.RandomState(seed)
    img = Image.fromarray(rng.randint(0, 256, (size, size, 3), dtype=np.uint8))
    draw = ImageDraw.Draw(img)
    for _ in range(3):
        x0, y0 = rng.randint(0, size - 12, 2)
        w, h = rng.randint(6, 12, 2)
        draw.ellipse([x0, y0, x0 + w, y0 + h], fill=tuple(int(v) for v in rng.randint(0, 256, 3)))
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


def _shards(folder, samples, per_shard):
    import webdataset as wds

    folder.mkdir(parents=True)
    chunks = [samples[i:i + per_shard] for i in range(0, len(samples), per_shard)]
    for n, chunk in enumerate(chunks):
        with wds.TarWriter(str(folder / f"{n}.tar")) as sink:
            for s in chunk:
                sink.write(s)
    (folder / "nshards.txt").write_text(f"{len(chunks)}\n")


def write_classification_wds(root, classes=CLASSES, counts=CLASS_COUNTS, templates=TEMPLATES, seed=0,
                             per_shard=16, metadata=None):
    """CLIP_benchmark wds classification set: ``test/{0..}.tar`` of png + cls, classnames, templates;
    ``metadata(i)`` -> a list of ints adds sample i's ``.npy`` (as DataComp's WILDS / fairness sets)."""
    samples, i = [], 0
    for c, n in enumerate(counts):
        for _ in range(n):
            samples.append({"__key__": f"s{i:05d}", "png": _image(seed * 1000 + i), "cls": str(c).encode()})
            if metadata is not None:
                buf = io.BytesIO()
                np.save(buf, np.asarray(metadata(i), dtype=np.int64))
                samples[-1]["npy"] = buf.getvalue()
            i += 1
    order = np.random.RandomState(seed).permutation(len(samples))  # classes interleaved
    _shards(root / "test", [samples[j] for j in order], per_shard)
    (root / "classnames.txt").write_text("\n".join(classes) + "\n")
    (root / "zeroshot_classification_templates.txt").write_text("\n".join(templates) + "\n")
    return root


RETRIEVAL_WORDS = ["dog", "beach", "red", "car", "tree", "snow", "city", "child", "boat", "kite", "market", "bridge"]


def write_retrieval_wds(root, n_images=14, seed=1, per_shard=8):
    """CLIP_benchmark wds retrieval set: png + multi-line txt captions (2 or 3 per image)."""
    rng = np.random.RandomState(seed)
    samples = []
    for i in range(n_images):
        caps = [" ".join(rng.choice(RETRIEVAL_WORDS, 4)) + f" {j}" for j in range(2 + i % 2)]
        samples.append({"__key__": f"r{i:05d}", "png": _image(seed * 1000 + i), "txt": "\n".join(caps).encode()})
    _shards(root / "test", samples, per_shard)
    (root / "dataset_type.txt").write_text("retrieval\n")
    return root


def tiny_checkpoint(path, seed=0):
    """A random-init ``ARCH`` checkpoint as open_clip_train saves it."""
    import open_clip

    from training.model import register_model_configs

    register_model_configs()
    torch.manual_seed(seed)
    model = open_clip.create_model(ARCH)
    torch.save({"epoch": 1, "state_dict": {f"module.{k}": v for k, v in model.state_dict().items()}}, path)
    return path


def load_job():
    from curation.common.config import REPO_ROOT

    spec = importlib.util.spec_from_file_location("evaluate_job", REPO_ROOT / "pipelines" / "evaluate.py")
    job = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(job)
    return job


def _numpy2_compatible_accuracy(monkeypatch):
    """clip_benchmark 1.6.2's ``accuracy`` calls ``float()`` on a shape-(1,) array, which NumPy >= 2.4
    refuses (TypeError). Its own code still runs: only while it runs, a shape-(1,) tensor's
    ``.numpy()`` gives the 0-d array older NumPy accepted."""
    from clip_benchmark.metrics import zeroshot_classification as zsc

    original, to_numpy = zsc.accuracy, torch.Tensor.numpy

    def numpy_0d(self, *args, **kwargs):
        arr = to_numpy(self, *args, **kwargs)
        return arr.reshape(()) if arr.shape == (1,) else arr

    def accuracy(*args, **kwargs):
        with monkeypatch.context() as m:
            m.setattr(torch.Tensor, "numpy", numpy_0d)
            return original(*args, **kwargs)

    monkeypatch.setattr(zsc, "accuracy", accuracy)


def _clip_benchmark(monkeypatch, tmp_path, name, root, ckpt, task, recall_k=()):
    """``clip_benchmark eval`` through its console entry point, in this process (so that it knows
    the project's model configs), on CPU without mixed precision; returns its metrics."""
    from clip_benchmark import cli

    out = tmp_path / f"cb_{name}.json"
    argv = ["clip_benchmark", "eval", "--dataset", f"wds/{name}", "--dataset_root", str(root),
            "--model", ARCH, "--pretrained", str(ckpt), "--task", task, "--no_amp", "--num_workers", "0",
            "--batch_size", "8", "--output", str(out), "--quiet"]
    if recall_k:
        argv += ["--recall_k", *map(str, recall_k)]
    monkeypatch.setattr(sys, "argv", argv)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)  # CPU, as the project's side
    _numpy2_compatible_accuracy(monkeypatch)
    cli.main()
    return json.loads(out.read_text())["metrics"]


def test_same_numbers_as_clip_benchmark(tmp_path, monkeypatch, capsys, one_thread):
    cls_root = write_classification_wds(tmp_path / "wds_shapes")
    ret_root = write_retrieval_wds(tmp_path / "wds_captions")
    ckpt = tiny_checkpoint(tmp_path / "epoch_1.pt")
    ks = [1, 2, 5]

    job = load_job()
    out = tmp_path / "ours.json"
    rc = job.main([str(ckpt), "--arch", ARCH, "eval.datasets=[shapes, captions]",
                   f"eval.wds.shapes={cls_root}", f"eval.wds.captions={ret_root}", f"eval.recall_at={ks}",
                   "eval.linear_probe.enabled=false", "eval.fewshot.enabled=false", "eval.batch_size=8",
                   "eval.device=cpu", f"eval.output={out}"])
    assert rc == 0, capsys.readouterr()
    ours = json.loads(out.read_text())["results"]

    ref_cls = _clip_benchmark(monkeypatch, tmp_path, "shapes", cls_root, ckpt, "zeroshot_classification")
    ref_ret = _clip_benchmark(monkeypatch, tmp_path, "captions", ret_root, ckpt, "zeroshot_retrieval", ks)

    zs = ours["shapes"]["zeroshot"]["clip"]
    assert ours["shapes"]["num_test"] == sum(CLASS_COUNTS)
    print("ours", zs, "clip_benchmark", ref_cls)
    for key in ("acc1", "acc5", "mean_per_class_recall"):
        assert zs[key] == pytest.approx(ref_cls[key], abs=1e-12), key
    # the numbers say something: not chance-trivial, and mean per-class recall is not acc1
    assert 0.0 < zs["acc5"] < 1.0 and zs["acc1"] != zs["mean_per_class_recall"]

    # retrieval: clip_benchmark's recalls are float32 means (2/35 -> 0.0571428574...), ours exact
    # fractions (0.0571428571...): the same hit counts, compared exactly, and values equal to float32
    ret = ours["captions"]["retrieval"]["clip"]
    n_img = ours["captions"]["num_test"]
    n_txt = sum(2 + i % 2 for i in range(n_img))
    print("ours", ret, "clip_benchmark", ref_ret)
    for k in ks:
        for key, n in ((f"image_retrieval_recall@{k}", n_txt), (f"text_retrieval_recall@{k}", n_img)):
            assert ret[key] * n == pytest.approx(round(ret[key] * n), abs=1e-9), key  # ours: a count / n
            assert round(ret[key] * n) == round(ref_ret[key] * n), key
            assert ret[key] == pytest.approx(ref_ret[key], rel=1e-6), key
    assert any(0.0 < ret[f"image_retrieval_recall@{k}"] < 1.0 for k in ks)
    assert ret["mean_recall@1"] == pytest.approx(0.5 * (ref_ret["image_retrieval_recall@1"]
                                                        + ref_ret["text_retrieval_recall@1"]))


def test_acc5_with_fewer_than_five_classes_is_absent_as_in_clip_benchmark():
    from training.evaluate import classification_metrics

    logits = torch.tensor([[0.9, 0.1, 0.0], [0.2, 0.7, 0.1], [0.1, 0.8, 0.1], [0.3, 0.3, 0.4]])
    m = classification_metrics(logits, torch.tensor([0, 1, 2, 2]))
    assert m["acc5"] is None  # clip_benchmark: NaN, DataComp: None; never a trivial 1.0
    assert m["acc1"] == 0.75 and m["mean_per_class_recall"] == pytest.approx((1 + 1 + 0.5) / 3)
