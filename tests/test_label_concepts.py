"""Concept labelling for DiHT's distillation: the pure units and the Ray Data job end to end."""

import importlib.util
import io
import json
import random
from collections import Counter
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image
from webdataset import TarWriter

from curation.common.config import CONFIG_DIR, build_config
from training import concepts as C

REPO = Path(__file__).resolve().parents[1]
TINY_ARCH = "concepts-test-tiny-vit"
TINY_CONFIG = {
    "embed_dim": 32,
    "vision_cfg": {"image_size": 32, "layers": 1, "width": 64, "head_width": 32, "patch_size": 8},
    "text_cfg": {"context_length": 16, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1},
}


def load_job():
    spec = importlib.util.spec_from_file_location("label_concepts_job", REPO / "pipelines" / "label_concepts.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


# --- captions -> concepts -----------------------------------------------------------------------

def test_caption_concepts_use_the_scene_graph_definitions(nlp):
    captions = [
        "a dog sitting on a red couch",
        "Two brown dogs playing in the green grass",
        "the car is red",
        "A tennis ball on the wooden table",
        "three cats and a small dog",
    ]
    got = C.parse_concepts(nlp.pipe(captions))
    assert got == [
        (["dog", "couch"], ["red"]),
        (["dog", "grass"], ["two", "brown", "green"]),  # lemmatised: dogs -> dog
        (["car"], ["red"]),                              # predicate adjective
        (["ball", "table"], ["wooden"]),                 # "tennis" is a compound, not an object
        (["cat", "dog"], ["three", "small"]),
    ]


def test_concept_parser_handles_empty_and_missing_captions():
    parser = C.ConceptParser()
    got = parser(["", None, "a yellow bus on the road", "   "])
    assert got[0] == got[1] == got[3] == ([], [])
    assert got[2] == (["bus", "road"], ["yellow"])


# --- vocabularies -------------------------------------------------------------------------------

def test_count_concepts_counts_each_caption_once():
    counts = C.count_concepts([["dog", "dog", "cat"], ["dog"], []])
    assert counts == Counter({"dog": 2, "cat": 1})


def test_build_vocab_size_min_count_and_order():
    counts = {"dog": 9, "cat": 5, "car": 5, "tree": 2, "sky": 1}
    assert C.build_vocab(counts, size=3, min_count=1) == ["dog", "car", "cat"]  # ties by name
    assert C.build_vocab(counts, size=10, min_count=5) == ["dog", "car", "cat"]
    assert C.build_vocab(counts, size=None, min_count=2) == ["dog", "car", "cat", "tree"]
    assert C.build_vocab(counts, size=2, min_count=10) == []
    with pytest.raises(ValueError):
        C.build_vocab(counts, size=-1)


def test_soft_targets_are_normalised_multi_hot():
    t = C.soft_targets([[0, 2], [1], []], 3)
    np.testing.assert_allclose(t, [[0.5, 0, 0.5], [0, 1, 0], [0, 0, 0]])


# --- classifier and top-k ------------------------------------------------------------------------

def toy_features(n_per_class=30, dim=8, seed=0):
    rng = np.random.default_rng(seed)
    centers = rng.normal(0, 3, (3, dim))
    x = np.concatenate([c + rng.normal(0, 0.5, (n_per_class, dim)) for c in centers]).astype(np.float32)
    y = np.repeat(np.arange(3), n_per_class)
    return x, y, centers


def test_fit_linear_classifier_learns_separable_concepts():
    x, y, centers = toy_features()
    # class 0 images are also labelled with concept 3 ("shared"); some samples carry no label
    labels = [[int(c), 3] if c == 0 else [int(c)] for c in y]
    labels[5] = []
    clf = C.fit_linear_classifier(x, labels, 4, epochs=100, lr=0.05, weight_decay=0.0)
    assert clf.info["fit_samples"] == len(x) - 1
    assert clf.info["final_loss"] < clf.info["first_epoch_loss"]
    probs = clf.predict_proba(centers.astype(np.float32))
    np.testing.assert_allclose(probs.sum(axis=1), 1.0, rtol=1e-5)
    assert probs[1].argmax() == 1 and probs[2].argmax() == 2
    # class 0's two labels share the mass: both ~0.5, far above the other concepts
    assert set(np.argsort(probs[0])[-2:]) == {0, 3}
    assert probs[0, 0] > 0.3 and probs[0, 3] > 0.3
    # soft cross-entropy against [0.5, 0.5] targets: loss close to its minimum, the entropy log 2
    assert clf.info["final_loss"] < np.log(2) * (1 / 3) + 0.1
    np.testing.assert_array_equal(clf.predict_proba(x).argmax(axis=1)[y != 0], y[y != 0])


def test_fit_linear_classifier_rejects_bad_labels():
    x, y, _ = toy_features(5)
    with pytest.raises(ValueError, match="out of range"):
        C.fit_linear_classifier(x, [[7]] * len(x), 3)
    with pytest.raises(ValueError, match="no sample"):
        C.fit_linear_classifier(x, [[]] * len(x), 3)
    with pytest.raises(ValueError, match="one label set per row"):
        C.fit_linear_classifier(x, [[0]], 3)


def test_top_k_sorted_descending():
    probs = np.array([[0.1, 0.5, 0.15, 0.25], [0.7, 0.1, 0.1, 0.1]], np.float32)
    ids, vals = C.top_k(probs, 2)
    assert ids.dtype == np.int32 and vals.dtype == np.float32
    np.testing.assert_array_equal(ids[0], [1, 3])
    np.testing.assert_allclose(vals[0], [0.5, 0.25])
    assert ids[1, 0] == 0
    ids, vals = C.top_k(probs, 10)  # k larger than the vocabulary: all of it, sorted
    assert ids.shape == (2, 4)
    assert (np.diff(vals, axis=1) <= 0).all()
    with pytest.raises(ValueError):
        C.top_k(probs, 0)


def test_key_fraction_mask_is_reproducible():
    keys = [f"{i:09d}" for i in range(4000)]
    a = C.key_fraction_mask(keys, 0.25, seed=1)
    assert (a == C.key_fraction_mask(list(reversed(keys)), 0.25, seed=1)[::-1]).all()
    assert 0.2 < a.mean() < 0.3
    assert (a != C.key_fraction_mask(keys, 0.25, seed=2)).any()
    assert C.key_fraction_mask(keys[:3], 1.0).all()


# --- teachers ------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def tiny_teacher(tmp_path_factory):
    """A tiny open_clip ViT: its JSON config and a checkpoint in open_clip's format."""
    import open_clip

    folder = tmp_path_factory.mktemp("teacher")
    config = folder / f"{TINY_ARCH}.json"
    config.write_text(json.dumps(TINY_CONFIG))
    open_clip.add_model_config(config)
    torch.manual_seed(0)
    model = open_clip.create_model(TINY_ARCH)
    ckpt = folder / "teacher.pt"
    torch.save({"epoch": 1, "name": "tiny", "state_dict": model.state_dict()}, ckpt)
    return {"kind": "open_clip", "arch": TINY_ARCH, "model_config": str(config),
            "checkpoint": str(ckpt), "name": None}


def test_open_clip_teacher_loads_local_checkpoint(tiny_teacher):
    teacher = C.load_teacher(tiny_teacher)
    img = Image.new("RGB", (40, 30), (200, 10, 10))
    f = teacher.encode(torch.stack([teacher.preprocess(img)] * 2))
    assert f.shape == (2, TINY_CONFIG["embed_dim"])
    np.testing.assert_allclose(np.linalg.norm(f, axis=1), 1.0, rtol=1e-5)
    assert not any(p.requires_grad for p in teacher.model.parameters())
    half = C.load_teacher({**tiny_teacher, "precision": "bf16"})
    fh = half.encode(torch.stack([half.preprocess(img)] * 2))
    assert fh.dtype == np.float32
    np.testing.assert_allclose(fh, f, atol=0.05)


def test_a_trainer_checkpoint_brings_its_architecture(tmp_path):
    """As evaluate.py: the folder's meta.json names the architecture (teacher.arch is ignored)."""
    import open_clip

    from training.checkpoint import save_checkpoint
    from training.model import register_model_configs

    register_model_configs()
    torch.manual_seed(3)
    clip = open_clip.create_model("micro-vit-32")
    folder = tmp_path / "checkpoint_step_0000000010"
    save_checkpoint(folder, module=clip, clip=clip, arch="micro-vit-32", recipe="clip", step=10, epoch=1)
    img = Image.new("RGB", (40, 30), (10, 200, 10))
    clip.eval()
    _, _, preprocess = open_clip.create_model_and_transforms("micro-vit-32")
    with torch.no_grad():
        want = torch.nn.functional.normalize(clip.encode_image(preprocess(img)[None]), dim=-1).numpy()
    for given in (folder, folder / "open_clip.pt"):
        teacher = C.load_teacher({"kind": "open_clip", "arch": "ViT-B-32", "checkpoint": str(given)})
        assert teacher.description["arch"] == "micro-vit-32"
        np.testing.assert_allclose(teacher.encode(teacher.preprocess(img)[None]), want, atol=1e-5)


def test_timm_teacher_loads_local_weights_and_ignores_the_head(tmp_path):
    import timm

    torch.manual_seed(0)
    trained = timm.create_model("test_vit", pretrained=False, num_classes=7)
    weights = tmp_path / "vit.pth"
    torch.save(trained.state_dict(), weights)
    teacher = C.load_teacher({"kind": "timm", "name": "test_vit", "checkpoint": str(weights)})
    x = teacher.preprocess(Image.new("RGB", (50, 50), (0, 90, 200))).unsqueeze(0)
    f = teacher.encode(x)
    assert f.shape == (1, trained.num_features)
    expected = trained.eval().forward_head(trained.forward_features(x), pre_logits=True)
    np.testing.assert_allclose(f, expected.detach().numpy(), rtol=1e-4, atol=1e-5)
    wrong = tmp_path / "wrong.pth"
    torch.save(timm.create_model("test_resnet", num_classes=0).state_dict(), wrong)
    with pytest.raises(C.TeacherError, match="does not fit"):
        C.load_teacher({"kind": "timm", "name": "test_vit", "checkpoint": str(wrong)})


def test_teacher_config_errors_never_download(tmp_path):
    with pytest.raises(C.TeacherError, match="required"):
        C.load_teacher({"kind": "open_clip", "arch": "ViT-B-32", "checkpoint": None})
    with pytest.raises(C.TeacherError, match="not a local file"):
        C.load_teacher({"kind": "open_clip", "arch": "ViT-B-32", "checkpoint": "openai"})
    ckpt = tmp_path / "x.pt"
    torch.save({}, ckpt)
    with pytest.raises(C.TeacherError, match="local open_clip architecture"):
        C.load_teacher({"kind": "open_clip", "arch": "hf-hub:org/model", "checkpoint": str(ckpt)})
    with pytest.raises(C.TeacherError, match="unknown open_clip architecture"):
        C.load_teacher({"kind": "open_clip", "arch": "no-such-arch", "checkpoint": str(ckpt)})
    with pytest.raises(C.TeacherError, match="precision"):
        C.load_teacher({"kind": "open_clip", "arch": "ViT-B-32", "checkpoint": str(ckpt),
                        "precision": "int8"})
    with pytest.raises(C.TeacherError, match="kind"):
        C.load_teacher({"kind": "keras", "checkpoint": str(ckpt)})


# --- the Ray Data job -----------------------------------------------------------------------------

COLORS = {"red": (210, 30, 30), "green": (30, 170, 40), "blue": (30, 60, 210), "yellow": (230, 210, 20)}
SUBJECTS = ["dog", "cat", "car", "bird", "boat"]
TEMPLATES = [
    "a {c} {s} sitting on the grass",
    "two {c} {s}s standing next to a tree",
    "the {s} is {c}",
    "a small {c} {s} in front of a house",
]


def image_bytes(rgb, seed, fmt="JPEG"):
    rng = np.random.default_rng(seed)
    arr = np.clip(np.array(rgb) + rng.normal(0, 20, (48, 48, 3)), 0, 255).astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format=fmt)
    return buf.getvalue()


