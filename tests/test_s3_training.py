"""Training on object storage, end to end on a real S3 server (SeaweedFS on 127.0.0.1): curated
shards in a bucket, two Ray Train workers, checkpoints and logs in the bucket, and a second run
with the same name that resumes from the bucket's last checkpoint. The first run is configured
by a ``storage_options`` block only (no AWS variables anywhere), the second by the standard AWS
variables only."""

import json
import os
from pathlib import Path

import fsspec
import pytest

from test_train_ray import ARCH, read_jsonl, usable_keys, write_color_shards

AWS_VARS = ("AWS_ENDPOINT_URL", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_DEFAULT_REGION",
            "AWS_REGION")


def s3_cfg(data, storage, name, *extra, config_file=None):
    from training.train import build_train_config

    return build_train_config(config_file, [
        f"data.train={data}", f"run.storage_path={storage}", f"run.name={name}",
        f"model.arch={ARCH}", "scaling.num_workers=2", "scaling.cpus_per_worker=0.5",
        "scaling.use_gpu=false", "data.num_cpus=0.5", "data.map_batch_size=16",
        "data.shuffle_buffer=32", "train.batch_size=16", "train.warmup_steps=1",
        "train.log_every_steps=1", "train.checkpoint_every_steps=3", "eval.enabled=false", *extra])


@pytest.fixture
def fresh_fsspec_conf(monkeypatch):
    """The driver's fsspec defaults as they were before the test (the job sets them)."""
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


def test_train_from_bucket_checkpoints_in_bucket_and_resume(ray_session, s3_server, fresh_fsspec_conf,
                                                           tmp_path, monkeypatch):
    from training.model import register_model_configs
    from training.train import train

    register_model_configs()
    server = s3_server
    for var in AWS_VARS:
        monkeypatch.delenv(var, raising=False)
    bucket = server.new_bucket("train")
    write_color_shards(tmp_path / "curated", per_shard=41)
    server.upload(tmp_path / "curated", f"s3://{bucket}/cat")
    data, runs = f"s3://{bucket}/cat", f"s3://{bucket}/runs"
    monkeypatch.chdir(tmp_path)  # a stray os.makedirs("s3://...") would show up here

    # 1. configured by a storage_options block (a YAML config file) only
    user_config = tmp_path / "bucket.yaml"
    user_config.write_text(json.dumps({"storage_options": server.storage_options}))  # YAML
    debug = tmp_path / "debug"
    first = train(s3_cfg(data, runs, "bucket-run", "train.max_steps=6", f"debug.dir={debug}",
                         "debug.log_keys=true", config_file=str(user_config)), log=lambda *_: None)
    assert first["metrics"]["step"] == 6
    assert first["plan"] == {"num_samples": 82, "steps_per_epoch": 5, "total_steps": 6, "local_batch_size": 8}
    assert first["log_dir"] == f"{runs}/bucket-run"
    assert len(first["metrics"]["worker_nodes"]) == 2  # one Ray node id per rank (one node here)
    assert first["checkpoint"].startswith(f"{runs}/bucket-run/checkpoint_")
    # both workers read the bucket's shards: epoch 0 was every usable sample exactly once
    epoch0 = [k for rank in (0, 1) for r in read_jsonl(debug / f"keys-rank{rank}.jsonl")
              if r["epoch"] == 0 for k in r["keys"]]
    assert len(epoch0) == 80 and set(epoch0) == usable_keys()

    fs = server.filesystem()
    run_dir = f"{bucket}/runs/bucket-run"
    ckpts = sorted(p.rsplit("/", 1)[1] for p in fs.ls(run_dir)
                   if "/checkpoint_" in p and not p.endswith(".json"))  # not Ray's manager snapshot
    assert len(ckpts) == 2  # steps 3 and 6 (run.num_to_keep=2)
    meta = json.loads(fs.cat(f"{run_dir}/{ckpts[-1]}/meta.json"))
    assert meta["step"] == 6 and meta["arch"] == ARCH
    rows = [json.loads(line) for line in fs.cat(f"{run_dir}/metrics.jsonl").decode().splitlines()]
    assert [r["step"] for r in rows if "train/loss" in r] == [1, 2, 3, 4, 5, 6]
    assert json.loads(fs.cat(f"{run_dir}/summary.json"))["metrics"]["step"] == 6
    assert fs.ls(f"{run_dir}/tensorboard")

    # 2. restarted with the same run name, configured by the AWS variables only
    monkeypatch.setattr(fsspec.config, "conf", {})
    for k, v in server.env.items():
        monkeypatch.setenv(k, v)
    again = train(s3_cfg(data, runs, "bucket-run", "train.max_steps=8"), log=lambda *_: None)
    assert again["metrics"]["step"] == 8
    rows = [json.loads(line) for line in fs.cat(f"{run_dir}/metrics.jsonl").decode().splitlines()]
    assert [r["step"] for r in rows if "train/loss" in r] == [1, 2, 3, 4, 5, 6, 7, 8]  # resumed at 6
    meta = json.loads(fs.cat(f"{again['checkpoint'].removeprefix('s3://')}/meta.json"))
    assert meta["step"] == 8 and meta["epoch"] == 1 and meta["epoch_step"] == 3

    # the weights in the bucket load with open_clip
    import open_clip

    local = tmp_path / "ckpt.pt"
    fs.get_file(f"{again['checkpoint'].removeprefix('s3://')}/open_clip.pt", str(local))
    model, _, _ = open_clip.create_model_and_transforms(ARCH, pretrained=str(local))
    assert sum(p.numel() for p in model.parameters()) > 0

    # nothing went to a local folder named after the URL
    assert not any(p.name.startswith("s3") for p in Path(tmp_path).iterdir()), os.listdir(tmp_path)
    assert not Path("outputs").exists()
