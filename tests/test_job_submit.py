"""`ray start --head` + `ray job submit --working-dir . -- python pipelines/cat_filter.py`."""

import json
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


@pytest.mark.timeout(600)
def test_cat_filter_runs_as_a_ray_job(tmp_path):
    bindir = str(Path(sys.executable).parent)
    env = dict(os.environ, PATH=bindir + os.pathsep + os.environ.get("PATH", ""),
               RAY_AUTH_MODE="token", RAY_AUTH_TOKEN_PATH=str(tmp_path / "token"))
    env.pop("RAY_ADDRESS", None)
    # Socket paths must stay short: use a short temp dir of our own for this cluster.
    temp_dir = tempfile.mkdtemp(prefix="rayjob", dir="/tmp")
    dash = _free_port()
    (tmp_path / "token").write_text(secrets.token_hex(32))  # this cluster's own auth token
    head = subprocess.Popen([f"{bindir}/ray", "start", "--head", f"--port={_free_port()}",
                             f"--dashboard-port={dash}", "--num-cpus=2", "--include-dashboard=true",
                             "--disable-usage-stats", f"--temp-dir={temp_dir}", "--block",
                             # fixed default ports would clash with any other Ray on this machine
                             f"--dashboard-agent-listen-port={_free_port()}",
                             f"--dashboard-agent-grpc-port={_free_port()}",
                             f"--metrics-export-port={_free_port()}",
                             f"--runtime-env-agent-port={_free_port()}"],
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            start_new_session=True)
    try:
        out = tmp_path / "curated"
        cmd = [f"{bindir}/ray", "job", "submit", f"--address=http://127.0.0.1:{dash}",
               "--working-dir", ".", "--", "python", "pipelines/cat_filter.py",
               f"output={out}", "progress=false", "demo.num_samples=60", "demo.num_shards=2",
               f"demo.output={tmp_path / 'demo'}"]
        deadline, res = time.time() + 300, None
        while time.time() < deadline:  # the dashboard's job server takes a while to come up
            res = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=400)
            if res.returncode == 0 or "submitted successfully" in res.stdout:
                break  # ran (or failed for real): do not resubmit
            time.sleep(5)  # "No available agent to submit job" while the head starts up
        assert res is not None and res.returncode == 0, res.stdout[-4000:] + res.stderr[-4000:]
        assert "succeeded" in res.stdout and "CAT filter funnel" in res.stdout
        summary = json.loads((out / "summary.json").read_text())
        assert summary["funnel"]["input"] == 60 and summary["shards"]["committed"] == 2
    finally:
        head.terminate()
        try:
            head.wait(timeout=20)
        except subprocess.TimeoutExpired:
            head.kill()
        _kill_cluster(temp_dir)
        shutil.rmtree(temp_dir, ignore_errors=True)