@pytest.fixture(scope="module")
def curated(tmp_path_factory):
    """A curated output folder: 2 shards of real captions and generated images, an empty shard,
    one corrupt image, a sizes.json. Returns (folder, {key: caption})."""
    root = tmp_path_factory.mktemp("curated")
    (root / "shards").mkdir()
    rnd = random.Random(0)
    captions = {}
    for shard, n in (("00000", 24), ("00001", 20), ("00002", 0)):
        with TarWriter(str(root / "shards" / f"{shard}.tar"), encoder=False) as sink:
            for i in range(n):
                key = f"{shard}{i:04d}"
                color, subj = rnd.choice(list(COLORS)), rnd.choice(SUBJECTS)
                caption = rnd.choice(TEMPLATES).format(c=color, s=subj)
                ext = "png" if i % 5 == 0 else "jpg"
                image = image_bytes(COLORS[color], i, "PNG" if ext == "png" else "JPEG")
                if shard == "00001" and i == 3:
                    image = b"\xff\xd8\xff\xe0 this is not a jpeg"
                sink.write({"__key__": key, ext: image, "txt": caption.encode(),
                            "json": json.dumps({"key": key}).encode()})
                captions[key] = caption
    # the curation's sample counts; 00001 claims one sample more than its tar holds (a lost one)
    sizes = {"00000.tar": 24, "00001.tar": 21, "00002.tar": 0}
    (root / "shards" / "sizes.json").write_text(json.dumps(sizes))
    return root, captions


