"""The DiHT recipe: join of concept targets by key, HN-NCE + distillation terms, a Ray Train run."""

import io
import json
import random
import tarfile

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image

from training import concepts as C
from training.recipe_diht import (ConceptError, ConceptTargets, DiHTRecipe, padded_list_column,
                                  read_vocab)

ARCH = "micro-vit-32"
OBJECTS = ["car", "boat", "kite", "house"]
ATTRIBUTES = ["red", "green", "blue"]
COLORS = {"red": (220, 30, 30), "green": (30, 200, 40), "blue": (30, 40, 220)}
TOP_K = 3


def diht_config(*overrides):
    from training.train import build_train_config

    return build_train_config("configs/train/diht_tiny.yaml", [f"model.arch={ARCH}", *overrides])


# --- small generated data --------------------------------------------------------------------------

def image_bytes(rng: random.Random, rgb) -> bytes:
    arr = np.clip(np.array(rgb)[None, None, :] + np.array(
        [[[rng.gauss(0, 20) for _ in range(3)] for _ in range(40)] for _ in range(40)]), 0, 255)
    buf = io.BytesIO()
    Image.fromarray(arr.astype(np.uint8)).save(buf, format="JPEG", quality=90)
    return buf.getvalue()


def write_curated(folder, num_shards=2, per_shard=24, seed=0) -> list[dict]:
    """Curated-format shards; returns the samples (key, colour, object)."""
    rng = random.Random(seed)
    (folder / "shards").mkdir(parents=True)
    samples, sizes = [], {}
    for s in range(num_shards):
        with tarfile.open(folder / "shards" / f"{s:05d}.tar", "w") as tar:
            for j in range(per_shard):
                key = f"{s:05d}{j:04d}"
                color, obj = rng.choice(sorted(COLORS)), rng.choice(OBJECTS)
                for ext, data in (("jpg", image_bytes(rng, COLORS[color])),
                                  ("txt", f"a {color} {obj} on the road".encode()),
                                  ("json", json.dumps({"key": key}).encode())):
                    info = tarfile.TarInfo(f"{key}.{ext}")
                    info.size = len(data)
                    tar.addfile(info, io.BytesIO(data))
                samples.append({"key": key, "color": color, "object": obj, "shard": f"{s:05d}"})
        sizes[f"{s:05d}.tar"] = per_shard
    (folder / "shards" / "sizes.json").write_text(json.dumps(sizes))
    return samples


def target_row(sample: dict) -> dict:
    """Softmax-like top-k targets that name the sample's own object and colour first."""
    o, a = OBJECTS.index(sample["object"]), ATTRIBUTES.index(sample["color"])
    return {"key": sample["key"],
            "obj_ids": [o, (o + 1) % len(OBJECTS), (o + 2) % len(OBJECTS)], "obj_probs": [0.7, 0.2, 0.05],
            "attr_ids": [a, (a + 1) % len(ATTRIBUTES)], "attr_probs": [0.8, 0.1], "error": None}


def write_concepts(folder, samples, skip_every=3) -> set:
    """``concepts/`` as pipelines/label_concepts.py writes it; every ``skip_every``-th sample has no
    row, and one more has an error row. Returns the keys that have usable targets."""
    out = folder / "concepts"
    out.mkdir(parents=True)
    labelled, by_shard = set(), {}
    for i, s in enumerate(samples):
        if i % skip_every == 0:
            continue
        row = target_row(s)
        if i == 1:  # an image the labelling job could not decode
            row = {"key": s["key"], "obj_ids": [], "obj_probs": [], "attr_ids": [], "attr_probs": [],
                   "error": "cannot decode image"}
        else:
            labelled.add(s["key"])
        by_shard.setdefault(s["shard"], []).append(row)
    for shard, rows in by_shard.items():
        pq.write_table(pa.Table.from_pylist(rows, schema=C.OUTPUT_SCHEMA), out / f"{shard}.parquet")
    (out / "vocab.json").write_text(json.dumps({"objects": OBJECTS, "attributes": ATTRIBUTES,
                                                "top_k": TOP_K, "teacher": {"kind": "test"}}))
    return labelled


