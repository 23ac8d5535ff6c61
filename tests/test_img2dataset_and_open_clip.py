"""Real img2dataset downloads over a loopback HTTP server, curated, then trained on by open_clip."""

import functools
import http.server
import json
import os
import socketserver
import subprocess
import sys
import threading
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from curation.demo_data import make_image

from test_pipeline import assert_accounting, make_cfg

CAPTIONS = [
    "a young woman riding a brown horse on the beach",
    "two children playing with a red ball in the park",
    "a chef cutting fresh vegetables in a small kitchen",
    "a man repairing an old bicycle near the garage",
    "sunset",
    "blue wooden boat",
    "a dog sleeping on a green sofa",
    "Vintage Poster Sale",
]


class _Quiet(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args):
        pass


@pytest.fixture(scope="module")
def loopback_downloads(tmp_path_factory):
    """img2dataset output in both formats, downloaded from 127.0.0.1."""
    import random

    root = tmp_path_factory.mktemp("i2d")
    www = root / "www"
    www.mkdir()
    rng = random.Random(1)
    names = []
    for i, cap in enumerate(CAPTIONS * 2):
        name = f"img{i}.jpg"
        (www / name).write_bytes(make_image(rng, cap if i % 3 == 0 else None))
        names.append((name, cap))
    (www / "empty.jpg").write_bytes(b"")
    names += [("empty.jpg", "a cat holding a ball"), ("missing.jpg", "a bird eating a worm")]
    server = socketserver.TCPServer(("127.0.0.1", 0), functools.partial(_Quiet, directory=str(www)))
    port = server.server_address[1]
    threading.Thread(target=server.serve_forever, daemon=True).start()
    urls = root / "urls.parquet"
    pq.write_table(pa.table({"url": [f"http://127.0.0.1:{port}/{n}" for n, _ in names],
                             "caption": [c for _, c in names]}), urls)
    outs = {}
    try:
        for fmt in ("webdataset", "parquet"):
            out = root / fmt
            cmd = [str(Path(sys.executable).parent / "img2dataset"), f"--url_list={urls}",
                   "--input_format=parquet", "--url_col=url", "--caption_col=caption",
                   f"--output_format={fmt}", f"--output_folder={out}", "--processes_count=1",
                   "--thread_count=4", "--number_sample_per_shard=10", "--image_size=128",
                   "--resize_mode=keep_ratio", "--timeout=5", "--retries=0"]
            env = dict(os.environ, NO_ALBUMENTATIONS_UPDATE="1")
            subprocess.run(cmd, check=True, env=env, capture_output=True, timeout=300)
            outs[fmt] = out
    finally:
        server.shutdown()
    return outs, len(names)


@pytest.mark.parametrize("fmt", ["webdataset", "parquet"])
def test_curates_real_img2dataset_output(ray_session, loopback_downloads, tmp_path, fmt):
    outs, n_urls = loopback_downloads
    out = tmp_path / "cur"
    # any fsspec URL works for input and output; exercise the URL form on one of the two
    src, dst = (f"file://{outs[fmt]}", f"file://{out}") if fmt == "parquet" else (outs[fmt], out)
    summary = curate_quiet(make_cfg(src, dst))
    stats, samples = assert_accounting(outs[fmt], out)
    assert len(stats) == n_urls
    assert summary["funnel"]["not_downloaded"] == 2  # the empty and the missing file
    assert set(stats[stats.status == "not_downloaded"].url.str.rsplit("/", n=1).str[-1]) == {
        "empty.jpg", "missing.jpg"}
    kept_caps = set(stats[stats.status == "kept"].caption)
    assert "a young woman riding a brown horse on the beach" in kept_caps
    assert not kept_caps & {"sunset", "blue wooden boat", "Vintage Poster Sale"}
    for s in samples.values():
        assert s["txt"].decode() in kept_caps and len(s["jpg"]) > 0
        assert json.loads(s["json"])["url"].startswith("http://127.0.0.1")


def curate_quiet(cfg):
    from curation.pipeline import curate

    return curate(cfg, log=lambda *_: None)


def test_open_clip_train_runs_on_the_curated_shards(ray_session, loopback_downloads, tmp_path):
    """open_clip's reference trainer reads the shards and sizes.json as is, for one step."""
    from open_clip_train.data import get_dataset_size

    outs, _ = loopback_downloads
    out = tmp_path / "cur"
    summary = curate_quiet(make_cfg(outs["webdataset"], out))
    shards = sorted(p.name for p in (out / "shards").glob("*.tar"))
    pattern = str(out / "shards" / f"{{{shards[0][:-4]}..{shards[-1][:-4]}}}.tar")
    assert get_dataset_size(pattern) == (summary["funnel"]["kept"], len(shards))
    logs = tmp_path / "logs"
    batch = 4
    cmd = [sys.executable, "-m", "open_clip_train.main", "--train-data", pattern,
           "--dataset-type", "webdataset", "--train-num-samples", str(batch), "--batch-size", str(batch),
           "--epochs", "1", "--model", "ViT-S-32", "--workers", "0", "--device", "cpu",
           "--precision", "fp32", "--lr", "1e-4", "--warmup", "1", "--logs", str(logs),
           "--name", "one-step", "--save-frequency", "1", "--log-every-n-steps", "1", "--seed", "0"]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=600,
                         env=dict(os.environ, CUDA_VISIBLE_DEVICES=""))
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    assert (logs / "one-step" / "checkpoints" / "epoch_1.pt").exists()
    assert "Train Epoch: 0" in res.stdout + res.stderr
