"""The project's small version of DiHT's table: CLIP vs CLIP + HN-NCE vs DiHT on the demo data.

    python benchmarks/compare_recipes.py [--config FILE] [key=value ...]

Driven by ``configs/experiments/compare_recipes.yaml``:

1. the curated demo data (``data.curated``), made when missing with ``curation.pipeline.curate``
   (the default CAT config plus ``data.curation_overrides``);
2. for every seed, every entry of ``recipes`` is trained with ``training.train.train`` (its config
   file, then ``common``, then its own ``overrides``: the same data, budget and seed for all). The
   ``teacher`` entry is trained first; before the first entry with ``concepts: true``, its
   checkpoint labels the data as the open_clip teacher of ``pipelines/label_concepts.py`` (DiHT's
   stage 1) and those entries train on the labels;
3. every run is evaluated by the trainer's end-of-training evaluation (``training.evaluate``:
   zero-shot, retrieval, the few-shot sweep) with the same ``eval`` settings;
4. ``OUTPUT/results.json`` (everything) and ``OUTPUT/results.md`` (the table) are written and the
   table is printed.

All runs share one Ray instance. Run folders are replaced, so timings are of fresh runs.
"""

from __future__ import annotations

import json
import math
import os
import platform
import shutil
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from curation.common.config import CONFIG_DIR, build_config, parse_cli  # noqa: E402

DEFAULT_CONFIG = CONFIG_DIR / "experiments" / "compare_recipes.yaml"

# (column title, path in the evaluation results; {emb} = the entry's embedding name)
COLUMNS = [
    ("demo zero-shot top-1", "demo/zeroshot/{emb}/acc1"),
    ("demo T→I R@1 / R@5", ("demo/retrieval/{emb}/image_retrieval_recall@1",
                           "demo/retrieval/{emb}/image_retrieval_recall@5")),
    ("demo I→T R@1 / R@5", ("demo/retrieval/{emb}/text_retrieval_recall@1",
                           "demo/retrieval/{emb}/text_retrieval_recall@5")),
    ("demo 1-shot", "demo/fewshot/{emb}/k=1/projected"),
    ("demo 8-shot", "demo/fewshot/{emb}/k=8/projected"),
    ("digits zero-shot top-1", "digits/zeroshot/{emb}/acc1"),
    ("digits 1-shot", "digits/fewshot/{emb}/k=1/projected"),
    ("digits 8-shot", "digits/fewshot/{emb}/k=8/projected"),
]


class ExperimentError(RuntimeError):
    pass


# --- pure helpers -----------------------------------------------------------------------------------

def ordered_entries(cfg: dict) -> list[dict]:
    """The recipe entries, the teacher's first; checks names and the teacher."""
    entries = [dict(e) for e in cfg["recipes"]]
    names = [e.get("name") for e in entries]
    if not entries or not all(isinstance(n, str) and n for n in names) or len(set(names)) != len(names):
        raise ExperimentError(f"recipes need unique, non-empty names; got {names}")
    for e in entries:
        unknown = set(e) - {"name", "title", "config", "overrides", "concepts", "embedding"}
        if unknown:
            raise ExperimentError(f"recipe entry {e['name']!r}: unknown keys {sorted(unknown)}")
    if any(e.get("concepts") for e in entries):
        teacher = cfg.get("teacher")
        if teacher not in names:
            raise ExperimentError(f"entries need concept labels but teacher={teacher!r} is not a recipe name")
        if next(e for e in entries if e["name"] == teacher).get("concepts"):
            raise ExperimentError("the teacher entry cannot itself need concept labels")
        entries.sort(key=lambda e: e["name"] != teacher)  # stable: the others keep their order
    return entries


def lookup(results: dict, path: str, emb: str):
    """The value at ``path`` ("ds/kind/emb/metric", or "ds/fewshot/emb/k=K/column") or None."""
    node = results
    for part in path.format(emb=emb).split("/"):
        if isinstance(node, dict) and part.startswith("k=") and "rows" in node:
            node = next((r for r in node["rows"] if str(r["k"]) == part[2:]), None)
        elif isinstance(node, dict):
            node = node.get(part)
        else:
            return None
        if node is None:
            return None
    return node if isinstance(node, (int, float)) else None


def embedding_name(results: dict, wanted: str | None) -> str:
    if wanted:
        return wanted
    for res in results.values():
        for kind in ("zeroshot", "retrieval"):
            if isinstance(res, dict) and res.get(kind):
                return next(iter(res[kind]))
    return "clip"


