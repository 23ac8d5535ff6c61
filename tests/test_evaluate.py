"""Evaluation suite: metrics against direct computations, the wds reader, a fake two-embedding
model with known answers, the built-in datasets and the job on a tiny open_clip checkpoint."""

import importlib.util
import io
import json
import re

import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from training.eval_data import digits_dataset, digits_split_indices, load_eval_dataset, wds_dataset
from training.evaluate import (classification_metrics, evaluate_dataset, format_results,
                               preprocess_size, retrieval_metrics, run_evaluation, with_ensembles)

ENSEMBLE_WEIGHTS = [0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9]


# -- pure metrics ------------------------------------------------------------------------------

def test_classification_metrics_match_a_direct_computation():
    g = torch.Generator().manual_seed(0)
    logits, labels = torch.randn(200, 7, generator=g), torch.randint(0, 7, (200,), generator=g)
    labels[:30] = logits[:30].argmax(1)  # some correct answers
    m = classification_metrics(logits, labels)
    ranks = [sorted(range(7), key=lambda c: -logits[i, c].item()).index(labels[i].item()) for i in range(200)]
    assert m["acc1"] == pytest.approx(sum(r == 0 for r in ranks) / 200)
    assert m["acc5"] == pytest.approx(sum(r < 5 for r in ranks) / 200)
    per_class = [sum(r == 0 for r, l in zip(ranks, labels.tolist()) if l == c) / (labels == c).sum().item()
                 for c in range(7)]
    assert m["mean_per_class_recall"] == pytest.approx(sum(per_class) / 7)
    f1 = []
    for c in range(7):
        tp = sum(r == 0 for r, lab in zip(ranks, labels.tolist()) if lab == c)
        predicted = (logits.argmax(1) == c).sum().item()
        f1.append(2 * tp / (predicted + (labels == c).sum().item()))
    assert m["macro_f1"] == pytest.approx(sum(f1) / 7)  # WILDS' F1-macro_all (DataComp's iWildCam metric)
    # hand case: class 0 always right (3 of 3), class 1 right once of 1: acc1 4/4; imbalance matters
    logits = torch.tensor([[1.0, 0.0], [1.0, 0.0], [1.0, 0.0], [1.0, 0.0]])
    m = classification_metrics(logits, torch.tensor([0, 0, 0, 1]))
    assert m["acc1"] == 0.75 and m["mean_per_class_recall"] == 0.5
    assert m["acc5"] is None  # fewer than 5 classes: no acc5 (CLIP_benchmark: NaN), not a trivial 1.0
    assert m["acc1"] == 3 / 4  # an exact fraction, as CLIP_benchmark's (not a float32 mean)


def test_worst_group_metrics_match_a_direct_computation():
    from training.evaluate import worst_group_metrics

    g = torch.Generator().manual_seed(2)
    logits, labels = torch.randn(60, 8, generator=g), torch.randint(0, 8, (60,), generator=g)
    labels[:20] = logits[:20].argmax(1)
    groups = torch.randint(0, 4, (60,), generator=g) * 3  # group ids need not be contiguous
    m = worst_group_metrics(logits, labels, groups)
    top5 = logits.topk(5, dim=1).indices
    acc1 = [(logits[groups == v].argmax(1) == labels[groups == v]).float().mean().item() for v in (0, 3, 6, 9)]
    acc5 = [(top5[groups == v] == labels[groups == v][:, None]).any(1).float().mean().item() for v in (0, 3, 6, 9)]
    assert m["worst_group_acc1"] == pytest.approx(min(acc1)) and m["worst_group_acc5"] == pytest.approx(min(acc5))
    assert m["num_groups"] == 4 and min(acc1) < max(acc1)  # groups differ, so "worst" is a real choice


def test_retrieval_metrics_match_brute_force():
    g = torch.Generator().manual_seed(1)
    owner = torch.tensor([0, 0, 1, 2, 2, 2, 3, 4, 4, 5, 5, 6, 7, 7])  # several captions per image
    sim = torch.randn(8, len(owner), generator=g)
    m = retrieval_metrics(sim, owner, ks=(1, 2, 5))
    for k in (1, 2, 5):
        t2i = sum(owner[j].item() in sim[:, j].argsort(descending=True)[:k].tolist()
                  for j in range(len(owner))) / len(owner)
        i2t = sum(any(owner[j].item() == i for j in sim[i].argsort(descending=True)[:k].tolist())
                  for i in range(8)) / 8
        assert m[f"image_retrieval_recall@{k}"] == pytest.approx(t2i)
        assert m[f"text_retrieval_recall@{k}"] == pytest.approx(i2t)
        assert m[f"mean_recall@{k}"] == pytest.approx((t2i + i2t) / 2)  # DataComp's retrieval main metric
    assert retrieval_metrics(sim, owner, ks=(20,))["text_retrieval_recall@20"] == 1.0


