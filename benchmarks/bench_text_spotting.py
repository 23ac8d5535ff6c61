"""Benchmark of the Text-spotting (T) stage: raw EasyOCR vs the Ray Data stage, and the cascade.

    python benchmarks/bench_text_spotting.py [--images 40] [--mix 200] [--cpus 2] [--labelled 0] [--gpu]
                                             [key.sub=value ...]   # curation config overrides

Measured in one run, side by side, on images of the generated labelled set
(:mod:`curation.textspot_data`: caption text, unrelated text or no text over flat, gradient and
photo-like backgrounds, 384 x 288):

1. **Raw EasyOCR**: images/s of a ``reader.readtext`` loop in this one process (torch using
   ``--cpus`` threads), over the images decoded as the stage decodes them
   (:func:`curation.images.decode_rgb`), timed from the loaded reader to the last result.
2. **Ray T stage**: images/s of the same images as pending rows through
   ``map_batches(TextSpottingStage, ...)`` as :func:`curation.pipeline.build_dataset` wires it,
   with ``--cpus`` actors of 1 CPU and 1 torch thread each, on a local Ray with ``--cpus`` CPUs;
   timed from the moment every actor has built its reader (``wait_for_min_actors_s``, as in
   ``bench_caption_filters.py``) to the last output batch. The recognised text is checked to
   equal the raw loop's.
3. Their ratio (same number of cores on both sides); the project target is >= 0.80.
4. **Cascade end to end**: the whole job (:func:`curation.pipeline.curate`, default config,
   ``--cpus`` CPUs) on ``--mix`` generated pairs of which about half fail C or A, with the cascade
   (OCR only what passed C and A) and with ``evaluate_all=true``; samples/s of each (actor
   start-up included: it is part of every job) and the speed-up; target >= 1.5x.
5. With ``--labelled N``: precision and recall of the drop decision on N labelled pairs for the
   ``content_words`` measure at thresholds 0.1..0.9 and for Fondant's rule (OCR once, then score).

``--gpu`` runs parts 1-2 with EasyOCR on the GPU (batched ``readtext_batched`` in the stage).
"""

from __future__ import annotations

import os

os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")

import argparse  # noqa: E402
import io  # noqa: E402
import json  # noqa: E402
import sys  # noqa: E402
import tarfile  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))
sys.path.insert(0, str(REPO_ROOT / "benchmarks"))

import numpy as np  # noqa: E402
import pyarrow as pa  # noqa: E402

from bench_caption_filters import timed_actor_pass  # noqa: E402
from curation import textspot_data  # noqa: E402
from curation.config import CONFIG_DIR, build_config  # noqa: E402
from curation.ingest import PENDING, ROW_SCHEMA, make_row  # noqa: E402
from curation.images import decode_rgb  # noqa: E402
from curation.ocr import EasyOCRBackend, TextSpotter, TextSpottingConfig, set_torch_threads  # noqa: E402
from curation.text_overlap import TextOverlapConfig  # noqa: E402


def default_cfg(*overrides) -> dict:
    return build_config(CONFIG_DIR / "curation" / "cat_filter.yaml", overrides=list(overrides))


# --- 1. raw EasyOCR ---------------------------------------------------------------------------

def bench_raw(images: list[bytes], cfg: dict, threads: int, gpu: bool) -> dict:
    set_torch_threads(threads)
    ts = cfg["filters"]["text_spotting"]
    backend = EasyOCRBackend(gpu=gpu, batched=False, batch_size=cfg["stages"]["ocr"]["ocr_batch_size"])
    t = time.perf_counter()
    texts = []
    for data in images:
        arr = np.asarray(decode_rgb(data, max_side=ts["max_side"]))
        found = backend.reader.readtext(arr, batch_size=backend.batch_size)
        texts.append([s for _b, s, c in found if c >= ts["min_confidence"] and s.strip()])
    dt = time.perf_counter() - t
    return {"rate": len(images) / dt, "seconds": dt, "texts": texts}


