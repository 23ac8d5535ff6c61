"""A two-node Ray cluster on this machine (`ray start --head` plus a second `ray start --address`,
each with its own ports and one CPU) running the jobs as users do: `ray job submit --working-dir .`
with the object-storage settings in the job's `runtime_env`, on bucket paths of a real S3 server.
"""

import json
import io
import os
import secrets
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil
import pytest

REPO = Path(__file__).resolve().parents[1]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _kill_cluster(temp_dir: str) -> None:
    """Stop only the processes of the cluster rooted at temp_dir (`ray stop` would stop all)."""
    procs = []
    for p in psutil.process_iter(["cmdline"]):
        try:
            if any(temp_dir in part for part in (p.info["cmdline"] or [])):
                procs.append(p)
        except psutil.Error:
            pass
    for p in procs:
        try:
            p.terminate()
        except psutil.Error:
            pass
    _, alive = psutil.wait_procs(procs, timeout=10)
    for p in alive:
        try:
            p.kill()
        except psutil.Error:
            pass


class TwoNodeCluster:
    def __init__(self, tmp_path: Path):
        bindir = str(Path(sys.executable).parent)
        self.ray = f"{bindir}/ray"
        self.env = dict(os.environ, PATH=bindir + os.pathsep + os.environ.get("PATH", ""),
                        RAY_AUTH_MODE="token", RAY_AUTH_TOKEN_PATH=str(tmp_path / "token"))
        for k in list(self.env):
            if k.startswith("AWS_") or k == "RAY_ADDRESS":
                self.env.pop(k)  # the nodes know no object storage: settings come with the job
        (tmp_path / "token").write_text(secrets.token_hex(32))  # this cluster's own auth token
        # Socket paths must stay short: a short temp dir of our own for this cluster.
        self.temp_dir = tempfile.mkdtemp(prefix="ray2n", dir="/tmp")
        self.gcs, self.dash = _free_port(), _free_port()
        self.procs = []

    def _agent_ports(self) -> list[str]:
        # fixed default ports would clash between the two nodes and with any other Ray here
        return [f"--dashboard-agent-listen-port={_free_port()}",
                f"--dashboard-agent-grpc-port={_free_port()}",
                f"--metrics-export-port={_free_port()}", f"--runtime-env-agent-port={_free_port()}",
                f"--node-manager-port={_free_port()}", f"--object-manager-port={_free_port()}"]

    def start(self):
        common = ["--num-cpus=1", "--disable-usage-stats", "--block"]
        self.procs.append(subprocess.Popen(
            [self.ray, "start", "--head", f"--port={self.gcs}", f"--dashboard-port={self.dash}",
             "--include-dashboard=true", f"--temp-dir={self.temp_dir}", *common, *self._agent_ports()],
            env=self.env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True))
        time.sleep(3)
        self.procs.append(subprocess.Popen(
            [self.ray, "start", f"--address=127.0.0.1:{self.gcs}", "--min-worker-port=23000",
             "--max-worker-port=23999", *common, *self._agent_ports()],
            env=self.env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True))
        deadline, status = time.time() + 120, ""
        while time.time() < deadline:  # both nodes registered before any job is submitted
            status = subprocess.run([self.ray, "status", f"--address=127.0.0.1:{self.gcs}"],
                                    env=self.env, capture_output=True, text=True).stdout
            active = status.split("Active:")[-1].split("Pending:")[0] if "Active:" in status else ""
            if active.count("node_") == 2:
                return self
            time.sleep(2)
        self.stop()
        raise RuntimeError("the two-node cluster did not come up:\n" + status)

    def submit(self, runtime_env: dict, *entrypoint: str, timeout: float = 400) -> subprocess.CompletedProcess:
        cmd = [self.ray, "job", "submit", f"--address=http://127.0.0.1:{self.dash}",
               "--working-dir", ".", "--runtime-env-json", json.dumps(runtime_env), "--", *entrypoint]
        deadline, res = time.time() + 300, None
        while time.time() < deadline:  # the dashboard's job server takes a while to come up
            res = subprocess.run(cmd, cwd=REPO, env=self.env, capture_output=True, text=True,
                                 timeout=timeout)
            if res.returncode == 0 or "submitted successfully" in res.stdout:
                break  # ran (or failed for real): do not resubmit
            time.sleep(5)  # "No available agent to submit job" while the head starts up
        return res

    def stop(self):
        for p in self.procs:
            p.terminate()
        for p in self.procs:
            try:
                p.wait(timeout=5)  # nothing of the cluster needs to survive the tests
            except subprocess.TimeoutExpired:
                p.kill()
        _kill_cluster(self.temp_dir)
        shutil.rmtree(self.temp_dir, ignore_errors=True)


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    c = TwoNodeCluster(tmp_path_factory.mktemp("cluster")).start()
    yield c
    c.stop()