def test_ensembles_only_for_two_embeddings():
    a, b = torch.randn(3, 4), torch.randn(3, 4)
    out = with_ensembles({"weak": a, "strong": b}, ENSEMBLE_WEIGHTS)
    assert len(out) == 11 and torch.allclose(out["ensemble_w0.3"], 0.3 * a + 0.7 * b)
    assert list(with_ensembles({"clip": a}, ENSEMBLE_WEIGHTS)) == ["clip"]


# -- a CLIP_benchmark wds dataset and a fake model with known answers --------------------------

CLASSES = ["cat", "dog", "car", "boat"]


def _png(rgb) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (4, 4), rgb).save(buf, format="PNG")
    return buf.getvalue()


def write_wds(root, n_test=12, n_train=16, broken=True):
    """Image i of class i % 4 is a flat PNG of colour (i, class, 0); captions name class and id."""
    import webdataset as wds

    root.mkdir(parents=True)
    (root / "classnames.txt").write_text("\n".join(CLASSES) + "\n")
    (root / "zeroshot_classification_templates.txt").write_text("a photo of a {c}.\nart of the {c}\n")
    for split, n, offset in (("test", n_test, 0), ("train", n_train, 100)):
        (root / split).mkdir()
        with wds.TarWriter(str(root / split / "0.tar")) as sink:
            for i in range(offset, offset + n):
                c = i % 4
                sink.write({"__key__": f"s{i:04d}", "png": _png((i, c, 0)), "cls": str(c).encode(),
                            "txt": f"a {CLASSES[c]} number {i}\nthe {CLASSES[c]} id {i}".encode()})
            if broken and split == "test":
                sink.write({"__key__": "bad", "png": b"\x89PNG not an image", "cls": b"1"})
        (root / split / "nshards.txt").write_text("1\n")
    return root


class FakeEmbedder:
    """Two embeddings with known answers. Features: a class block (4) + an id block (256).

    weak: image = class one-hot + 0.1 * id one-hot; text = named class + 0.1 * named id.
    strong: the image's class block is shifted to class + 1, so strong zero-shot is always wrong
    and w * weak + (1 - w) * strong is right exactly when w > 0.5.
    """

    def preprocess(self, img):
        r, g, _ = img.getpixel((0, 0))
        return torch.tensor([r, g], dtype=torch.float32)

    def tokenizer(self, texts):
        out = []
        for t in texts:
            c = next(i for i, name in enumerate(CLASSES) if name in t)
            ids = re.findall(r"\d+", t)
            out.append([c, int(ids[0]) if ids else -1])
        return torch.tensor(out)

    @staticmethod
    def _feat(cls, ids):
        f = torch.zeros(len(cls), 4 + 256)
        f[torch.arange(len(cls)), cls] = 1.0
        has = ids >= 0
        f[torch.arange(len(cls))[has], 4 + ids[has]] = 0.1
        return F.normalize(f, dim=-1)

    def encode_image(self, images):
        ids, cls = images[:, 0].long(), images[:, 1].long()
        return {"weak": self._feat(cls, ids), "strong": self._feat((cls + 1) % 4, ids)}

    def encode_text(self, tokens):
        f = self._feat(tokens[:, 0], tokens[:, 1])
        return {"weak": f, "strong": f}


def _cfg(**kw):
    cfg = {"split": "test", "train_split": "train", "batch_size": 5, "ensemble_weights": ENSEMBLE_WEIGHTS,
           "recall_at": [1, 5], "zeroshot": True, "retrieval": True,
           "linear_probe": {"enabled": True, "weight_decay": [0.0, 1e-3], "val_fraction": 0.25,
                            "steps": 200, "lr": 0.05, "seed": 0},
           "fewshot": {"enabled": True, "shots": [1, 2], "seeds": [0], "cv_folds": 2, "steps": 20}}
    cfg.update(kw)
    return cfg


def test_wds_reader_local_and_fsspec_url_records_bad_samples(tmp_path):
    root = write_wds(tmp_path / "ds")
    for where in (str(root), f"file://{root}"):
        ds = wds_dataset(where)
        assert ds.classnames == CLASSES and ds.templates == ["a photo of a {c}.", "art of the {c}"]
        assert ds.splits == ["test", "train"]
        samples = list(ds.samples("test"))
        assert [s["key"] for s in samples] == [f"s{i:04d}" for i in range(12)]
        assert [s["label"] for s in samples] == [i % 4 for i in range(12)]
        assert samples[5]["captions"] == ["a dog number 5", "the dog id 5"]
        assert samples[5]["image"].getpixel((0, 0)) == (5, 1, 0)
        assert len(ds.errors) == 1 and ds.errors[0]["key"] == "bad" and "cannot decode" in ds.errors[0]["error"]
    with pytest.raises(ValueError, match="not found"):
        wds_dataset(tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="nshards.txt"):
        wds_dataset(tmp_path / "empty")


