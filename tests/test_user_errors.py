"""No silent wrong results: a re-run with other settings, a wrong input format and a report of a
folder that is not there are refused with one line, before any work."""

import json
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from curation.common.config import CONFIG_DIR, build_config
from curation.demo_data import build_demo_dataset
from curation.pipeline import PipelineError, SettingsError, curate

from helpers import jpeg

REPO = Path(__file__).resolve().parents[1]


def cfg_for(inp, out, *overrides):
    return build_config(CONFIG_DIR / "curation" / "cat_filter.yaml",
                        overrides=[f"input={inp}", f"output={out}", "progress=false", "report=false",
                                   "filters.text_spotting.enabled=false", *overrides])


@pytest.fixture(scope="module")
def small_input(tmp_path_factory):
    return build_demo_dataset(tmp_path_factory.mktemp("errs") / "in", num_samples=60, num_shards=2)


def _kept(out: Path) -> set:
    stats = pd.read_parquet(out / "stats")
    return set(stats.key[stats.status == "kept"])


def test_rerun_with_other_thresholds_is_refused_then_overwrite_redoes_it(ray_session, small_input, tmp_path):
    out = tmp_path / "out"
    curate(cfg_for(small_input, out), log=lambda *_: None)  # complexity.min 1
    kept_before = _kept(out)
    assert json.loads((out / "job_settings.json").read_text())["filters"]["complexity"]["min"] == 1

    # the same settings resume (nothing to do), also when only resources or batch sizes change
    logs = []
    curate(cfg_for(small_input, out, "stages.caption.batch_size=16"), log=logs.append)
    assert any("2 already done, 0 to process" in line for line in logs)
    summary_before = (out / "summary.json").read_text()

    with pytest.raises(SettingsError) as exc:
        curate(cfg_for(small_input, out, "filters.complexity.min=3"), log=lambda *_: None)
    msg = str(exc.value)
    assert "filters.complexity.min: 1 -> 3" in msg and "overwrite=true" in msg and "new output" in msg
    # nothing was touched: the provenance still names the settings the shards were made with
    assert (out / "summary.json").read_text() == summary_before and _kept(out) == kept_before

    strict = curate(cfg_for(small_input, out, "filters.complexity.min=3", "overwrite=true"), log=lambda *_: None)
    assert strict["config"]["filters"]["complexity"]["min"] == 3
    clean = tmp_path / "clean"
    curate(cfg_for(small_input, clean, "filters.complexity.min=3"), log=lambda *_: None)
    assert _kept(out) == _kept(clean) and _kept(out) < kept_before
    assert json.loads((out / "job_settings.json").read_text())["filters"]["complexity"]["min"] == 3


def test_parquet_format_on_webdataset_output_is_refused_before_any_work(small_input, tmp_path):
    out = tmp_path / "out"
    with pytest.raises(SettingsError, match="input_format=webdataset"):
        curate(cfg_for(small_input, out, "input_format=parquet"), log=lambda *_: None)
    assert not list((out / "stats").glob("*.parquet"))
    # a later run with the right format does the work (nothing was committed)
    with pytest.raises(SettingsError, match="has no image column"):
        sidecars = tmp_path / "sidecars"  # the sidecar parquet files alone
        sidecars.mkdir()
        for p in Path(small_input).glob("*.parquet"):
            (sidecars / p.name).write_bytes(p.read_bytes())
        curate(cfg_for(sidecars, tmp_path / "out2", "input_format=parquet"), log=lambda *_: None)


def _parquet_shard(path: Path, name: str, n: int, with_images: bool = True):
    rows = {"key": [f"{name}{i:04d}" for i in range(n)],
            "caption": ["a dog is chasing a ball in the park"] * n,
            "url": [f"http://example.com/{name}/{i}.jpg" for i in range(n)],
            "status": ["success"] * n}
    if with_images:
        rows["jpg"] = [jpeg((10 * i % 255, 80, 120)) for i in range(n)]
    pq.write_table(pa.table(rows), path / f"{name}.parquet")


def test_a_parquet_shard_without_images_is_never_committed(ray_session, tmp_path):
    inp = tmp_path / "in"
    inp.mkdir()
    _parquet_shard(inp, "00000", 6)
    _parquet_shard(inp, "00001", 6, with_images=False)  # not img2dataset's parquet format
    out = tmp_path / "out"
    with pytest.raises(PipelineError, match="00001"):
        curate(cfg_for(inp, out, "input_format=parquet"), log=lambda *_: None)
    assert sorted(p.stem for p in (out / "stats").glob("*.parquet")) == ["00000"]
    assert len(pd.read_parquet(out / "stats")) == 6


def _cli(*args) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, *args], cwd=REPO, capture_output=True, text=True, timeout=300)


