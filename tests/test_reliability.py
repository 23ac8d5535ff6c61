"""Every sample accounted for under hostile input, and transient read faults that never become
data loss (on local disk and on the S3 server)."""

import io
import json
import shutil
import tarfile
from pathlib import Path

import pandas as pd
import pytest

from curation.common.config import CONFIG_DIR, build_config
from curation.demo_data import build_demo_dataset
from curation.pipeline import PipelineError, curate

import hostile


def _cfg(inp, out, *extra, ocr=False):
    return build_config(CONFIG_DIR / "curation" / "cat_filter.yaml",
                        overrides=[f"input={inp}", f"output={out}", "progress=false",
                                   f"filters.text_spotting.enabled={str(ocr).lower()}", *extra])


def _files(root: Path, skip: Path) -> set[str]:
    return {str(p) for p in root.rglob("*") if skip not in p.parents and p != skip}


def _base(key: str) -> str:
    return key.split("/duplicate-")[0]


@pytest.mark.timeout(900)
def test_hostile_input_every_sample_accounted_for(ray_session, tmp_path):
    import webdataset as wds

    inp = hostile.build(tmp_path / "in")
    out = tmp_path / "out"
    before = _files(tmp_path, out)
    summary = curate(_cfg(inp, out, ocr=True), log=lambda *_: None)
    assert _files(tmp_path, out) == before  # nothing written outside the output folder

    names = ["00000", "00001", "00002", "00003", "00004", "00005", "00005.old"]
    assert summary["shards"] == {"input": 7, "committed": 7, "failed": {}}
    stats = pd.read_parquet(out / "stats")
    for name in names:
        rows = stats[stats.shard == name]
        assert rows.key.is_unique, name
        tar_keys = [k.rsplit("/", 1)[-1] for k in hostile.tar_member_keys(inp / f"{name}.tar")]
        side = inp / f"{name}.parquet"
        try:
            side_keys = set(pd.read_parquet(side).key)
        except Exception:  # the corrupt sidecar of 00004
            side_keys = set()
        # every tar member group and every sidecar row has exactly one stats row
        assert {_base(k) for k in rows.key if "/unreadable" not in k} == set(tar_keys) | side_keys, name
        if name != "00003":  # the truncated tar: tarfile and the reader may stop a member apart
            assert len(rows) == len(tar_keys) + len(side_keys - set(tar_keys)), name
    by_key = stats.set_index("key")
    kept = set(stats.key[stats.status == "kept"])
    # odd formats, sidecar-only captions, bad metadata, reading after repeats, a corrupt sidecar
    assert {"a_ok", "a_gif", "a_tiff", "a_bmp", "a_no_txt", "a_html", "m_list", "m_null", "m_string",
            "m_deep", "m_invalid", "m_binary", "m_ok", "d_after", "d_again", "d_mid", "d_escape",
            "d_abs", "d_last", "p_0", "p_1", "p_2", "n_1", "o_1"} <= kept
    for key, why in {"a_truncated": "corrupt", "a_empty_img": "empty", "a_random": "not a recognised",
                     "a_bomb": "too large", "a_not_utf8": "UTF-8", "a_empty_cap": "empty caption",
                     "a_long_cap": "too long", "d_twice": "duplicate member",
                     "d_again/duplicate-2": "duplicate key", "p_no_txt": "00004.parquet unreadable"}.items():
        assert by_key.loc[key, "status"] == "error" and why in by_key.loc[key, "error"], key
    s4 = json.loads((out / "shard_summaries" / "00004.json").read_text())
    assert "00004.parquet unreadable" in s4["input_errors"]

    # every kept sample is trainable as written, by open_clip_train's own loader stages
    sizes = json.loads((out / "shards" / "sizes.json").read_text())
    urls = sorted(str(p) for p in (out / "shards").glob("*.tar"))
    loaded = list(wds.WebDataset(urls, shardshuffle=False).decode("pilrgb")
                  .rename(image="jpg;png;jpeg;webp", text="txt").to_tuple("__key__", "image", "text"))
    assert sorted(k for k, *_ in loaded) == sorted(kept) and sum(sizes.values()) == len(kept)
    with tarfile.open(out / "shards" / "00000.tar") as tar:
        members = set(tar.getnames())
        meta = json.loads(tar.extractfile("a_gif.json").read())
        no_txt = tar.extractfile("a_no_txt.txt").read().decode()
    assert "a_gif.png" in members and "a_gif.gif" not in members and meta["original_image_format"] == "gif"
    assert no_txt == hostile.ACTION  # the caption it was judged on, from the sidecar
    assert all(not n.startswith(("/", "..")) for n in members)
    from curation.report import write_report

    write_report(str(out), examples=100)  # every kept sample an example: the HTML caption is shown
    page = (out / "report.html").read_text()
    assert "<script>alert(1)</script>" not in page and "&lt;script&gt;" in page