def mean_std(values: list[float]) -> tuple[float, float] | None:
    vals = [v for v in values if v is not None and not math.isnan(v)]
    if not vals:
        return None
    m = sum(vals) / len(vals)
    return m, math.sqrt(sum((v - m) ** 2 for v in vals) / len(vals))


def fmt(values: list[float]) -> str:
    ms = mean_std(values)
    if ms is None:
        return "-"
    return f"{100 * ms[0]:.1f}" + (f" ± {100 * ms[1]:.1f}" if len(values) > 1 else "")


def markdown_table(rows: list[dict], seeds: list[int]) -> str:
    """``rows``: {"title", "evals": [results per seed], "embedding", "train_s": [...]}."""
    head = ["recipe"] + [c for c, _ in COLUMNS] + ["train + eval s"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for row in rows:
        cells = [row["title"]]
        for _, path in COLUMNS:
            paths = path if isinstance(path, tuple) else (path,)
            parts = [fmt([lookup(ev, p, row["embedding"]) for ev in row["evals"]]) for p in paths]
            cells.append(" / ".join(parts))
        cells.append(f"{sum(row['train_s']) / len(row['train_s']):.0f}")
        lines.append("| " + " | ".join(cells) + " |")
    note = (f"Top-1 / recall in %, {'mean ± std over training seeds ' + str(seeds) if len(seeds) > 1 else 'training seed ' + str(seeds[0])}"
            "; few-shot = the zero-shot-initialised projected probe (mean over the few-shot seeds).")
    return "\n".join(lines) + "\n\n" + note + "\n"


# --- the steps ----------------------------------------------------------------------------------------

def ensure_curated(cfg: dict, log=print) -> tuple[str, float]:
    """The curated folder (made with the default CAT config + overrides when missing)."""
    out = cfg["data"]["curated"]
    if (Path(out) / "shards" / "sizes.json").exists():
        return out, 0.0
    from curation.pipeline import curate

    t0 = time.time()
    log(f"curating the demo data into {out}")
    ccfg = build_config(CONFIG_DIR / "curation" / "cat_filter.yaml",
                        overrides=[*cfg["data"].get("curation_overrides", []), f"output={out}"])
    summary = curate(ccfg, log=log)
    if not summary["funnel"].get("kept"):
        raise ExperimentError(f"the curation of {out} kept no samples")
    return out, time.time() - t0


def train_config(entry: dict, cfg: dict, seed: int, data: str, run_root: str,
                 concepts: str | None) -> dict:
    from training.train import build_train_config

    overrides = [*cfg.get("common", []), f"data.train={data}", f"run.storage_path={run_root}",
                 f"run.name={entry['name']}", f"train.seed={seed}", "eval.enabled=true",
                 *(entry.get("overrides") or [])]
    if entry.get("concepts"):
        overrides.append(f"loss.distill.concepts={concepts}")
    config_file = entry.get("config")
    return build_train_config(str(REPO / config_file) if config_file else None, overrides)


def label_with_teacher(cfg: dict, data: str, checkpoint: str, out: str, log=print) -> dict:
    """DiHT stage 1: ``pipelines/label_concepts.py`` with the teacher run's open_clip checkpoint."""
    import importlib.util

    from training.checkpoint import read_meta

    meta = read_meta(checkpoint)
    arch = meta["arch"]
    overrides = [f"input={data}", f"output={out}", "teacher.kind=open_clip", f"teacher.arch={arch}",
                 f"teacher.checkpoint={Path(checkpoint) / 'open_clip.pt'}"]
    model_json = REPO / "configs" / "models" / f"{arch}.json"
    if model_json.exists():  # the project's tiny architectures are not built into open_clip
        overrides.append(f"teacher.model_config={model_json}")
    lcfg = build_config(CONFIG_DIR / "concepts" / "label_concepts.yaml",
                        overrides=[*overrides, *(cfg.get("labels") or {}).get("overrides", [])])
    spec = importlib.util.spec_from_file_location("label_concepts_job", REPO / "pipelines" / "label_concepts.py")
    job = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(job)
    if Path(out).exists():
        shutil.rmtree(out)
    return job.label_concepts(lcfg, log=log)


def run(cfg: dict, log=print) -> dict:
    from curation.common.jobs import init_ray
    from training.train import train

    started = time.time()
    entries = ordered_entries(cfg)
    seeds = [int(s) for s in cfg.get("seeds") or [0]]
    out = Path(cfg["output"])
    out.mkdir(parents=True, exist_ok=True)
    init_ray(cfg.get("ray") or {})  # one Ray instance for the curation, every run and the labelling
    data, curate_s = ensure_curated(cfg, log)
    data = os.path.abspath(data)
    timings = {"curation_s": round(curate_s, 1), "runs": {}, "labelling_s": {}}
    runs: dict = {e["name"]: {"title": e.get("title") or e["name"], "evals": [], "train_s": [],
                              "steps": [], "final_loss": [], "embedding": None} for e in entries}
    labels_info: dict = {}
    for seed in seeds:
        run_root = out / "runs" / f"seed{seed}"
        checkpoints, concepts = {}, None
        for entry in entries:
            name = entry["name"]
            if entry.get("concepts") and concepts is None:
                t0 = time.time()
                concepts = str((out / f"concepts-seed{seed}").resolve())
                log(f"[seed {seed}] labelling concepts with teacher {cfg['teacher']!r}")
                vocab = label_with_teacher(cfg, data, checkpoints[cfg["teacher"]], concepts, log)
                timings["labelling_s"][seed] = round(time.time() - t0, 1)
                labels_info[seed] = {"objects": len(vocab["objects"]), "attributes": len(vocab["attributes"]),
                                     "top_k": vocab["top_k"], "samples": vocab["samples"],
                                     "classifier": {k: vocab["classifier"][k] for k in ("objects", "attributes")}}
            tcfg = train_config(entry, cfg, seed, data, str(run_root.resolve()), concepts)
            if (run_root / name).exists():
                shutil.rmtree(run_root / name)  # a fresh run, not a resume
            log(f"[seed {seed}] training {name} ({tcfg.get('recipe')})")
            t0 = time.time()
            summary = train(tcfg, log=log)
            wall = time.time() - t0
            checkpoints[name] = summary["checkpoint"]
            eval_path = Path(summary["log_dir"]) / "eval.json"
            results = json.loads(eval_path.read_text()) if eval_path.exists() else {}
            r = runs[name]
            r["evals"].append(results)
            r["train_s"].append(wall)
            r["steps"].append((summary["metrics"] or {}).get("step"))
            r["final_loss"].append((summary["metrics"] or {}).get("train/loss"))
            r.setdefault("metrics", []).append(summary["metrics"])
            r["embedding"] = embedding_name(results, entry.get("embedding"))
            timings["runs"][f"{name}-seed{seed}"] = round(wall, 1)
    table = markdown_table(list(runs.values()), seeds)
    total = time.time() - started
    timings["total_s"] = round(total, 1)
    header = (f"# Recipe comparison on the curated demo data\n\n"
              f"{count_samples(data)} curated training pairs ({data_name(data)}); "
              f"config: `configs/experiments/compare_recipes.yaml`; total {total / 60:.1f} min on "
              f"{os.cpu_count()} CPU cores ({platform.machine()}).\n\n")
    (out / "results.md").write_text(header + table)
    (out / "results.json").write_text(json.dumps(
        {"config": cfg, "data": data, "timings": timings, "labels": labels_info,
         "runs": runs}, indent=1, default=str))
    return {"table": table, "markdown": header + table, "timings": timings, "runs": runs,
            "labels": labels_info, "output": str(out)}


def count_samples(data: str) -> int:
    sizes = Path(data) / "shards" / "sizes.json"
    return sum(json.loads(sizes.read_text()).values()) if sizes.exists() else 0


def data_name(data: str) -> str:
    try:
        return os.path.relpath(data, REPO)
    except ValueError:
        return data


def main(argv=None) -> int:
    cfg = parse_cli(argv, DEFAULT_CONFIG, __doc__.splitlines()[0])
    os.chdir(REPO)  # the config's relative paths are relative to the repository root
    try:
        result = run(cfg)
    except ExperimentError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    t = result["timings"]
    print(f"\n{result['markdown']}\ntimings (s): curation {t['curation_s']}, labelling {t['labelling_s']}, "
          f"runs {t['runs']}, total {t['total_s']}\nwritten: {result['output']}/results.md, results.json")
    return 0


if __name__ == "__main__":
    sys.exit(main())
