"""Benchmark of the Text-spotting (T) stage: today's EasyOCR vs the new default, and the cascade.

    python benchmarks/bench_text_spotting.py [--gen 150] [--real 180] [--mix 5000] [--cpus 2]
                                             [--sweep] [--stage 0] [--labelled 0]
                                             [key.sub=value ...]   # curation config overrides

Measured in one run, side by side, on the same images and cores:

1. **Engines on the labelled sets** (:mod:`curation.textspot_data`): the generated set (``--gen``
   pairs, 320 x 240, as ``tests/test_text_spotting.py``) and, when ``../shared/data`` is present,
   real photos with real captions rendered at varied sizes (``--real`` pairs,
   :func:`curation.textspot_data.real_photo_set`). Each engine is a
   :class:`curation.ocr.TextSpotter` in this process with ONE thread (torch and ONNX Runtime), so
   images/s is per core; the engines take turns image by image (the order rotating), so load
   from other jobs falls on all of them alike. Per engine: images/s per core and its ratio to
   today's configuration (EasyOCR, ``max_side`` 512, ``content_words`` >= 0.4), where the time
   goes (detection, recognition, the rest: decoding, pre/post-processing, matching), boxes per
   image, and precision/recall of the drop decision under its own rule and under both rules
   (``content_words`` and ``partial``, from the same OCR text). ``--sweep`` adds EasyOCR at
   ``max_side`` 384/320/256, PP-OCR detection at 384/320/256 and PP-OCR boxes read by EasyOCR's
   recogniser.
2. **Whole job, cascade vs evaluate_all** (``--mix`` pairs; needs ``../shared/data``): each of
   the real captions of ``laion_captions_1000.parquet`` (repeated when ``--mix`` is larger, each
   time with another photo) with a real photo (half show no text, a
   quarter the caption, a quarter unrelated text), as img2dataset shards; the whole job
   (:func:`curation.pipeline.curate`, default config, ``--cpus`` CPUs, actor start-up included)
   with the cascade (OCR only what passed C and A) and with ``evaluate_all=true``; samples/s and
   the speed-up (target >= 3x).
3. ``--stage N``: the Ray T stage (``--cpus`` actors x 1 thread) vs a raw loop of the same
   backend in one process with ``--cpus`` threads, on N generated images (target >= 0.80).
4. ``--labelled N``: precision/recall of the default engine's drop decision on N generated
   pairs for ``partial`` and ``content_words`` at thresholds 0.1..0.9 and for Fondant's rule.
"""

from __future__ import annotations

import os

os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")

import argparse  # noqa: E402
import io  # noqa: E402
import json  # noqa: E402
import random  # noqa: E402
import sys  # noqa: E402
import tarfile  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

REPO_ROOT = Path(__file__).resolve().parents[1]
SHARED = REPO_ROOT.parent / "shared" / "data"
sys.path.insert(0, str(REPO_ROOT))
sys.path.insert(0, str(REPO_ROOT / "benchmarks"))

import numpy as np  # noqa: E402
import pyarrow as pa  # noqa: E402

from curation import textspot_data  # noqa: E402
from curation.common.config import CONFIG_DIR, build_config  # noqa: E402
from curation.images import decode_rgb  # noqa: E402
from curation.ingest import PENDING, ROW_SCHEMA, make_row  # noqa: E402
from curation.ocr import TextSpotter, TextSpottingConfig, set_torch_threads  # noqa: E402
from curation.text_overlap import TextOverlapConfig  # noqa: E402

TODAY = {"backend": "easyocr", "measure": "content_words", "max_side": 512}  # before 2026-12-02
SWEEP = ([(f"easyocr max_side {s}", {**TODAY, "max_side": s}) for s in (384, 320, 256)]
         + [(f"ppocr det_side {s}", {"backend": "ppocr", "det_side": s}) for s in (384, 320, 256)]
         + [("ppocr det + easyocr rec", {"backend": "ppocr", "recogniser": "easyocr"})])


def default_cfg(*overrides) -> dict:
    return build_config(CONFIG_DIR / "curation" / "cat_filter.yaml", overrides=list(overrides))


