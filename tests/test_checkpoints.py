"""Trainer checkpoints: what open_clip.pt holds per recipe, evaluating exactly the trained model
(also from s3://), fine-tuning with open_clip_train --pretrained, and refusing unsafe pickles.

The checkpoints are written by the project's own ``save_checkpoint`` from a real recipe model
(CLIP 🚀 on ``micro-vit-32``) and the "end-of-training" numbers come from the trainer's own
``training.loop.run_eval``; no long training.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

ARCH = "micro-vit-32"
EVAL = ["eval.datasets=[digits]", "eval.max_samples=120", "eval.linear_probe.enabled=false",
        "eval.fewshot.enabled=false"]
AWS = ("AWS_ENDPOINT_URL", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_DEFAULT_REGION", "AWS_REGION")


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _job():
    import importlib.util

    from curation.common.config import REPO_ROOT

    spec = importlib.util.spec_from_file_location("evaluate_job", REPO_ROOT / "pipelines" / "evaluate.py")
    job = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(job)
    return job


def _strip(results: dict) -> dict:
    return {ds: {k: v for k, v in r.items() if k != "elapsed_s"} for ds, r in results.items()}


def _rocket(arch=ARCH):
    from training.loop import TrainModule
    from training.recipe_improved import ImprovedRecipe, improved_config

    cfg = improved_config("configs/train/presets/tiny_cpu.yaml", overrides=[
        f"model.arch={arch}", "model.improved.mlp_hidden_dim=32", "model.improved.proj_dim=48", *EVAL])
    recipe = ImprovedRecipe(cfg)
    torch.manual_seed(0)
    model = recipe.build_model()
    size, ctx = (32, 16) if arch == ARCH else (64, 24)
    with torch.no_grad():  # move the strong projectors' BatchNorm statistics off their init
        model.train()
        for seed in range(2):
            g = torch.Generator().manual_seed(seed)
            model(torch.randn(8, 3, size, size, generator=g), torch.randint(1, 400, (8, ctx), generator=g),
                  torch.randn(8, 2, 3, size, size, generator=g), torch.randint(1, 400, (8, 2, ctx), generator=g))
        model.log_scale.fill_(2.9)
    return recipe, model, TrainModule(model, recipe.build_loss(model)), cfg


@pytest.fixture(scope="module")
def rocket_checkpoint(tmp_path_factory):
    """A CLIP 🚀 checkpoint folder and the trainer's own evaluation of the model in it."""
    from training.checkpoint import save_checkpoint
    from training.loop import run_eval

    recipe, model, module, cfg = _rocket()
    folder = tmp_path_factory.mktemp("rocket") / "checkpoint_000001"
    save_checkpoint(folder, module=module, clip=model.clip, arch=ARCH, recipe="improved", step=1, epoch=1)
    trainer_results = run_eval(recipe, module, cfg["eval"], torch.device("cpu"), log=lambda *_: None)
    return folder, trainer_results, recipe, model


def _evaluate(job, checkpoint, out, *extra):
    assert job.main([str(checkpoint), *EVAL, f"eval.output={out}", *extra]) == 0
    return json.loads(Path(out).read_text())["results"]


# --- item 5: evaluate.py evaluates the model that was trained ------------------------------------------------

def test_evaluate_reproduces_the_trainers_evaluation_of_clip_rocket(rocket_checkpoint, tmp_path):
    folder, trainer_results, _, _ = rocket_checkpoint
    got = _evaluate(_job(), folder, tmp_path / "res.json")
    names = {"weak", "strong", *(f"ensemble_w{w / 10:g}" for w in range(1, 10))}
    assert set(got["digits"]["zeroshot"]) == names
    assert _strip(got) == _strip(trainer_results)  # exactly the end-of-training numbers
    assert got["digits"]["zeroshot"]["weak"] != got["digits"]["zeroshot"]["strong"]


