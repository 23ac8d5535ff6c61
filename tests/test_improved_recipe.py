"""The improved-CLIP recipe (training/recipe_improved.py) and its configs.

Every config (CLIP 🚀 and the five SSL variants) is trained in-process with the real recipe
objects (Ray Data transform -> collate -> model -> loss -> AdamW steps) on a small generated
batch; one real Ray Train run (two gloo workers, DDP) covers the job end to end (multi-view
data on Ray Data, the EMA target of BYOLIP, evaluation of the weak, strong and ensemble
embeddings).
"""

from __future__ import annotations

import io
import json
import math
import random
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from curation.common.config import CONFIG_DIR, ConfigError, load_yaml

TRAIN_CONFIGS = CONFIG_DIR / "train"
TINY = TRAIN_CONFIGS / "presets" / "tiny_cpu.yaml"
VARIANTS = ["improved_clip", "improved_barlip", "improved_siamlip", "improved_byolip",
            "improved_swalip", "improved_slip"]
ARCH = "micro-vit-32"
COLORS = {"red": (220, 30, 30), "green": (30, 200, 40), "blue": (30, 40, 220), "yellow": (230, 220, 30)}


def config(variant: str, *overrides: str) -> dict:
    from training.recipe_improved import improved_config

    return improved_config(variant_file(variant), TINY, overrides=[f"model.arch={ARCH}", *overrides])


def variant_file(variant: str) -> Path:
    return TRAIN_CONFIGS / f"{variant}.yaml"


def color_jpeg(rng: random.Random, rgb) -> bytes:
    arr = np.clip(np.array(rgb)[None, None, :] + rng.gauss(0, 1) * 20
                  + np.random.default_rng(rng.randrange(2**31)).normal(0, 20, (40, 48, 3)), 0, 255)
    buf = io.BytesIO()
    Image.fromarray(arr.astype(np.uint8)).save(buf, format="JPEG", quality=90)
    return buf.getvalue()


def raw_rows(n: int, seed: int = 0, bad: bool = False) -> dict:
    """A Ray Data webdataset batch (raw bytes) of ``n`` coloured images with captions."""
    rng = random.Random(seed)
    keys, jpgs, txts = [], [], []
    for i in range(n):
        color = sorted(COLORS)[i % len(COLORS)]
        keys.append(f"{seed:03d}{i:05d}")
        jpgs.append(color_jpeg(rng, COLORS[color]))
        txts.append(f"a photo of a {color} square on the table".encode())
    if bad:
        keys += ["bad_image", "bad_text"]
        jpgs += [b"\xff\xd8\xff not a jpeg", color_jpeg(rng, COLORS["red"])]
        txts += [b"a red thing", b"   "]
    return {"__key__": np.array(keys, dtype=object), "jpg": np.array(jpgs, dtype=object),
            "txt": np.array(txts, dtype=object)}


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Intra-op threads of 1: tiny models on a loaded 2-core machine are far faster that way."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def registered():
    from training.model import register_model_configs

    register_model_configs()


# --- configs -------------------------------------------------------------------------------------------

def test_the_view_defaults_are_the_recipes_views():
    from training.augment.views import views_config
    from training.settings import as_dict

    assert load_yaml(TRAIN_CONFIGS / "improved.yaml")["views"] == as_dict(views_config())


@pytest.mark.parametrize("variant", VARIANTS)
def test_variant_configs_select_their_companion(variant):
    from training.train import build_train_config

    cfg = build_train_config(str(variant_file(variant)))
    assert cfg["recipe"] == "improved"
    assert cfg["loss"]["ssl"]["name"] == ("none" if variant == "improved_clip" else variant.split("_")[1])
    from training.recipe_improved import loss_settings

    # SwALIP trains without label smoothing (SPEC 5; the official SwALIPLoss asserts it), the rest 0.1
    want = 0.0 if variant == "improved_swalip" else 0.1
    assert loss_settings(cfg["loss"]) == {"label_smoothing": want, "reduction": "mean"}
    assert cfg["model"]["improved"]["proj_dim"] == 256 and cfg["model"]["improved"]["mlp_hidden_dim"] == 4096


