"""A real fault: SIGKILL the curation driver after its first shard commits, then re-run the same
command. The output must equal a clean run's: no sample missing or duplicated in shards/ or
stats/. The job runs on the S3 server with the endpoint and keys given only as `storage_options`
overrides (no AWS variables in its environment), so this also shows those reach every worker."""

import io
import os
import signal
import subprocess
import tarfile
import sys
import time
from pathlib import Path

import pandas as pd
import pyarrow.parquet as pq
import pytest


REPO = Path(__file__).resolve().parents[1]
SHARDS = 8


def _stats(fs, root) -> pd.DataFrame:
    frames = [pq.read_table(io.BytesIO(fs.cat(p))).to_pandas()
              for p in sorted(fs.glob(f"{root}/stats/*.parquet"))]
    return pd.concat(frames).sort_values("key").reset_index(drop=True)


def _tar_keys(fs, root) -> list[str]:
    """The key of every sample (its .txt member) in the curated tars, repeats included."""
    keys = []
    for p in sorted(fs.glob(f"{root}/shards/*.tar")):
        with tarfile.open(fileobj=io.BytesIO(fs.cat(p))) as tar:
            keys += [m.name[:-4] for m in tar if m.name.endswith(".txt")]
    return keys


@pytest.mark.timeout(600)
def test_sigkill_driver_then_rerun_equals_clean_run(ray_session, clean_run, s3_server, tmp_path):
    local_in, clean_out, _ = clean_run  # the same settings on local disk, run once for the session
    bucket = s3_server.new_bucket("kill")
    s3_server.upload(local_in, f"s3://{bucket}/in")
    fs = s3_server.filesystem()
    opts = s3_server.storage_options
    out_root = f"{bucket}/out"
    # both runs attach to the session's Ray as drivers (as `ray job submit` drivers attach to a
    # cluster): when the first is killed, Ray reaps that job's tasks and actors
    cmd = [sys.executable, "pipelines/cat_filter.py", f"input=s3://{bucket}/in",
           f"output=s3://{out_root}", "progress=false", "report=false",
           f"ray.address={ray_session.get_runtime_context().gcs_address}",
           "filters.text_spotting.enabled=false",
           f"storage_options.endpoint_url={opts['endpoint_url']}",
           f"storage_options.key={opts['key']}", f"storage_options.secret={opts['secret']}"]
    env = {k: v for k, v in os.environ.items() if not k.startswith("AWS_") and k != "RAY_ADDRESS"}

    first = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE,
                             stderr=subprocess.STDOUT, start_new_session=True)
    deadline, committed_at_kill = time.time() + 240, None
    while time.time() < deadline and first.poll() is None:
        fs.invalidate_cache()
        done = fs.glob(f"{out_root}/stats/*.parquet")
        if done:
            os.kill(first.pid, signal.SIGKILL)  # the driver only, as the OOM killer would
            committed_at_kill = len(done)
            break
        time.sleep(0.05)
    first.wait(30)
    log = first.stdout.read().decode(errors="replace")
    assert committed_at_kill is not None, "no shard committed before the run ended:\n" + log[-3000:]
    assert first.returncode == -signal.SIGKILL
    assert committed_at_kill < SHARDS, "the run finished before the kill; nothing was tested"

    rerun = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=400)
    assert rerun.returncode == 0, rerun.stdout[-3000:] + rerun.stderr[-3000:]
    fs.invalidate_cache()
    assert "already done" in rerun.stdout and f"{SHARDS} input shards" in rerun.stdout

    clean = pd.read_parquet(clean_out / "stats").sort_values("key").reset_index(drop=True)
    resumed = _stats(fs, out_root)
    assert resumed.key.is_unique and len(resumed) == len(clean) == SHARDS * 25
    pd.testing.assert_frame_equal(resumed, clean)
    keys = _tar_keys(fs, out_root)
    assert len(keys) == len(set(keys))  # no sample twice in the shards
    assert set(keys) == set(clean.key[clean.status == "kept"])
    assert [p for p in fs.find(f"{out_root}/_tmp") if p.rstrip("/") != f"{out_root}/_tmp"] == []  # no objects left
