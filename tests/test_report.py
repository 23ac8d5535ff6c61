"""The HTML stats report: pure helpers, a page built from a written output, headless Chromium."""

import re
import shutil
import subprocess
import tempfile

import pyarrow as pa
import pytest

from curation.ingest import IngestOptions, InputShard, read_shard
from curation.output import OutputFolder, write_shard
from curation.report import (EXAMPLE_SHARDS, example_shards, float_histogram, int_histogram, pick_examples,
                             svg_bars, write_report)

from helpers import jpeg, noisy_jpeg, write_wds_shard


def test_histograms_and_svg():
    assert int_histogram([0, 1, 1, 7, None, 3], 3) == (["0", "1", "2", "3+"], [1, 2, 0, 2])
    labels, counts = float_histogram([0.0, 0.05, 0.5, 1.0, None], bins=4)
    assert labels == ["0.0", "0.2", "0.5", "0.8"] and counts == [2, 0, 1, 1]
    svg = svg_bars("t <x>", ["a", "b"], [3, 0])
    assert svg.count("<rect") == 2 and "t &lt;x&gt;" in svg and 'height="0.0"' in svg
    svg = svg_bars("s", ["0", "1"], [3, 2], stacked={"kept": [1, 2], "dropped": [2, 0]}, threshold=1.0,
                   x_title="score")
    assert svg.count("<rect") == 4 + 2 and "0: dropped 2" in svg and "threshold" in svg and ">score<" in svg


def test_examples_are_seeded_random_draws_across_shards():
    names = [f"{i:05d}" for i in range(200)]
    chosen = example_shards(names)
    assert len(chosen) == EXAMPLE_SHARDS and chosen == example_shards(names) and chosen != names[:EXAMPLE_SHARDS]
    assert max(chosen) > names[EXAMPLE_SHARDS]  # not only the first shards
    stats = pa.table({"key": [f"k{i:03d}" for i in range(100)], "status": ["kept"] * 90 + ["not_downloaded"] * 10,
                      "drop_reason": pa.array([None] * 100, pa.string())})
    a, b = pick_examples(stats, 5, seed=0), pick_examples(stats, 5, seed=1)
    assert len(a["kept"]) == 5 and len(a["not downloaded"]) == 5
    assert a == pick_examples(stats, 5, seed=0) and a["kept"] != b["kept"]
    assert [r["key"] for r in a["kept"]] != [f"k{i:03d}" for i in range(5)]  # not the first by key


def _written_output(tmp_path):
    """An input shard and its curated output, written by the real shard writer (no Ray)."""
    inp, out = tmp_path / "in", tmp_path / "out"
    inp.mkdir()
    write_wds_shard(inp, "00000", [
        {"key": "k1", "caption": "a man riding a red bicycle", "image": noisy_jpeg(seed=1)},
        {"key": "k2", "caption": "<script>alert(1)</script> sunset", "image": jpeg((20, 90, 200))},
        {"key": "k3", "caption": "a dog sleeping on a sofa", "image": noisy_jpeg(seed=3)},
        {"key": "k4", "caption": "a cat", "image": b""},
        {"key": "k5", "caption": "x", "status": "failed"},
    ])
    shard = InputShard("00000", "webdataset", str(inp / "00000.tar"), str(inp / "00000.parquet"))
    rows = pa.concat_tables([t for t in read_shard(shard, IngestOptions.defaults()) if t["key"][0].as_py()])
    rows = rows.drop_columns(["shard_rows"])
    n = rows.num_rows
    key = rows["key"].to_pylist()
    scores = {"k1": (2, 1, True, True, "RIDING", 1, 0.2, True),
              "k2": (0, 0, False, False, None, None, None, None),
              "k3": (2, 1, True, True, "A DOG SLEEPING ON A SOFA", 1, 1.0, False)}
    cols = list(zip(*[scores.get(k, (None,) * 8) for k in key]))
    types = [pa.int32(), pa.int32(), pa.bool_(), pa.bool_(), pa.string(), pa.int32(), pa.float32(), pa.bool_()]
    names = ["complexity", "num_actions", "passed_complexity", "passed_action", "ocr_text", "ocr_boxes",
             "text_overlap", "passed_text_spotting"]
    for name, typ, values in zip(names, types, cols):
        rows = rows.append_column(name, pa.array(list(values), typ))
    ts = ["evaluated" if k in ("k1", "k3") else ("not_evaluated" if k == "k2" else None) for k in key]
    rows = rows.append_column("text_spotting_status", pa.array(ts, pa.string()))
    assert n == 5
    folder = OutputFolder(str(out))
    folder.prepare()
    write_shard(shard.name, rows, str(out))
    folder.write_json("summary.json", {"input": str(inp), "output": str(out), "elapsed_s": 1.0,
                                       "config": {"filters": {"complexity": {"enabled": True, "min": 1},
                                                              "action": {"enabled": True, "min": 1},
                                                              "text_spotting": {"enabled": True,
                                                                                "threshold": 0.4}}}})
    return out


def test_report_is_self_contained(tmp_path):
    out = _written_output(tmp_path)
    path = write_report(str(out), examples=4)
    page = (out / "report.html").read_text()
    assert path.endswith("report.html")
    # kept k1, dropped k2 (complexity) and k3 (text spotting) have thumbnails; the error k4 none
    assert page.count('src="data:image/jpeg;base64,') == 3
    assert re.findall(r'(?:src|href)="(?!data:)', page) == []  # nothing loaded from elsewhere
    assert "<script>" not in page and "&lt;script&gt;alert(1)&lt;/script&gt;" in page
    for heading in ("kept", "dropped: complexity", "dropped: text_spotting", "error", "not downloaded"):
        assert f"<h3>{heading}</h3>" in page
    # histograms split kept/dropped, with the thresholds drawn and axis titles
    assert page.count("<title>threshold</title>") == 3
    assert "complexity score" in page and "caption words found in the image text" in page
    assert "2: kept 1</title>" in page and "2: dropped 1</title>" in page  # k1 kept, k3 dropped at C=2
    # the settings as a table
    assert "<td><code>text_spotting.threshold</code></td><td>0.4</td>" in page
    assert "OCR: A DOG SLEEPING ON A SOFA" in page and "T overlap=1.00" in page
    assert re.search(r"<td>input samples</td><td class=\"n\">5</td>", page)
    assert "empty image" in page  # the error table


def test_report_renders_in_headless_chromium(tmp_path):
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    if not chromium:
        pytest.skip("chromium is not installed (Debian: apt-get install chromium)")
    from PIL import Image

    out = _written_output(tmp_path)
    write_report(str(out))
    shot = tmp_path / "shot.png"
    with tempfile.TemporaryDirectory() as profile:
        subprocess.run([chromium, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic",
                        "--no-first-run", "--disable-background-networking", "--disable-component-update",
                        "--disable-sync", f"--user-data-dir={profile}", f"--screenshot={shot}",
                        "--window-size=1000,2400", (out / "report.html").as_uri()],
                       check=True, capture_output=True, timeout=120)
    img = Image.open(shot).convert("RGB")
    assert img.size == (1000, 2400)
    # the noisy thumbnails and the blue one drew: many colours and the jpeg's blue are on screen
    colours = img.getcolors(maxcolors=1 << 20)
    assert len(colours) > 2000
    assert any(abs(r - 20) < 12 and abs(g - 90) < 12 and abs(b - 200) < 12 for _, (r, g, b) in colours)