def test_swalip_refuses_label_smoothing():
    from training.losses.ssl import SwALIP
    from training.recipe_improved import ImprovedRecipe, ImprovedRecipeLoss

    # a preset + `loss.ssl.name=swalip` on the command line gets 0, as the official SwALIP runs
    assert ImprovedRecipe(config("improved_clip", "loss.ssl.name=swalip")).build_loss(
        ImprovedRecipe(config("improved_clip")).build_model()).clip_loss.label_smoothing == 0.0
    with pytest.raises(ValueError, match="loss.label_smoothing=0.1 with loss.ssl.name=swalip"):
        ImprovedRecipe(config("improved_swalip", "loss.label_smoothing=0.1"))
    with pytest.raises(ValueError, match="SwALIP is trained without label smoothing"):
        ImprovedRecipeLoss(0.1, ssl=SwALIP(), ssl_name="swalip")
    assert ImprovedRecipeLoss(0.0, ssl=SwALIP(), ssl_name="swalip").clip_loss.label_smoothing == 0.0


@pytest.mark.parametrize("preset,dropout,text_layers,wd,reduction", [
    ("cc3m", 0.2, 6, 0.5, "mean"), ("cc12m", 0.05, None, 0.1, "sum"), ("yfcc15m", 0.0, None, 0.1, "sum")])
def test_dataset_presets_follow_spec(preset, dropout, text_layers, wd, reduction):
    from training.recipe_improved import ImprovedRecipe, loss_settings
    from training.train import build_train_config

    cfg = build_train_config(str(TRAIN_CONFIGS / "presets" / f"{preset}.yaml"))
    t = cfg["train"]
    assert cfg["recipe"] == "improved"
    assert cfg["model"]["improved"]["text_residual_dropout"] == dropout
    assert cfg["model"]["text_cfg"].get("layers") == text_layers
    assert t["weight_decay"] == wd
    assert (t["lr"], t["batch_size"], t["epochs"], t["beta1"], t["beta2"], t["eps"]) == \
        (3e-3, 4096, 32, 0.9, 0.98, 1e-8)
    assert t["lr"] * t["min_lr_ratio"] == pytest.approx(1e-5, rel=1e-6)  # cosine to 1e-5
    # the official runs: CC3M averages the two directions, CC12M / YFCC15M sum them
    assert loss_settings(cfg["loss"]) == {"label_smoothing": 0.1, "reduction": reduction}
    small = build_train_config(str(TRAIN_CONFIGS / "presets" / f"{preset}.yaml"),
                               [f"model.arch={ARCH}", "model.text_cfg={}", "model.improved.mlp_hidden_dim=16"])
    recipe = ImprovedRecipe(small)
    assert recipe.build_loss(recipe.build_model()).clip_loss.reduction == reduction


def test_config_errors():
    from training.recipe_improved import improved_config, ssl_settings

    with pytest.raises(ConfigError, match="loss.ssl.barlip.projdim"):
        improved_config(TINY, overrides=["loss.ssl.barlip.projdim=3"])
    with pytest.raises(ConfigError, match="views.text.strong.opps"):
        improved_config(TINY, overrides=["views.text.strong.opps=1"])
    with pytest.raises(ValueError, match="unknown loss.ssl.name"):
        ssl_settings({"ssl": {"name": "simclr"}})
    assert ssl_settings({"ssl": {"name": "none"}}) == ("none", None, {})
    name, section, extras = ssl_settings(config("improved_byolip")["loss"])
    assert name == "byolip" and extras == {"ema_model": True} and "ema_model" not in section
    assert section["momentum"] == 0.99


# --- the data path (no Ray) ----------------------------------------------------------------------------