def job_cfg_overrides(teacher, *overrides):
    t = [f"teacher.{k}={v}" for k, v in teacher.items() if v is not None]
    return ["progress=false", "stages.parse.actors=1",
            "vocab.objects.size=4", "vocab.objects.min_count=3",
            "vocab.attributes.size=null", "vocab.attributes.min_count=3",
            "top_k=3", "classifier.epochs=50", *t, *overrides]


def job_cfg(curated_dir, teacher, *overrides):
    return build_config(CONFIG_DIR / "concepts" / "label_concepts.yaml",
                        overrides=[f"input={curated_dir}", *job_cfg_overrides(teacher, *overrides)])


@pytest.fixture(scope="module")
def local_run(ray_session, curated, tiny_teacher):
    job = load_job()
    root, _ = curated
    return job.label_concepts(job_cfg(root, tiny_teacher, "classifier.max_samples=30"),
                              log=lambda *_: None)


def test_label_concepts_job(local_run, curated, tiny_teacher, nlp):
    root, captions = curated
    summary = local_run
    out = root / "concepts"

    # vocabularies: exactly what the pure units give on the same captions
    parsed = dict(zip(captions, C.parse_concepts(nlp.pipe(captions.values()))))
    obj_counts = C.count_concepts(o for o, _ in parsed.values())
    attr_counts = C.count_concepts(a for _, a in parsed.values())
    vocab = json.loads((out / "vocab.json").read_text())
    assert vocab["objects"] == C.build_vocab(obj_counts, 4, 3)
    assert vocab["attributes"] == C.build_vocab(attr_counts, None, 3)
    assert len(vocab["objects"]) == 4 and len(vocab["attributes"]) >= 4  # the 4 colours at least
    assert set(COLORS) <= set(vocab["attributes"])
    assert all(c >= 3 for c in vocab["object_counts"] + vocab["attribute_counts"])
    assert vocab["object_counts"] == sorted(vocab["object_counts"], reverse=True)
    assert vocab["top_k"] == 3 and vocab["teacher"]["feature_dim"] == TINY_CONFIG["embed_dim"]
    assert vocab["teacher"]["checkpoint"] == "teacher.pt"
    assert summary["samples"] == {**summary["samples"], "total": 44, "embedded": 43, "errors": 1}
    assert summary["shards"] == {"count": 3, "errors": {
        "00001": "20 samples read but shards/sizes.json lists 21"}}
    # the classifiers were fitted on the reproducible key subsample (max_samples 30 of the 45
    # samples sizes.json lists), the only images embedded before the labelling pass
    ok_keys = [k for k in captions if k != "000010003"]
    expected = int(C.key_fraction_mask(ok_keys, 30 / 45, seed=0).sum())
    assert 0 < summary["samples"]["fit_subsample"] == expected < len(ok_keys)
    assert vocab["classifier"]["objects"]["fit_samples"] == summary["samples"]["fit_with_objects"]

    # one file per curated shard, one row per curated sample, keyed by its key
    files = sorted(p.name for p in out.glob("*.parquet"))
    assert files == ["00000.parquet", "00001.parquet", "00002.parquet"]
    tables = {f: pq.read_table(out / f) for f in files}
    for t in tables.values():
        assert t.schema.equals(C.OUTPUT_SCHEMA)
        assert t["key"].to_pylist() == sorted(t["key"].to_pylist())
    assert tables["00002.parquet"].num_rows == 0
    rows = pa.concat_tables(tables.values()).to_pylist()
    assert sorted(r["key"] for r in rows) == sorted(captions)
    assert {r["key"][:5] for r in tables["00000.parquet"].to_pylist()} == {"00000"}

    for r in rows:
        if r["key"] == "000010003":  # the corrupt image: an error, no predictions
            assert "cannot decode image" in r["error"]
            assert r["obj_ids"] == r["obj_probs"] == r["attr_ids"] == r["attr_probs"] == []
            continue
        assert r["error"] is None
        for prefix, size in (("obj", len(vocab["objects"])), ("attr", len(vocab["attributes"]))):
            ids, probs = r[f"{prefix}_ids"], r[f"{prefix}_probs"]
            assert len(ids) == len(probs) == min(3, size)
            assert len(set(ids)) == len(ids) and all(0 <= i < size for i in ids)
            assert all(a >= b for a, b in zip(probs, probs[1:]))
            assert all(p > 0 for p in probs) and sum(probs) <= 1 + 1e-5

    # reading back for the trainer's join: the same rows, padded to top_k
    vocab_back, table = C.read_concepts(str(out))
    assert vocab_back == vocab and sorted(table["key"].to_pylist()) == sorted(captions)
    ids, probs = C.padded_targets(table["attr_ids"].to_pylist(), table["attr_probs"].to_pylist(), 3)
    bad = table["key"].to_pylist().index("000010003")
    assert (ids[bad] == -1).all() and (probs[bad] == 0).all()
    assert (np.delete(ids, bad, axis=0) >= 0).all()

    # the stored classifiers reproduce the stored probabilities of a sample from its features
    npz = np.load(out / "classifiers.npz")
    clf = C.LinearClassifier(*(npz[f"attributes_{p}"] for p in ("weight", "bias", "mean", "scale")))
    teacher = C.load_teacher(tiny_teacher)
    sample = next(r for r in rows if r["error"] is None)
    import webdataset as wds

    tar = str(root / "shards" / f"{sample['key'][:5]}.tar")
    stored = next(s for s in wds.WebDataset(tar, shardshuffle=False) if s["__key__"] == sample["key"])
    data = stored.get("jpg", stored.get("png"))
    f = teacher.encode(teacher.preprocess(C.decode_rgb(data, flatten_alpha=False)).unsqueeze(0))
    ids, probs = C.top_k(clf.predict_proba(f), 3)
    assert ids[0].tolist() == sample["attr_ids"]
    np.testing.assert_allclose(probs[0], sample["attr_probs"], rtol=1e-4, atol=1e-6)


