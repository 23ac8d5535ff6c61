"""Concept labels for DiHT's concept distillation: curated shards -> CURATED/concepts/.

    python pipelines/label_concepts.py [--config FILE] [key=value ...]
    python pipelines/label_concepts.py input=outputs/demo/curated teacher.checkpoint=stage1.pt

Two Ray Data passes (SPEC section 2, stage 1); input and output may be local or ``s3://`` URLs
(``storage_options`` and the AWS variables reach every task and actor):

1. **fit sample** (bounded): read tasks (one per curated shard ``shards/NNNNN.tar``) -> spaCy
   actors parse every caption (the vocabulary counts: per-batch ``Counter`` rows, so the driver
   holds one count per concept, never per sample) and keep the image of a reproducible key
   subsample of at most ``classifier.max_samples`` samples -> teacher actors embed that sample.
   On the driver: the vocabularies (``vocab.*.size`` most frequent names mentioned by at least
   ``vocab.*.min_count`` captions) and the two softmax linear classifiers fitted on the sample's
   features (at most ``classifier.max_samples`` x the teacher's feature size).
2. **label** (one streaming pass): teacher actors (``stages.label``, on GPUs when
   ``stages.embed.num_gpus > 0``) take one shard per call, embed it, predict each image's top-k
   (id, probability) for both vocabularies and write ``concepts/NNNNN.parquet`` themselves (one
   row per curated sample of shard NNNNN, sorted by key); the driver gets one summary row per
   shard. Then ``classifiers.npz`` and ``concepts/vocab.json`` last (a folder without it is
   incomplete).
"""

from __future__ import annotations

import io
import json
import os
import posixpath
import sys
import time
from collections import Counter
from dataclasses import replace
from typing import Mapping

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import fsspec  # noqa: E402
import pyarrow as pa  # noqa: E402

from curation.common.config import CONFIG_DIR, ConfigError, as_dict, parse_cli, user_error  # noqa: E402
from training import concepts as C  # noqa: E402
from training.concept_settings import (LabelConceptsConfig, TeacherSettings,  # noqa: E402
                                       parse_label_config)

DEFAULT_CONFIG = CONFIG_DIR / "concepts" / "label_concepts.yaml"


class LabelError(RuntimeError):
    pass


def output_url(cfg: LabelConceptsConfig) -> str:
    return cfg.output or cfg.input.rstrip("/") + "/concepts"


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


def check_teacher(teacher: TeacherSettings) -> None:
    """Fail fast with a clear message: load the teacher once on the driver (CPU) before any
    actor starts, so a wrong path, architecture or checkpoint is one line, not an actor crash."""
    try:
        C.load_teacher(teacher, "cpu")
    except C.TeacherError as exc:
        raise LabelError(str(exc)) from None


def total_samples(urls: list[str], sizes: dict, cfg: LabelConceptsConfig, storage) -> int:
    """Samples in these shards: ``shards/sizes.json`` when it lists them all, else counted by
    one read task per shard (per-shard counts only reach the driver)."""
    import ray

    names = [posixpath.basename(u) for u in urls]
    if all(n in sizes for n in names):
        return int(sum(int(sizes[n]) for n in names))
    ds = ray.data.from_items([{"url": u} for u in urls], override_num_blocks=len(urls))
    counts = ds.map_batches(C.count_shard_rows_batch, batch_size=1, batch_format="pyarrow",
                            fn_kwargs={"storage": storage}, num_cpus=cfg.stages.read.num_cpus)
    return int(sum(r["rows"] for r in counts.select_columns(["rows"]).iter_rows()))