def shared_inputs() -> tuple[list[bytes], list[str]] | None:
    """Real photos and real captions from ../shared/data (None when absent: a user's clone)."""
    photos = sorted((SHARED / "real_images").glob("*.jpg")) if SHARED.is_dir() else []
    captions = SHARED / "laion_captions_1000.parquet"
    if not photos or not captions.exists():
        return None
    import pandas as pd

    return [p.read_bytes() for p in photos], pd.read_parquet(captions)["caption"].tolist()


# --- 1. engines side by side on the labelled sets -----------------------------------------------

class Timed:
    """Adds up the seconds spent in an engine's detection and recognition calls."""

    def __init__(self, spotter: TextSpotter):
        self.spotter, self.det, self.rec = spotter, 0.0, 0.0
        backend = spotter.backend
        target = backend.reader if hasattr(backend, "reader") else backend  # EasyOCR: its Reader
        names = ("detect", "recognize") if hasattr(backend, "reader") else ("detect", "recognise")
        for attr, name in zip(("det", "rec"), names):
            setattr(target, name, self._wrap(getattr(target, name), attr))

    def _wrap(self, fn, attr):
        def timed(*a, **k):
            t = time.perf_counter()
            try:
                return fn(*a, **k)
            finally:
                setattr(self, attr, getattr(self, attr) + time.perf_counter() - t)
        return timed


def make_spotter(ts: dict, overrides: dict, batch_size: int) -> Timed:
    cfg = TextSpottingConfig.from_config({**ts, **overrides})
    return Timed(TextSpotter(cfg, cfg.make_backend(batch_size=batch_size, threads=1)))


def precision_recall(drop: np.ndarray, truth: np.ndarray) -> tuple[float, float]:
    tp = int((drop & truth).sum())
    return tp / max(1, int(drop.sum())), tp / max(1, int(truth.sum()))


def bench_engines(sets: dict, engines: list[tuple[str, dict]], cfg: dict) -> dict:
    """Every engine on every set, image by image in rotating order; one thread each."""
    set_torch_threads(1)
    ts, batch = cfg["filters"]["text_spotting"], cfg["stages"]["ocr"]["ocr_batch_size"]
    spotters = [make_spotter(ts, o, batch) for _, o in engines]
    for s in spotters:  # warm-up (first-call allocations), not timed
        s.spotter.spot([textspot_data.text_image("warm up", seed=1)], ["warm up"])
    out = {}
    for set_name, pairs in sets.items():
        n = len(spotters)
        seconds, det, rec = np.zeros(n), np.zeros(n), np.zeros(n)
        results = [[None] * len(pairs) for _ in spotters]
        for s in spotters:
            s.det = s.rec = 0.0
        for i, p in enumerate(pairs):
            for k in range(n):
                e = (i + k) % n
                t = time.perf_counter()
                results[e][i] = spotters[e].spotter.spot([p.image], [p.caption])[0]
                seconds[e] += time.perf_counter() - t
        truth = np.array([p.must_drop for p in pairs])
        rows = []
        for e, ((label, _o), s) in enumerate(zip(engines, spotters)):
            res = results[e]
            texts = [r.ocr_text.split("\n") if r.ocr_text else [] for r in res]
            own = precision_recall(np.array([r.passed is False for r in res]), truth)
            by_rule = {}
            for measure in ("content_words", "partial"):
                oc = TextOverlapConfig(measure, 0.4)
                drop = np.array([not oc.passes(oc.score(t, p.caption)) for t, p in zip(texts, pairs)])
                by_rule[measure] = precision_recall(drop, truth)
            misses = [(p.kind, p.caption[:60], r.ocr_text, r.text_overlap) for p, r in zip(pairs, res)
                      if (r.passed is False) != p.must_drop]
            rows.append({"label": label, "rate": len(pairs) / seconds[e], "seconds": seconds[e],
                         "det_ms": 1000 * s.det / len(pairs), "rec_ms": 1000 * s.rec / len(pairs),
                         "other_ms": 1000 * (seconds[e] - s.det - s.rec) / len(pairs),
                         "boxes": float(np.mean([r.ocr_boxes or 0 for r in res])),
                         "own": own, "rule": res[0].rule, "by_rule": by_rule, "misses": misses})
        out[set_name] = rows
    return out


