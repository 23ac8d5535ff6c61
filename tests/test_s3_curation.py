"""The curation job on object storage: img2dataset output in a bucket -> shards, stats, summary and
report in a bucket, on a real S3 server (SeaweedFS), compared with the same run on local disk."""

import io
import json
import tarfile

import pandas as pd
import pyarrow.parquet as pq
import pytest

from curation.common.config import CONFIG_DIR, build_config
from curation.pipeline import curate


def _cfg(inp, out, *extra):
    return build_config(CONFIG_DIR / "curation" / "cat_filter.yaml",
                        overrides=[f"input={inp}", f"output={out}", "progress=false",
                                   "filters.text_spotting.enabled=false", *extra])


def _bucket_stats(fs, url) -> pd.DataFrame:
    root = url.removeprefix("s3://")
    frames = []
    for p in sorted(fs.glob(f"{root}/stats/*.parquet")):
        frames.append(pq.read_table(io.BytesIO(fs.cat(p))).to_pandas())
    return pd.concat(frames).sort_values("key").reset_index(drop=True)


def _bucket_samples(fs, url) -> dict:
    """key -> {extension: bytes} of every sample in the bucket's curated tars."""
    root = url.removeprefix("s3://")
    samples = {}
    for p in sorted(fs.glob(f"{root}/shards/*.tar")):
        with tarfile.open(fileobj=io.BytesIO(fs.cat(p))) as tar:
            for m in tar:
                key, ext = m.name.split(".", 1)
                assert ext not in samples.setdefault(key, {}), f"{m.name} twice"
                samples[key][ext] = tar.extractfile(m).read()
    return samples


@pytest.mark.timeout(600)
def test_curation_bucket_to_bucket_equals_local_run(clean_run, s3_env, tmp_path):
    """AWS_* variables set only in the driver's environment (the session's Ray workers started
    before them) still reach the readers and writers: the job ships its storage settings. The
    local run is the session's ``clean_run`` (the same settings on local disk)."""
    local_in, local_out, local = clean_run
    bucket = s3_env.new_bucket("cat")
    s3_env.upload(local_in, f"s3://{bucket}/laion")
    fs = s3_env.filesystem()

    out_url = f"s3://{bucket}/curated"
    remote = curate(_cfg(f"s3://{bucket}/laion", out_url), log=lambda *_: None)

    assert remote["funnel"] == local["funnel"] and remote["funnel"]["input"] == 200
    assert remote["shards"] == {"input": 8, "committed": 8, "failed": {}}
    local_stats = pd.read_parquet(local_out / "stats").sort_values("key").reset_index(drop=True)
    remote_stats = _bucket_stats(fs, out_url)
    pd.testing.assert_frame_equal(local_stats, remote_stats)
    samples = _bucket_samples(fs, out_url)
    assert set(samples) == set(local_stats.key[local_stats.status == "kept"])
    sizes = json.loads(fs.cat(f"{bucket}/curated/shards/sizes.json"))
    assert sizes == json.loads((local_out / "shards" / "sizes.json").read_text())
    assert json.loads(fs.cat(f"{bucket}/curated/summary.json"))["funnel"] == local["funnel"]
    page = fs.cat(f"{bucket}/curated/report.html").decode()
    assert f'<td>input samples</td><td class="n">200</td>' in page
    assert page.count('src="data:image/jpeg;base64,') > 0  # thumbnails read from the bucket input
    assert [p for p in fs.find(f"{bucket}/curated/_tmp") if p.rstrip("/") != f"{bucket}/curated/_tmp"] == []  # no objects left

    # An interrupted run on S3: a shard's tar is there but its stats object is not (the commit).
    fs.rm(f"{bucket}/curated/stats/00001.parquet")
    fs.pipe(f"{bucket}/curated/shards/00001.tar", b"half a tar")
    logs = []
    again = curate(_cfg(f"s3://{bucket}/laion", out_url, "report=false"), log=logs.append)
    assert any("7 already done, 1 to process" in line for line in logs)
    assert again["funnel"] == local["funnel"]
    pd.testing.assert_frame_equal(_bucket_stats(fs, out_url), remote_stats)
    assert set(_bucket_samples(fs, out_url)) == set(samples)