def test_cli_prints_one_line_and_exits_2(small_input, tmp_path):
    proc = _cli("pipelines/cat_filter.py", f"input={small_input}", f"output={tmp_path / 'o'}",
                "input_format=parquet", "progress=false")
    assert proc.returncode == 2, proc.stderr[-2000:]
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert lines[-1].startswith("error: ") and "input_format=webdataset" in lines[-1]
    assert "Traceback" not in proc.stderr

    missing = tmp_path / "no-such-output"
    proc = _cli("pipelines/report.py", str(missing))
    assert proc.returncode == 2 and proc.stderr.startswith("error: ") and "Traceback" not in proc.stderr
    assert not missing.exists()  # the report does not create the folder


@pytest.mark.parametrize("args, message", [
    (["pipelines/cat_filter.py", "filters.complexity.min=two"],
     "error: filters.complexity.min must be an integer (default 1), got 'two'"),
    (["pipelines/cat_filter.py", "filters.complexity.measure=longest"],
     "error: filters.complexity.measure must be one of"),
    (["pipelines/cat_filter.py", "filters.complexity.mni=2"], "error: unknown config key 'filters.complexity.mni'"),
    (["training/train.py", "train.batch_size=big"],
     "error: train.batch_size must be an integer (default 32), got 'big'"),
])
def test_config_mistakes_are_one_line_before_ray(args, message, tmp_path):
    proc = _cli(*args, f"output={tmp_path / 'o'}") if "cat_filter" in args[0] else _cli(*args)
    assert proc.returncode == 2, proc.stdout[-1000:] + proc.stderr[-2000:]
    assert [line for line in proc.stderr.splitlines() if line.strip()] == [proc.stderr.strip()]
    assert proc.stderr.startswith(message), proc.stderr
    assert "Ray" not in proc.stdout + proc.stderr  # refused before Ray started


@pytest.mark.parametrize("override, message", [
    ("filters.complexity.measure=scene", "filters.complexity.measure must be one of "
     "'scene_graph', 'max_children', 'entity_edges', got 'scene'"),
    ("filters.text_spotting.recogniser=tesseract",
     "filters.text_spotting.recogniser must be one of 'ppocr', 'easyocr', got 'tesseract'"),
    ("input_format=tar", "input_format must be one of 'auto', 'webdataset', 'parquet', got 'tar'"),
    ("stages.ocr.actors=1.5", "stages.ocr.actors must be an integer, got 1.5"),
])
def test_a_value_the_typed_view_refuses_is_one_line_naming_the_key(override, message, tmp_path):
    """The job parses its merged config once into its typed view (curation/settings.py) before
    any work: a value outside the YAML's choices or of the wrong type is one line naming the
    dotted key (and the choices), exit 2, nothing written."""
    proc = _cli("pipelines/cat_filter.py", f"output={tmp_path / 'o'}", override)
    assert proc.returncode == 2, proc.stdout[-1000:] + proc.stderr[-2000:]
    assert proc.stderr.strip() == f"error: {message}", proc.stderr
    assert "Ray" not in proc.stdout + proc.stderr and not (tmp_path / "o").exists()


def test_output_that_is_a_file_is_one_line(small_input, tmp_path):
    afile = tmp_path / "out.tar"
    afile.write_bytes(b"not a folder")
    with pytest.raises(SettingsError, match="is a file, not a folder"):
        curate(cfg_for(small_input, afile), log=lambda *_: None)
    assert afile.read_bytes() == b"not a folder"


def test_config_types_and_scientific_notation():
    from curation.common.config import ConfigError

    cfg = build_config(CONFIG_DIR / "train" / "clip.yaml", overrides=["train.lr=1e-3", "train.epochs=0.5"])
    assert cfg["train"]["lr"] == 0.001 and cfg["train"]["epochs"] == 0.5  # YAML reads 1e-3 as a string
    with pytest.raises(ConfigError, match="must be true or false"):
        build_config(CONFIG_DIR / "curation" / "cat_filter.yaml", overrides=["filters.action.enabled=maybe"])
    with pytest.raises(ConfigError, match="must be a number"):
        build_config(CONFIG_DIR / "curation" / "cat_filter.yaml", overrides=["filters.text_spotting.threshold=high"])
    # string defaults such as "auto" take other types; null is always allowed
    cfg = build_config(CONFIG_DIR / "train" / "clip.yaml", overrides=["scaling.use_gpu=false", "train.max_steps=null"])
    assert cfg["scaling"]["use_gpu"] is False


def test_shard_progress_line():
    from curation.pipeline import ShardProgress

    now = [100.0]
    p = ShardProgress(total=10, done=2, clock=lambda: now[0])  # 2 shards done by an earlier run
    now[0] = 110.0
    assert p.shard_done(500) == "[3/10 shards, 50.0 samples/s, ETA 1.2 min]"  # 7 left x 10 s
    now[0] = 120.0
    assert p.shard_done(1500) == "[4/10 shards, 100.0 samples/s, ETA 1.0 min]"
    for _ in range(6):
        line = p.shard_done(1000)
    assert line.startswith("[10/10 shards,") and line.endswith("ETA done]")