def print_engines(set_name: str, pairs, rows: list[dict]) -> None:
    truth = sum(p.must_drop for p in pairs)
    print(f"    {set_name}: {len(pairs)} pairs, {truth} must be dropped")
    print(f"    {'engine':30s} {'img/s/core':>10s} {'vs today':>8s} {'det ms':>7s} {'rec ms':>7s} "
          f"{'rest ms':>7s} {'boxes':>5s}  {'own rule':16s} {'P/R':11s} | content_words P/R | partial P/R")
    base = rows[0]["rate"]
    for r in rows:
        (p, rc), cw, pa_ = r["own"], r["by_rule"]["content_words"], r["by_rule"]["partial"]
        print(f"    {r['label']:30s} {r['rate']:10.2f} {r['rate'] / base:7.2f}x {r['det_ms']:7.1f} "
              f"{r['rec_ms']:7.1f} {r['other_ms']:7.1f} {r['boxes']:5.2f}  {r['rule']:16s} "
              f"{p:.3f}/{rc:.3f} | {cw[0]:.3f}/{cw[1]:.3f}       | {pa_[0]:.3f}/{pa_[1]:.3f}", flush=True)
    for r in rows[:2]:
        for m in r["misses"]:
            print(f"      miss ({r['label']}): {m}")


# --- 2. the whole job on a real-caption mix: cascade vs evaluate_all ----------------------------

def caption_mix(photos: list[bytes], captions: list[str], seed: int = 0) -> list[tuple[str, str, bytes]]:
    """(key, caption, image) for every caption: a real photo showing no text (half), the caption's
    first words (a quarter) or unrelated text (a quarter)."""
    rng = random.Random(seed)
    out = []
    for i, caption in enumerate(captions):
        r = rng.random()
        text = "" if r < 0.5 else (" ".join(caption.split()[:8]) if r < 0.75
                                   else rng.choice(textspot_data.UNRELATED))
        if not (text.isascii() and text.isprintable()):
            text = ""
        out.append((f"{i:06d}", caption, textspot_data.text_over_photo(rng.choice(photos), text, rng)))
    return out


def write_input(folder: Path, pairs, shard_size: int = 100) -> None:
    """(key, caption, image) pairs as img2dataset-style webdataset shards (tar only)."""
    folder.mkdir(parents=True, exist_ok=True)
    for s in range(0, len(pairs), shard_size):
        with tarfile.open(folder / f"{s // shard_size:05d}.tar", "w") as tar:
            for key, caption, image in pairs[s:s + shard_size]:
                for ext, data in (("jpg", image), ("txt", caption.encode()),
                                  ("json", json.dumps({"key": key}).encode())):
                    info = tarfile.TarInfo(f"{key}.{ext}")
                    info.size, info.mtime = len(data), 0
                    tar.addfile(info, io.BytesIO(data))


def bench_cascade(pairs, cpus: int, workdir: Path, overrides=()) -> dict:
    import ray

    from curation.pipeline import curate

    write_input(workdir / "in", pairs)
    ray.init(address="local", num_cpus=cpus, include_dashboard=False, log_to_driver=False)
    results = {}
    try:
        for name, extra in (("cascade", []), ("evaluate_all", ["filters.text_spotting.evaluate_all=true"])):
            cfg = default_cfg(*overrides, f"input={workdir / 'in'}", f"output={workdir / name}",
                              "progress=false", "report=false", *extra)
            t = time.perf_counter()
            summary = curate(cfg, log=lambda *_: None)
            dt = time.perf_counter() - t
            results[name] = {"seconds": dt, "rate": len(pairs) / dt, "funnel": summary["funnel"]}
    finally:
        ray.shutdown()
    return results


# --- 3. the Ray stage vs a raw loop of the same backend ------------------------------------------

def image_blocks(images: list[bytes], rows: int) -> list[pa.Table]:
    out = []
    for i in range(0, len(images), rows):
        part = [make_row(f"{j:09d}", "bench", caption="a dog running", status=PENDING, image=images[j])
                for j in range(i, min(i + rows, len(images)))]
        t = pa.Table.from_pylist(part, schema=ROW_SCHEMA)
        t = t.append_column("passed_complexity", pa.array([True] * t.num_rows))
        out.append(t.append_column("passed_action", pa.array([True] * t.num_rows)))
    return out


