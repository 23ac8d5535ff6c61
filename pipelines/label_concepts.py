"""Concept labels for DiHT's concept distillation: curated shards -> CURATED/concepts/.

    python pipelines/label_concepts.py [--config FILE] [key=value ...]
    python pipelines/label_concepts.py input=outputs/demo/curated teacher.checkpoint=stage1.pt

A Ray Data job (SPEC section 2, stage 1):

1. **read** (tasks, one per curated shard ``shards/NNNNN.tar``): key, caption, image bytes;
2. **parse** (spaCy actor pool): each caption's objects and attributes (curation's parser);
3. **embed** (teacher actor pool, on GPUs when ``stages.embed.num_gpus > 0``): the frozen
   teacher's image features; the dataset (features, not images) is then materialised;
4. on the driver: the vocabularies (``vocab.*.size`` most frequent names mentioned by at least
   ``vocab.*.min_count`` captions) and the two softmax linear classifiers, fitted on a
   reproducible subsample of at most ``classifier.max_samples`` images;
5. **predict** (tasks): each image's top-k (id, probability) for both vocabularies, written as
   ``concepts/NNNNN.parquet`` (one row per curated sample of shard NNNNN, sorted by key), then
   ``concepts/vocab.json`` last (a folder without it is incomplete) and ``classifiers.npz``.
"""

from __future__ import annotations

import io
import json
import os
import posixpath
import sys
import time
from collections import Counter, defaultdict

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import fsspec  # noqa: E402
import pyarrow as pa  # noqa: E402
import pyarrow.parquet as pq  # noqa: E402

from curation.config import CONFIG_DIR, parse_cli  # noqa: E402
from training import concepts as C  # noqa: E402

DEFAULT_CONFIG = CONFIG_DIR / "concepts" / "label_concepts.yaml"


class LabelError(RuntimeError):
    pass


def output_url(cfg: dict) -> str:
    return cfg.get("output") or cfg["input"].rstrip("/") + "/concepts"


def list_curated_shards(input_url: str) -> list[str]:
    """URLs of the curated tars ``INPUT/shards/*.tar``, sorted."""
    fs, root = fsspec.core.url_to_fs(input_url)
    shards = posixpath.join(root, "shards")
    if not fs.exists(shards):
        raise LabelError(f"no curated output in {input_url}: {shards} does not exist "
                         "(run pipelines/cat_filter.py first)")
    tars = sorted(p for p in fs.ls(shards, detail=False) if p.endswith(".tar"))
    if not tars:
        raise LabelError(f"no curated shards (*.tar) in {input_url}/shards")
    return [fs.unstrip_protocol(p) for p in tars]


def read_sizes(input_url: str) -> dict:
    """The curation's ``shards/sizes.json`` ({"NNNNN.tar": samples}); {} when absent."""
    fs, root = fsspec.core.url_to_fs(input_url)
    path = posixpath.join(root, "shards", "sizes.json")
    if not fs.exists(path):
        return {}
    with fs.open(path, "r") as f:
        return json.load(f)


def check_teacher(teacher: dict) -> None:
    """Fail fast with a clear message: load the teacher once on the driver (CPU) before any
    actor starts, so a wrong path, architecture or checkpoint is one line, not an actor crash."""
    try:
        C.load_teacher(teacher, "cpu")
    except C.TeacherError as exc:
        raise LabelError(str(exc)) from None


def build_dataset(urls: list[str], cfg: dict):
    """read -> parse -> embed, materialised (rows: key, shard, caption, error, objects,
    attributes, features)."""
    import ray

    st = cfg["stages"]
    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = bool(cfg.get("progress", True))
    ds = ray.data.from_items([{"url": u} for u in urls], override_num_blocks=len(urls))
    ds = ds.map_batches(C.read_curated_shards_batch, batch_size=1, batch_format="pyarrow",
                        fn_kwargs={"rows_per_block": int(st["read"]["rows_per_block"])},
                        num_cpus=st["read"]["num_cpus"])
    ds = ds.map_batches(C.ConceptParseStage,
                        fn_constructor_kwargs={"model": cfg["spacy"]["model"],
                                               "batch_size": int(cfg["spacy"]["batch_size"])},
                        batch_size=int(st["parse"]["batch_size"]), batch_format="pyarrow",
                        compute=ray.data.ActorPoolStrategy(size=int(st["parse"]["actors"])),
                        num_cpus=st["parse"]["num_cpus"])
    gpus = st["embed"].get("num_gpus") or 0
    ds = ds.map_batches(C.TeacherEmbedStage,
                        fn_constructor_kwargs={"teacher_cfg": cfg["teacher"],
                                               "device": "cuda" if gpus > 0 else "cpu",
                                               "batch_size": int(st["embed"]["forward_batch_size"])},
                        batch_size=int(st["embed"]["batch_size"]), batch_format="pyarrow",
                        compute=ray.data.ActorPoolStrategy(size=int(st["embed"]["actors"])),
                        num_cpus=st["embed"]["num_cpus"], num_gpus=gpus)
    return ds.materialize()