def _break_local(inp: str, name: str):
    """Make one input tar unreadable at the OS level (a directory where the file was); return a
    function that restores it."""
    path = Path(inp) / f"{name}.tar"
    saved = path.with_suffix(".saved")
    path.rename(saved)
    path.mkdir()
    (path / "x").write_bytes(b"")

    def restore():
        shutil.rmtree(path)
        saved.rename(path)
    return restore


@pytest.mark.timeout(600)
@pytest.mark.parametrize("fs_kind", ["local", "s3"])
def test_transient_read_failure_leaves_the_shard_for_the_rerun(clean_run, s3_server, tmp_path, fs_kind):
    """A shard whose tar cannot be read (on S3: every connection that asks for it is reset, after
    the listing) is retried, stays uncommitted, is named by the failing job, and the re-run then
    produces exactly the clean run's output (the session's ``clean_run``, same settings)."""
    from s3server import FlakyProxy

    from curation.output import OutputFolder

    shared_in, clean, _ = clean_run
    local_in = shutil.copytree(shared_in, tmp_path / "in")  # broken below: a copy of our own
    proxy = None
    if fs_kind == "local":
        inp, out, opts = str(local_in), str(tmp_path / "out"), []
        restore = _break_local(inp, "00001")
    else:
        bucket = s3_server.new_bucket("flaky")
        s3_server.upload(local_in, f"s3://{bucket}/in")
        inp, out = f"s3://{bucket}/in", f"s3://{bucket}/out"
        proxy = FlakyProxy(s3_server.port)
        opts = [f"storage_options.endpoint_url={proxy.endpoint}",
                f"storage_options.key={s3_server.access_key}",
                f"storage_options.secret={s3_server.secret_key}"]
        proxy.break_reads(f"/{bucket}/in/00001.tar")
        restore = proxy.heal
    try:
        with pytest.raises(PipelineError, match="00001"):
            curate(_cfg(inp, out, "report=false", "ingest.read_retries=1",
                        "ingest.retry_backoff_s=0.05", *opts), log=lambda *_: None)
        if proxy is not None:
            assert proxy.resets > 0  # the fault really happened on the wire
        restore()
        folder = OutputFolder(out)
        assert folder.committed() == {f"{i:05d}" for i in range(8)} - {"00001"}  # not the unreadable shard
        logs = []
        curate(_cfg(inp, out, "report=false", *opts), log=logs.append)
    finally:
        if proxy is not None:
            proxy.close()
    assert any("7 already done, 1 to process" in line for line in logs)
    want = pd.read_parquet(clean / "stats").sort_values("key").reset_index(drop=True)
    got = folder.read_stats().to_pandas().sort_values("key").reset_index(drop=True)
    pd.testing.assert_frame_equal(got, want)
    with folder.fs.open(folder.path("shards", "00001.tar"), "rb") as f:
        with tarfile.open(fileobj=io.BytesIO(f.read())) as tar:
            got_members = tar.getnames()
    with tarfile.open(clean / "shards" / "00001.tar") as tar:
        assert got_members == tar.getnames()