def bench_stage(images: list[bytes], cfg: dict, cpus: int) -> tuple[dict, dict]:
    import ray

    from bench_caption_filters import timed_actor_pass
    from curation.pipeline import TextSpottingStage, ocr_rows_per_call
    from curation.settings import curation_config

    ts, os_ = cfg["filters"]["text_spotting"], cfg["stages"]["ocr"]
    rows_per_call = ocr_rows_per_call(curation_config(cfg).stages.ocr)
    set_torch_threads(cpus)
    tcfg = TextSpottingConfig.from_config(ts)
    backend = tcfg.make_backend(batch_size=os_["ocr_batch_size"], threads=cpus)
    t = time.perf_counter()
    raw = [[s for s, c in found if c >= tcfg.min_confidence and s.strip()]
           for found in (backend.read([np.asarray(decode_rgb(d, max_side=tcfg.max_side))])[0] for d in images)]
    raw_s = time.perf_counter() - t

    def stage(blocks):
        return ray.data.from_arrow(blocks).map_batches(
            TextSpottingStage,
            fn_constructor_kwargs={"ts_cfg": ts, "max_pixels": cfg["ingest"]["max_image_pixels"], "gpu": False,
                                   "torch_threads": 1, "ocr_batch_size": os_["ocr_batch_size"]},
            batch_size=rows_per_call, batch_format="pyarrow",
            compute=ray.data.ActorPoolStrategy(size=cpus), num_cpus=1)

    r = timed_actor_pass(stage, image_blocks(images[:cpus], 1), image_blocks(images, rows_per_call), cpus)
    out = r.pop("out").sort_by("key")
    texts = [s.split("\n") if s else [] for s in out["ocr_text"].to_pylist()]
    return {"rate": len(images) / raw_s, "seconds": raw_s, "texts": raw}, {**r, "rate": len(images) / r["seconds"],
                                                                          "texts": texts}


# --- 4. threshold sweep on the generated labelled set --------------------------------------------