def test_multiview_transform_shapes_errors_and_seeding(registered):
    from training import recipe_improved
    from training.recipe_improved import MultiViewSampleTransform

    cfg = config("improved_clip")
    t = MultiViewSampleTransform(ARCH, cfg["views"], seeding="sample", counter=None)
    out = t(raw_rows(4, bad=True))
    assert list(out["key"]) == [f"000{i:05d}" for i in range(4)]  # the bad rows are dropped
    assert out["image"].shape == (4, 3, 32, 32) and out["image"].dtype == np.float32
    assert out["image_strong"].shape == (4, 2, 3, 32, 32)
    assert out["text"].shape == (4, 16) and out["text_strong"].shape == (4, 2, 16)
    assert out["text"].dtype == out["text_strong"].dtype == np.int64
    # the two strong views differ from each other and from the weak view
    assert not np.allclose(out["image_strong"][:, 0], out["image_strong"][:, 1])
    assert not np.allclose(out["image_strong"][:, 0], out["image"])
    # per-sample seeding: the same views in a fresh process (cache cleared), whatever the batch
    recipe_improved._VIEWS.clear()
    again = MultiViewSampleTransform(ARCH, cfg["views"], seeding="sample")(raw_rows(4))
    for k in ("image", "image_strong", "text", "text_strong"):
        assert np.array_equal(out[k], again[k]), k
    # per-worker seeding: a different process seed gives different views
    recipe_improved._VIEWS.clear()
    w1 = MultiViewSampleTransform(ARCH, cfg["views"], seeding="worker")
    first = w1(raw_rows(4))
    second = w1(raw_rows(4))  # the worker's RNG moved on: fresh views for the next epoch
    assert not np.allclose(first["image_strong"], second["image_strong"])
    with pytest.raises(ValueError, match="views_seeding"):
        MultiViewSampleTransform(ARCH, cfg["views"], seeding="epoch")


def test_bad_samples_are_counted_not_fatal(registered):
    from training.data import SampleErrorCounter
    from training.recipe_improved import MultiViewSampleTransform

    counter = SampleErrorCounter()
    t = MultiViewSampleTransform(ARCH, config("improved_clip")["views"], counter=counter)
    out = t(raw_rows(0, bad=True))
    assert out["image"].shape == (0, 3, 32, 32) and out["text_strong"].shape == (0, 2, 16)
    s = counter.summary()
    assert s["by_reason"] == {"bad_image": 1, "bad_text": 1}


def test_collate_checks_the_multiview_fields(registered):
    from training.recipes import get_recipe

    recipe = get_recipe(config("improved_clip"))
    with pytest.raises(ValueError, match="image_strong"):
        recipe.collate({"image": np.zeros((2, 3, 32, 32), np.float32), "text": np.zeros((2, 16), np.int64)})


# --- every config trains (in-process, real recipe objects) ----------------------------------------------

@pytest.fixture(scope="module")
def fixed_rows():
    return raw_rows(12, seed=1)


def make_parts(variant: str, *overrides: str):
    from training.loop import TrainModule
    from training.optim import build_optimizer
    from training.recipes import get_recipe

    cfg = config(variant, "data.views_seeding=sample", *overrides)
    recipe = get_recipe(cfg)
    torch.manual_seed(0)
    model = recipe.build_model()
    module = TrainModule(model, recipe.build_loss(model))
    opt = build_optimizer(module, cfg["train"])
    return cfg, recipe, module, opt


def train_steps(module, opt, batch, steps: int, after_step: bool = True) -> list[dict]:
    module.train()
    history = []
    for i in range(steps):
        opt.zero_grad(set_to_none=True)
        terms = module(batch)
        terms["loss"].backward()
        if i == 0:  # every trainable parameter takes part (DDP without find_unused_parameters)
            unused = [n for n, p in module.named_parameters() if p.requires_grad and p.grad is None]
            assert not unused, unused
        opt.step()
        module.model.clamp_logit_scale()
        if after_step:
            module.loss.after_step()
        history.append({k: float(v.detach()) for k, v in terms.items()})
    return history