def raw_batch(samples, rng=None) -> dict:
    """What ray.data.read_webdataset hands the sample transform (raw bytes)."""
    rng = rng or random.Random(0)
    return {"__key__": np.array([s["key"] for s in samples], dtype=object),
            "jpg": np.array([image_bytes(rng, COLORS[s["color"]]) for s in samples], dtype=object),
            "txt": np.array([f"a {s['color']} {s['object']}".encode() for s in samples], dtype=object)}


@pytest.fixture(scope="module")
def curated(tmp_path_factory):
    folder = tmp_path_factory.mktemp("diht_curated")
    samples = write_curated(folder)
    labelled = write_concepts(folder, samples)
    return folder, samples, labelled


# --- the join by key -------------------------------------------------------------------------------

def test_padded_list_column_matches_padded_targets():
    rows = [[3, 1, 2], [], [5], None, [7, 8, 9, 10, 11]]
    col = pa.chunked_array([pa.array(rows[:2], pa.list_(pa.int32())), pa.array(rows[2:], pa.list_(pa.int32()))])
    for k in (1, 3, 6):
        got = padded_list_column(col, k, np.int64, -1)
        want, _ = C.padded_targets([r or [] for r in rows], [[0.0] * len(r or []) for r in rows], k)
        np.testing.assert_array_equal(got, want)


def test_join_by_key_marks_samples_without_targets():
    table = pa.Table.from_pylist([
        {"key": "a", "obj_ids": [2, 0], "obj_probs": [0.6, 0.3], "attr_ids": [1], "attr_probs": [0.9], "error": None},
        {"key": "b", "obj_ids": [1, 3, 0], "obj_probs": [0.5, 0.2, 0.1], "attr_ids": [0, 1],
         "attr_probs": [0.5, 0.4], "error": None},
        {"key": "c", "obj_ids": [], "obj_probs": [], "attr_ids": [], "attr_probs": [], "error": "bad image"},
    ], schema=C.OUTPUT_SCHEMA)
    targets = ConceptTargets(table, top_k=2)
    got = targets.lookup(["b", "missing", "dir/a", "c"])  # keys are matched by their basename
    np.testing.assert_array_equal(got["has_concepts"], [True, False, True, False])
    np.testing.assert_array_equal(got["obj_ids"], [[1, 3], [-1, -1], [2, 0], [-1, -1]])
    np.testing.assert_allclose(got["obj_probs"], [[0.5, 0.2], [0, 0], [0.6, 0.3], [0, 0]])
    np.testing.assert_array_equal(got["attr_ids"], [[0, 1], [-1, -1], [1, -1], [-1, -1]])
    np.testing.assert_allclose(got["attr_probs"], [[0.5, 0.4], [0, 0], [0.9, 0], [0, 0]])
    assert got["obj_ids"].dtype == np.int64 and got["obj_probs"].dtype == np.float32
    empty = targets.lookup([])
    assert empty["obj_ids"].shape == (0, 2) and empty["has_concepts"].shape == (0,)


def test_sample_transform_joins_targets_by_key(curated):
    folder, samples, labelled = curated
    recipe = DiHTRecipe(diht_config(f"data.train={folder}"))
    assert recipe.concepts == str(folder / "concepts")
    transform = recipe.sample_transform(is_train=True)
    picked = samples[:9]
    out = recipe.collate(transform(raw_batch(picked)))
    assert out["key"] == [s["key"] for s in picked]
    assert out["image"].shape == (9, 3, 32, 32) and out["obj_ids"].shape == (9, TOP_K)
    want = [s["key"] in labelled for s in picked]
    assert out["has_concepts"].tolist() == want and 0 < sum(want) < 9
    for i, s in enumerate(picked):
        if want[i]:
            row = target_row(s)
            assert out["obj_ids"][i].tolist() == row["obj_ids"]
            assert out["attr_ids"][i].tolist() == row["attr_ids"] + [-1]
        else:
            assert (out["obj_ids"][i] == -1).all() and (out["attr_probs"][i] == 0).all()