def bench_labelled(n: int, cfg: dict) -> list[tuple]:
    set_torch_threads(1)
    pairs = textspot_data.generate(n, seed=0, size=(320, 240))
    tcfg = TextSpottingConfig.from_config(cfg["filters"]["text_spotting"])
    spotter = TextSpotter(tcfg, tcfg.make_backend(threads=1))
    texts = [r.ocr_text.split("\n") if r.ocr_text else []
             for r in spotter.spot([p.image for p in pairs], [p.caption for p in pairs])]
    truth = np.array([p.must_drop for p in pairs])
    rows = []
    measures = ([(m, t) for m in ("partial", "content_words") for t in (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9)]
                + [("fondant", 0.5)])
    for measure, thr in measures:
        oc = TextOverlapConfig(measure, thr)
        drop = np.array([not oc.passes(oc.score(t, p.caption)) for t, p in zip(texts, pairs)])
        rows.append((measure, thr, *precision_recall(drop, truth)))
    return rows


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--gen", type=int, default=150, help="generated labelled pairs (0: skip)")
    ap.add_argument("--real", type=int, default=180, help="real-photo labelled pairs (0: skip)")
    ap.add_argument("--mix", type=int, default=5000,
                    help="pairs for the whole-job run, real captions repeated as needed (0: skip); "
                         "5,000 so that Ray and actor start-up (~35-60 s) does not decide the ratio")
    ap.add_argument("--cpus", type=int, default=2)
    ap.add_argument("--sweep", action="store_true", help="also the smaller sizes and PP-OCR + EasyOCR rec")
    ap.add_argument("--stage", type=int, default=0, help="images for the Ray stage vs raw loop (0: skip)")
    ap.add_argument("--labelled", type=int, default=0, help="generated pairs for the threshold sweep")
    ap.add_argument("overrides", nargs="*", help="curation config overrides (key.sub=value)")
    args = ap.parse_args(argv)
    cfg = default_cfg(*args.overrides)
    shared = shared_inputs()
    new = TextSpottingConfig.from_config(cfg["filters"]["text_spotting"])
    engines = [("today: easyocr 512", TODAY),
               (f"default: {new.backend} {new.side}", {})] + (SWEEP if args.sweep else [])

    sets = {}
    if args.gen:
        sets["generated"] = textspot_data.generate(args.gen, seed=0, size=(320, 240))
    if args.real and shared:
        sets["real photos"] = textspot_data.real_photo_set(*shared, n=args.real, seed=0)
    elif args.real:
        print("    (no ../shared/data: the real-photo set is skipped)")
    if sets:
        print(f"[1] engines side by side, 1 thread each (images/s per core), interleaved image by image; "
              f"today = EasyOCR at max_side 512 with content_words >= 0.4", flush=True)
        res = bench_engines(sets, engines, cfg)
        for name, rows in res.items():
            print_engines(name, sets[name], rows)
        for name, rows in res.items():
            ratio = rows[1]["rate"] / rows[0]["rate"]
            p, r = rows[1]["own"]
            print(f"    {name}: default / today = {ratio:.2f}x images/s per core "
                  f"{'PASS' if ratio >= 5 else 'FAIL'} (target >= 5x); precision {p:.3f} recall {r:.3f} "
                  f"{'PASS' if min(p, r) >= 0.95 else 'FAIL'} (target >= 0.95)", flush=True)

    if args.mix and shared:
        photos, captions = shared
        pairs = caption_mix(photos, [captions[i % len(captions)] for i in range(args.mix)])
        with tempfile.TemporaryDirectory() as tmp:
            res = bench_cascade(pairs, args.cpus, Path(tmp), args.overrides)
        on, off = res["cascade"], res["evaluate_all"]
        f = on["funnel"]
        print(f"[2] whole job on {len(pairs)} pairs of real captions and photos ({f['passed_action']} of "
              f"{f['evaluated']} pass C and A), {args.cpus} CPUs, default config", flush=True)
        for name, r in res.items():
            print(f"    {name:13s} {r['rate']:.2f} samples/s ({r['seconds']:.1f}s, "
                  f"OCR on {r['funnel']['text_spotting_evaluated']}, kept {r['funnel']['kept']})")
        speedup = off["seconds"] / on["seconds"]
        per_image = (off["seconds"] - on["seconds"]) / (off["funnel"]["text_spotting_evaluated"]
                                                         - on["funnel"]["text_spotting_evaluated"])
        fixed = on["seconds"] - per_image * on["funnel"]["text_spotting_evaluated"]
        print(f"    (from the two runs: {per_image * 1000:.0f} ms per OCR'd image on {args.cpus} CPUs, and "
              f"{fixed:.0f} s for everything else: start-up, reading, C+A, writing)")
        print(f"    cascade speed-up: {speedup:.2f}x  {'PASS' if speedup >= 3 else 'FAIL'} (target >= 3x)")
        assert on["funnel"]["kept"] == off["funnel"]["kept"], "the cascade changed the result"
    elif args.mix:
        print("[2] skipped: no ../shared/data (real captions)")

    if args.stage:
        images = [p.image for p in textspot_data.generate(args.stage, seed=2)]
        raw, ray_ = bench_stage(images, cfg, args.cpus)
        same = sum(a == b for a, b in zip(raw["texts"], ray_["texts"]))
        ratio = ray_["rate"] / raw["rate"]
        print(f"[3] {new.backend}: raw loop ({args.cpus} threads) {raw['rate']:.2f} images/s; Ray T stage "
              f"({args.cpus} actors x 1 thread) {ray_['rate']:.2f} images/s ({ray_['how']}); same text for "
              f"{same}/{len(images)}; ratio {ratio:.2f} {'PASS' if ratio >= 0.8 else 'FAIL'} (target >= 0.80)")

    if args.labelled:
        print(f"[4] generated set, {args.labelled} pairs (320x240), {new.backend}: precision / recall of the drop decision")
        for measure, thr, p, r in bench_labelled(args.labelled, cfg):
            label = f"{measure} >= {thr:.1f}" if measure != "fondant" else "fondant (any word)"
            print(f"    {label:22s} precision {p:.3f}  recall {r:.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