@pytest.mark.parametrize("variant", VARIANTS)
def test_every_config_trains_without_nan_and_loss_falls(registered, fixed_rows, variant):
    cfg, recipe, module, opt = make_parts(variant, "train.lr=0.002", "train.weight_decay=0.0")
    batch = recipe.collate(recipe.sample_transform(is_train=True)(fixed_rows))
    history = train_steps(module, opt, batch, steps=25)
    losses = [h["loss"] for h in history]
    assert all(math.isfinite(v) for h in history for v in h.values()), history[-1]
    name = cfg["loss"]["ssl"]["name"]
    assert (f"ssl_{name}" in history[0]) == (name != "none")
    assert {"clip_rocket", "global_i2t", "global_t2i", "local_i2t", "local_t2i", "logit_scale_weak",
            "logit_scale_strong"} <= set(history[0])
    assert history[0]["logit_scale_strong"] == pytest.approx(1 / 0.1, rel=1e-2)  # its own init
    assert np.mean(losses[-3:]) < np.mean(losses[:3]) - 0.1, losses
    assert history[-1]["clip_rocket"] < history[0]["clip_rocket"]


# --- after_step: the EMA targets of BYOLIP ---------------------------------------------------------------

def _snapshot(module):
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def test_byolip_after_step_updates_both_emas(registered, fixed_rows):
    cfg, recipe, module, opt = make_parts("improved_byolip")
    loss = module.loss
    m = cfg["loss"]["ssl"]["byolip"]["momentum"]
    assert loss.target is not None and loss.ssl.target_projectors is not None
    # the EMA model is trained with nothing: no gradients, not in the optimiser
    assert not any(p.requires_grad for p in loss.target.parameters())
    in_opt = {id(p) for g in opt.param_groups for p in g["params"]}
    assert not any(id(p) in in_opt for p in loss.target.parameters())
    batch = recipe.collate(recipe.sample_transform(is_train=True)(fixed_rows))
    train_steps(module, opt, batch, steps=1, after_step=False)
    target_before = _snapshot(loss.target.module)
    proj_before = _snapshot(loss.ssl.target_projectors.module)
    online = dict(module.model.named_parameters())
    online_proj = dict(loss.ssl.projectors.named_parameters())
    loss.after_step()
    for name, p in loss.target.module.named_parameters():
        assert torch.allclose(p, m * target_before[name] + (1 - m) * online[name].detach(), atol=1e-6), name
    for name, p in loss.ssl.target_projectors.module.named_parameters():
        assert torch.allclose(p, m * proj_before[name] + (1 - m) * online_proj[name].detach(), atol=1e-6), name
    # the targets of the companion are the EMA model's features
    out = module.model(batch)
    targets = loss.target_outputs(batch)
    assert set(targets) == {"target_image_pooled", "target_text_pooled", "target_image_strong_pooled",
                            "target_text_strong_pooled"}
    assert targets["target_image_pooled"].shape == out["image_pooled"].shape
    assert not targets["target_image_pooled"].requires_grad