def is_shard_error(key: str) -> bool:
    return key.endswith("/unreadable")


def scan(ds, fraction: float, seed: int) -> dict:
    """One pass over the materialised dataset (no images): concept counts over all samples, and
    the features and concept names of a reproducible subsample (``fraction`` of the keys) of the
    samples without errors, for fitting the classifiers."""
    out = {"objects": Counter(), "attributes": Counter(), "rows": 0, "ok": 0,
           "features": [], "fit_objects": [], "fit_attributes": []}
    cols = ["key", "error", "objects", "attributes", "features"]
    for b in ds.select_columns(cols).iter_batches(batch_format="pyarrow", batch_size=None):
        keys, errors = b["key"].to_pylist(), b["error"].to_pylist()
        objs, attrs = b["objects"].to_pylist(), b["attributes"].to_pylist()
        real = [i for i, key in enumerate(keys) if not is_shard_error(key)]
        out["rows"] += len(real)
        out["objects"].update(C.count_concepts(objs[i] for i in real))
        out["attributes"].update(C.count_concepts(attrs[i] for i in real))
        ok = [i for i in real if errors[i] is None]
        out["ok"] += len(ok)
        mask = C.key_fraction_mask([keys[i] for i in ok], fraction, seed)
        fit = [i for i, m in zip(ok, mask) if m]
        if fit:
            out["features"].append(C.features_matrix(b["features"].take(pa.array(fit))))
            out["fit_objects"] += [objs[i] for i in fit]
            out["fit_attributes"] += [attrs[i] for i in fit]
    feats = out.pop("features")
    out["features"] = np.concatenate(feats) if feats else np.zeros((0, 0), np.float32)
    return out


def write_parquet(fs, path: str, table: pa.Table) -> None:
    buf = io.BytesIO()
    pq.write_table(table, buf)
    tmp = path + ".tmp"
    with fs.open(tmp, "wb") as f:
        f.write(buf.getvalue())
    fs.mv(tmp, path)


def write_bytes(fs, path: str, data: bytes) -> None:
    tmp = path + ".tmp"
    with fs.open(tmp, "wb") as f:
        f.write(data)
    fs.mv(tmp, path)