def fit_sample(urls: list[str], cfg: LabelConceptsConfig, fraction: float, storage) -> dict:
    """Pass 1: every caption parsed (vocabulary counts), the ``fraction`` key subsample of the
    samples without errors embedded; returns the counts and the sample's features and concepts
    (bounded by ``classifier.max_samples``)."""
    import ray

    st, cc = cfg.stages, cfg.classifier
    ds = ray.data.from_items([{"url": u} for u in urls], override_num_blocks=len(urls))
    ds = ds.map_batches(C.read_shards_for_fit, batch_size=1, batch_format="pyarrow",
                        fn_kwargs={"rows_per_block": st.read.rows_per_block, "storage": storage,
                                   "fraction": fraction, "seed": cc.seed},
                        num_cpus=st.read.num_cpus)
    ds = ds.map_batches(C.ConceptCountSampleStage,
                        fn_constructor_kwargs={"model": cfg.spacy.model, "batch_size": cfg.spacy.batch_size,
                                               "fraction": fraction, "seed": cc.seed},
                        batch_size=st.parse.batch_size, batch_format="pyarrow",
                        compute=ray.data.ActorPoolStrategy(size=st.parse.actors),
                        num_cpus=st.parse.num_cpus)
    gpus = st.embed.num_gpus
    ds = ds.map_batches(C.TeacherEmbedStageWithStorage,
                        fn_constructor_kwargs={"teacher_cfg": cfg.teacher,
                                               "device": "cuda" if gpus > 0 else "cpu",
                                               "batch_size": st.embed.forward_batch_size,
                                               "storage": storage},
                        batch_size=st.embed.batch_size, batch_format="pyarrow",
                        compute=ray.data.ActorPoolStrategy(size=st.embed.actors),
                        num_cpus=st.embed.num_cpus, num_gpus=gpus)
    out = {"objects": Counter(), "attributes": Counter(), "rows": 0,
           "features": [], "fit_objects": [], "fit_attributes": []}
    for b in ds.iter_batches(batch_format="pyarrow", batch_size=None):
        keys = b["key"].to_pylist()
        for i in (i for i, k in enumerate(keys) if k == C.COUNTS_KEY):
            row = b.slice(i, 1).to_pylist()[0]
            out["objects"].update(dict(zip(row["obj_names"], row["obj_counts"])))
            out["attributes"].update(dict(zip(row["attr_names"], row["attr_counts"])))
            out["rows"] += row["rows"]
        errors = b["error"].to_pylist()
        fit = [i for i, k in enumerate(keys) if k != C.COUNTS_KEY and errors[i] is None]
        if fit:
            out["features"].append(C.features_matrix(b["features"].take(pa.array(fit))))
            objs, attrs = b["objects"].to_pylist(), b["attributes"].to_pylist()
            out["fit_objects"] += [objs[i] for i in fit]
            out["fit_attributes"] += [attrs[i] for i in fit]
    feats = out.pop("features")
    out["features"] = np.concatenate(feats) if feats else np.zeros((0, 0), np.float32)
    return out


def label_all(urls: list[str], cfg: LabelConceptsConfig, classifiers: dict, out_url: str, storage) -> list[dict]:
    """Pass 2, one streaming pass: teacher actors label one shard per call and write its label
    file themselves; the driver receives one summary row per shard."""
    import ray

    st = cfg.stages
    gpus = st.embed.num_gpus
    ds = ray.data.from_items([{"url": u} for u in urls], override_num_blocks=len(urls))
    ds = ds.map_batches(C.LabelShardStage,
                        fn_constructor_kwargs={"teacher_cfg": cfg.teacher,
                                               "objects": classifiers["objects"].to_dict(),
                                               "attributes": classifiers["attributes"].to_dict(),
                                               "k": cfg.top_k, "out_url": out_url,
                                               "device": "cuda" if gpus > 0 else "cpu",
                                               "batch_size": st.embed.forward_batch_size,
                                               "rows_per_block": st.read.rows_per_block,
                                               "storage": storage},
                        batch_size=1, batch_format="pyarrow",
                        compute=ray.data.ActorPoolStrategy(size=st.label.actors),
                        num_cpus=st.label.num_cpus, num_gpus=gpus)
    return list(ds.iter_rows())


def write_bytes(fs, path: str, data: bytes) -> None:
    """A whole file: an object store's PUT is atomic; a local file is renamed into place."""
    protocol = fs.protocol if isinstance(fs.protocol, str) else fs.protocol[0]
    if protocol not in ("file", "local"):
        fs.pipe_file(path, data)
        return
    tmp = path + ".tmp"
    with fs.open(tmp, "wb") as f:
        f.write(data)
    fs.mv(tmp, path)