@pytest.mark.parametrize("recipe_name", ["clip", "diht"])
def test_evaluate_reproduces_the_trainers_evaluation_of_plain_recipes(recipe_name, tmp_path):
    from training.checkpoint import read_meta, save_checkpoint
    from training.loop import TrainModule, run_eval
    from training.recipes import get_recipe
    from training.train import build_train_config

    config = None if recipe_name == "clip" else "configs/train/diht_tiny.yaml"
    extra = ["loss.distill.enabled=false"] if recipe_name == "diht" else []  # HN-NCE, no labels needed
    cfg = build_train_config(config, [f"model.arch={ARCH}", *extra, *EVAL])
    recipe = get_recipe(cfg)
    torch.manual_seed(1)
    model = recipe.build_model()
    module = TrainModule(model, recipe.build_loss(model))
    save_checkpoint(tmp_path, module=module, clip=model.clip, arch=ARCH, recipe=recipe_name, step=1, epoch=1)
    assert read_meta(tmp_path)["open_clip"]["arch"] == ARCH and read_meta(tmp_path)["recipe"] == recipe_name
    want = run_eval(recipe, module, cfg["eval"], torch.device("cpu"), log=lambda *_: None)
    got = _evaluate(_job(), tmp_path, tmp_path / "res.json")
    assert set(got["digits"]["zeroshot"]) == {"clip"}
    assert _strip(got) == _strip(want)
    # the open_clip file is that same model here
    assert _strip(_evaluate(_job(), tmp_path, tmp_path / "oc.json", "--open-clip")) == _strip(want)


@pytest.mark.parametrize("arch", [ARCH, "tiny-rn-64"])  # ViT proj parameter / ResNet attnpool c_proj
def test_open_clip_file_is_the_weak_embedding(arch, tmp_path):
    import open_clip

    from training.checkpoint import load_open_clip, read_meta, save_checkpoint

    recipe, model, module, _ = _rocket(arch)
    save_checkpoint(tmp_path, module=module, clip=model.clip, arch=arch, recipe="improved", step=1, epoch=1)
    entry = read_meta(tmp_path)["open_clip"]
    assert entry["arch"] == f"{arch}-clip-rocket-weak" and entry["folded"] is True
    assert json.loads((tmp_path / entry["config"]).read_text())["embed_dim"] == 48
    # what the README tells open_clip users to do
    open_clip.add_model_config(tmp_path / entry["config"])
    oc, _, preprocess = open_clip.create_model_and_transforms(entry["arch"], pretrained=str(tmp_path / "open_clip.pt"))
    oc.eval()
    embedder = recipe.embedder(model)
    size = 32 if arch == ARCH else 64
    images = torch.randn(4, 3, size, size, generator=torch.Generator().manual_seed(5))
    tokens = open_clip.get_tokenizer(entry["arch"])(["a red square", "a photo of a dog", "two cats"])
    with torch.no_grad():
        torch.testing.assert_close(oc.encode_image(images, normalize=True), embedder.encode_image(images)["weak"],
                                   rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(oc.encode_text(tokens, normalize=True), embedder.encode_text(tokens)["weak"],
                                   rtol=1e-5, atol=1e-5)
        assert oc.logit_scale.exp().item() == pytest.approx(model.logit_scale().item())
    assert load_open_clip(tmp_path)[0].state_dict().keys() == oc.state_dict().keys()


def test_open_clip_flag_evaluates_the_folded_weak_model(rocket_checkpoint, tmp_path):
    folder, trainer_results, _, _ = rocket_checkpoint
    got = _evaluate(_job(), folder, tmp_path / "oc.json", "--open-clip")
    assert set(got["digits"]["zeroshot"]) == {"clip"}
    weak = trainer_results["digits"]["zeroshot"]["weak"]
    for key in ("acc1", "acc5"):  # the same embedding up to float rounding
        assert abs(got["digits"]["zeroshot"]["clip"][key] - weak[key]) <= 1 / 120 + 1e-9


# --- item 6: open_clip_train fine-tunes from open_clip.pt (--pretrained) ---------------------------------

def test_open_clip_train_pretrained_starts_from_the_checkpoint(rocket_checkpoint, tmp_path):
    import io

    import webdataset as wds
    from PIL import Image

    from training.checkpoint import read_meta

    folder, _, _, _ = rocket_checkpoint
    entry = read_meta(folder)["open_clip"]
    shard = tmp_path / "train.tar"
    with wds.TarWriter(str(shard)) as sink:
        for i in range(4):
            buf = io.BytesIO()
            Image.new("RGB", (40, 30), (60 * i, 20, 200 - 40 * i)).save(buf, format="JPEG")
            sink.write({"__key__": f"{i:05d}", "jpg": buf.getvalue(), "txt": f"a square of colour {i}".encode()})
    wrapper = ("import sys, open_clip; open_clip.add_model_config(sys.argv.pop(1)); "
               "from open_clip_train.main import main; main(sys.argv[1:])")
    cmd = [sys.executable, "-c", wrapper, str(folder / entry["config"]),
           "--train-data", str(shard), "--dataset-type", "webdataset", "--train-num-samples", "4",
           "--batch-size", "4", "--epochs", "1", "--model", entry["arch"], "--pretrained",
           str(folder / "open_clip.pt"), "--workers", "0", "--device", "cpu", "--precision", "fp32",
           "--lr", "0", "--wd", "0", "--warmup", "1", "--logs", str(tmp_path / "logs"), "--name", "ft",
           "--save-frequency", "1", "--seed", "0"]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=600,
                         env=dict(os.environ, CUDA_VISIBLE_DEVICES=""))
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    saved = torch.load(tmp_path / "logs" / "ft" / "checkpoints" / "epoch_1.pt", map_location="cpu",
                       weights_only=True)["state_dict"]
    ours = torch.load(folder / "open_clip.pt", map_location="cpu", weights_only=True)["state_dict"]
    assert saved.keys() == ours.keys()
    for k in ours:  # lr 0: one real step leaves exactly the loaded weights
        assert torch.equal(saved[k], ours[k]), k