def test_two_embeddings_and_their_ensembles_give_the_known_answers(tmp_path):
    ds = wds_dataset(write_wds(tmp_path / "ds"))
    res = evaluate_dataset(FakeEmbedder(), ds, _cfg(), log=lambda *_: None)
    assert res["num_test"] == 12 and res["num_train"] == 16 and res["num_errors"] == 1
    zs = res["zeroshot"]
    assert set(zs) == {"weak", "strong"} | {f"ensemble_w{w:g}" for w in ENSEMBLE_WEIGHTS}
    assert zs["weak"]["acc1"] == 1.0 and zs["strong"]["acc1"] == 0.0 and zs["strong"]["acc5"] is None  # 4 classes
    for w in ENSEMBLE_WEIGHTS:
        if w != 0.5:
            assert zs[f"ensemble_w{w:g}"]["acc1"] == (1.0 if w > 0.5 else 0.0), w
    rt = res["retrieval"]
    assert rt["weak"]["image_retrieval_recall@1"] == 1.0 and rt["weak"]["text_retrieval_recall@1"] == 1.0
    assert rt["strong"]["image_retrieval_recall@1"] == 0.0 and rt["strong"]["text_retrieval_recall@1"] == 0.0
    assert rt["ensemble_w0.9"]["image_retrieval_recall@1"] == 1.0
    assert res["linear_probe"]["weak"]["acc1"] == 1.0  # classes are linearly separable
    sweep = res["fewshot"]["weak"]
    assert [r["k"] for r in sweep["rows"]] == [1, 2] and sweep["zeroshot"] == 1.0
    assert sweep["rows"][0]["projected"] == 1.0  # validation keeps the perfect zero-shot classifier
    table = format_results({"toy": res})
    assert "ensemble_w0.9" in table and "few-shot (weak)" in table and "1 unreadable" in table


def test_retrieval_only_dataset_and_missing_train_split(tmp_path):
    import shutil

    root = write_wds(tmp_path / "ds", broken=False)
    (root / "classnames.txt").unlink()
    shutil.rmtree(root / "train")
    logs = []
    res = evaluate_dataset(FakeEmbedder(), wds_dataset(root), _cfg(), log=logs.append)
    assert "zeroshot" not in res and "linear_probe" not in res and "errors" not in res
    assert res["retrieval"]["weak"]["text_retrieval_recall@5"] == 1.0


def test_fewshot_that_cannot_run_is_reported_not_fatal(tmp_path):
    ds = wds_dataset(write_wds(tmp_path / "ds", broken=False))
    cfg = _cfg()
    cfg["fewshot"] = {**cfg["fewshot"], "shots": [8]}  # 4 training images per class
    logs = []
    res = evaluate_dataset(FakeEmbedder(), ds, cfg, log=logs.append)
    assert "8-shot needs at least 8" in res["fewshot_error"] and any("few-shot skipped" in line for line in logs)
    assert res["zeroshot"]["weak"]["acc1"] == 1.0 and "linear_probe" in res


def test_digits_dataset_is_the_real_digits_split_in_two():
    from sklearn.datasets import load_digits

    train, test, all_ = (digits_split_indices(s) for s in ("train", "test", "all"))
    assert len(all_) == 1797 and sorted(train + test) == all_ and not set(train) & set(test)
    ds = digits_dataset(image_size=32)
    assert ds.classnames == [str(d) for d in range(10)] and all("{}" in t for t in ds.templates)
    first = next(ds.samples("test"))
    target = load_digits().target
    assert first["label"] == target[test[0]] and first["image"].size == (32, 32)
    px = torch.tensor(list(first["image"].convert("L").getdata()), dtype=torch.float32)
    assert px.max() == 255 and px.min() < 100  # dark ink on a white background


# -- the job on a tiny open_clip model ---------------------------------------------------------

TINY = {"embed_dim": 32, "vision_cfg": {"image_size": 32, "layers": 2, "width": 64, "patch_size": 8,
                                        "head_width": 32},
        "text_cfg": {"context_length": 32, "vocab_size": 49408, "width": 64, "heads": 2, "layers": 2}}


def _load_job():
    from curation.common.config import REPO_ROOT

    spec = importlib.util.spec_from_file_location("evaluate_job", REPO_ROOT / "pipelines" / "evaluate.py")
    job = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(job)
    return job


