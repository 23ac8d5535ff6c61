"""The DiHT recipe (Radenovic et al., CVPR 2023): HN-NCE + concept distillation on Ray Train.

    python training/train.py --config configs/train/diht_tiny.yaml          # CPU demo
    python training/train.py recipe=diht data.train=s3://bucket/laion_cat   # cluster (configs/train/diht.yaml)

``recipe: diht`` plugs three things into the trainer's seams (:mod:`training.recipes`):

* **loss** (:class:`DiHTLoss`, built by :func:`training.objective.diht_objective`): HN-NCE
  (:func:`training.losses.hnnce.hnnce_loss`, ``loss.hnnce.alpha`` / ``loss.hnnce.beta``;
  ``beta: 0, alpha: 1`` is exactly the CLIP loss) plus, when ``loss.distill.enabled``,
  ``lambda * (L_objects + L_attributes)`` from two linear heads on the student's pooled image
  feature (:class:`training.losses.distill.ConceptDistillLoss`, weight ``loss.distill.weight``,
  temperature ``loss.distill.temperature``). The terms are returned (and
  logged) separately: ``loss``, ``contrastive``, ``distill`` and ``concept_coverage`` (the fraction
  of the batch that has targets). The heads are trained with the model and saved in
  ``train_state.pt``; ``open_clip.pt`` holds the plain open_clip student.
* **sample transform** (:class:`ConceptSampleTransform`): the plain CLIP transform plus the
  stored teacher targets, joined **by sample key** with the ``CURATED/concepts`` folder written by
  ``pipelines/label_concepts.py`` (``loss.distill.concepts``; ``null``: ``<data.train>/concepts``).
  The label job writes one ``concepts/NNNNN.parquet`` per curated shard ``NNNNN.tar``, and the
  reader tags every sample with its tar (``read_webdataset(include_paths=True)``), so each Ray
  Data worker reads only the label files of the shards it is decoding, keeping the last
  :data:`SHARD_CACHE` of them: its memory does not grow with the dataset. Samples whose key has no
  targets (or whose shard has no label file) get ``has_concepts = False`` and contribute only the
  contrastive loss. No teacher runs during training.
* **model / embedder**: the plain CLIP wrapper and embedder (the heads are training-only).
"""

from __future__ import annotations

import json
import os
import posixpath
from collections import OrderedDict
from dataclasses import replace
from typing import Callable, Mapping, Sequence

import numpy as np
import torch
from torch import nn

from training.data import ClipSampleTransform
from training.recipes import ClipRecipe, register_recipe
from training.settings import DiHTConfig, DiHTLossConfig

TARGET_COLUMNS = ("obj_ids", "obj_probs", "attr_ids", "attr_probs")
_TARGETS: dict = {}  # per-process cache: concepts URL -> ConceptTargets of the whole folder
SHARD_CACHE = 8  # label files (one per curated shard) kept per worker process
_SHARD_TARGETS: "OrderedDict[tuple[str, str], ConceptTargets]" = OrderedDict()
_VOCABS: dict = {}


class ConceptError(ValueError):
    """The concept targets cannot be used (missing folder, mismatching vocabulary)."""


# --- the join by key (pure, no Ray) ---------------------------------------------------------------

def padded_list_column(column, k: int, dtype, fill) -> np.ndarray:
    """[N, k] array from an Arrow ``list<...>`` column: the first ``k`` values of each row,
    padded with ``fill`` (vectorised :func:`training.concepts.padded_targets`)."""
    import pyarrow as pa

    arr = column.combine_chunks() if isinstance(column, pa.ChunkedArray) else column
    n = len(arr)
    out = np.full((n, k), fill, dtype)
    if n == 0:
        return out
    offsets = arr.offsets.to_numpy()
    values = arr.values.to_numpy(zero_copy_only=False)
    lengths = np.minimum(np.diff(offsets), k)
    if arr.null_count:
        lengths = np.where(arr.is_null().to_numpy(zero_copy_only=False), 0, lengths)
    rows = np.repeat(np.arange(n), lengths)
    starts = np.repeat(np.cumsum(lengths) - lengths, lengths)
    pos = np.arange(int(lengths.sum())) - starts
    out[rows, pos] = values[np.repeat(offsets[:-1], lengths) + pos]
    return out