# --- 2. the Ray stage ------------------------------------------------------------------------------

def image_blocks(images: list[bytes], rows: int) -> list[pa.Table]:
    out = []
    for i in range(0, len(images), rows):
        part = [make_row(f"{j:09d}", "bench", caption="a dog running", status=PENDING, image=images[j])
                for j in range(i, min(i + rows, len(images)))]
        t = pa.Table.from_pylist(part, schema=ROW_SCHEMA)
        t = t.append_column("passed_complexity", pa.array([True] * t.num_rows))
        out.append(t.append_column("passed_action", pa.array([True] * t.num_rows)))
    return out


def ocr_stage(blocks, cfg: dict, actors: int, gpu: bool):
    import ray

    from curation.pipeline import TextSpottingStage, ocr_rows_per_call

    os_ = cfg["stages"]["ocr"]
    return ray.data.from_arrow(blocks).map_batches(
        TextSpottingStage,
        fn_constructor_kwargs={"ts_cfg": cfg["filters"]["text_spotting"],
                               "max_pixels": cfg["ingest"]["max_image_pixels"], "gpu": gpu,
                               "torch_threads": 1, "ocr_batch_size": os_["ocr_batch_size"]},
        batch_size=ocr_rows_per_call({**os_, "num_gpus": 1 if gpu else 0}), batch_format="pyarrow",
        compute=ray.data.ActorPoolStrategy(size=actors), num_cpus=1, num_gpus=1 if gpu else 0)


def bench_ray(images: list[bytes], cfg: dict, actors: int, gpu: bool) -> dict:
    from curation.pipeline import ocr_rows_per_call

    blocks = image_blocks(images, ocr_rows_per_call({**cfg["stages"]["ocr"], "num_gpus": 1 if gpu else 0}))
    r = timed_actor_pass(lambda b: ocr_stage(b, cfg, actors, gpu), image_blocks(images[:actors], 1),
                         blocks, actors, num_gpus=actors if gpu else 0)
    out = r.pop("out").sort_by("key")
    texts = [(s or "").split("\n") if s else [] for s in out["ocr_text"].to_pylist()]
    return {**r, "rate": len(images) / r["seconds"], "texts": texts}


# --- 4. the cascade end to end ------------------------------------------------------------------

def write_input(folder: Path, pairs, shard_size: int = 32) -> None:
    """The pairs as img2dataset-style webdataset shards (tar only; ingest needs no sidecar)."""
    folder.mkdir(parents=True, exist_ok=True)
    for s in range(0, len(pairs), shard_size):
        with tarfile.open(folder / f"{s // shard_size:05d}.tar", "w") as tar:
            for p in pairs[s:s + shard_size]:
                for ext, data in (("jpg", p.image), ("txt", p.caption.encode()),
                                  ("json", json.dumps({"key": p.key}).encode())):
                    info = tarfile.TarInfo(f"{p.key}.{ext}")
                    info.size, info.mtime = len(data), 0
                    tar.addfile(info, io.BytesIO(data))


def bench_cascade(n: int, cpus: int, workdir: Path, overrides=()) -> dict:
    import ray

    from curation.pipeline import curate

    pairs = textspot_data.generate(n, seed=1)
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
            results[name] = {"seconds": dt, "rate": n / dt, "funnel": summary["funnel"]}
    finally:
        ray.shutdown()
    return results


# --- 5. threshold sweep on the labelled set ------------------------------------------------------

