import os

os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")
os.environ.setdefault("RAY_ENABLE_UV_RUN_RUNTIME_ENV", "0")

import pytest  # noqa: E402


@pytest.fixture(scope="session")
def ray_session():
    """One local Ray for the whole test session (never attach to a stray cluster)."""
    import ray

    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = False
    yield ray
    ray.shutdown()


@pytest.fixture
def one_thread():
    """One intra-op thread for the test: tiny models on a loaded 2-core machine run faster so."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def nlp():
    from curation.common.nlp import load_english

    return load_english()


@pytest.fixture(scope="session")
def s3_server():
    """A real S3 server (SeaweedFS) on 127.0.0.1 for the whole session; see tests/s3server.py."""
    from s3server import SeaweedS3

    server = SeaweedS3().start()
    yield server
    server.stop()


@pytest.fixture(scope="session")
def default_demo(ray_session, tmp_path_factory):
    """``make demo``'s curation (the default config, text spotting on, report written), run once
    for the session: (summary, demo input folder, output folder). Tests only read it."""
    from pathlib import Path

    from curation.common.config import CONFIG_DIR, build_config
    from curation.pipeline import curate

    tmp = tmp_path_factory.mktemp("default-demo")
    cfg = build_config(CONFIG_DIR / "curation" / "cat_filter.yaml",
                       overrides=[f"output={tmp / 'out'}", f"demo.output={tmp / 'demo'}", "progress=false"])
    summary = curate(cfg, log=lambda *_: None)
    return summary, Path(cfg["demo"]["output"]), tmp / "out"


@pytest.fixture(scope="session")
def clean_run(ray_session, tmp_path_factory):
    """The reference run that the object-storage, kill and read-fault tests compare with: 200 demo
    samples in 8 img2dataset shards of 25, curated on local disk without text spotting, once for
    the session: (input folder, output folder, summary). Tests only read it."""
    from curation.common.config import CONFIG_DIR, build_config
    from curation.demo_data import build_demo_dataset
    from curation.pipeline import curate

    tmp = tmp_path_factory.mktemp("clean-run")
    inp = build_demo_dataset(tmp / "in", num_samples=200, num_shards=8)
    cfg = build_config(CONFIG_DIR / "curation" / "cat_filter.yaml",
                       overrides=[f"input={inp}", f"output={tmp / 'out'}", "progress=false", "report=false",
                                  "filters.text_spotting.enabled=false"])
    summary = curate(cfg, log=lambda *_: None)
    return inp, tmp / "out", summary


@pytest.fixture
def s3_env(s3_server, monkeypatch):
    """The server's endpoint and credentials in the standard AWS variables, as users set them."""
    for k, v in s3_server.env.items():
        monkeypatch.setenv(k, v)
    return s3_server
