"""The evaluation suite: zero-shot classification, image-text retrieval, linear and few-shot probes.

Works on any *embedder* (the contract in the training package): ``encode_image(images)`` and
``encode_text(tokens)`` return ``{name: normalised features}``, plus ``preprocess`` (open_clip's
val transform) and ``tokenizer``. Every metric is computed per embedding name; when an embedder
returns two names (a, b) in that order (e.g. improved CLIP's "weak", "strong"), zero-shot and
retrieval are also computed for the similarity ensemble ``w * sim_a + (1 - w) * sim_b`` for every
w in ``eval.ensemble_weights``, reported as ``"ensemble_w0.3"`` etc.

* Zero-shot: the classifier is the per-class mean of the normalised prompt-template embeddings,
  renormalised; metrics ``acc1``, ``acc5`` (None with fewer than 5 classes, as CLIP_benchmark
  and DataComp) and ``mean_per_class_recall`` (over the classes present, as scikit-learn's
  ``balanced_accuracy_score`` that CLIP_benchmark uses).
* Retrieval: every image with all its captions; ``image_retrieval_recall@k`` (text -> image:
  the caption's image is in the top k), ``text_retrieval_recall@k`` (image -> text: at least
  one of its captions is in the top k), as CLIP_benchmark, and their mean ``mean_recall@k``
  (DataComp's main retrieval metric at k = 1). ``tests/test_eval_clip_benchmark.py`` checks these
  numbers against ``clip_benchmark eval`` on the same checkpoint and data.
* Linear probe baseline: a from-scratch logistic-regression probe on the train split's frozen
  features, weight decay chosen on a held-out part of it (:mod:`training.fewshot`).
* Few-shot: the k-shot sweep of :func:`training.fewshot.fewshot_sweep` (zero-shot-initialised
  projected probe vs from-scratch probe).
* Suites (``eval.suite``, ``configs/eval/suites/*.yaml``, e.g. DataComp's 38 tasks): every task
  found under ``eval.wds_root`` is evaluated zero-shot, its main metric collected, and the suite's
  average (the mean over all its tasks, as DataComp; open while a task is missing) and the
  average over the tasks present are reported (:func:`evaluate_suite`).

Pure metric functions (:func:`classification_metrics`, :func:`retrieval_metrics`,
:func:`with_ensembles`) take tensors; :func:`run_evaluation` wires datasets, embedder and
metrics together; it needs no Ray.
"""

from __future__ import annotations

import math
import re
import time
from dataclasses import replace
from typing import Callable, Iterable, Iterator, Mapping

import torch
import torch.nn.functional as F

from training import fewshot
from training.eval_data import (EvalDataset, find_task_folder, load_eval_dataset, load_suite,
                                suite_task_dataset)
from training.eval_settings import EvalConfig, LinearProbeSettings, eval_config