def label_concepts(cfg: dict, log=print) -> dict:
    """Run the labelling job described by ``cfg``; returns the contents of ``vocab.json``."""
    import ray
    import torch

    from curation.pipeline import init_ray

    started = time.time()
    if not cfg.get("input"):
        raise LabelError("input (the curated output folder) is required")
    k = int(cfg["top_k"])
    if k < 1:
        raise LabelError(f"top_k must be >= 1, not {k}")
    check_teacher(cfg["teacher"])
    urls = list_curated_shards(cfg["input"])
    out_url = output_url(cfg)
    fs, out_root = fsspec.core.url_to_fs(out_url)
    fs.makedirs(out_root, exist_ok=True)
    vocab_path = posixpath.join(out_root, "vocab.json")
    if fs.exists(vocab_path):  # the folder is incomplete until this run writes it again
        fs.rm(vocab_path)
    log(f"labelling {len(urls)} curated shards of {cfg['input']} -> {out_url}")

    init_ray(cfg.get("ray", {}))
    ds = build_dataset(urls, cfg)
    t_embed = time.time()

    cc = cfg["classifier"]
    total = ds.count()  # metadata of the materialised blocks; an upper bound of the usable rows
    max_samples = cc.get("max_samples")
    fraction = 1.0 if not max_samples or total <= max_samples else max_samples / total
    data = scan(ds, fraction, int(cc["seed"]))
    obj_counts, attr_counts, n_rows, n_ok = (data["objects"], data["attributes"], data["rows"],
                                             data["ok"])
    vocabs = {}
    for name, counts in (("objects", obj_counts), ("attributes", attr_counts)):
        v = cfg["vocab"][name]
        vocabs[name] = C.build_vocab(counts, v["size"], int(v["min_count"]))
        if not vocabs[name]:
            raise LabelError(f"the {name} vocabulary is empty: no {name[:-1]} is mentioned by "
                             f"vocab.{name}.min_count={v['min_count']} captions of {n_rows}; "
                             "lower the minimum count")
    log(f"{n_rows} samples; vocabularies: {len(vocabs['objects'])} objects "
        f"(of {len(obj_counts)}), {len(vocabs['attributes'])} attributes (of {len(attr_counts)})")

    x = data["features"]
    if not len(x):
        raise LabelError("no image could be embedded by the teacher; see the errors in the data")
    obj_index = {n: i for i, n in enumerate(vocabs["objects"])}
    attr_index = {n: i for i, n in enumerate(vocabs["attributes"])}
    obj_sets = [C.label_ids(o, obj_index) for o in data["fit_objects"]]
    attr_sets = [C.label_ids(a, attr_index) for a in data["fit_attributes"]]
    device = cc.get("device", "auto")
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    fit_kw = dict(epochs=int(cc["epochs"]), lr=float(cc["lr"]), weight_decay=float(cc["weight_decay"]),
                  batch_size=int(cc["batch_size"]), seed=int(cc["seed"]), device=device)
    classifiers = {}
    for name, sets in (("objects", obj_sets), ("attributes", attr_sets)):
        try:
            classifiers[name] = C.fit_linear_classifier(x, sets, len(vocabs[name]), **fit_kw)
        except ValueError as exc:
            raise LabelError(f"cannot fit the {name} classifier: {exc}") from None
        info = classifiers[name].info
        log(f"{name} classifier: {info['fit_samples']} images, loss {info['first_epoch_loss']:.3f} "
            f"-> {info['final_loss']:.3f}, train top-1 in labels {info['train_top1_in_labels']:.2f}")
    t_fit = time.time()

    pred = ds.map_batches(C.predict_top_k_batch, batch_format="pyarrow",
                          batch_size=int(cfg["stages"]["predict"]["batch_size"]),
                          fn_kwargs={"objects": classifiers["objects"].to_dict(),
                                     "attributes": classifiers["attributes"].to_dict(), "k": k})
    by_shard = defaultdict(list)
    shard_errors, sample_errors = {}, 0
    for b in pred.iter_batches(batch_format="pyarrow", batch_size=None):
        keys, shards, errors = b["key"].to_pylist(), b["shard"].to_pylist(), b["error"].to_pylist()
        real = []
        for i, key in enumerate(keys):
            if is_shard_error(key):
                shard_errors[shards[i]] = errors[i]
            else:
                real.append(i)
                sample_errors += errors[i] is not None
        for shard in set(shards[i] for i in real):
            rows = [i for i in real if shards[i] == shard]
            by_shard[shard].append(b.take(pa.array(rows)).select(C.OUTPUT_SCHEMA.names))
    sizes = read_sizes(cfg["input"])
    for url in urls:
        name = C.shard_name(url)
        parts = by_shard.pop(name, [])
        table = (pa.concat_tables(parts) if parts else C.OUTPUT_SCHEMA.empty_table()).cast(C.OUTPUT_SCHEMA)
        expected = sizes.get(f"{name}.tar")
        if expected is not None and expected != table.num_rows and name not in shard_errors:
            shard_errors[name] = f"{table.num_rows} samples read but shards/sizes.json lists {expected}"
        write_parquet(fs, posixpath.join(out_root, f"{name}.parquet"), table.sort_by("key"))
    for name, err in sorted(shard_errors.items()):
        log(f"shard {name}: {err}; its readable samples are labelled, the others have no targets")

    buf = io.BytesIO()
    np.savez(buf, **{f"{n}_{p}": getattr(c, p) for n, c in classifiers.items()
                     for p in ("weight", "bias", "mean", "scale")})
    write_bytes(fs, posixpath.join(out_root, "classifiers.npz"), buf.getvalue())
    teacher = {k_: v for k_, v in cfg["teacher"].items() if v is not None}
    for f in ("checkpoint", "model_config"):  # names only: the paths are machine-specific
        if teacher.get(f):
            teacher[f] = os.path.basename(str(teacher[f]))
    teacher["feature_dim"] = int(x.shape[1])
    summary = {
        "objects": vocabs["objects"],
        "attributes": vocabs["attributes"],
        "object_counts": [obj_counts[n] for n in vocabs["objects"]],
        "attribute_counts": [attr_counts[n] for n in vocabs["attributes"]],
        "top_k": k,
        "teacher": teacher,
        "vocab": cfg["vocab"],
        "classifier": {"objects": classifiers["objects"].info,
                       "attributes": classifiers["attributes"].info,
                       "kind": "softmax linear, soft cross-entropy vs normalised multi-hot labels",
                       **{k_: v for k_, v in cc.items()}},
        "samples": {"total": n_rows, "embedded": n_ok, "errors": sample_errors,
                    "fit_subsample": int(len(x)),
                    "fit_with_objects": sum(1 for s in obj_sets if s),
                    "fit_with_attributes": sum(1 for s in attr_sets if s)},
        "shards": {"count": len(urls), "errors": shard_errors},
        "input": cfg["input"],
        "timing_s": {"read_parse_embed": round(t_embed - started, 2),
                     "vocab_and_fit": round(t_fit - t_embed, 2),
                     "predict_and_write": round(time.time() - t_fit, 2),
                     "total": round(time.time() - started, 2)},
        "versions": {"ray": ray.__version__, "torch": torch.__version__},
    }
    write_bytes(fs, vocab_path, json.dumps(summary, indent=1).encode())
    log(f"wrote {len(urls)} concept files and vocab.json to {out_url} in "
        f"{summary['timing_s']['total']:.1f}s ({sample_errors} samples in error)")
    return summary


def main(argv=None) -> int:
    cfg = parse_cli(argv, DEFAULT_CONFIG, __doc__.splitlines()[0])
    try:
        label_concepts(cfg)
    except LabelError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
