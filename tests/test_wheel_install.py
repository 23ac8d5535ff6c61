"""A non-editable install works from any folder: the wheel carries the code, the jobs as commands
(cat-filter, cat-report, cat-train, cat-evaluate, cat-label-concepts) and the default configs.

The wheel is installed without dependencies into a fresh virtual environment that sees this
environment's third-party packages through a ``.pth`` line (no network, no second copy of torch);
the source tree's editable-install hook is not active there, so every ``import curation`` and
every config file comes from the wheel."""

import os
import subprocess
import sys
import sysconfig
from pathlib import Path

import pandas as pd
import pytest

REPO = Path(__file__).resolve().parents[1]
COMMANDS = ("cat-filter", "cat-select", "cat-report", "cat-train", "cat-evaluate", "cat-label-concepts")


def _run(cmd, **kw):
    return subprocess.run(cmd, capture_output=True, text=True, timeout=kw.pop("timeout", 300), **kw)


@pytest.fixture(scope="module")
def installed(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("wheel")
    build = _run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
                  "-w", str(tmp / "dist"), str(REPO)])
    assert build.returncode == 0, build.stderr[-3000:]
    wheel = next((tmp / "dist").glob("cat_clip-*.whl"))
    venv = tmp / "venv"
    made = _run([sys.executable, "-m", "venv", "--without-pip", str(venv)])
    assert made.returncode == 0, made.stderr
    py = venv / "bin" / "python"
    site = Path(_run([str(py), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"]).stdout.strip())
    (site / "third_party.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    inst = _run([sys.executable, "-m", "pip", "--python", str(py), "install", "--no-deps", "-q", str(wheel)])
    assert inst.returncode == 0, inst.stderr[-3000:]
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "RAY_ADDRESS")}
    return venv, site, env


def test_the_wheel_holds_the_code_configs_and_commands(installed, tmp_path):
    venv, site, env = installed
    where = _run([str(venv / "bin" / "python"), "-c",
                  "import curation, training.train, pipelines.cat_filter as p; from curation.common.config import CONFIG_DIR;"
                  "print(curation.__file__); print(CONFIG_DIR)"], cwd=tmp_path, env=env)
    assert where.returncode == 0, where.stderr[-2000:]
    module_file, config_dir = where.stdout.split()
    assert Path(module_file).is_relative_to(site) and not Path(module_file).is_relative_to(REPO)
    assert Path(config_dir) == site / "cat_clip_configs"
    assert (Path(config_dir) / "curation" / "cat_filter.yaml").is_file()
    assert (Path(config_dir) / "models" / "micro-vit-32.json").is_file()
    for cmd in COMMANDS:
        res = _run([str(venv / "bin" / cmd), "--help"], cwd=tmp_path, env=env)
        assert res.returncode == 0 and "usage:" in res.stdout, (cmd, res.stderr[-2000:])


@pytest.mark.timeout(600)
def test_demo_curation_from_another_folder(installed, tmp_path):
    venv, _, env = installed
    res = _run([str(venv / "bin" / "cat-filter"), "output=curated", "demo.output=demo", "demo.num_samples=40",
                "demo.num_shards=1", "progress=false", "ray.num_cpus=1", "filters.text_spotting.enabled=false"],
               cwd=tmp_path, env=env, timeout=500)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    assert "CAT filter funnel" in res.stdout
    stats = pd.read_parquet(tmp_path / "curated" / "stats")
    assert len(stats) == 40 and (stats.status == "kept").sum() > 0
    report = _run([str(venv / "bin" / "cat-report"), "curated"], cwd=tmp_path, env=env)
    assert report.returncode == 0 and (tmp_path / "curated" / "report.html").stat().st_size > 0, report.stderr
