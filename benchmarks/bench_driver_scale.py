"""Does the curation driver stay flat as the data grows?

Part 1 builds synthetic *committed* curation outputs of 100k, 1M and 5M stats rows (10,000-row
shards in the real stats schema, with the per-shard summaries the job writes at commit, and
realistic caption and URL strings: real LAION captions from ../shared/data when present, else
generated ones), then times, each size in a fresh process, the job's end-of-job step (listing the
committed shards, adding up their summaries into the funnel and ``sizes.json``, writing both) and
the HTML report (DuckDB aggregates + a bounded example sample), with the process's peak RSS.
It prints the 5M/100k ratios; the target is a peak-RSS ratio <= 1.2 and time growing no faster
than the number of shards.

Part 2 runs the real curation job (local Ray, C+A, text spotting off) on the demo data at two
sizes (the same 4 shards, more samples in each) and reports the driver process's CPU time per
input sample, which should be ~0: no per-sample row reaches the driver.

    python benchmarks/bench_driver_scale.py [--sizes 100000 1000000 5000000] [--skip-job]
"""

from __future__ import annotations

import argparse
import json
import os
import random
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import pyarrow as pa  # noqa: E402
import pyarrow.parquet as pq  # noqa: E402

from curation.output import STATS_SCHEMA, OutputFolder, shard_summary  # noqa: E402

ROWS_PER_SHARD = 10_000
JOB_SHARDS = 4  # part 2: the same shards at every size, so only the samples per shard grow
SHARED_CAPTIONS = Path(__file__).resolve().parents[2] / "shared" / "data" / "laion_captions_1000.parquet"
WORDS = ("a man riding a red bicycle down the street photo of the beach at sunset with people "
         "walking dogs stock image vintage poster wedding dress modern kitchen interior design "
         "logo vector illustration girl playing guitar").split()


def caption_pool(n: int = 2000) -> list[str]:
    if SHARED_CAPTIONS.exists():
        table = pq.read_table(SHARED_CAPTIONS)
        col = next(c for c in ("caption", "TEXT", "text") if c in table.column_names)
        pool = [c for c in table[col].to_pylist() if c]
        if pool:
            return pool
    rng = random.Random(0)
    return [" ".join(rng.choice(WORDS) for _ in range(rng.randint(3, 18))) for _ in range(n)]


def synthetic_shard(name: str, captions: list[str], rng: random.Random) -> pa.Table:
    """One shard's stats rows with a plausible mix of statuses and scores."""
    n = ROWS_PER_SHARD
    rows = {f.name: [None] * n for f in STATS_SCHEMA}
    for i in range(n):
        key = f"{name}{i:04d}"
        r = rng.random()
        status = ("not_downloaded" if r < 0.08 else "error" if r < 0.1
                  else "kept" if r < 0.3 else "dropped")
        rows["key"][i], rows["shard"][i], rows["status"][i] = key, name, status
        rows["url"][i] = f"https://images.example-cdn.com/media/{rng.getrandbits(64):016x}/{key}.jpg"
        rows["caption"][i] = captions[rng.randrange(len(captions))]
        if status == "error":
            rows["error"][i] = "image is truncated or corrupt: broken data stream"
        if status in ("kept", "dropped"):
            c, a = rng.randint(0, 6), rng.randint(0, 4)
            rows["complexity"][i], rows["num_actions"][i] = c, a
            pc, pa_ = (True, True) if status == "kept" else (c >= 1, a >= 1)
            rows["passed_complexity"][i], rows["passed_action"][i] = pc, pa_
            if status == "dropped" and pc and pa_:  # dropped by T
                rows["text_overlap"][i], rows["passed_text_spotting"][i] = 0.6, False
                rows["ocr_text"][i], rows["ocr_boxes"][i] = "SALE 50% OFF", 2
                rows["text_spotting_status"][i] = "evaluated"
            elif status == "kept":
                rows["text_overlap"][i], rows["passed_text_spotting"][i] = 0.0, True
                rows["ocr_boxes"][i], rows["text_spotting_status"][i] = 0, "evaluated"
            else:
                rows["text_spotting_status"][i] = "not_evaluated"
            rows["drop_reason"][i] = (None if status == "kept" else "complexity" if not pc
                                      else "action" if not pa_ else "text_spotting")
            rows["width"][i], rows["height"][i] = 512, 384
            rows["image_format"][i], rows["image_bytes"][i] = "jpg", rng.randint(20_000, 90_000)
    return pa.Table.from_pydict(rows, schema=STATS_SCHEMA)