def test_job_on_a_tiny_open_clip_checkpoint(tmp_path, capsys):
    import open_clip

    config = tmp_path / "tiny_eval_clip.json"
    config.write_text(json.dumps(TINY))
    open_clip.add_model_config(config)
    torch.manual_seed(0)
    model = open_clip.create_model("tiny_eval_clip")
    ckpt = tmp_path / "epoch_1.pt"
    torch.save({"epoch": 1, "name": "t", "state_dict": {f"module.{k}": v for k, v in model.state_dict().items()}}, ckpt)
    job = _load_job()

    embedder, size = job.load_embedder(str(ckpt), model_config=str(config), device="cpu")
    assert size == 32 == preprocess_size(embedder.preprocess)
    for k, v in model.state_dict().items():
        assert torch.equal(embedder.model.state_dict()[k], v), k
    img = embedder.preprocess(Image.new("RGB", (50, 40), (200, 10, 10)))[None]
    feats = embedder.encode_image(img)["clip"]
    assert torch.allclose(feats, F.normalize(model.eval().encode_image(img), dim=-1), atol=1e-5)

    out = tmp_path / "res.json"
    rc = job.main([str(ckpt), "--model-config", str(config), "eval.datasets=[digits, demo]",
                   f"eval.cache_dir={tmp_path / 'cache'}", "eval.demo.num_train=20", "eval.demo.num_test=20",
                   "eval.max_samples=30", "eval.max_train_samples=100", "eval.fewshot.shots=[1]",
                   "eval.fewshot.seeds=[0]", "eval.fewshot.cv_folds=2", "eval.fewshot.steps=10",
                   "eval.linear_probe.steps=20", f"eval.output={out}"])
    assert rc == 0, capsys.readouterr()
    res = json.loads(out.read_text())["results"]
    assert res["digits"]["num_test"] == 30 and res["demo"]["num_test"] == 20
    for ds in ("digits", "demo"):
        m = res[ds]["zeroshot"]["clip"]
        assert 0.0 <= m["acc1"] <= m["acc5"] <= 1.0
        assert [r["k"] for r in res[ds]["fewshot"]["clip"]["rows"]] == [1]
    assert 0.0 <= res["demo"]["retrieval"]["clip"]["image_retrieval_recall@10"] <= 1.0
    assert "retrieval" not in res["digits"]
    assert "== demo ==" in capsys.readouterr().out

    # clear errors, no crash: missing checkpoint, unfitting checkpoint, unknown dataset
    assert job.main([str(tmp_path / "nope.pt"), "--arch", "tiny_eval_clip"]) == 1
    assert "checkpoint not found" in capsys.readouterr().err
    torch.save({"state_dict": {"visual.conv1.weight": torch.zeros(1)}}, tmp_path / "bad.pt")
    assert job.main([str(tmp_path / "bad.pt"), "--arch", "tiny_eval_clip"]) == 1
    assert "cannot load" in capsys.readouterr().err or "does not fit" in capsys.readouterr().err
    with pytest.raises(ValueError, match="unknown eval dataset"):
        load_eval_dataset("imagenet", {"wds": {}})


def test_a_wrong_eval_config_value_is_one_line_naming_the_key(capsys):
    from pathlib import Path

    spec = importlib.util.spec_from_file_location(
        "evaluate_job_config_error", Path(__file__).resolve().parents[1] / "pipelines" / "evaluate.py")
    job = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(job)
    with pytest.raises(SystemExit) as exit_info:
        job.main(["no-such-checkpoint", "eval.device=gpu"])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err.splitlines() == [err]
    assert err.startswith("error: eval.device must be one of 'auto', 'cpu', 'cuda'"), err


def test_the_eval_yaml_is_one_typed_view_and_a_plain_section_is_parsed_over_it():
    """configs/eval/default.yaml parses as EvalJobConfig; the plain ``eval`` section the training
    loop hands over (or a few keys) is merged over the YAML's and parsed once: a wrong value is a
    ConfigError naming the dotted key, before any dataset is read."""
    from curation.common.config import ConfigError, as_dict, load_yaml
    from training.eval_settings import DEFAULTS_FILE, EvalConfig, eval_config, parse_eval_job_config

    raw = load_yaml(DEFAULTS_FILE)
    job = parse_eval_job_config(raw)
    assert isinstance(job.eval, EvalConfig) and as_dict(job) == raw
    assert eval_config() == job.eval and eval_config(job.eval) is job.eval
    view = eval_config({"datasets": ["digits"], "fewshot": {"shots": [1]}})
    assert view.datasets == ("digits",) and view.fewshot.shots == (1,) and view.fewshot.seeds == job.eval.fewshot.seeds
    with pytest.raises(ConfigError, match=r"^eval\.fewshot\.steps must be an integer"):
        eval_config({"fewshot": {"steps": "many"}})
    with pytest.raises(ConfigError, match=r"unknown config key 'eval\.fewshot\.shot'"):
        run_evaluation(FakeEmbedder(), {"fewshot": {"shot": [1]}}, image_size=32, log=lambda *_: None)
