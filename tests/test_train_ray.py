"""The Ray Train job end to end on small generated shards: two gloo workers, bad samples skipped,
a SIGKILLed worker process resumed from the last checkpoint with the same data order, and a model
that learns (loss falls, zero-shot accuracy on held-out images far above chance)."""

import io
import json
import os
import random
import signal
import tarfile
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

COLORS = {"red": (220, 30, 30), "green": (30, 200, 40), "blue": (30, 40, 220), "yellow": (230, 220, 30)}
ARCH = "micro-vit-32"


def color_image(rng: random.Random, rgb) -> bytes:
    """A noisy image dominated by one colour, with a random grey patch."""
    w, h = rng.choice([40, 48, 56]), rng.choice([40, 48])
    arr = np.clip(np.array(rgb)[None, None, :] + np.array(
        [[[rng.gauss(0, 25) for _ in range(3)] for _ in range(w)] for _ in range(h)]), 0, 255)
    img = Image.fromarray(arr.astype(np.uint8))
    x, y = rng.randrange(w // 2), rng.randrange(h // 2)
    g = rng.randrange(80, 180)
    img.paste((g, g, g), (x, y, x + w // 4, y + h // 4))
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=90)
    return buf.getvalue()


def caption(rng: random.Random, color: str) -> str:
    return rng.choice(["a photo of a {} thing", "a {} object", "something {}", "{} colour"]).format(color)


def _add(tar, name, data: bytes):
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tar.addfile(info, io.BytesIO(data))


def write_color_shards(folder, num_shards=2, per_shard=40, seed=0):
    """Curated-format shards (jpg/txt/json + sizes.json) with two bad samples in shard 0."""
    rng = random.Random(seed)
    shards = folder / "shards"
    shards.mkdir(parents=True)
    sizes = {}
    for s in range(num_shards):
        with tarfile.open(shards / f"{s:05d}.tar", "w") as tar:
            for j in range(per_shard):
                key = f"{s:05d}{j:04d}"
                color = rng.choice(sorted(COLORS))
                img, txt = color_image(rng, COLORS[color]), caption(rng, color).encode()
                if s == 0 and j == 3:
                    img = b"\xff\xd8\xff this is not a jpeg"
                if s == 0 and j == 7:
                    txt = b"  "
                _add(tar, f"{key}.jpg", img)
                _add(tar, f"{key}.txt", txt)
                _add(tar, f"{key}.json", json.dumps({"key": key}).encode())
        sizes[f"{s:05d}.tar"] = per_shard
    (shards / "sizes.json").write_text(json.dumps(sizes))
    return str(folder)


def zero_shot_accuracy(model, preprocess, tokenizer, n_per_class=12, seed=123) -> float:
    rng = random.Random(seed)
    names = sorted(COLORS)
    with torch.no_grad():
        classes = model.encode_text(tokenizer([f"a photo of a {c} thing" for c in names]), normalize=True)
        correct = total = 0
        for label, c in enumerate(names):
            imgs = torch.stack([preprocess(Image.open(io.BytesIO(color_image(rng, COLORS[c]))))
                                for _ in range(n_per_class)])
            pred = (model.encode_image(imgs, normalize=True) @ classes.T).argmax(dim=1)
            correct += int((pred == label).sum())
            total += n_per_class
    return correct / total


def read_jsonl(path):
    return [json.loads(line) for line in open(path)]


@pytest.fixture(scope="module")
def color_data(tmp_path_factory):
    # 82 samples, 2 bad: 80 usable = 2 workers x 5 full batches of 8, so an epoch is every usable
    # sample exactly once
    return write_color_shards(tmp_path_factory.mktemp("colors"), per_shard=41)


def usable_keys(num_shards=2, per_shard=41) -> set:
    return {f"{s:05d}{j:04d}" for s in range(num_shards) for j in range(per_shard)} - {"000000003", "000000007"}


def run_cfg(data, storage, name, *extra, config_file=None):
    from training.train import build_train_config

    return build_train_config(config_file, [
        f"data.train={data}", f"run.storage_path={storage}", f"run.name={name}",
        f"model.arch={ARCH}", "scaling.num_workers=2", "scaling.cpus_per_worker=0.5",
        "scaling.use_gpu=false", "data.num_cpus=0.5", "data.map_batch_size=16",
        "data.shuffle_buffer=32", "train.batch_size=16", "train.lr=0.005", "train.warmup_steps=3",
        "train.weight_decay=0.0", "train.log_every_steps=1", "eval.enabled=false", *extra])


def kill_when_paused(marker: Path, timeout: float = 600, delay: float = 0.2) -> dict:
    """A thread that SIGKILLs the worker process whose pid ``marker`` holds, once it appears
    (``delay`` s later)."""
    out: dict = {}

    def run():
        deadline = time.time() + timeout
        while time.time() < deadline and not marker.exists():
            time.sleep(0.05)
        time.sleep(delay)
        while not marker.read_text().strip():  # created, pid not written yet
            time.sleep(0.01)
        out["pid"] = int(marker.read_text())
        os.kill(out["pid"], signal.SIGKILL)

    out["thread"] = threading.Thread(target=run, daemon=True)
    out["thread"].start()
    return out


def attempts(rows: list[dict]) -> list[list[dict]]:
    """Key-log rows grouped by worker process, in order of appearance."""
    pids = list(dict.fromkeys(r["pid"] for r in rows))
    return [[r for r in rows if r["pid"] == p] for p in pids]


AWS_VARS = ("AWS_ENDPOINT_URL", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_DEFAULT_REGION",
            "AWS_REGION")


@pytest.fixture
def fresh_fsspec_conf(monkeypatch):
    """The driver's fsspec defaults as they were before the test (the job sets them)."""
    import fsspec

    monkeypatch.setattr(fsspec.config, "conf", {k: dict(v) for k, v in fsspec.config.conf.items()})


def test_fsspec_options_from_env_and_storage_options():
    from curation.common.storage import Storage
    from training.data import fsspec_options

    storage = Storage(env={"AWS_ENDPOINT_URL": "http://127.0.0.1:1", "AWS_ACCESS_KEY_ID": "k",
                           "AWS_SECRET_ACCESS_KEY": "s", "AWS_REGION": "eu-west-1"},
                      options={"secret": "s2", "client_kwargs": {"verify": False}})
    assert fsspec_options("s3://b/x", storage) == {
        "endpoint_url": "http://127.0.0.1:1", "key": "k", "secret": "s2",
        "client_kwargs": {"region_name": "eu-west-1", "verify": False}}
    assert fsspec_options("/local/path", storage) == {} == fsspec_options("s3://b/x", None)


def test_bucket_run_resumes_after_sigkill_learns_and_restarts(ray_session, s3_server, color_data,
                                                             fresh_fsspec_conf, tmp_path, monkeypatch):
    """The Ray Train job on a real S3 server (SeaweedFS): shards, checkpoints and logs in a bucket,
    two gloo workers.

    1. Configured by a ``storage_options`` block only (no AWS variables anywhere). A real SIGKILL
       of the rank-0 worker process right after the step-12 checkpoint is uploaded and marked
       complete, before Ray Train's controller has (usually) recorded it; mid-epoch (epoch 2 =
       steps 11..15; checkpoints every 4 steps). The restarted worker group finds the step-12
       checkpoint itself (its completeness marker), not Ray's previous one at step 8, replays
       epoch 2's first two batches without training and continues with exactly the samples the
       killed run would have trained on; the model learns.
    2. Restarted as a new job with the same run name, configured by the standard AWS variables
       only: it resumes from the bucket's last checkpoint."""
    import open_clip
    import psutil

    from training.model import register_model_configs
    from training.train import train

    register_model_configs()  # the tiny architectures in configs/models/
    for var in AWS_VARS:
        monkeypatch.delenv(var, raising=False)
    bucket = s3_server.new_bucket("train")
    s3_server.upload(color_data, f"s3://{bucket}/cat")
    data, runs = f"s3://{bucket}/cat", f"s3://{bucket}/runs"
    monkeypatch.chdir(tmp_path)  # a stray os.makedirs("s3://...") would show up here
    user_config = tmp_path / "bucket.yaml"
    user_config.write_text(json.dumps({"storage_options": s3_server.storage_options}))  # YAML

    debug = tmp_path / "debug"
    cfg = run_cfg(data, runs, "colors", "train.max_steps=30", "train.checkpoint_every_steps=4",
                  "debug.pause_at_step=12", f"debug.dir={debug}", "debug.log_keys=true",
                  "run.max_failures=1", config_file=str(user_config))
    killer = kill_when_paused(debug / "paused-at-12-rank0", delay=0.0)
    summary = train(cfg, log=lambda *_: None)
    killer["thread"].join(5)

    assert summary["metrics"]["step"] == 30
    assert summary["plan"] == {"num_samples": 82, "steps_per_epoch": 5, "total_steps": 30, "local_batch_size": 8}
    assert summary["log_dir"] == f"{runs}/colors"
    assert len(summary["metrics"]["worker_nodes"]) == 2  # one Ray node id per rank (one node here)
    assert summary["checkpoint"].startswith(f"{runs}/colors/checkpoint_")
    # the process killed was the rank-0 training worker of the first attempt, and it is gone
    first_pid = attempts(read_jsonl(debug / "keys-rank0.jsonl"))[0][0]["pid"]
    assert killer["pid"] == first_pid and not psutil.pid_exists(first_pid)
    fs = s3_server.filesystem()
    run_dir = f"{bucket}/runs/colors"

    def logged_steps():
        fs.invalidate_cache()
        rows = [json.loads(line) for line in fs.cat(f"{run_dir}/metrics.jsonl").decode().splitlines()]
        return [r for r in rows if "train/loss" in r]

    # first attempt logged 1..12 and was killed; the retry resumed from the step-12 checkpoint
    assert [r["step"] for r in logged_steps()] == list(range(1, 13)) + list(range(13, 31))
    markers = [p.split("/")[-2] for p in fs.glob(f"{run_dir}/checkpoint_step_*/checkpoint_complete.json")]
    assert "checkpoint_step_0000000012" in markers
    assert fs.ls(f"{run_dir}/tensorboard")
    assert json.loads(fs.cat(f"{run_dir}/summary.json"))["metrics"]["step"] == 30

    usable = usable_keys()
    epoch2: list = []
    for rank in (0, 1):
        first, second = attempts(read_jsonl(debug / f"keys-rank{rank}.jsonl"))
        a1 = {r["step"]: r["keys"] for r in first}
        assert sorted(a1) == list(range(1, 13)) and not any(r["skipped"] for r in first)
        # the retry replayed epoch 2 up to the checkpoint: the same batches as the killed run ...
        replayed = [(r["step"], r["keys"]) for r in second if r["skipped"]]
        assert replayed == [(11, a1[11]), (12, a1[12])]
        trained = {r["step"]: r["keys"] for r in second if not r["skipped"]}
        assert sorted(trained) == list(range(13, 31))
        epoch2 += a1[11] + a1[12] + trained[13] + trained[14] + trained[15]
        assert {k for s in range(1, 6) for k in a1[s]} <= usable
    # the interrupted epoch saw every usable sample exactly once, over both attempts, both
    # workers reading the bucket's shards
    assert len(epoch2) == 80 and set(epoch2) == usable

    # the corrupt image and the empty caption were skipped (once per epoch), not fatal
    skipped = summary["skipped_samples"]
    assert skipped["unique_keys"] == 2
    assert set(skipped["by_reason"]) == {"bad_image", "bad_text"}

    # it learned: loss falls and zero-shot colour classification of unseen images is far above
    # 1/4, with the weights from the bucket loaded by open_clip
    losses = [r["train/loss"] for r in logged_steps()]
    assert np.mean(losses[-5:]) < np.mean(losses[:3]) - 0.3
    ckpt = summary["checkpoint"].removeprefix("s3://")
    meta = json.loads(fs.cat(f"{ckpt}/meta.json"))
    assert meta["step"] == 30 and meta["arch"] == ARCH
    local = tmp_path / "ckpt.pt"
    fs.get_file(f"{ckpt}/open_clip.pt", str(local))
    model, _, preprocess = open_clip.create_model_and_transforms(ARCH, pretrained=str(local))
    model.eval()
    acc = zero_shot_accuracy(model, preprocess, open_clip.get_tokenizer(ARCH))
    assert acc >= 0.6, acc

    # 2. a new job with the same run name, configured by the AWS variables only
    import fsspec

    monkeypatch.setattr(fsspec.config, "conf", {})
    for k, v in s3_server.env.items():
        monkeypatch.setenv(k, v)
    again = train(run_cfg(data, runs, "colors", "train.max_steps=32", "train.checkpoint_every_steps=4"),
                  log=lambda *_: None)
    assert again["metrics"]["step"] == 32
    assert [r["step"] for r in logged_steps()] == list(range(1, 33))  # resumed at 30
    meta = json.loads(fs.cat(f"{again['checkpoint'].removeprefix('s3://')}/meta.json"))
    assert meta["step"] == 32 and meta["epoch"] == 6 and meta["epoch_step"] == 2

    # nothing went to a local folder named after the URL
    assert not any(p.name.startswith("s3") for p in Path(tmp_path).iterdir()), os.listdir(tmp_path)
    assert not Path("outputs").exists()
