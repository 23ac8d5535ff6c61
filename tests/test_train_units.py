"""Trainer building blocks without Ray: loss, distributed equivalence, optimizer, checkpoints, data."""

import io
import math
import os
import tarfile

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from tests.gloo import free_port, process_group
from training.losses.clip import clip_loss

ARCH = "micro-vit-32"


# --- loss -----------------------------------------------------------------------------------------

def reference_clip_loss(image, text, scale):
    """Direct computation with explicit sums (no cross_entropy, no matrix tricks)."""
    n = image.shape[0]
    total = 0.0
    for i in range(n):
        row_i = [scale * float(image[i] @ text[j]) for j in range(n)]
        row_t = [scale * float(text[i] @ image[j]) for j in range(n)]
        total += -(row_i[i] - math.log(sum(math.exp(v) for v in row_i)))
        total += -(row_t[i] - math.log(sum(math.exp(v) for v in row_t)))
    return total / (2 * n)


def test_clip_loss_equals_direct_reference():
    g = torch.Generator().manual_seed(0)
    image = F.normalize(torch.randn(6, 8, generator=g, dtype=torch.float64), dim=-1)
    text = F.normalize(torch.randn(6, 8, generator=g, dtype=torch.float64), dim=-1)
    for scale in (1.0, 14.3):
        got = clip_loss(image, text, torch.tensor(scale, dtype=torch.float64)).item()
        assert got == pytest.approx(reference_clip_loss(image, text, scale), rel=1e-9)
    # matching pairs give a lower loss than shuffled ones
    assert clip_loss(image, image, torch.tensor(10.0)) < clip_loss(image, text, torch.tensor(10.0))


def test_clip_loss_rejects_mismatched_shapes():
    with pytest.raises(ValueError, match="differ in shape"):
        clip_loss(torch.zeros(4, 8), torch.zeros(3, 8), torch.tensor(1.0))


# --- two gloo workers == one process ------------------------------------------------------------------