class ConceptTargets:
    """Key -> padded top-k concept targets of one ``CURATED/concepts`` table.

    :meth:`lookup` turns a batch's keys into ``obj_ids``/``attr_ids`` [n, k] int64 (-1 padded),
    ``obj_probs``/``attr_probs`` [n, k] float32 (0 padded) and ``has_concepts`` [n] bool: False
    for keys the table lacks and for samples the labelling job could not label (``error`` set).
    """

    def __init__(self, table, top_k: int):
        if top_k < 1:
            raise ConceptError(f"top_k must be >= 1, got {top_k}")
        missing = [c for c in ("key", *TARGET_COLUMNS) if c not in table.column_names]
        if missing:
            raise ConceptError(f"concept table lacks columns {missing}")
        self.top_k = int(top_k)
        keys = [posixpath.basename(k) for k in table["key"].to_pylist()]
        self.index = {k: i for i, k in enumerate(keys)}
        self.arrays = {}
        for c in TARGET_COLUMNS:
            ids = c.endswith("_ids")
            self.arrays[c] = padded_list_column(table[c], self.top_k, np.int64 if ids else np.float32,
                                                -1 if ids else 0.0)
        labelled = (self.arrays["obj_ids"] >= 0).any(axis=1) | (self.arrays["attr_ids"] >= 0).any(axis=1)
        if "error" in table.column_names:
            labelled &= np.asarray(table["error"].is_null().to_numpy(zero_copy_only=False), bool)
        self.labelled = labelled

    def __len__(self) -> int:
        return len(self.index)

    def lookup(self, keys) -> dict[str, np.ndarray]:
        rows = np.array([self.index.get(posixpath.basename(str(k)), -1) for k in keys], np.int64)
        found = rows >= 0
        safe = np.where(found, rows, 0)
        out = {}
        for c, arr in self.arrays.items():
            if len(arr):
                v = arr[safe]
                v[~found] = -1 if c.endswith("_ids") else 0.0
            else:
                v = np.full((len(rows), self.top_k), -1 if c.endswith("_ids") else 0.0, arr.dtype)
            out[c] = v
        out["has_concepts"] = found & (self.labelled[safe] if len(self.labelled) else False)
        return out


def read_vocab(url: str) -> dict:
    """``vocab.json`` of a concepts folder, with a clear error when the folder is incomplete."""
    import fsspec

    fs, root = fsspec.core.url_to_fs(url)
    path = posixpath.join(root, "vocab.json")
    if not fs.exists(path):
        raise ConceptError(f"no concept labels at {url} (vocab.json missing): run "
                           "pipelines/label_concepts.py first, set loss.distill.concepts, or "
                           "loss.distill.enabled=false")
    with fs.open(path, "r") as f:
        vocab = json.load(f)
    for name in ("objects", "attributes"):
        if not isinstance(vocab.get(name), list) or not vocab[name]:
            raise ConceptError(f"{path}: '{name}' must be a non-empty list")
    return vocab


def load_targets(url: str) -> ConceptTargets:
    """The folder's targets, read once per process (:func:`training.concepts.read_concepts`)."""
    if url not in _TARGETS:
        from training.concepts import read_concepts

        try:
            vocab, table = read_concepts(url)
        except FileNotFoundError as exc:
            raise ConceptError(str(exc)) from None
        _TARGETS[url] = ConceptTargets(table, int(vocab.get("top_k") or 1))
    return _TARGETS[url]


def _shard_file_targets(url: str, shard: str | None) -> ConceptTargets:
    import fsspec
    import pyarrow.parquet as pq

    from training.concepts import OUTPUT_SCHEMA

    if url not in _VOCABS:
        _VOCABS[url] = read_vocab(url)
    table = OUTPUT_SCHEMA.empty_table()
    if shard:
        fs, root = fsspec.core.url_to_fs(url)
        path = posixpath.join(root, f"{shard}.parquet")
        if fs.exists(path):
            with fs.open(path, "rb") as f:
                table = pq.read_table(f).cast(OUTPUT_SCHEMA)
    return ConceptTargets(table, int(_VOCABS[url].get("top_k") or 1))


def load_shard_targets(url: str, shard: str | None) -> ConceptTargets:
    """Targets of one curated shard (``<url>/<shard>.parquet``), cached per process (the last
    :data:`SHARD_CACHE` shards). A shard without a label file (or ``None``) has no targets."""
    cache_key = (url, shard or "")
    if cache_key in _SHARD_TARGETS:
        _SHARD_TARGETS.move_to_end(cache_key)
    else:
        _SHARD_TARGETS[cache_key] = _shard_file_targets(url, shard)
        while len(_SHARD_TARGETS) > SHARD_CACHE:
            _SHARD_TARGETS.popitem(last=False)
    return _SHARD_TARGETS[cache_key]


def lookup_by_shard(url: str, keys: Sequence[str], shard_of: dict[str, str]) -> dict[str, np.ndarray]:
    """:meth:`ConceptTargets.lookup` of ``keys``, each in its own shard's label file
    (``shard_of``: key -> shard name); the rows keep the order of ``keys``."""
    out = load_shard_targets(url, None).lookup(keys)  # right shapes, nothing found
    groups: dict[str | None, list[int]] = {}
    for i, k in enumerate(keys):
        groups.setdefault(shard_of.get(str(k)), []).append(i)
    for shard, rows in groups.items():
        if shard is not None:
            for c, v in load_shard_targets(url, shard).lookup([keys[i] for i in rows]).items():
                out[c][rows] = v
    return out