@pytest.mark.timeout(600)
def test_curation_job_on_two_nodes_with_buckets(cluster, s3_server, tmp_path):
    from curation.demo_data import build_demo_dataset

    local_in = build_demo_dataset(tmp_path / "in", num_samples=80, num_shards=8)
    bucket = s3_server.new_bucket("cluster")
    s3_server.upload(local_in, f"s3://{bucket}/laion")
    res = cluster.submit({"env_vars": s3_server.env},
                         "python", "pipelines/cat_filter.py", f"input=s3://{bucket}/laion",
                         f"output=s3://{bucket}/curated", "progress=false",
                         "filters.text_spotting.enabled=false",
                         # one spaCy actor per node: each node has one CPU
                         "stages.caption.actors=2", "stages.caption.num_cpus=1",
                         # and no shard taken before both actors are up (the second node's
                         # actor starts later: the job's working dir reaches it first)
                         "stages.wait_for_actors_s=300")
    assert res is not None and res.returncode == 0, res.stdout[-4000:] + res.stderr[-4000:]
    assert "succeeded" in res.stdout and "CAT filter funnel" in res.stdout
    fs = s3_server.filesystem()
    summary = json.loads(fs.cat(f"{bucket}/curated/summary.json"))
    assert summary["funnel"]["input"] == 80 and summary["shards"]["committed"] == 8
    shard_summaries = [json.loads(fs.cat(p)) for p in fs.glob(f"{bucket}/curated/shard_summaries/*.json")]
    assert sorted(s["shard"] for s in shard_summaries) == [f"{i:05d}" for i in range(8)]
    read_on = {s["nodes"]["read"] for s in shard_summaries}
    assert len(read_on) == 2, f"every shard was read on one node: {read_on}"
    # the stats in the bucket account for every input sample exactly once
    import pyarrow.parquet as pq

    keys = []
    for p in fs.glob(f"{bucket}/curated/stats/*.parquet"):
        keys += pq.read_table(io.BytesIO(fs.cat(p)), columns=["key"])["key"].to_pylist()
    assert len(keys) == len(set(keys)) == 80


@pytest.mark.timeout(600)
def test_two_worker_training_job_on_two_nodes_with_buckets(cluster, s3_server, tmp_path):
    """`training/train.py` as a Ray job: curated shards in a bucket, two Train workers spread over
    the two nodes, checkpoints and logs written to the bucket."""
    from test_train_ray import write_color_shards

    curated = Path(write_color_shards(tmp_path / "curated", per_shard=24))  # curated-format shards
    bucket = s3_server.new_bucket("train2n")
    s3_server.upload(curated / "shards", f"s3://{bucket}/curated/shards")
    res = cluster.submit({"env_vars": s3_server.env},
                         "python", "training/train.py", f"data.train=s3://{bucket}/curated/shards",
                         f"run.storage_path=s3://{bucket}/runs", "run.name=two-nodes",
                         "model.arch=micro-vit-32", "scaling.num_workers=2",
                         "scaling.cpus_per_worker=0.5", "scaling.placement_strategy=SPREAD",
                         "scaling.use_gpu=false", "data.num_cpus=0.5", "data.map_batch_size=16",
                         "train.batch_size=8", "train.max_steps=4", "train.checkpoint_every_steps=2",
                         "train.warmup_steps=1", "train.log_every_steps=1", "eval.enabled=false")
    assert res is not None and res.returncode == 0, res.stdout[-4000:] + res.stderr[-4000:]
    fs = s3_server.filesystem()
    summary = json.loads(fs.cat(f"{bucket}/runs/two-nodes/summary.json"))
    assert summary["metrics"]["step"] == 4
    assert len(set(summary["metrics"]["worker_nodes"])) == 2  # one rank on each node
    checkpoints = sorted(p.rsplit("/", 1)[-1] for p in fs.ls(f"{bucket}/runs/two-nodes")
                         if p.rsplit("/", 1)[-1].startswith("checkpoint_") and not p.endswith(".json"))
    assert len(checkpoints) == 2, checkpoints
    steps = [json.loads(line)["step"] for line in
             fs.cat(f"{bucket}/runs/two-nodes/metrics.jsonl").decode().splitlines() if line.strip()]
    assert sorted(set(steps)) == [1, 2, 3, 4]