def test_rows_tagged_with_their_tar_read_only_that_shards_labels(curated, monkeypatch):
    from training import recipe_diht

    folder, samples, labelled = curated
    monkeypatch.setattr(recipe_diht, "_SHARD_TARGETS", type(recipe_diht._SHARD_TARGETS)())
    monkeypatch.setattr(recipe_diht, "_TARGETS", {})
    monkeypatch.setattr(recipe_diht, "SHARD_CACHE", 1)
    recipe = DiHTRecipe(diht_config(f"data.train={folder}"))
    transform = recipe.sample_transform(is_train=False)
    whole = recipe.sample_transform(is_train=False)(raw_batch(samples))  # untagged: whole folder
    recipe_diht._TARGETS.clear()

    def tagged(picked, shard_of=lambda s: s["shard"]):
        batch = raw_batch(picked)
        batch["path"] = np.array([f"{folder}/shards/{shard_of(s)}.tar" for s in picked], dtype=object)
        return transform(batch)

    first = [s for s in samples if s["shard"] == "00000"][:10]
    out = tagged(first)
    assert list(recipe_diht._SHARD_TARGETS) == [(recipe.concepts, "00000")] and not recipe_diht._TARGETS
    mixed = samples[20:30]  # both shards, in one batch
    assert {s["shard"] for s in mixed} == {"00000", "00001"}
    out = tagged(mixed)
    assert len(recipe_diht._SHARD_TARGETS) == 1  # the cache is bounded
    rows = [samples.index(s) for s in mixed]
    for c in ("obj_ids", "obj_probs", "attr_ids", "attr_probs", "has_concepts"):
        np.testing.assert_array_equal(out[c], whole[c][rows], err_msg=c)
    assert out["has_concepts"].any()
    # a tar with no label file: no targets, not an error
    out = tagged(first, shard_of=lambda s: "00099")
    assert not out["has_concepts"].any() and (out["obj_ids"] == -1).all()


def test_training_reader_tags_rows_with_their_tar(ray_session, curated):
    from training.data import build_dataset

    def tar_of_each_row(batch: dict) -> dict:  # defined here: Ray workers cannot import tests
        shards = [C.shard_name(str(p)) for p in batch["path"]]
        return {"key": batch["__key__"], "shard": np.array(shards, dtype=object)}

    folder, samples, _ = curated
    ds = build_dataset({"train": str(folder), "map_batch_size": 16, "num_cpus": 0.5,
                        "op_resource_reservation": True}, tar_of_each_row)
    got = {r["key"]: r["shard"] for r in ds.take_all()}
    assert got == {s["key"]: s["shard"] for s in samples}
    assert ds.context.op_resource_reservation_enabled  # Ray Data's default, kept when the config says so
    off = build_dataset({"train": str(folder), "map_batch_size": 16, "num_cpus": 0.5,
                         "op_resource_reservation": False}, tar_of_each_row)
    assert not off.context.op_resource_reservation_enabled
    assert ray_session.data.DataContext.get_current().op_resource_reservation_enabled  # only that dataset


def test_missing_concept_labels_are_a_clear_error(tmp_path):
    recipe = DiHTRecipe(diht_config(f"data.train={tmp_path}"))
    with pytest.raises(ConceptError, match="label_concepts"):
        recipe.sample_transform()
    # HN-NCE alone needs no labels
    plain = DiHTRecipe(diht_config(f"data.train={tmp_path}", "loss.distill.enabled=false"))
    assert "obj_ids" not in plain.sample_transform()(raw_batch([
        {"key": "x", "color": "red", "object": "car"}, {"key": "y", "color": "blue", "object": "kite"}]))
    with pytest.raises(ValueError, match="label smoothing"):
        DiHTRecipe(diht_config("loss.label_smoothing=0.1", "loss.distill.enabled=false"))


# --- the loss terms ---------------------------------------------------------------------------------