def test_label_concepts_bucket_input_and_output(local_run, curated, tiny_teacher, s3_server, tmp_path,
                                                monkeypatch):
    """Input and output in a bucket of a real S3 server, configured by ``storage_options`` only:
    the same label files as the local run."""
    import fsspec

    job = load_job()
    root, captions = curated
    bucket = s3_server.new_bucket("concepts")
    staged = tmp_path / "curated"
    (staged / "shards").mkdir(parents=True)
    for p in (root / "shards").iterdir():
        (staged / "shards" / p.name).write_bytes(p.read_bytes())
    s3_server.upload(staged, f"s3://{bucket}/cat")
    for var in ("AWS_ENDPOINT_URL", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setattr(fsspec.config, "conf", {k: dict(v) for k, v in fsspec.config.conf.items()})
    config = tmp_path / "bucket.yaml"
    config.write_text(json.dumps({"storage_options": s3_server.storage_options}))
    cfg = build_config(CONFIG_DIR / "concepts" / "label_concepts.yaml", user_file=str(config),
                       overrides=[f"input=s3://{bucket}/cat", f"output=s3://{bucket}/labels",
                                  *job_cfg_overrides(tiny_teacher, "classifier.max_samples=30")])
    summary = job.label_concepts(cfg, log=lambda *_: None)
    assert summary["samples"] == local_run["samples"] and summary["shards"] == local_run["shards"]
    fs = s3_server.filesystem()
    assert sorted(p.rsplit("/", 1)[1] for p in fs.ls(f"{bucket}/labels")) == [
        "00000.parquet", "00001.parquet", "00002.parquet", "classifiers.npz", "vocab.json"]
    assert json.loads(fs.cat(f"{bucket}/labels/vocab.json"))["objects"] == local_run["objects"]
    for name in ("00000", "00001", "00002"):
        got = pq.read_table(io.BytesIO(fs.cat(f"{bucket}/labels/{name}.parquet")))
        want = pq.read_table(root / "concepts" / f"{name}.parquet")
        assert got["key"].to_pylist() == want["key"].to_pylist()
        assert got["obj_ids"].to_pylist() == want["obj_ids"].to_pylist()
        assert got["attr_ids"].to_pylist() == want["attr_ids"].to_pylist()
        assert got["error"].to_pylist() == want["error"].to_pylist()
    assert not any(p.name.startswith("s3") for p in tmp_path.iterdir())


def test_label_concepts_clear_errors(tmp_path, curated, tiny_teacher):
    job = load_job()
    root, _ = curated
    with pytest.raises(job.LabelError, match="checkpoint"):
        job.label_concepts(job_cfg(root, {**tiny_teacher, "checkpoint": None},
                                   "teacher.checkpoint=null"), log=lambda *_: None)
    wrong = tmp_path / "wrong.pt"
    torch.save({"state_dict": {"visual.proj": torch.zeros(3)}}, wrong)
    with pytest.raises(job.LabelError, match="cannot load"):
        job.label_concepts(job_cfg(root, {**tiny_teacher, "checkpoint": str(wrong)}),
                           log=lambda *_: None)
    with pytest.raises(job.LabelError, match="no curated output"):
        job.label_concepts(job_cfg(tmp_path, tiny_teacher), log=lambda *_: None)


def test_read_curated_shard_records_broken_input(tmp_path):
    path = tmp_path / "00007.tar"
    with TarWriter(str(path), encoder=False) as sink:
        sink.write({"__key__": "a", "jpg": image_bytes(COLORS["red"], 0), "txt": b"a red car"})
        sink.write({"__key__": "b", "txt": b"a caption without an image"})
        sink.write({"__key__": "c", "jpg": image_bytes(COLORS["blue"], 1), "txt": b"\xff\xfe bad"})
        for i in range(20):
            sink.write({"__key__": f"d{i}", "jpg": image_bytes(COLORS["green"], i), "txt": b"a tree"})
    rows = pa.concat_tables(C.read_curated_shard(str(path))).to_pylist()
    by_key = {r["key"]: r for r in rows}
    assert by_key["a"]["error"] is None and by_key["a"]["caption"] == "a red car"
    assert by_key["a"]["shard"] == "00007" and by_key["a"]["image"]
    assert by_key["b"]["error"] == "sample has no image"
    assert "UTF-8" in by_key["c"]["error"]
    import tarfile

    with tarfile.open(path) as tar:
        cut = tar.getmember("d5.jpg").offset_data + 10
    path.write_bytes(path.read_bytes()[:cut])  # truncated inside d5.jpg: one error row at the end
    rows = pa.concat_tables(C.read_curated_shard(str(path))).to_pylist()
    assert rows[-1]["key"] == "00007/unreadable" and "unreadable" in rows[-1]["error"]
    assert [r["key"] for r in rows[:-1]] == ["a", "b", "c"] + [f"d{i}" for i in range(5)]


def test_a_wrong_labelling_config_value_is_one_line_naming_the_key(capsys):
    with pytest.raises(SystemExit) as exit_info:
        load_job().main(["teacher.precision=fp8"])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err.splitlines() == [err]
    assert err.startswith("error: teacher.precision must be one of 'fp32', 'fp16', 'bf16'"), err


def test_the_labelling_yaml_parses_as_its_typed_view():
    from training.concept_settings import parse_label_config

    view = parse_label_config(build_config(CONFIG_DIR / "concepts" / "label_concepts.yaml"))
    assert view.teacher.kind == "open_clip" and view.stages.embed.num_gpus == 0