def concepts_url(cfg: DiHTConfig) -> str:
    """``loss.distill.concepts``, else ``<curated folder>/concepts`` of ``data.train`` (or of the
    demo output when ``data.train`` is null). Local paths are made absolute."""
    url = cfg.loss.distill.concepts
    if not url:
        data = cfg.data.train or cfg.data.demo_output
        if not isinstance(data, str) or any(ch in data for ch in "{*?["):
            raise ConceptError("loss.distill.concepts must be set when data.train is not one "
                               f"curated folder (got {data!r})")
        base = data.rstrip("/")
        if posixpath.basename(base) == "shards":
            base = posixpath.dirname(base)
        url = posixpath.join(base, "concepts")
    return url if "://" in url else os.path.abspath(url)


class ConceptSampleTransform(ClipSampleTransform):
    """:class:`training.data.ClipSampleTransform` + the concept targets of each sample's key."""

    def __init__(self, arch: str, concepts: str, is_train: bool = True, counter=None,
                 aug_cfg: dict | None = None):
        super().__init__(arch, is_train=is_train, counter=counter, aug_cfg=aug_cfg)
        self.concepts = concepts

    def __call__(self, batch: dict) -> dict:
        out = super().__call__(batch)
        paths = batch.get("path")
        if paths is None:  # rows not tagged with their tar: the whole folder's table
            out.update(load_targets(self.concepts).lookup(out["key"]))
            return out
        from training.concepts import shard_name

        shard_of = {str(k): shard_name(str(p)) for k, p in zip(batch["__key__"], paths)}
        out.update(lookup_by_shard(self.concepts, list(out["key"]), shard_of))
        return out


# --- the loss -------------------------------------------------------------------------------------

class DiHTLoss(nn.Module):
    """``HN-NCE + [lambda * (L_objects + L_attributes)]`` on the wrapper's outputs.

    ``distill`` is a :class:`~training.losses.distill.ConceptDistillLoss` (its heads are trained
    with the model) or None. Returns ``{"loss", "contrastive"[, "distill", "concept_coverage"]}``.
    """

    def __init__(self, alpha: float = 1.0, beta: float = 0.5, distill: nn.Module | None = None):
        super().__init__()
        self.alpha, self.beta = float(alpha), float(beta)
        self.distill = distill

    def forward(self, out: dict, batch: dict) -> dict:
        from training.losses.hnnce import hnnce_loss

        contrastive = hnnce_loss(out["image"], out["text"], out["logit_scale"], self.alpha, self.beta)
        terms = {"contrastive": contrastive.detach()}
        loss = contrastive
        if self.distill is not None:
            distill = self.distill(out["image_pooled"], batch)
            loss = loss + distill
            terms["distill"] = distill.detach()
            has = batch.get("has_concepts")
            if torch.is_tensor(has):
                terms["concept_coverage"] = has.float().mean().detach()
        return {"loss": loss, **terms}


def hnnce_settings(loss_cfg: DiHTLossConfig) -> tuple[float, float]:
    """``(alpha, beta)`` of HN-NCE from ``loss.hnnce``; errors for label smoothing (HN-NCE has
    none) and a negative alpha."""
    if loss_cfg.label_smoothing != 0.0:
        raise ValueError("recipe diht: HN-NCE has no label smoothing; set loss.label_smoothing=0")
    alpha, beta = loss_cfg.hnnce.alpha, loss_cfg.hnnce.beta
    if alpha < 0:
        raise ValueError(f"loss.hnnce.alpha must be >= 0, got {alpha}")
    return alpha, beta


# --- the recipe ------------------------------------------------------------------------------------

@register_recipe("diht")
class DiHTRecipe(ClipRecipe):
    """DiHT: CLIP model, HN-NCE loss and (optionally) concept distillation from stored targets."""

    config_keys = ("loss.hnnce", "loss.distill")
    config_class = DiHTConfig  # the typed view of diht.yaml's sections (training/settings.py)

    def __init__(self, cfg: DiHTConfig | Mapping):
        super().__init__(cfg)
        cfg = self.cfg
        self.alpha, self.beta = hnnce_settings(cfg.loss)  # config errors on the driver
        self.distill = cfg.loss.distill.enabled
        self.concepts = None
        if self.distill:
            self.concepts = concepts_url(cfg)
            # Resolved once (on the driver) into the config (``self.cfg``) the trainer hands to
            # its workers, whose working directory may differ.
            distill = replace(cfg.loss.distill, concepts=self.concepts)
            self.cfg = replace(cfg, loss=replace(cfg.loss, distill=distill))

    def sample_transform(self, is_train: bool = True, counter=None) -> Callable:
        if not self.distill:
            return super().sample_transform(is_train, counter)
        read_vocab(self.concepts)  # fail fast on the driver, before any worker starts
        aug = self.cfg.data.aug_cfg or None
        return ConceptSampleTransform(self.arch, self.concepts, is_train=is_train, counter=counter,
                                      aug_cfg=aug if is_train else None)