def model_and_loss(recipe, seed=0):
    torch.manual_seed(seed)  # as the training loop: model, then the loss's heads
    model = recipe.build_model()
    return model, recipe.build_loss(model)


def batch_of(curated, n=8):
    folder, samples, labelled = curated
    recipe = DiHTRecipe(diht_config(f"data.train={folder}"))
    return recipe.collate(recipe.sample_transform(is_train=False)(raw_batch(samples[:n])))


def test_with_and_without_distillation_differ_only_by_the_extra_term(curated):
    folder = curated[0]
    batch = batch_of(curated)
    assert 0 < int(batch["has_concepts"].sum()) < len(batch["key"])
    on_recipe = DiHTRecipe(diht_config(f"data.train={folder}"))
    off_recipe = DiHTRecipe(diht_config(f"data.train={folder}", "loss.distill.enabled=false"))
    m_on, loss_on = model_and_loss(on_recipe)
    m_off, loss_off = model_and_loss(off_recipe)
    assert isinstance(loss_on, torch.nn.Module) and len(list(loss_on.parameters())) == 4  # 2 heads
    assert not list(loss_off.parameters())

    t_on, t_off = loss_on(m_on(batch), batch), loss_off(m_off(batch), batch)
    assert set(t_on) == {"loss", "contrastive", "distill", "concept_coverage"}
    assert set(t_off) == {"loss", "contrastive"}
    torch.testing.assert_close(t_on["contrastive"], t_off["contrastive"])
    assert t_on["distill"] > 0
    torch.testing.assert_close(t_on["loss"] - t_off["loss"], t_on["distill"])
    assert t_on["concept_coverage"].item() == pytest.approx(batch["has_concepts"].float().mean().item())

    # gradients: the run with distillation = the run without + the distillation term's gradient
    t_on["loss"].backward()
    t_off["loss"].backward()
    m_extra, loss_extra = model_and_loss(on_recipe)
    loss_extra.distill(m_extra(batch)["image_pooled"], batch).backward()
    for (name, p_on), p_off, p_extra in zip(m_on.named_parameters(), m_off.parameters(), m_extra.parameters()):
        g_off = p_off.grad if p_off.grad is not None else torch.zeros_like(p_on)
        g_extra = p_extra.grad if p_extra.grad is not None else torch.zeros_like(p_on)
        torch.testing.assert_close(p_on.grad, g_off + g_extra, rtol=1e-4, atol=1e-6, msg=name)
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in m_extra.clip.visual.parameters())


def test_beta0_alpha1_recipe_loss_equals_the_clip_recipe_loss(curated):
    from training.recipes import get_recipe
    from training.train import build_train_config

    batch = batch_of(curated)
    clip_recipe = get_recipe(build_train_config(None, [f"model.arch={ARCH}"]))
    m_clip, loss_clip = model_and_loss(clip_recipe)
    want = loss_clip(m_clip(batch), batch)["loss"]
    for beta, same in ((0.0, True), (0.5, False)):
        recipe = get_recipe(diht_config("loss.distill.enabled=false", "loss.hnnce.alpha=1.0",
                                        f"loss.hnnce.beta={beta}"))
        assert isinstance(recipe, DiHTRecipe)
        model, loss = model_and_loss(recipe)
        got = loss(model(batch), batch)["loss"]
        assert torch.isclose(got, want, rtol=1e-5, atol=1e-6).item() is same, (beta, got, want)


# --- a short Ray Train run ---------------------------------------------------------------------------