def test_after_step_applies_itself_once_without_the_loop_hook(registered, fixed_rows):
    """A loop without the ``after_step`` hook: the next training forward after an optimiser step
    applies the missed update exactly once (not again for a second micro-batch, nor twice when the
    hook is there)."""
    cfg, recipe, module, opt = make_parts("improved_byolip")
    loss = module.loss
    m = cfg["loss"]["ssl"]["byolip"]["momentum"]
    batch = recipe.collate(recipe.sample_transform(is_train=True)(fixed_rows))
    train_steps(module, opt, batch, steps=1, after_step=False)  # first forward: only records
    before = _snapshot(loss.target.module)
    online = {k: v.detach().clone() for k, v in module.model.named_parameters()}
    module.train()
    module(batch)  # the step happened since the last forward: the EMA update is applied now
    name = "log_scale"
    expected = m * before[name] + (1 - m) * online[name]
    assert torch.allclose(loss.target.module.log_scale, expected)
    module(batch)  # no step in between (gradient accumulation): nothing more
    assert torch.allclose(loss.target.module.log_scale, expected)
    loss.after_step()  # the loop's hook, then a forward: applied once, by the hook
    once = loss.target.module.log_scale.detach().clone()
    module(batch)
    assert torch.allclose(loss.target.module.log_scale, once)
    with torch.no_grad():  # evaluation forwards never update
        module.model.log_scale.add_(0.5)
        module(batch)
    assert torch.allclose(loss.target.module.log_scale, once)


def test_plain_companions_have_no_targets(registered):
    for variant in ("improved_clip", "improved_swalip"):
        _, _, module, _ = make_parts(variant)
        assert module.loss.target is None
        assert not module.loss._has_updates
    _, _, module, _ = make_parts("improved_byolip", "loss.ssl.byolip.ema_model=false")
    assert module.loss.target is None and module.loss._has_updates  # projector EMA only


def test_text_layers_override(registered):
    from training.improved_model import find_resblocks

    _, _, module, _ = make_parts("improved_clip", "model.text_cfg.layers=3")
    blocks, _ = find_resblocks(module.model.clip, "text")
    assert len(blocks) == 3  # micro-vit-32 has 1


# --- evaluation embedder ---------------------------------------------------------------------------------

def test_embedder_returns_weak_and_strong(registered):
    from training.evaluate import with_ensembles

    _, recipe, module, _ = make_parts("improved_clip")
    emb = recipe.embedder(module.model)
    images = torch.stack([emb.preprocess(Image.new("RGB", (40, 40), c)) for c in COLORS.values()])
    tokens = emb.tokenizer([f"a {c} thing" for c in COLORS])
    fi, ft = emb.encode_image(images), emb.encode_text(tokens)
    assert list(fi) == list(ft) == ["weak", "strong"]
    for f in (*fi.values(), *ft.values()):
        assert f.shape == (4, 64) and torch.allclose(f.norm(dim=-1), torch.ones(4), atol=1e-5)
    assert not torch.allclose(fi["weak"], fi["strong"])
    sims = with_ensembles({k: fi[k] @ ft[k].T for k in fi}, [0.1, 0.5, 0.9])
    assert set(sims) == {"weak", "strong", "ensemble_w0.1", "ensemble_w0.5", "ensemble_w0.9"}


# --- one real Ray Train run ------------------------------------------------------------------------------

def write_shards(folder: Path, n: int = 48) -> str:
    import tarfile

    shards = folder / "shards"
    shards.mkdir(parents=True)
    rows = raw_rows(n, seed=7, bad=True)
    with tarfile.open(shards / "00000.tar", "w") as tar:
        for key, jpg, txt in zip(rows["__key__"], rows["jpg"], rows["txt"]):
            for ext, data in (("jpg", jpg), ("txt", txt)):
                info = tarfile.TarInfo(f"{key}.{ext}")
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    (shards / "sizes.json").write_text(json.dumps({"00000.tar": n + 2}))
    return str(folder)