class TinyTowers(torch.nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.img = torch.nn.Linear(10, 6)
        self.txt = torch.nn.Linear(7, 6)
        self.logit_scale = torch.nn.Parameter(torch.tensor(math.log(1 / 0.07)))

    def forward(self, x, t):
        return (F.normalize(self.img(x), dim=-1), F.normalize(self.txt(t), dim=-1),
                self.logit_scale.exp().clamp(max=100))


def global_batch():
    g = torch.Generator().manual_seed(1)
    return torch.randn(8, 10, generator=g), torch.randn(8, 7, generator=g)


def _worker(rank, world, port, out_dir):
    with process_group(rank, world, port):
        model = torch.nn.parallel.DistributedDataParallel(TinyTowers())
        x, t = global_batch()
        n = x.shape[0] // world
        img, txt, scale = model(x[rank * n:(rank + 1) * n], t[rank * n:(rank + 1) * n])
        loss = clip_loss(img, txt, scale)
        loss.backward()
        from training.distributed import all_reduce_mean

        torch.save({"loss": all_reduce_mean(loss).item(),
                    "grads": {k: p.grad.clone() for k, p in model.module.named_parameters()}},
                   os.path.join(out_dir, f"rank{rank}.pt"))


def test_two_gloo_workers_match_one_process_on_the_global_batch(tmp_path):
    import torch.multiprocessing as mp

    mp.spawn(_worker, args=(2, free_port(), str(tmp_path)), nprocs=2, join=True)
    model = TinyTowers()
    x, t = global_batch()
    loss = clip_loss(*model(x, t))
    loss.backward()
    for rank in range(2):
        got = torch.load(tmp_path / f"rank{rank}.pt")
        assert got["loss"] == pytest.approx(loss.item(), rel=1e-5)
        for name, p in model.named_parameters():
            torch.testing.assert_close(got["grads"][name], p.grad, rtol=1e-5, atol=1e-6)


# --- optimizer and schedule -------------------------------------------------------------------------------

def test_no_weight_decay_on_biases_norms_and_logit_scale():
    from training.model import ClipModel, create_clip
    from training.optim import build_optimizer

    model = ClipModel(create_clip(ARCH), ARCH)
    opt = build_optimizer(model, {"lr": 1e-3, "weight_decay": 0.2, "beta1": 0.9, "beta2": 0.98, "eps": 1e-6})
    groups = {g["name"]: g for g in opt.param_groups}
    names = {id(p): n for n, p in model.named_parameters()}
    no_decay = {names[id(p)] for p in groups["no_decay"]["params"]}
    decay = {names[id(p)] for p in groups["decay"]["params"]}
    assert groups["no_decay"]["weight_decay"] == 0 and groups["decay"]["weight_decay"] == 0.2
    assert "clip.logit_scale" in no_decay
    assert any(n.endswith("ln_1.weight") for n in no_decay) and any(n.endswith(".bias") for n in no_decay)
    assert not any(n.endswith(".bias") or "ln_" in n for n in decay)
    assert "clip.token_embedding.weight" in decay and any("attn.in_proj_weight" in n for n in decay)
    assert len(no_decay) + len(decay) == len(list(model.parameters()))


def test_cosine_schedule_with_linear_warmup():
    from training.optim import build_scheduler, cosine_lr_multiplier

    assert [cosine_lr_multiplier(s, 4, 20) for s in range(4)] == [0.25, 0.5, 0.75, 1.0]
    assert cosine_lr_multiplier(12, 4, 20) == pytest.approx(0.5)
    assert cosine_lr_multiplier(20, 4, 20) == pytest.approx(0.0)
    assert cosine_lr_multiplier(20, 4, 20, min_ratio=0.1) == pytest.approx(0.1)
    p = torch.nn.Parameter(torch.zeros(1))
    opt = torch.optim.AdamW([p], lr=2.0)
    sched = build_scheduler(opt, 4, 20)
    lrs = []
    for _ in range(20):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert lrs[0] == pytest.approx(0.5) and max(lrs) == pytest.approx(2.0)
    assert all(a >= b for a, b in zip(lrs[4:], lrs[5:]))  # non-increasing after warm-up


# --- checkpoints --------------------------------------------------------------------------------------------

def test_checkpoint_round_trip_and_open_clip_loading(tmp_path):
    import open_clip

    from training.checkpoint import load_open_clip, load_train_state, save_checkpoint
    from training.model import ClipModel, create_clip
    from training.optim import build_optimizer, build_scheduler

    torch.manual_seed(3)
    model = ClipModel(create_clip(ARCH), ARCH)
    opt = build_optimizer(model, {"lr": 1e-3, "weight_decay": 0.1, "beta1": 0.9, "beta2": 0.98, "eps": 1e-6})
    sched = build_scheduler(opt, 2, 10)
    images, tokens = torch.randn(3, 3, 32, 32), torch.randint(1, 1000, (3, 16))
    for _ in range(3):  # a few real steps so optimizer state exists
        out = model({"image": images, "text": tokens})
        clip_loss(out["image"], out["text"], out["logit_scale"]).backward()
        opt.step()
        sched.step()
        opt.zero_grad()
    save_checkpoint(tmp_path, module=model, clip=model.clip, arch=ARCH, recipe="clip", step=3,
                    epoch=1, optimizer=opt, scheduler=sched)

    model.eval()
    with torch.no_grad():
        want_i, want_t = model.encode_image(images), model.encode_text(tokens)
    loaded, _, preprocess = open_clip.create_model_and_transforms(ARCH, pretrained=str(tmp_path / "open_clip.pt"))
    loaded.eval()
    with torch.no_grad():
        torch.testing.assert_close(loaded.encode_image(images, normalize=True), want_i)
        torch.testing.assert_close(loaded.encode_text(tokens, normalize=True), want_t)
    assert load_open_clip(tmp_path)[0].state_dict().keys() == loaded.state_dict().keys()

    fresh = ClipModel(create_clip(ARCH), ARCH)
    opt2 = build_optimizer(fresh, {"lr": 1e-3, "weight_decay": 0.1, "beta1": 0.9, "beta2": 0.98, "eps": 1e-6})
    sched2 = build_scheduler(opt2, 2, 10)
    state = load_train_state(tmp_path, module=fresh, optimizer=opt2, scheduler=sched2)
    assert state == {"step": 3, "epoch": 1}
    assert sched2.last_epoch == 3 and opt2.param_groups[0]["lr"] == pytest.approx(opt.param_groups[0]["lr"])
    for a, b in zip(opt.state_dict()["state"].values(), opt2.state_dict()["state"].values()):
        torch.testing.assert_close(a["exp_avg"], b["exp_avg"])
    for (k, a), (_, b) in zip(model.state_dict().items(), fresh.state_dict().items()):
        torch.testing.assert_close(a, b, msg=k)


# --- data path pieces (no Ray) -----------------------------------------------------------------------------

def _jpeg(color, size=(40, 30)):
    buf = io.BytesIO()
    Image.new("RGB", size, color).save(buf, format="JPEG")
    return buf.getvalue()


def test_sample_transform_skips_and_counts_bad_samples():
    from training.data import ClipSampleTransform

    errors = []

    class Counter:
        def add(self, errs):
            errors.extend(errs)

    batch = {
        "__key__": np.array(["ok1", "corrupt", "nocap", "noimg", "ok2", "badutf8"], dtype=object),
        "jpg": np.array([_jpeg("red"), b"\xff\xd8 not a jpeg", _jpeg("blue"), None, None, _jpeg("red")], dtype=object),
        "png": np.array([None, None, None, None, _png("green"), None], dtype=object),
        "txt": np.array([b"a red square", b"x", b"   ", b"a cat", "a green one", b"caf\xe9"], dtype=object),
    }
    out = ClipSampleTransform(ARCH, is_train=True, counter=Counter())(batch)
    assert list(out["key"]) == ["ok1", "ok2"]
    assert out["image"].shape == (2, 3, 32, 32) and out["image"].dtype == np.float32
    assert out["text"].shape == (2, 16) and out["text"].dtype == np.int64
    assert {e[0]: e[1] for e in errors} == {"corrupt": "bad_image", "nocap": "bad_text",
                                           "noimg": "no_image", "badutf8": "bad_text"}
    import open_clip

    want = open_clip.get_tokenizer(ARCH)(["a red square"])[0].numpy()
    np.testing.assert_array_equal(out["text"][0], want)


def _png(color):
    buf = io.BytesIO()
    Image.new("RGB", (20, 20), color).save(buf, format="PNG")
    return buf.getvalue()


def test_resolve_shards_folder_pattern_and_errors(tmp_path):
    from training.data import DataError, count_samples, resolve_shards

    shards = tmp_path / "cur" / "shards"
    shards.mkdir(parents=True)
    for i in range(3):
        with tarfile.open(shards / f"{i:05d}.tar", "w"):
            pass
    (shards / "sizes.json").write_text('{"00000.tar": 4, "00001.tar": 5, "00002.tar": 6}')
    paths, fs = resolve_shards(str(tmp_path / "cur"))
    assert fs is None and [os.path.basename(p) for p in paths] == ["00000.tar", "00001.tar", "00002.tar"]
    assert count_samples(paths) == 15
    paths2, _ = resolve_shards(str(shards / "{00001..00002}.tar"))
    assert [os.path.basename(p) for p in paths2] == ["00001.tar", "00002.tar"]
    assert count_samples(paths2) == 11
    paths3, _ = resolve_shards(f"file://{shards}")
    assert len(paths3) == 3
    with pytest.raises(DataError, match="not found"):
        resolve_shards(str(tmp_path / "missing"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="no .tar shards"):
        resolve_shards(str(tmp_path / "empty"))


def test_plan_batches_and_config_errors():
    from curation.common.config import ConfigError
    from training.recipes import get_recipe
    from training.train import TrainError, build_train_config, plan_batches

    assert plan_batches(128, 32, 1, 1, 3) == {"local_batch_size": 32, "steps_per_epoch": 4, "total_steps": 12}
    assert plan_batches(130, 32, 2, 2, 1, max_steps=7) == {"local_batch_size": 8, "steps_per_epoch": 4,
                                                            "total_steps": 7}
    with pytest.raises(TrainError, match="divisible"):
        plan_batches(128, 30, 4, 1, 1)
    with pytest.raises(TrainError, match="fewer than one global batch"):
        plan_batches(10, 32, 1, 1, 1)
    cfg = build_train_config(None, ["model.arch=micro-vit-32", "train.batch_size=8"])
    assert cfg["model"]["arch"] == ARCH and cfg["train"]["batch_size"] == 8
    with pytest.raises(ConfigError, match="unknown config key"):
        build_train_config(None, ["train.batchsize=8"])
    with pytest.raises(ValueError, match="unknown recipe"):
        get_recipe({**cfg, "recipe": "nope"})
    with pytest.raises(ValueError, match="unknown open_clip architecture"):
        get_recipe({**cfg, "model": {**cfg["model"], "arch": "no-such-arch"}}).build_model()


def test_tensorboard_reads_the_training_logs(tmp_path):
    """The logs are TensorBoard's format: its own reader (the `tensorboard` extra) gets them back."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from training.loop import MetricsLogger

    logger = MetricsLogger(str(tmp_path), True, print_fn=lambda *_: None)
    for step in range(1, 4):
        logger.log(step, {"train/loss": 1.0 / step, "eval/zeroshot_acc1": 0.1 * step}, progress=False)
    logger.close()
    events = EventAccumulator(str(tmp_path / "tensorboard"))
    events.Reload()
    assert {"train/loss", "eval/zeroshot_acc1"} <= set(events.Tags()["scalars"])
    loss = events.Scalars("train/loss")
    assert [e.step for e in loss] == [1, 2, 3]
    assert [round(e.value, 4) for e in loss] == [1.0, 0.5, 0.3333]


def test_worker_lines_print_once_under_ray_trains_print_patch(capsys, monkeypatch):
    """Ray Train patches ``print`` on its workers (log + echo when stdout is wrapped, as in a
    Ray worker): a step line printed with it appeared twice; ``worker_print`` writes it once."""
    import builtins
    import io
    import logging
    import sys

    from ray.train.v2._internal.logging.patch_print import redirected_print

    from training.loop import worker_print

    wrapped = io.StringIO()
    handler = logging.StreamHandler(wrapped)  # Ray Train's workers log INFO to their stdout
    root = logging.getLogger()
    level = root.level
    root.addHandler(handler)
    root.setLevel(logging.INFO)
    monkeypatch.setattr(sys, "stdout", wrapped)  # not sys.__stdout__, as in a Ray worker
    monkeypatch.setattr(builtins, "print", redirected_print)
    try:
        print("step 4/4 (patched print)")
        worker_print("step 4/4 (worker_print)")
    finally:
        root.removeHandler(handler)
        root.setLevel(level)
    lines = wrapped.getvalue().splitlines()
    assert lines.count("step 4/4 (patched print)") == 2  # what the trainer showed before
    assert lines.count("step 4/4 (worker_print)") == 1


def test_typed_view_of_each_recipe_and_a_wrong_value_through_main():
    """training/settings.py: each recipe's YAML parses as its own typed view (its sections typed
    attributes, as_dict gives the merged config back); a wrong value is a one-line error naming
    the dotted key, exit code 2, through the real training/train.py."""
    import subprocess
    import sys

    from curation.common.config import ConfigError
    from training.settings import (DiHTConfig, HNNCEConfig, ImprovedConfig, SSLConfig, TrainConfig,
                                   ViewsConfig, as_dict, train_config)
    from training.train import build_train_config

    clip = build_train_config()
    assert type(train_config(clip)) is TrainConfig and as_dict(train_config(clip)) == clip
    diht = train_config(build_train_config("configs/train/diht_tiny.yaml"))
    assert isinstance(diht, DiHTConfig) and isinstance(diht.loss.hnnce, HNNCEConfig)
    assert diht.loss.hnnce.alpha == 1.0 and diht.loss.distill.enabled is True
    improved = train_config(build_train_config("configs/train/improved_barlip.yaml"))
    assert isinstance(improved, ImprovedConfig) and isinstance(improved.views, ViewsConfig)
    assert isinstance(improved.loss.ssl, SSLConfig) and improved.loss.ssl.name == "barlip"
    assert improved.views.image.weak.scale == (0.5, 1.0) and improved.model.sync_bn == "auto"
    with pytest.raises(ConfigError, match="loss.hnnce.alpha"):
        train_config(build_train_config("configs/train/diht_tiny.yaml", ["loss.hnnce.alpha=high"]))

    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    for args, key in ((["train.precision=fp13"], "train.precision"),
                      (["--config", "configs/train/diht_tiny.yaml", "loss.hnnce.alpha=high"], "loss.hnnce.alpha")):
        proc = subprocess.run([sys.executable, "training/train.py", *args], cwd=repo, capture_output=True,
                              text=True, timeout=300)
        assert proc.returncode == 2, proc.stderr[-2000:]
        lines = proc.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("error: ") and key in lines[0], proc.stderr


def test_eval_section_is_merged_strictly_and_checked_at_the_entry(tmp_path, monkeypatch):
    """clip.yaml's ``eval`` is merged strictly over configs/eval/default.yaml (only the loop's
    schedule keys are its own), and the entry checks the merged section with evaluate's typed view:
    a typo in a shipped YAML or a wrong eval value fails before any work, naming the key."""
    import training.train as train_mod
    from curation.common.config import ConfigError, load_yaml

    good = train_mod.default_config()
    assert good["eval"]["enabled"] is True and good["eval"]["every_n_epochs"] == 0
    assert good["eval"]["fewshot"]["enabled"] is False  # clip.yaml's value over evaluate's default
    broken = load_yaml(train_mod.DEFAULT_CONFIG)
    broken["eval"]["fewshot"] = {"enabld": True}
    path = tmp_path / "clip.yaml"
    path.write_text(__import__("yaml").safe_dump(broken))
    monkeypatch.setattr(train_mod, "DEFAULT_CONFIG", path)
    with pytest.raises(ConfigError, match="eval.fewshot.enabld"):
        train_mod.default_config()
    monkeypatch.undo()
    cfg = train_mod.build_train_config(None, ["eval.fewshot.shots=[1, 2]"])
    assert train_mod.checked_config(cfg).eval["fewshot"]["shots"] == [1, 2]
    wrong = train_mod.build_train_config(None, ["eval.fewshot.shots=[one, two]"])  # a list: merges
    with pytest.raises(ConfigError, match="eval.fewshot.shots"):
        train_mod.checked_config(wrong)