def build_output(root: Path, num_rows: int, captions: list[str]) -> None:
    out = OutputFolder(str(root))
    out.prepare()
    rng = random.Random(num_rows)
    template = [synthetic_shard("t", captions, rng) for _ in range(4)]  # vary a few templates
    for s in range(num_rows // ROWS_PER_SHARD):
        name = f"{s:05d}"
        t = template[s % len(template)]
        keys = pa.array([name + k[1:] for k in t["key"].to_pylist()])
        t = t.set_column(0, "key", keys).set_column(1, "shard", pa.array([name] * t.num_rows))
        pq.write_table(t, out.path("stats", f"{name}.parquet"))
        (root / "shards" / f"{name}.tar").write_bytes(b"")
        out.write_json(f"shard_summaries/{name}.json", shard_summary(name, t, tar_bytes=0))


def build_many_shards(root: Path, num_shards: int) -> None:
    """A LAION-sized output's bookkeeping: ``num_shards`` committed shards (empty stats files,
    real per-shard summaries of a 10,000-row shard), for the listing and the end-of-job step."""
    out = OutputFolder(str(root))
    out.prepare()
    t = synthetic_shard("t", caption_pool(200), random.Random(1))
    proto = shard_summary("t", t, tar_bytes=123_456_789)
    for s in range(num_shards):
        name = f"{s:06d}"
        (root / "stats" / f"{name}.parquet").write_bytes(b"")
        (root / "shard_summaries" / f"{name}.json").write_text(json.dumps({**proto, "shard": name}))


def child(root: str, what: str) -> dict:
    """Runs in a fresh process: the end-of-job step or the report; time and peak RSS."""
    from curation.output import aggregate, format_funnel
    from curation.report import write_report

    start = time.perf_counter()
    if what == "end_of_job":
        out = OutputFolder(root)
        committed = out.committed()
        total, sizes, totals = aggregate(out, committed)
        out.write_json("shards/sizes.json", sizes)
        out.write_json("summary.json", {"funnel": total, "bytes": totals, "input": None,
                                        "output": root})
        format_funnel(total)
    else:
        write_report(root)
    return {"seconds": time.perf_counter() - start,
            "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}


def run_child(root: Path, what: str) -> dict:
    res = subprocess.run([sys.executable, __file__, "--child", what, "--root", str(root)],
                         capture_output=True, text=True, check=True)
    return json.loads(res.stdout.strip().splitlines()[-1])


def driver_cpu_per_sample(sizes: list[int]) -> list[dict]:
    """The real job on the demo at each size: the driver's CPU seconds during curate()."""
    import ray

    from curation.common.config import CONFIG_DIR, build_config
    from curation.demo_data import build_demo_dataset
    from curation.common.jobs import init_ray
    from curation.pipeline import curate

    init_ray({"num_cpus": 2})
    ray.data.DataContext.get_current().enable_progress_bars = False
    rows = []
    work = Path(tempfile.mkdtemp(prefix="drvcpu"))
    try:
        for n in sizes:
            inp = build_demo_dataset(work / f"in{n}", num_samples=n, num_shards=JOB_SHARDS)
            cfg = build_config(CONFIG_DIR / "curation" / "cat_filter.yaml",
                               overrides=[f"input={inp}", f"output={work / f'out{n}'}",
                                          "progress=false", "report=false",
                                          "filters.text_spotting.enabled=false"])
            cpu0, t0 = time.process_time(), time.perf_counter()
            curate(cfg, log=lambda *_: None)
            rows.append({"samples": n, "driver_cpu_s": time.process_time() - cpu0,
                         "wall_s": time.perf_counter() - t0})
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return rows


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", type=int, nargs="+", default=[100_000, 1_000_000, 5_000_000])
    ap.add_argument("--job-sizes", type=int, nargs="+", default=[400, 4000])
    ap.add_argument("--skip-job", action="store_true", help="skip part 2 (the real job)")
    ap.add_argument("--many-shards", type=int, default=200_000,
                    help="part 3: committed-shard listing + end-of-job step at this many shards (0: skip)")
    ap.add_argument("--child", choices=["end_of_job", "report"], help=argparse.SUPPRESS)
    ap.add_argument("--root", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.child:
        print(json.dumps(child(args.root, args.child)))
        return 0

    captions = caption_pool()
    work = Path(tempfile.mkdtemp(prefix="drvscale"))
    results = []
    try:
        for n in args.sizes:
            root = work / f"out{n}"
            t0 = time.perf_counter()
            build_output(root, n, captions)
            built = time.perf_counter() - t0
            eoj, rep = run_child(root, "end_of_job"), run_child(root, "report")
            results.append({"rows": n, "shards": n // ROWS_PER_SHARD, "build_s": built,
                            "end_of_job": eoj, "report": rep})
            print(f"{n:>9,} rows {n // ROWS_PER_SHARD:>4} shards | end of job {eoj['seconds']:6.2f} s "
                  f"{eoj['peak_rss_mb']:7.0f} MB | report {rep['seconds']:6.2f} s "
                  f"{rep['peak_rss_mb']:7.0f} MB", flush=True)
            shutil.rmtree(root)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    lo, hi = results[0], results[-1]
    shard_ratio = hi["shards"] / lo["shards"]
    print(f"\n{hi['rows']:,} / {lo['rows']:,} rows ({shard_ratio:.0f}x the shards):")
    ok = True
    for part in ("end_of_job", "report"):
        rss = hi[part]["peak_rss_mb"] / lo[part]["peak_rss_mb"]
        tim = hi[part]["seconds"] / lo[part]["seconds"]
        verdict = "PASS" if rss <= 1.2 and tim <= shard_ratio else "FAIL"
        ok &= verdict == "PASS"
        grew = hi[part]["peak_rss_mb"] - lo[part]["peak_rss_mb"]
        print(f"  {part:<10} peak RSS ratio {rss:5.2f} (target <= 1.2; {grew:+.0f} MB)  time ratio "
              f"{tim:6.1f} (target <= {shard_ratio:.0f})  {verdict}")

    if not args.skip_job:
        print(f"\nreal curation job (local Ray, 2 CPUs, C+A, OCR off, {JOB_SHARDS} shards): driver CPU")
        job = driver_cpu_per_sample(args.job_sizes)
        for r in job:
            print(f"  {r['samples']:>6} samples: driver CPU {r['driver_cpu_s']:6.2f} s, "
                  f"{1e3 * r['driver_cpu_s'] / r['samples']:6.3f} ms/sample, wall {r['wall_s']:6.1f} s")
        a, b = job[0], job[-1]
        marginal = (b["driver_cpu_s"] - a["driver_cpu_s"]) / (b["samples"] - a["samples"])
        print(f"  marginal driver CPU per extra sample: {1e3 * marginal:.3f} ms "
              f"(the driver's Ray Data executor works per block and per task, not per sample)")
        results.append({"job": job, "marginal_driver_cpu_ms_per_sample": 1e3 * marginal})
    if args.many_shards:
        root = Path(tempfile.mkdtemp(prefix="drvshards"))
        try:
            build_many_shards(root, args.many_shards)
            t0 = time.perf_counter()
            n = len(OutputFolder(str(root)).committed())
            listing = time.perf_counter() - t0
            eoj = run_child(root, "end_of_job")
        finally:
            shutil.rmtree(root, ignore_errors=True)
        print(f"\n{n:,} committed shards (2 billion rows at 10,000 per shard), local disk: listing "
              f"{listing:.2f} s (one call); end-of-job step {eoj['seconds']:.1f} s, peak RSS "
              f"{eoj['peak_rss_mb']:.0f} MB")
        results.append({"many_shards": n, "listing_s": listing, "end_of_job": eoj})
    out = Path("outputs") / "bench_driver_scale.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=2))
    print(f"\nwrote {out}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
