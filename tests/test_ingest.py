"""Ingest units: image probing, caption decoding and shard reading, without Ray."""

import pyarrow as pa
import pytest

from curation.images import BadImage, probe_image
from curation.ingest import (ERROR, NOT_DOWNLOADED, PENDING, SHARD_END, IngestOptions,
                             decode_caption, discover_shards, read_shard)

from helpers import jpeg, noisy_jpeg, png, png_claiming, write_wds_shard


def test_probe_valid_images():
    assert probe_image(jpeg(size=(64, 48)))[:2] == (64, 48)
    assert probe_image(png())[2] == "png"


@pytest.mark.parametrize("data,message", [
    (b"", "empty image"),
    (b"\x00garbage bytes that are no image" * 10, "not a recognised image"),
    (noisy_jpeg()[: len(noisy_jpeg()) // 2], "corrupt image data"),
    (png_claiming(50_000, 50_000), "image too large"),
])
def test_probe_bad_images(data, message):
    with pytest.raises(BadImage, match=message):
        probe_image(data)


def test_decode_caption():
    assert decode_caption(b"a dog", 100) == ("a dog", None)
    assert decode_caption(None, 100)[1] == "missing caption"
    assert decode_caption("  \n", 100)[1] == "empty caption"
    text, err = decode_caption(b"caf\xe9", 100)
    assert "not valid UTF-8" in err and text.startswith("caf")
    assert "caption too long: 100000" in decode_caption("x" * 100_000, 4096)[1]


def test_read_webdataset_shard_accounts_for_every_row(tmp_path):
    rows = write_wds_shard(tmp_path, "00000", [
        {"key": "a", "caption": "a dog running on the beach", "image": jpeg()},
        {"key": "b", "caption": "x", "status": "failed"},
        {"key": "c", "caption": None, "image": jpeg()},
        {"key": "d", "caption": "a cat", "image": png(), "ext": "png"},
    ])
    (shard,) = discover_shards(str(tmp_path))
    assert shard.format == "webdataset" and shard.meta_url
    tables = list(read_shard(shard, IngestOptions.defaults(rows_per_block=2)))
    marker = tables[-1]
    assert marker["status"].to_pylist() == [SHARD_END] and marker["shard_rows"][0].as_py() == len(rows)
    got = {r["key"]: r for r in pa.concat_tables(tables[:-1]).to_pylist()}
    assert set(got) == {"a", "b", "c", "d"}
    assert got["a"]["status"] == PENDING and got["a"]["image"] == jpeg()  # bytes unchanged
    assert got["b"]["status"] == NOT_DOWNLOADED
    assert got["c"]["status"] == ERROR and got["c"]["error"] == "missing caption"
    assert got["d"]["image_format"] == "png" and got["d"]["width"] == 40


def test_truncated_tar_marks_listed_samples_as_errors(tmp_path):
    samples = [{"key": f"k{i}", "caption": "a man riding a horse", "image": jpeg(size=(120, 120))}
               for i in range(6)]
    write_wds_shard(tmp_path, "00000", samples, truncate_to=0.5)
    (shard,) = discover_shards(str(tmp_path))
    rows = pa.concat_tables(list(read_shard(shard, IngestOptions.defaults()))[:-1]).to_pylist()
    assert len(rows) == 6
    errors = [r for r in rows if r["status"] == ERROR]
    assert errors and all("unreadable" in r["error"] or "corrupt" in r["error"] for r in errors)
    assert any(r["status"] == PENDING for r in rows)


def test_truncated_tar_without_sidecar_records_the_loss(tmp_path):
    samples = [{"key": f"k{i}", "caption": "a man riding a horse", "image": jpeg(size=(120, 120))}
               for i in range(6)]
    write_wds_shard(tmp_path, "00000", samples, sidecar=False, truncate_to=0.5)
    (shard,) = discover_shards(str(tmp_path))
    rows = pa.concat_tables(list(read_shard(shard, IngestOptions.defaults()))[:-1]).to_pylist()
    assert rows[-1]["status"] == ERROR and "samples after this point unknown" in rows[-1]["error"]


def test_missing_input_is_a_clear_error(tmp_path):
    with pytest.raises(ValueError, match="does not exist"):
        discover_shards(str(tmp_path / "nope"))
    with pytest.raises(ValueError, match="no img2dataset shards"):
        discover_shards(str(tmp_path))