class OpenClipEmbedder:
    """The embedder interface around a plain open_clip model (or the trainer's wrapper): one
    embedding named ``name``. Encodes in eval mode and restores the model's mode afterwards, so
    it can evaluate a model in the middle of training."""

    def __init__(self, model, preprocess, tokenizer, name: str = "clip", device=None):
        self.model = model
        self.preprocess = preprocess
        self.tokenizer = tokenizer
        self.name = name
        self.device = torch.device(device) if device else next(model.parameters()).device

    @torch.no_grad()
    def _encode(self, encode, x: torch.Tensor) -> dict[str, torch.Tensor]:
        was_training = self.model.training
        self.model.eval()
        try:
            feats = encode(x.to(self.device))
        finally:
            self.model.train(was_training)
        return {self.name: F.normalize(feats.float(), dim=-1).cpu()}

    def encode_image(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        return self._encode(self.model.encode_image, images)

    def encode_text(self, tokens: torch.Tensor) -> dict[str, torch.Tensor]:
        return self._encode(self.model.encode_text, tokens)


# -- metrics (pure) ----------------------------------------------------------------------------

def classification_metrics(logits: torch.Tensor, labels: torch.Tensor) -> dict[str, float]:
    """acc1, acc5, mean per-class recall and macro F1 of [N, C] scores.

    acc5 is None with fewer than 5 classes (CLIP_benchmark reports NaN there, DataComp None).
    Fractions are exact (counts divided in float64, as CLIP_benchmark), not float32 means. Mean
    per-class recall is scikit-learn's ``balanced_accuracy_score`` (as CLIP_benchmark: over the
    classes present); ``macro_f1`` is ``f1_score(average="macro")`` over the classes present (WILDS'
    ``F1-macro_all``, DataComp's main metric for iWildCam)."""
    import warnings

    from sklearn.metrics import balanced_accuracy_score, f1_score

    labels = labels.long()
    n = len(labels)
    k = min(5, logits.shape[1])
    topk = logits.topk(k, dim=1).indices
    acc1 = int((topk[:, 0] == labels).sum()) / n
    acc5 = int((topk == labels[:, None]).any(dim=1).sum()) / n if k == 5 else None
    y_true, y_pred = labels.numpy(), topk[:, 0].numpy()
    with warnings.catch_warnings():  # predicted classes absent from the labels; classes never predicted
        warnings.simplefilter("ignore")
        mpcr = float(balanced_accuracy_score(y_true, y_pred))
        macro_f1 = float(f1_score(y_true, y_pred, average="macro", labels=torch.unique(labels).numpy()))
    return {"acc1": acc1, "acc5": acc5, "mean_per_class_recall": mpcr, "macro_f1": macro_f1}


def worst_group_metrics(logits: torch.Tensor, labels: torch.Tensor, groups: torch.Tensor) -> dict[str, float]:
    """The lowest top-1 and top-5 accuracy over the non-empty groups (WILDS' worst-group metrics,
    DataComp's main metrics for FMoW, GeoDE and Dollar Street) and the number of groups."""
    labels = labels.long()
    k = min(5, logits.shape[1])
    topk = logits.topk(k, dim=1).indices
    hit1, hit5 = topk[:, 0] == labels, (topk == labels[:, None]).any(dim=1)
    acc1, acc5 = [], []
    for g in torch.unique(groups).tolist():
        members = groups == g
        n = int(members.sum())
        acc1.append(int(hit1[members].sum()) / n)
        acc5.append(int(hit5[members].sum()) / n)
    return {"worst_group_acc1": min(acc1), "worst_group_acc5": min(acc5) if k == 5 else None,
            "num_groups": len(acc1)}


def retrieval_metrics(sim: torch.Tensor, text_to_image: torch.Tensor,
                      ks: Iterable[int] = (1, 5, 10)) -> dict[str, float]:
    """Recall@k both ways from an [N_images, N_texts] similarity matrix; ``text_to_image[j]`` is
    the index of caption j's image (an image may have several captions)."""
    text_to_image = text_to_image.long()
    n_img, n_txt = sim.shape
    positive = torch.zeros(n_img, n_txt, dtype=torch.bool)
    positive[text_to_image, torch.arange(n_txt)] = True
    out = {}
    for k in ks:
        # text -> image: the caption's image among the k best images for that caption
        top_img = sim.topk(min(k, n_img), dim=0).indices  # [k, N_texts]
        t2i = int((top_img == text_to_image[None, :]).any(dim=0).sum()) / n_txt
        # image -> text: at least one of the image's captions among its k best captions
        top_txt = sim.topk(min(k, n_txt), dim=1).indices  # [N_images, k]
        i2t = int(positive.gather(1, top_txt).any(dim=1).sum()) / n_img
        out[f"image_retrieval_recall@{k}"] = t2i
        out[f"text_retrieval_recall@{k}"] = i2t
        out[f"mean_recall@{k}"] = 0.5 * (t2i + i2t)
    return out


def with_ensembles(sims: dict[str, torch.Tensor], weights: Iterable[float]) -> dict[str, torch.Tensor]:
    """``sims`` plus ``ensemble_w{w}`` = w * sim_a + (1 - w) * sim_b when there are exactly two
    names (a, b in insertion order); unchanged otherwise."""
    out = dict(sims)
    if len(sims) == 2:
        (_, a), (_, b) = sims.items()
        for w in weights:
            out[f"ensemble_w{w:g}"] = w * a + (1 - w) * b
    return out


# -- features ----------------------------------------------------------------------------------

def _batches(items: Iterator, size: int) -> Iterator[list]:
    batch = []
    for item in items:
        batch.append(item)
        if len(batch) == size:
            yield batch
            batch = []
    if batch:
        yield batch


def _cat(parts: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    return {name: torch.cat([p[name] for p in parts]) for name in parts[0]}


def image_features(embedder, samples: Iterable[dict], batch_size: int = 64,
                   max_samples: int | None = None) -> dict:
    """Encode every sample's image: ``{"features": {name: [N, D]}, "labels": [N] or None,
    "captions": list (per image) or None, "keys": [...]}``."""
    feats, labels, captions, keys, metadata = [], [], [], [], []
    samples = iter(samples)
    if max_samples:
        samples = (s for _, s in zip(range(max_samples), samples))
    for batch in _batches(samples, batch_size):
        images = torch.stack([embedder.preprocess(s["image"]) for s in batch])
        feats.append(embedder.encode_image(images))
        for s in batch:
            labels.append(s["label"])
            captions.append(s["captions"])
            keys.append(s["key"])
            metadata.append(s.get("metadata"))
    if not feats:
        raise ValueError("no samples to evaluate")
    return {"features": _cat(feats),
            "labels": None if any(v is None for v in labels) else torch.tensor(labels),
            "captions": None if any(c is None for c in captions) else captions, "keys": keys,
            "metadata": None if any(m is None for m in metadata) else metadata}


def text_features(embedder, texts: list[str], batch_size: int = 256) -> dict[str, torch.Tensor]:
    return _cat([embedder.encode_text(embedder.tokenizer(chunk)) for chunk in _batches(iter(texts), batch_size)])


def zeroshot_classifier(embedder, classnames: list[str], templates: list[str],
                        batch_size: int = 256) -> dict[str, torch.Tensor]:
    """[C, D] per name: mean of the normalised template embeddings per class, renormalised."""
    texts = [t.replace("{c}", c).replace("{}", c) for c in classnames for t in templates]
    feats = text_features(embedder, texts, batch_size)
    return {name: F.normalize(F.normalize(f, dim=-1).view(len(classnames), len(templates), -1).mean(1), dim=-1)
            for name, f in feats.items()}


# -- evaluations -------------------------------------------------------------------------------

def zeroshot_eval(test: dict, classifier: dict[str, torch.Tensor], ensemble_weights,
                  group_by: int | None = None) -> dict:
    """Classification metrics per name; with ``group_by`` (a column of the samples' metadata) also
    the worst-group accuracies (:func:`worst_group_metrics`)."""
    sims = {name: test["features"][name] @ w.T for name, w in classifier.items()}
    groups = None
    if group_by is not None:
        if test.get("metadata") is None:
            raise ValueError(f"worst-group metrics need .npy metadata on every sample (group column {group_by})")
        groups = torch.tensor([m[group_by] for m in test["metadata"]])
    out = {}
    for name, s in with_ensembles(sims, ensemble_weights).items():
        out[name] = classification_metrics(s, test["labels"])
        if groups is not None:
            out[name].update(worst_group_metrics(s, test["labels"], groups))
    return out


def retrieval_eval(embedder, test: dict, ensemble_weights, ks=(1, 5, 10), batch_size: int = 256) -> dict:
    texts, owner = [], []
    for i, caps in enumerate(test["captions"]):
        texts.extend(caps)
        owner.extend([i] * len(caps))
    tfeats = text_features(embedder, texts, batch_size)
    sims = {name: test["features"][name] @ tfeats[name].T for name in tfeats}
    owner = torch.tensor(owner)
    return {name: retrieval_metrics(s, owner, ks) for name, s in with_ensembles(sims, ensemble_weights).items()}


def linear_probe_eval(train: dict, test: dict, cfg: LinearProbeSettings) -> dict:
    """From-scratch probe per name; weight decay chosen on ``val_fraction`` of the train split
    (``cfg``: the ``eval.linear_probe`` settings)."""
    gen = torch.Generator().manual_seed(cfg.seed)
    n = len(train["labels"])
    perm = torch.randperm(n, generator=gen)
    nval = max(1, int(n * cfg.val_fraction))
    va, tr = perm[:nval], perm[nval:]
    num_classes = int(max(train["labels"].max(), test["labels"].max())) + 1
    out = {}
    with fewshot.torch_threads(cfg.num_threads):
        for name, x in train["features"].items():
            p = fewshot.scratch_probe(x[tr], train["labels"][tr], x[va], train["labels"][va], num_classes, cfg)
            metrics = classification_metrics(p["predict"](test["features"][name]), test["labels"])
            out[name] = {**metrics, "weight_decay": p["weight_decay"], "val_acc": p["val_acc"]}
    return out


def evaluate_dataset(embedder, dataset: EvalDataset, cfg: EvalConfig | Mapping, log: Callable = print,
                     group_by: int | str | None = None) -> dict:
    """All enabled evaluations of one dataset; ``cfg`` is the ``eval`` section (a view, or a
    mapping merged over configs/eval/default.yaml, see :func:`training.eval_settings.eval_config`).
    ``group_by``: a suite task's metadata column of the groups (worst-group metrics)."""
    cfg = eval_config(cfg)
    t0 = time.time()
    bs, cap = cfg.batch_size, cfg.max_samples
    weights = cfg.ensemble_weights
    result: dict = {}
    test = image_features(embedder, dataset.samples(cfg.split), bs, cap)
    result["num_test"] = len(test["keys"])
    classify = dataset.classnames is not None and test["labels"] is not None
    templates = dataset.templates or cfg.templates
    classifier = None
    if classify and cfg.zeroshot:
        if not templates:
            raise ValueError(f"dataset {dataset.name!r} has no templates; set eval.templates")
        classifier = zeroshot_classifier(embedder, dataset.classnames, templates, bs)
        result["zeroshot"] = zeroshot_eval(test, classifier, weights, group_by)
    if test["captions"] is not None and cfg.retrieval:
        result["retrieval"] = retrieval_eval(embedder, test, weights, cfg.recall_at, bs)
    lp, fs = cfg.linear_probe, cfg.fewshot
    train_split = cfg.train_split
    want_train = classify and (lp.enabled or fs.enabled)
    if want_train and train_split not in dataset.splits:
        log(f"  {dataset.name}: no {train_split!r} split, skipping the linear and few-shot probes")
    elif want_train:
        train = image_features(embedder, dataset.samples(train_split), bs, cfg.max_train_samples)
        result["num_train"] = len(train["keys"])
        if lp.enabled:
            result["linear_probe"] = linear_probe_eval(train, test, lp)
        if fs.enabled and classifier is not None:
            try:
                result["fewshot"] = {name: fewshot.fewshot_sweep(train["features"][name], train["labels"],
                                                                test["features"][name], test["labels"],
                                                                classifier[name], fs)
                                     for name in classifier}
            except ValueError as exc:  # e.g. a class with fewer than k + 1 training samples
                log(f"  {dataset.name}: few-shot skipped: {exc}")
                result["fewshot_error"] = str(exc)
    if dataset.errors:
        result["errors"] = dataset.errors[:100]
        result["num_errors"] = len(dataset.errors)
        log(f"  {dataset.name}: {len(dataset.errors)} unreadable samples skipped "
            f"(first: {dataset.errors[0]['error']})")
    result["elapsed_s"] = round(time.time() - t0, 2)
    return result


def preprocess_size(preprocess, default: int = 224) -> int:
    """The image size an open_clip val transform produces (its CenterCrop / Resize size)."""
    for t in reversed(getattr(preprocess, "transforms", [])):
        size = getattr(t, "size", None)
        if isinstance(size, int):
            return size
        if isinstance(size, (tuple, list)) and size:
            return int(size[0])
    return default


# -- suites ------------------------------------------------------------------------------------

CLASSIFICATION_METRICS = ("acc1", "acc5", "mean_per_class_recall", "macro_f1", "worst_group_acc1",
                          "worst_group_acc5")
# DataComp's (WILDS') names -> this project's
METRIC_ALIASES = {"F1-macro_all": "macro_f1", "acc_worst_region": "worst_group_acc1",
                  "acc_wg": "worst_group_acc1", "acc_top5_wg": "worst_group_acc5"}
RETRIEVAL_METRIC = re.compile(r"^(image_retrieval_recall|text_retrieval_recall|mean_recall)@(\d+)$")


def unsupported_reason(task: dict) -> str | None:
    """Why this project cannot compute a suite task's main metric (None when it can)."""
    metric = task["main_metric"]
    metric = METRIC_ALIASES.get(metric, metric)
    if task["task"] == "zeroshot_classification" and metric not in CLASSIFICATION_METRICS:
        return f"main metric {metric} is not computed here"
    if metric.startswith("worst_group") and task.get("group_by") is None:
        return f"main metric {task['main_metric']} needs group_by (the metadata column of the groups) in the suite"
    if task["task"] == "zeroshot_retrieval" and not RETRIEVAL_METRIC.match(metric):
        return f"main metric {metric} is not a retrieval recall"
    if task["task"] == "winogavil":
        return "WinoGAViL's association task is not implemented here"
    return None


def _task_main(task: dict, res: dict) -> dict[str, float]:
    section = "zeroshot" if task["task"] == "zeroshot_classification" else "retrieval"
    per_name = res.get(section) or {}
    metric = METRIC_ALIASES.get(task["main_metric"], task["main_metric"])
    values = {name: m.get(metric) for name, m in per_name.items()}
    if not values or any(v is None for v in values.values()):
        raise ValueError(f"no {task['main_metric']} in the {section} results (e.g. acc5 with fewer than 5 classes)")
    return values


def _mean(values: list[float]) -> float | None:
    return sum(values) / len(values) if values else None


def suite_averages(suite: dict, tasks: dict) -> dict:
    """Per embedding name: ``average`` (the mean of every task's main metric, DataComp's way; None
    while a task has no value), ``average_present`` (over the tasks that have one), their counts,
    and each group's mean (None unless all its tasks have a value)."""
    names = list(dict.fromkeys(n for t in tasks.values() for n in (t.get("main") or {})))
    out = {}
    for name in names:
        vals = {k: t["main"][name] for k, t in tasks.items() if name in (t.get("main") or {})}
        complete = len(vals) == len(suite["tasks"])
        out[name] = {"average": _mean(list(vals.values())) if complete else None,
                     "average_present": _mean(list(vals.values())), "num_present": len(vals),
                     "num_tasks": len(suite["tasks"]),
                     "groups": {g: (_mean([vals[k] for k in keys]) if all(k in vals for k in keys) else None)
                                for g, keys in suite["groups"].items()}}
    return out


def evaluate_suite(embedder, cfg: EvalConfig, log: Callable = print) -> dict:
    """Zero-shot evaluation of every task of suite ``cfg.suite`` found under ``cfg.wds_root``.

    Each task: ``status`` ``ok`` (with ``main``: embedding name -> main metric, and ``result``: all
    metrics), ``missing`` (no folder under the root), ``unsupported`` (a main metric not computed
    here) or ``failed`` (``error``; the other tasks still run). Probes are not run for suite tasks.
    """
    suite = load_suite(cfg.suite)
    root = cfg.wds_root
    if not root:
        raise ValueError(f"eval.suite={cfg.suite} needs eval.wds_root (the folder of CLIP_benchmark wds datasets)")
    import fsspec

    fs, base = fsspec.core.url_to_fs(str(root))
    if not fs.isdir(base):
        raise ValueError(f"eval.wds_root not found: {root}")
    ks = sorted(set(cfg.recall_at or [1, 5, 10]) | {int(m.group(2)) for t in suite["tasks"]
                                                    if (m := RETRIEVAL_METRIC.match(t["main_metric"]))})
    base = replace(cfg, recall_at=tuple(ks), linear_probe=replace(cfg.linear_probe, enabled=False),
                   fewshot=replace(cfg.fewshot, enabled=False))
    split = cfg.split
    n, tasks = len(suite["tasks"]), {}
    log(f"suite {suite['name']}: {n} tasks under {root}")
    for i, task in enumerate(suite["tasks"], 1):
        key = task["key"]
        entry = {"name": task["name"], "task": task["task"], "main_metric": task["main_metric"]}
        tasks[key] = entry
        try:
            folder = find_task_folder(root, task, split)
        except Exception as exc:  # an unreadable root: every task fails alike
            entry.update(status="failed", error=f"{type(exc).__name__}: {exc}")
            log(f"[{i}/{n}] {key}: failed: {entry['error']}")
            continue
        if folder is None:
            entry["status"] = "missing"
            continue
        entry["folder"] = folder
        reason = unsupported_reason(task)
        if reason:
            entry.update(status="unsupported", error=reason)
            log(f"[{i}/{n}] {key} ({task['name']}): unsupported: {reason}")
            continue
        log(f"[{i}/{n}] {key} ({task['name']}) ...")
        try:
            dataset = suite_task_dataset(folder, task)
            classify = task["task"] == "zeroshot_classification"
            res = evaluate_dataset(embedder, dataset, replace(base, zeroshot=classify, retrieval=not classify),
                                   log, group_by=task.get("group_by"))
            entry.update(status="ok", main=_task_main(task, res), result=res)
            shown = ", ".join(f"{name} {100 * v:.2f}" for name, v in entry["main"].items())
            log(f"[{i}/{n}] {key}: {task['main_metric']} {shown} ({res['num_test']} images, {res['elapsed_s']}s)")
        except Exception as exc:  # a failing task is reported; the rest go on
            entry.update(status="failed", error=f"{type(exc).__name__}: {exc}")
            log(f"[{i}/{n}] {key}: failed: {entry['error']}")
    missing = [k for k, t in tasks.items() if t["status"] == "missing"]
    if missing:
        log(f"suite {suite['name']}: {len(missing)} of {n} tasks missing under {root}: {', '.join(missing)}")
    return {"suite": suite["name"], "wds_root": str(root), "num_tasks": n, "tasks": tasks,
            "missing": missing, "failed": [k for k, t in tasks.items() if t["status"] == "failed"],
            "unsupported": [k for k, t in tasks.items() if t["status"] == "unsupported"],
            "averages": suite_averages(suite, tasks)}


def run_evaluation(embedder, cfg: EvalConfig | Mapping, image_size: int | None = None,
                   log: Callable = print) -> dict:
    """Evaluate ``embedder`` on every dataset in ``cfg.datasets`` and, with ``cfg.suite``, on the
    suite's tasks under ``cfg.wds_root`` (result key ``suite/<name>``, see :func:`evaluate_suite`).
    ``cfg`` is the ``eval`` section: an :class:`~training.eval_settings.EvalConfig`, or a plain
    mapping (the training loop's section), merged over configs/eval/default.yaml and parsed here
    once (:func:`training.eval_settings.eval_config`; a wrong key or value is a ConfigError).

    ``image_size`` (for the built-in digits) defaults to the size ``embedder.preprocess`` makes.
    A dataset that cannot be read is reported under ``{"error": ...}``; the others still run.
    """
    cfg = eval_config(cfg)
    image_size = image_size or preprocess_size(embedder.preprocess)
    results = {}
    for name in cfg.datasets:
        log(f"evaluating on {name} ...")
        try:
            dataset = load_eval_dataset(name, cfg, image_size)
            results[name] = evaluate_dataset(embedder, dataset, cfg, log)
        except (ValueError, OSError) as exc:
            log(f"  {name}: {exc}")
            results[name] = {"error": f"{type(exc).__name__}: {exc}"}
    if cfg.suite:
        try:
            res = evaluate_suite(embedder, cfg, log)
            results[f"suite/{res['suite']}"] = res
        except (ValueError, OSError) as exc:
            log(f"  suite {cfg.suite}: {exc}")
            results[f"suite/{cfg.suite}"] = {"error": f"{type(exc).__name__}: {exc}"}
    return results


def summary_metrics(results: dict) -> dict[str, float]:
    """Flat ``dataset/eval/name/metric`` -> value of the headline metrics (for trainer logs)."""
    flat = {}
    for ds, res in results.items():
        if "suite" in res:
            flat.update(suite_summary(res))
            continue
        for name, m in res.get("zeroshot", {}).items():
            flat[f"{ds}/zeroshot/{name}/acc1"] = m["acc1"]
        for name, m in res.get("retrieval", {}).items():
            for key in ("image_retrieval_recall@1", "text_retrieval_recall@1"):
                if key in m:
                    flat[f"{ds}/retrieval/{name}/{key}"] = m[key]
        for name, m in res.get("linear_probe", {}).items():
            flat[f"{ds}/linear_probe/{name}/acc1"] = m["acc1"]
    return flat


def suite_summary(res: dict) -> dict[str, float]:
    """``<suite>/<task>/<name>/<main metric>`` per task ('/' in task keys written as '-'), and
    ``<suite>/average/<name>`` (when every task has a value), ``<suite>/average_present/<name>``."""
    flat, suite = {}, res["suite"]
    for key, t in res["tasks"].items():
        for name, v in (t.get("main") or {}).items():
            flat[f"{suite}/{key.replace('/', '-')}/{name}/{t['main_metric']}"] = v
    for name, a in res["averages"].items():
        if a["average"] is not None:
            flat[f"{suite}/average/{name}"] = a["average"]
        if a["average_present"] is not None:
            flat[f"{suite}/average_present/{name}"] = a["average_present"]
    return flat


def suite_table_rows(res: dict) -> list[dict]:
    """One row per task (``key``, ``name``, ``task``, ``main_metric``, ``status``, one column per
    embedding name) and the average rows: the suite's table, as printed and written."""
    names = list(res["averages"])
    rows = []
    for key, t in res["tasks"].items():
        rows.append({"key": key, "name": t["name"], "task": t["task"], "main_metric": t["main_metric"],
                     "status": t["status"], **{n: (t.get("main") or {}).get(n) for n in names}})
    n = res["num_tasks"]
    avg = {name: a["average"] for name, a in res["averages"].items()}
    present = {name: a["average_present"] for name, a in res["averages"].items()}
    num_present = max([a["num_present"] for a in res["averages"].values()] or [0])
    rows.append({"key": "average", "name": f"average over all {n} tasks (DataComp)", "task": "", "main_metric": "",
                 "status": "ok" if num_present == n else f"{n - num_present} tasks without a result", **avg})
    rows.append({"key": "average_present", "name": f"average over the {num_present} tasks present", "task": "",
                 "main_metric": "", "status": "ok", **present})
    groups = {}
    for name, a in res["averages"].items():
        for g, v in a["groups"].items():
            groups.setdefault(g, {})[name] = v
    for g, vals in groups.items():
        rows.append({"key": f"group:{g}", "name": f"group {g}", "task": "", "main_metric": "",
                     "status": "ok" if all(v is not None for v in vals.values()) else "incomplete", **vals})
    return rows


def format_suite(res: dict) -> str:
    """The suite's table: one row per task found (missing ones listed below it), then DataComp's
    average over all tasks, the average over the tasks present and the complete groups."""
    names = list(res["averages"])
    widths = [max(6, len(nm)) for nm in names]
    n = res["num_tasks"]

    def cells(values: dict) -> str:
        return " ".join(f"{('n/a' if values.get(nm) is None else _pct(values[nm]).strip()):>{w}}"
                        for nm, w in zip(names, widths))

    lines = [f"  {'task':<50} {'name':<24} {'main metric':<22} " + " ".join(f"{nm:>{w}}" for nm, w in zip(names, widths))]
    rows = suite_table_rows(res)
    for row in rows[:n]:
        if row["status"] == "missing":
            continue
        label = f"{row['key']:<50} {row['name'][:24]:<24} {row['main_metric']:<22}"
        detail = cells(row) if row["status"] == "ok" else f"{row['status']}: {res['tasks'][row['key']].get('error', '')}"
        lines.append(f"  {label} {detail}")
    num_present = max([a["num_present"] for a in res["averages"].values()] or [0])
    avg = {nm: a["average"] for nm, a in res["averages"].items()}
    note = "" if num_present == n else f"   (n/a: {n - num_present} of {n} tasks without a result)"
    lines.append(f"  {f'average over all {n} tasks (DataComp)':<98} {cells(avg)}{note}")
    present = {nm: a["average_present"] for nm, a in res["averages"].items()}
    lines.append(f"  {f'average over the {num_present} tasks present':<98} {cells(present)}")
    for row in rows[n + 2:]:
        if any(row.get(nm) is not None for nm in names):
            lines.append(f"  {row['name']:<98} {cells(row)}")
    if res["missing"]:
        lines.append(f"  missing ({len(res['missing'])} of {n}): " + ", ".join(res["missing"]))
    if res["failed"]:
        lines.append(f"  failed ({len(res['failed'])}): " + ", ".join(res["failed"]))
    if res["unsupported"]:
        lines.append(f"  unsupported ({len(res['unsupported'])}): " + ", ".join(res["unsupported"]))
    return "\n".join(lines)


def _pct(v) -> str:
    return "   -" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{100 * v:5.1f}"


def format_results(results: dict) -> str:
    """Human-readable tables of :func:`run_evaluation`'s results."""
    lines = []
    for ds, res in results.items():
        lines.append(f"== {ds} ==")
        if "error" in res:
            lines.append(f"  error: {res['error']}")
            continue
        if "suite" in res:
            lines.append(f"  suite {res['suite']} under {res['wds_root']}")
            lines.append(format_suite(res))
            continue
        n = f"{res['num_test']} test images" + (f", {res['num_train']} train" if "num_train" in res else "")
        lines.append(f"  {n}, {res['elapsed_s']}s")
        if "zeroshot" in res:
            lines.append(f"  zero-shot           {'acc1':>6} {'acc5':>6} {'mpcr':>6}")
            for name, m in res["zeroshot"].items():
                lines.append(f"    {name:<17} {_pct(m['acc1']):>6} {_pct(m['acc5']):>6} "
                             f"{_pct(m['mean_per_class_recall']):>6}")
        if "retrieval" in res:
            ks = sorted(int(k.split("@")[1]) for k in next(iter(res["retrieval"].values()))
                        if k.startswith("image_retrieval"))
            head = " ".join(f"{'t2i@' + str(k):>6}" for k in ks) + " " + " ".join(f"{'i2t@' + str(k):>6}" for k in ks)
            lines.append(f"  retrieval           {head}")
            for name, m in res["retrieval"].items():
                vals = [m[f"image_retrieval_recall@{k}"] for k in ks] + [m[f"text_retrieval_recall@{k}"] for k in ks]
                lines.append(f"    {name:<17} " + " ".join(f"{_pct(v):>6}" for v in vals))
        if "linear_probe" in res:
            lines.append("  linear probe        acc1   (weight decay)")
            for name, m in res["linear_probe"].items():
                lines.append(f"    {name:<17} {_pct(m['acc1']):>6}   ({m['weight_decay']:g})")
        for name, sweep in res.get("fewshot", {}).items():
            table = fewshot.format_fewshot_table(sweep, title=f"  few-shot ({name})")
            lines.extend("  " + line if i else line for i, line in enumerate(table.splitlines()))
        if res.get("fewshot_error"):
            lines.append(f"  few-shot skipped: {res['fewshot_error']}")
        if res.get("num_errors"):
            lines.append(f"  {res['num_errors']} unreadable samples skipped")
    return "\n".join(lines)