def test_ray_train_run_with_byolip_on_two_workers(ray_session, registered, tmp_path):
    from training.train import train

    data = write_shards(tmp_path / "data")
    cfg = config("improved_byolip", f"data.train={data}", f"run.storage_path={tmp_path / 'runs'}",
                 "run.name=byolip", "scaling.num_workers=2", "scaling.cpus_per_worker=0.5", "data.num_cpus=0.5",
                 "data.map_batch_size=16", "data.shuffle_buffer=0", "train.batch_size=16",
                 "train.max_steps=12", "train.lr=0.002", "train.warmup_steps=2", "train.log_every_steps=1",
                 "train.checkpoint_every_steps=0", "train.torch_threads=1", "eval.datasets=[digits]",
                 "eval.max_samples=60",
                 "eval.linear_probe.enabled=false", "eval.retrieval=false")
    summary = train(cfg, log=lambda *_: None)
    assert summary["metrics"]["step"] == 12
    skipped = summary["skipped_samples"]  # counted once per epoch, never fatal
    assert skipped["unique_keys"] == 2 and set(skipped["by_reason"]) == {"bad_image", "bad_text"}
    log_dir = Path(summary["log_dir"])
    rows = [json.loads(line) for line in open(log_dir / "metrics.jsonl")]
    losses = [r["train/loss"] for r in rows if "train/loss" in r]
    assert len(losses) == 12 and all(math.isfinite(v) for v in losses)
    assert np.mean(losses[-3:]) < np.mean(losses[:3])
    assert all("train/ssl_byolip" in r for r in rows if "train/loss" in r)
    # the EMA model and the companion's EMA projectors are checkpointed with the model
    state = torch.load(Path(summary["checkpoint"]) / "train_state.pt", map_location="cpu", weights_only=False)
    keys = state["module"].keys()
    assert any(k.startswith("loss.target.module.clip.") for k in keys)
    assert any(k.startswith("loss.ssl.target_projectors.") for k in keys)
    # the EMA target moved from its initial copy (updates happened) but lags the online model
    online, target = state["module"]["model.log_scale"], state["module"]["loss.target.module.log_scale"]
    init = math.log(1 / cfg["model"]["improved"]["weak_temperature"])
    assert float(target) != pytest.approx(init, abs=1e-7) and not torch.equal(online, target)
    # evaluation: weak, strong and the similarity ensembles over w in 0.1..0.9
    results = json.loads((log_dir / "eval.json").read_text())
    text = json.dumps(results)
    for name in ("weak", "strong", "ensemble_w0.1", "ensemble_w0.5", "ensemble_w0.9"):
        assert f'"{name}"' in text, name
    # pipelines/evaluate.py on the run's checkpoint folder evaluates the model that was trained:
    # the same numbers as the end-of-training evaluation (issue 13 item 5)
    import importlib.util

    from curation.common.config import REPO_ROOT

    spec = importlib.util.spec_from_file_location("evaluate_job", REPO_ROOT / "pipelines" / "evaluate.py")
    job = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(job)
    out = tmp_path / "evaluate.json"
    assert job.main([summary["checkpoint"], "eval.datasets=[digits]", "eval.max_samples=60",
                     "eval.linear_probe.enabled=false", "eval.retrieval=false", "eval.fewshot.enabled=false",
                     f"eval.output={out}"]) == 0
    again = json.loads(out.read_text())["results"]["digits"]
    assert {k: v for k, v in again.items() if k != "elapsed_s"} == \
        {k: v for k, v in results["digits"].items() if k != "elapsed_s"}


def test_missing_thesaurus_fails_before_training(registered, tmp_path):
    """The synonym source is offline; a missing one is a clear error when the job builds its data
    path (on the driver), not a failure inside a Ray Data task."""
    from training import recipe_improved
    from training.augment.thesaurus import ThesaurusNotFoundError
    from training.recipes import get_recipe

    recipe_improved._VIEWS.clear()
    recipe = get_recipe(config("improved_clip", f"views.text.synonyms.path={tmp_path / 'no_wordnet'}"))
    with pytest.raises(ThesaurusNotFoundError, match="no_wordnet"):
        recipe.sample_transform(is_train=True)
    # with the synonym op off, no thesaurus is needed at all
    recipe = get_recipe(config("improved_clip", f"views.text.synonyms.path={tmp_path / 'no_wordnet'}",
                               "views.text.strong.ops.synonym=0.0"))
    out = recipe.sample_transform(is_train=True)(raw_rows(2))
    assert out["text_strong"].shape == (2, 2, 16)