def label_concepts(cfg: LabelConceptsConfig | Mapping, log=print) -> dict:
    """Run the labelling job described by ``cfg`` (the typed view, or the merged config as plain
    data, parsed here once); returns the contents of ``vocab.json``."""
    import ray
    import torch

    from curation.common.jobs import init_ray, warn_local_paths_on_cluster
    from curation.common.storage import Storage, absolute

    started = time.time()
    if not isinstance(cfg, LabelConceptsConfig):
        cfg = parse_label_config(cfg)
    if not cfg.input:
        raise LabelError("input (the curated output folder) is required")
    k = cfg.top_k
    if k < 1:
        raise LabelError(f"top_k must be >= 1, not {k}")
    storage = Storage.capture(cfg.storage_options).apply()
    # absolute before ray.init: under ray job submit the working_dir may be unpacked again later,
    # leaving the driver in a deleted directory (see training/train.py: absolute_paths)
    t = cfg.teacher
    cfg = replace(cfg, input=absolute(cfg.input), output=absolute(cfg.output) if cfg.output else cfg.output,
                  teacher=replace(t, checkpoint=absolute(t.checkpoint) if t.checkpoint else t.checkpoint,
                                  model_config=absolute(t.model_config) if t.model_config else t.model_config))
    check_teacher(cfg.teacher)
    urls = list_curated_shards(cfg.input)
    out_url = output_url(cfg)
    fs, out_root = fsspec.core.url_to_fs(out_url)
    fs.makedirs(out_root, exist_ok=True)
    out_url = fs.unstrip_protocol(out_root)  # absolute: the label files are written by workers
    vocab_path = posixpath.join(out_root, "vocab.json")
    if fs.exists(vocab_path):  # the folder is incomplete until this run writes it again
        fs.rm(vocab_path)
    log(f"labelling {len(urls)} curated shards of {cfg.input} -> {out_url}")

    init_ray(cfg.ray, storage=storage)
    warn_local_paths_on_cluster({"input": cfg.input, "output": out_url}, log=log)
    ray.data.DataContext.get_current().enable_progress_bars = cfg.progress
    sizes = read_sizes(cfg.input)
    cc = cfg.classifier
    total = total_samples(urls, sizes, cfg, storage)
    max_samples = cc.max_samples
    fraction = 1.0 if not max_samples or total <= max_samples else max_samples / total
    data = fit_sample(urls, cfg, fraction, storage)
    t_embed = time.time()
    obj_counts, attr_counts, n_rows = data["objects"], data["attributes"], data["rows"]
    vocabs = {}
    for name, counts in (("objects", obj_counts), ("attributes", attr_counts)):
        v = getattr(cfg.vocab, name)
        vocabs[name] = C.build_vocab(counts, v.size, v.min_count)
        if not vocabs[name]:
            raise LabelError(f"the {name} vocabulary is empty: no {name[:-1]} is mentioned by "
                             f"vocab.{name}.min_count={v.min_count} captions of {n_rows}; "
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
    device = cc.device
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    fit_kw = dict(epochs=cc.epochs, lr=cc.lr, weight_decay=cc.weight_decay, batch_size=cc.batch_size,
                  seed=cc.seed, device=device)
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

    shard_errors, sample_errors, n_ok = {}, 0, 0
    for row in label_all(urls, cfg, classifiers, out_url, storage):
        name = row["shard"]
        sample_errors += row["errors"]
        n_ok += row["rows"] - row["errors"]
        expected = sizes.get(f"{name}.tar")
        if row["shard_error"]:
            shard_errors[name] = row["shard_error"]
        elif expected is not None and expected != row["rows"]:
            shard_errors[name] = f"{row['rows']} samples read but shards/sizes.json lists {expected}"
    for name, err in sorted(shard_errors.items()):
        log(f"shard {name}: {err}; its readable samples are labelled, the others have no targets")

    buf = io.BytesIO()
    np.savez(buf, **{f"{n}_{p}": getattr(c, p) for n, c in classifiers.items()
                     for p in ("weight", "bias", "mean", "scale")})
    write_bytes(fs, posixpath.join(out_root, "classifiers.npz"), buf.getvalue())
    teacher = {k_: v for k_, v in as_dict(cfg.teacher).items() if v is not None}
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
        "vocab": as_dict(cfg.vocab),
        "classifier": {"objects": classifiers["objects"].info,
                       "attributes": classifiers["attributes"].info,
                       "kind": "softmax linear, soft cross-entropy vs normalised multi-hot labels",
                       **as_dict(cc)},
        "samples": {"total": n_rows, "embedded": n_ok, "errors": sample_errors,
                    "fit_fraction": fraction, "fit_subsample": int(len(x)),
                    "fit_with_objects": sum(1 for s in obj_sets if s),
                    "fit_with_attributes": sum(1 for s in attr_sets if s)},
        "shards": {"count": len(urls), "errors": shard_errors},
        "input": cfg.input,
        "timing_s": {"parse_and_fit_sample": round(t_embed - started, 2),
                     "vocab_and_fit": round(t_fit - t_embed, 2),
                     "embed_predict_write": round(time.time() - t_fit, 2),
                     "total": round(time.time() - started, 2)},
        "versions": {"ray": ray.__version__, "torch": torch.__version__},
    }
    write_bytes(fs, vocab_path, json.dumps(summary, indent=1).encode())
    log(f"wrote {len(urls)} concept files and vocab.json to {out_url} in "
        f"{summary['timing_s']['total']:.1f}s ({sample_errors} samples in error)")
    return summary


def main(argv=None) -> int:
    try:  # the typed view, parsed once before any work
        cfg = parse_label_config(parse_cli(argv, DEFAULT_CONFIG, __doc__.splitlines()[0]))
    except ConfigError as exc:
        user_error(exc)
    try:
        label_concepts(cfg)
    except LabelError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