def bench_labelled(n: int, cfg: dict, threads: int) -> list[tuple]:
    set_torch_threads(threads)
    pairs = textspot_data.generate(n, seed=0, size=(320, 240))
    spotter = TextSpotter(TextSpottingConfig.from_config(cfg["filters"]["text_spotting"]), EasyOCRBackend())
    texts = [r.ocr_text.split("\n") if r.ocr_text else []
             for r in spotter.spot([p.image for p in pairs], [p.caption for p in pairs])]
    truth = np.array([p.must_drop for p in pairs])
    rows = []
    measures = [("content_words", t) for t in (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9)] + [("fondant", 0.5)]
    for measure, thr in measures:
        oc = TextOverlapConfig(measure, thr)
        drop = np.array([not oc.passes(oc.score(t, p.caption)) for t, p in zip(texts, pairs)])
        tp = int((drop & truth).sum())
        rows.append((measure, thr, tp / max(1, drop.sum()), tp / truth.sum()))
    return rows


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--images", type=int, default=40, help="images for parts 1-3")
    ap.add_argument("--mix", type=int, default=200, help="pairs for the cascade end-to-end run (0: skip)")
    ap.add_argument("--cpus", type=int, default=2)
    ap.add_argument("--labelled", type=int, default=0, help="labelled pairs for the threshold sweep")
    ap.add_argument("--gpu", action="store_true", help="EasyOCR on the GPU in parts 1-2")
    ap.add_argument("overrides", nargs="*", help="curation config overrides (key.sub=value)")
    args = ap.parse_args(argv)
    cfg = default_cfg(*args.overrides)

    images = [p.image for p in textspot_data.generate(args.images, seed=2)]
    print(f"[1] raw EasyOCR readtext loop, 1 process, {args.cpus} torch threads, {len(images)} images "
          f"(384x288){' on the GPU' if args.gpu else ''}", flush=True)
    raw = bench_raw(images, cfg, args.cpus, args.gpu)
    print(f"    {raw['rate']:.2f} images/s ({raw['seconds']:.1f}s)", flush=True)
    print(f"[2] Ray T stage, {args.cpus} actors x 1 thread", flush=True)
    ray_ = bench_ray(images, cfg, args.cpus, args.gpu)
    same = sum(a == b for a, b in zip(raw["texts"], ray_["texts"]))
    print(f"    {ray_['rate']:.2f} images/s ({ray_['seconds']:.1f}s, {ray_['how']}; "
          f"start-up {ray_['startup_s']:.1f}s not timed); same text as raw for {same}/{len(images)} images",
          flush=True)
    ratio = ray_["rate"] / raw["rate"]
    print(f"[3] Ray stage / raw loop (same {args.cpus} cores): {ratio:.2f}  "
          f"{'PASS' if ratio >= 0.8 else 'FAIL'} (target >= 0.80)", flush=True)

    if args.mix:
        with tempfile.TemporaryDirectory() as tmp:
            res = bench_cascade(args.mix, args.cpus, Path(tmp), args.overrides)
        on, off = res["cascade"], res["evaluate_all"]
        f = on["funnel"]
        print(f"[4] whole job on {args.mix} pairs ({f['evaluated'] - f['passed_action']} fail C or A), "
              f"{args.cpus} CPUs, default config", flush=True)
        for name, r in res.items():
            print(f"    {name:13s} {r['rate']:.2f} samples/s ({r['seconds']:.1f}s, "
                  f"OCR on {r['funnel']['text_spotting_evaluated']}, kept {r['funnel']['kept']})")
        speedup = off["seconds"] / on["seconds"]
        print(f"    cascade speed-up: {speedup:.2f}x  {'PASS' if speedup >= 1.5 else 'FAIL'} (target >= 1.5x)")
        assert on["funnel"]["kept"] == off["funnel"]["kept"], "the cascade changed the result"

    if args.labelled:
        print(f"[5] labelled set, {args.labelled} pairs (320x240): precision / recall of the drop decision")
        for measure, thr, p, r in bench_labelled(args.labelled, cfg, args.cpus):
            label = f"{measure} >= {thr:.1f}" if measure == "content_words" else "fondant (any word)"
            print(f"    {label:22s} precision {p:.3f}  recall {r:.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