def test_diht_tiny_ray_training_run(ray_session, curated, tmp_path):
    from training.checkpoint import STATE_FILE
    from training.train import train

    folder, samples, labelled = curated
    cfg = diht_config(f"data.train={folder}", f"run.storage_path={tmp_path}", "run.name=diht",
                      "train.max_steps=6", "train.batch_size=16", "train.warmup_steps=1",
                      "train.log_every_steps=1", "data.map_batch_size=16", "data.num_cpus=0.5",
                      "scaling.cpus_per_worker=0.5", "eval.enabled=false")
    summary = train(cfg, log=lambda *_: None)
    assert summary["metrics"]["step"] == 6
    rows = [json.loads(line) for line in open(tmp_path / "diht" / "metrics.jsonl")]
    rows = [r for r in rows if "train/loss" in r]
    assert [r["step"] for r in rows] == list(range(1, 7))
    for r in rows:  # logged separately; the total is their sum
        assert r["train/loss"] == pytest.approx(r["train/contrastive"] + r["train/distill"], rel=1e-5)
        assert r["train/distill"] > 0 and 0 < r["train/concept_coverage"] <= 1
    coverage = np.mean([r["train/concept_coverage"] for r in rows])
    assert abs(coverage - len(labelled) / len(samples)) < 0.25
    state = torch.load(f"{summary['checkpoint']}/{STATE_FILE}", map_location="cpu", weights_only=False)
    heads = {k: v.shape for k, v in state["module"].items() if k.startswith("loss.")}
    assert heads["loss.distill.heads.objects.weight"] == (len(OBJECTS), 32)
    assert heads["loss.distill.heads.attributes.weight"] == (len(ATTRIBUTES), 32)
    assert read_vocab(str(folder / "concepts"))["top_k"] == TOP_K


# --- the experiment's pure parts ------------------------------------------------------------------

def load_compare():
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "benchmarks" / "compare_recipes.py"
    spec = importlib.util.spec_from_file_location("compare_recipes", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_compare_recipes_config_entries_and_table():
    from curation.common.config import build_config

    cr = load_compare()
    cfg = build_config(cr.DEFAULT_CONFIG)
    names = [e["name"] for e in cr.ordered_entries(cfg)]
    assert names[0] == cfg["teacher"] and set(names) >= {"clip", "hnnce", "diht"}
    # every entry's training config builds (known keys, known recipe), with the common overrides
    for entry in cfg["recipes"]:
        tcfg = cr.train_config(entry, cfg, 0, "data", "runs", "concepts")
        assert tcfg["train"]["max_steps"] == 150 and tcfg["eval"]["fewshot"]["shots"] == [1, 8]
    diht = cr.train_config(next(e for e in cfg["recipes"] if e["name"] == "diht"), cfg, 0, "d", "r", "cc")
    assert diht["recipe"] == "diht" and diht["loss"]["distill"]["enabled"] and diht["loss"]["distill"]["concepts"] == "cc"
    hn = cr.train_config(next(e for e in cfg["recipes"] if e["name"] == "hnnce"), cfg, 0, "d", "r", "cc")
    assert not hn["loss"]["distill"]["enabled"] and hn["loss"]["hnnce"]["beta"] == 0.5

    bad = {**cfg, "recipes": [*cfg["recipes"][1:], {"name": "x", "concepts": True}], "teacher": "nope"}
    with pytest.raises(cr.ExperimentError, match="teacher"):
        cr.ordered_entries(bad)

    ev = {"demo": {"zeroshot": {"clip": {"acc1": 0.25}},
                   "retrieval": {"clip": {"image_retrieval_recall@1": 0.1, "image_retrieval_recall@5": 0.3}},
                   "fewshot": {"clip": {"rows": [{"k": 1, "projected": 0.4}, {"k": 8, "projected": 0.6}]}}}}
    assert cr.lookup(ev, "demo/fewshot/{emb}/k=8/projected", "clip") == 0.6
    assert cr.lookup(ev, "demo/fewshot/{emb}/k=2/projected", "clip") is None
    assert cr.embedding_name(ev, None) == "clip"
    ev2 = json.loads(json.dumps(ev))
    ev2["demo"]["zeroshot"]["clip"]["acc1"] = 0.35
    table = cr.markdown_table([{"title": "CLIP", "evals": [ev, ev2], "embedding": "clip", "train_s": [10, 12]}], [0, 1])
    row = table.splitlines()[2]
    assert row == "| CLIP | 30.0 ± 5.0 | 10.0 ± 0.0 / 30.0 ± 0.0 | - / - | 40.0 ± 0.0 | 60.0 ± 0.0 | - | - | - | 11 |"