# --- item 7: untrusted files are never unpickled ----------------------------------------------------------

class _Exploit:
    """Unpickling this creates a marker file (stands in for arbitrary code)."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def test_crafted_pickles_are_refused_not_executed(rocket_checkpoint, tmp_path, capsys):
    import shutil

    from training.checkpoint import UnsafeCheckpointError, load_open_clip, load_train_state
    from training.concepts import TeacherError, load_state_dict_file

    folder, _, _, model = rocket_checkpoint
    evil = tmp_path / "evil"
    shutil.copytree(folder, evil)
    marker = tmp_path / "pwned"
    torch.save({"module": _Exploit(marker), "step": 1, "epoch": 1}, evil / "train_state.pt")
    torch.save({"epoch": 1, "name": "x", "state_dict": {"w": _Exploit(marker)}}, evil / "open_clip.pt")
    from training.loop import TrainModule

    with pytest.raises(UnsafeCheckpointError, match="refusing to load .*train_state.pt"):
        load_train_state(evil, module=TrainModule(model, None))
    with pytest.raises(UnsafeCheckpointError, match="refusing to load .*open_clip.pt"):
        load_open_clip(evil)
    job = _job()
    assert job.main([str(evil), *EVAL, f"eval.output={tmp_path / 'x.json'}"]) == 1
    assert "refusing to load" in capsys.readouterr().err
    assert job.main([str(evil), "--open-clip", *EVAL, f"eval.output={tmp_path / 'x.json'}"]) == 1
    assert "refusing to load" in capsys.readouterr().err
    with pytest.raises(TeacherError, match="refusing to load .*open_clip.pt"):
        load_state_dict_file(str(evil / "open_clip.pt"))
    assert not marker.exists()


# --- issue 12: checkpoints and eval.wds on s3:// ---------------------------------------------------------

def test_evaluate_from_s3_equals_local(rocket_checkpoint, s3_env, tmp_path):
    from test_evaluate import write_wds

    folder, trainer_results, _, _ = rocket_checkpoint
    bucket = s3_env.new_bucket("ckpt")
    url = f"s3://{bucket}/runs/rocket/checkpoint_000001"
    s3_env.upload(folder, url)
    wds_local = write_wds(tmp_path / "wds", broken=False)
    s3_env.upload(wds_local, f"s3://{bucket}/wds/tiny")
    job = _job()
    local = _evaluate(job, folder, tmp_path / "local.json", "eval.datasets=[digits, tiny]",
                      f"eval.wds.tiny={wds_local}")
    remote = _evaluate(job, url, tmp_path / "remote.json", "eval.datasets=[digits, tiny]",
                       f"eval.wds.tiny=s3://{bucket}/wds/tiny")
    assert _strip(remote) == _strip(local)
    assert _strip(remote)["digits"] == _strip(trainer_results)["digits"]
    assert remote["tiny"]["num_test"] == 12 and set(remote["tiny"]["zeroshot"]) >= {"weak", "strong"}
    # open_clip.pt by URL: its architecture and model config come from the folder on S3
    by_file = _evaluate(job, f"{url}/open_clip.pt", tmp_path / "file.json")
    assert _strip(by_file) == _strip(_evaluate(job, folder, tmp_path / "lf.json", "--open-clip"))


def test_evaluate_from_s3_with_storage_options_only(rocket_checkpoint, s3_server, tmp_path, monkeypatch):
    import fsspec
    import yaml

    for k in AWS:
        monkeypatch.delenv(k, raising=False)
    monkeypatch.setitem(fsspec.config.conf, "s3", {})
    monkeypatch.setitem(fsspec.config.conf, "s3a", {})
    folder, trainer_results, _, _ = rocket_checkpoint
    bucket = s3_server.new_bucket("opts")
    url = f"s3://{bucket}/checkpoint_000001"
    s3_server.upload(folder, url)
    config = tmp_path / "eval.yaml"
    config.write_text(yaml.safe_dump({"storage_options": s3_server.storage_options}))
    got = _evaluate(_job(), url, tmp_path / "r.json", "--config", str(config))
    assert _strip(got) == _strip(trainer_results)


# --- which checkpoint a restarted run resumes from ---------------------------------------------------------

class _RayCheckpoint:
    """What ``ray.train.get_checkpoint()`` returns, as far as resume_dir uses it."""

    def __init__(self, folder):
        self.folder = folder

    def as_directory(self):
        import contextlib

        return contextlib.nullcontext(str(self.folder))


def _fake_checkpoint(run: Path, step: int, complete: bool) -> Path:
    from training.checkpoint import checkpoint_dir_name, mark_complete

    folder = run / checkpoint_dir_name(step)
    folder.mkdir(parents=True)
    (folder / "meta.json").write_text(json.dumps({"step": step, "epoch": step // 5, "epoch_step": step % 5}))
    (folder / "train_state.pt").write_bytes(b"x" * step)
    if complete:
        mark_complete(str(run), step, step // 5)
    return folder


def test_resume_takes_the_newest_complete_checkpoint(tmp_path):
    """Ray Train recorded step 8; step 12 was uploaded and marked complete (then the worker was
    killed before Ray recorded it); step 16 was cut off mid-upload (no marker). Resume takes 12."""
    from training.checkpoint import newest_complete
    from training.loop import resume_dir

    run = tmp_path / "run"
    assert newest_complete(str(run)) is None
    with resume_dir(None, str(run)) as d:
        assert d is None  # a fresh start
    c8 = _fake_checkpoint(run, 8, complete=True)
    _fake_checkpoint(run, 12, complete=True)
    _fake_checkpoint(run, 16, complete=False)
    (run / "checkpoint_step_0000000020").mkdir()  # an empty folder, no marker
    folder, step = newest_complete(str(run))
    assert step == 12 and folder.endswith("checkpoint_step_0000000012")
    with resume_dir(_RayCheckpoint(c8), str(run)) as d:
        assert json.loads((Path(d) / "meta.json").read_text())["step"] == 12
        assert (Path(d) / "train_state.pt").read_bytes() == b"x" * 12
    # Ray's own record wins when it is as new (no copy) or newer
    c24 = _fake_checkpoint(run, 24, complete=False)
    with resume_dir(_RayCheckpoint(c24), str(run)) as d:
        assert d == str(c24)
    # a corrupt marker does not count
    (run / "checkpoint_step_0000000016" / "checkpoint_complete.json").write_text("{not json")
    assert newest_complete(str(run))[1] == 12


def test_newest_complete_on_s3(s3_env, tmp_path):
    from training.checkpoint import fetch_dir, mark_complete, newest_complete

    from training.data import url_to_fs

    run = f"s3://{s3_env.new_bucket('resume')}/runs/run"
    fs, _ = url_to_fs(run)
    for step in (4, 8):
        fs.pipe_file(f"{run[5:]}/checkpoint_step_{step:010d}/meta.json", json.dumps({"step": step}).encode())
    mark_complete(run, 4, 0)
    assert newest_complete(run) == (f"{run}/checkpoint_step_0000000004", 4)
    mark_complete(run, 8, 1)
    folder, step = newest_complete(run)
    assert step == 8
    local = fetch_dir(folder, tmp_path / "got")
    assert json.loads((local / "meta.json").read_text()) == {"step": 8}
    assert json.loads((local / "checkpoint_complete.json").read_text()) == {"step": 8, "epoch": 1}
