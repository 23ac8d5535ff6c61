"""Which offline OCR engine for the T filter: EasyOCR (the backend) vs RapidOCR, on the labelled set.

    python benchmarks/bench_ocr_engines.py [--pairs 150] [--threads 2] [--engines easyocr rapidocr_v4 rapidocr]

Issue 4 asks for another offline engine as an alternative backend only if it is markedly faster
at equal accuracy on the generated labelled set (:mod:`curation.textspot_data`). This runs each
engine, in one process with ``--threads`` inference threads, through the same
:class:`curation.ocr.TextSpotter` (same decoding, confidence floor and default overlap measure)
and prints images/s, the speed ratio to EasyOCR, and precision/recall of the drop decision.

These are the engines run as drop-ins, whole (RapidOCR's own pipeline: its detector at its default
size, its recogniser, its text-direction classifier), measured 2026-11-23 under the
``content_words`` rule. The ``ppocr`` backend (:mod:`curation.ocr_ppocr`, the default since
2026-12-02) uses ``rapidocr_onnxruntime``'s models differently (detection at ``max_side``, no
classifier, the ``partial`` rule); ``benchmarks/bench_text_spotting.py`` measures it.
``rapidocr_onnxruntime`` is a project dependency; ``rapidocr`` 3.x is not
(``pip install rapidocr`` to run it here):

- ``rapidocr_v4``: ``rapidocr_onnxruntime`` (1.4: PP-OCRv4 mobile det/rec, ONNX Runtime)
- ``rapidocr``: ``rapidocr`` (3.x: its default PP-OCR models shipped in the wheel, ONNX Runtime)

Engines that are not installed are reported and skipped.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))

import numpy as np  # noqa: E402

from curation import textspot_data  # noqa: E402
from curation.ocr import EasyOCRBackend, TextSpotter, TextSpottingConfig, set_torch_threads  # noqa: E402


class RapidOCRv4Backend:
    name = "rapidocr_v4"

    def __init__(self, threads: int):
        from rapidocr_onnxruntime import RapidOCR

        self.engine = RapidOCR(intra_op_num_threads=threads, inter_op_num_threads=1)

    def read(self, images):
        out = []
        for a in images:
            found, _elapsed = self.engine(np.ascontiguousarray(a[:, :, ::-1]))  # RGB -> BGR
            out.append([(text, float(conf)) for _box, text, conf in (found or [])])
        return out


class RapidOCRBackend:
    name = "rapidocr"

    def __init__(self, threads: int):
        from rapidocr import RapidOCR

        self.engine = RapidOCR(params={"EngineConfig.onnxruntime.intra_op_num_threads": threads,
                                       "EngineConfig.onnxruntime.inter_op_num_threads": 1})

    def read(self, images):
        out = []
        for a in images:
            r = self.engine(np.ascontiguousarray(a[:, :, ::-1]))
            out.append(list(zip(r.txts or (), map(float, r.scores or ()))))
        return out


def make(name: str, threads: int):
    if name == "easyocr":
        set_torch_threads(threads)
        return EasyOCRBackend(batched=False)
    return {"rapidocr_v4": RapidOCRv4Backend, "rapidocr": RapidOCRBackend}[name](threads)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--pairs", type=int, default=150)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--engines", nargs="+", default=["easyocr", "rapidocr_v4", "rapidocr"])
    args = ap.parse_args(argv)

    pairs = textspot_data.generate(args.pairs, seed=0, size=(320, 240))  # as the labelled-set test
    truth = np.array([p.must_drop for p in pairs])
    cfg = TextSpottingConfig.defaults()
    print(f"labelled set: {len(pairs)} pairs (320x240), {int(truth.sum())} must be dropped; "
          f"{args.threads} threads; measure {cfg.measure} >= {cfg.threshold}")
    base = None
    for name in args.engines:
        try:
            spotter = TextSpotter(cfg, make(name, args.threads))
        except ImportError as exc:
            print(f"  {name:12s} not installed ({exc.name}); skipped")
            continue
        spotter.spot([pairs[0].image], [pairs[0].caption])  # warm-up
        t = time.perf_counter()
        res = spotter.spot([p.image for p in pairs], [p.caption for p in pairs])
        rate = len(pairs) / (time.perf_counter() - t)
        drop = np.array([not r.passed for r in res])
        tp = int((drop & truth).sum())
        precision, recall = tp / max(1, int(drop.sum())), tp / int(truth.sum())
        base = base or rate
        print(f"  {name:12s} {rate:5.2f} images/s ({rate / base:.2f}x the first engine)  "
              f"precision {precision:.3f}  recall {recall:.3f}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
