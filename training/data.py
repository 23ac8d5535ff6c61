"""Curated webdataset shards -> Ray Data -> batches of tensors on every training worker.

* :func:`resolve_shards` turns a curated output folder, a ``shards/`` folder, a brace pattern
  (``.../{00000..00099}.tar``) or a list, local or any fsspec URL, into tar paths.
* :func:`build_dataset` reads them with ``ray.data.read_webdataset`` (raw bytes, no decoding in
  the reader) and runs the recipe's per-sample transform (decode, open_clip image transform,
  open_clip tokenizer) as Ray Data tasks on CPU workers.
* :class:`ClipSampleTransform` is the default transform. Bad samples (undecodable image, no
  image, no or empty caption) are dropped from the batch and counted by a
  :class:`SampleErrorCounter` actor, never fatal.
* :func:`iter_batches` is what each training worker runs on ``ray.train.get_dataset_shard``:
  ``iter_torch_batches`` with equal, full batches (``drop_last``) so every rank steps together.

Every sample keeps its ``key`` through the path, and the reader tags it with its tar (``path``),
for join-by-key side data stored per shard such as concept targets.
"""

from __future__ import annotations

import json
import posixpath
from typing import Callable

import numpy as np

from curation.images import TRAINABLE_FORMATS, decode_rgb

TEXT_COLUMNS = ("txt", "text", "caption")
_CACHE: dict = {}


class DataError(ValueError):
    """Training data that cannot be used at all (no shards, unreadable location)."""


# --- locating shards -------------------------------------------------------------------------------

def _expand_braces(pattern: str) -> list[str]:
    import braceexpand

    return list(braceexpand.braceexpand(pattern))


def fsspec_options(url: str, storage=None) -> dict:
    """Explicit fsspec options for ``url``: for ``s3://``, the AWS variables captured in
    ``storage`` (a :class:`curation.common.storage.Storage`: endpoint, key, secret, token, region) under
    its ``storage_options``. A filesystem built with them carries its settings when pickled into
    Ray tasks (Ray Data read tasks, checkpoint uploads), whose processes may not have the
    driver's environment."""
    from curation.common.storage import OBJECT_STORE_PROTOCOLS, is_remote

    if storage is None or not is_remote(url) or url.split("://", 1)[0] not in OBJECT_STORE_PROTOCOLS:
        return {}
    env = dict(storage.env)
    opts: dict = {}
    endpoint = env.get("AWS_ENDPOINT_URL_S3") or env.get("AWS_ENDPOINT_URL")
    if endpoint:
        opts["endpoint_url"] = endpoint
    for var, key in (("AWS_ACCESS_KEY_ID", "key"), ("AWS_SECRET_ACCESS_KEY", "secret"),
                     ("AWS_SESSION_TOKEN", "token"), ("AWS_PROFILE", "profile")):
        if env.get(var):
            opts[key] = env[var]
    region = env.get("AWS_REGION") or env.get("AWS_DEFAULT_REGION")
    if region:
        opts["client_kwargs"] = {"region_name": region}
    given = dict(storage.options)
    if "client_kwargs" in given and "client_kwargs" in opts:
        given["client_kwargs"] = {**opts["client_kwargs"], **given["client_kwargs"]}
    return {**opts, **given}


def url_to_fs(url: str, storage=None):
    """``(fsspec filesystem, path)`` for a local path or URL, with :func:`fsspec_options`."""
    import fsspec

    return fsspec.core.url_to_fs(str(url), **fsspec_options(str(url), storage))


def pyarrow_filesystem(fs):
    """A pyarrow filesystem over an fsspec one (None for the local disk: pyarrow's own)."""
    protocol = fs.protocol if isinstance(fs.protocol, str) else fs.protocol[0]
    if protocol in ("file", "local"):
        return None
    from pyarrow.fs import FSSpecHandler, PyFileSystem

    return PyFileSystem(FSSpecHandler(fs))


def resolve_shards(data, storage=None) -> tuple[list[str], object | None]:
    """``(tar paths, pyarrow filesystem or None)`` for a folder, pattern, URL or list of them."""
    items = list(data) if isinstance(data, (list, tuple)) else [data]
    if not items or not all(isinstance(i, str) and i for i in items):
        raise DataError(f"data.train must be a path, URL, pattern or list of them, got {data!r}")
    paths, fs0 = [], None
    for item in items:
        for url in _expand_braces(item):
            fs, path = url_to_fs(url, storage)
            fs0 = fs0 or fs
            if fs.isdir(path):
                sub = posixpath.join(path, "shards")
                folder = sub if fs.isdir(sub) else path
                found = sorted(p for p in fs.glob(posixpath.join(folder, "*.tar")))
                if not found:
                    raise DataError(f"no .tar shards in {url}")
                paths += found
            elif fs.exists(path):
                paths.append(path)
            elif any(c in path for c in "*?["):
                paths += sorted(fs.glob(path))
            else:
                raise DataError(f"training data not found: {url}")
    if not paths:
        raise DataError(f"no shards found for {data!r}")
    return paths, pyarrow_filesystem(fs0)


def count_samples(paths: list[str], filesystem=None) -> int | None:
    """Sum of the curated ``sizes.json`` entries of these shards (None when not all are listed)."""
    import fsspec

    fs = fsspec.filesystem("file") if filesystem is None else filesystem.handler.fs
    by_dir: dict[str, dict] = {}
    total = 0
    for p in paths:
        folder, name = posixpath.split(p)
        if folder not in by_dir:
            try:
                with fs.open(posixpath.join(folder, "sizes.json"), "r") as f:
                    by_dir[folder] = json.load(f)
            except (FileNotFoundError, OSError, ValueError):
                by_dir[folder] = {}
        if name not in by_dir[folder]:
            return None
        total += int(by_dir[folder][name])
    return total


# --- bad-sample accounting ---------------------------------------------------------------------------

class SampleErrorCounter:
    """Counts samples the data path skipped, by reason (runs as a small Ray actor)."""

    def __init__(self, max_examples: int = 20):
        self.counts: dict[str, int] = {}
        self.keys: set = set()
        self.examples: list = []
        self.max_examples = max_examples

    def add(self, errors: list[tuple[str, str, str]]) -> None:
        for key, reason, message in errors:
            self.counts[reason] = self.counts.get(reason, 0) + 1
            self.keys.add(key)
            if len(self.examples) < self.max_examples:
                self.examples.append({"key": key, "reason": reason, "error": message})

    def summary(self) -> dict:
        return {"skipped": sum(self.counts.values()), "unique_keys": len(self.keys),
                "by_reason": dict(self.counts), "examples": list(self.examples)}


def start_error_counter(name: str | None = None):
    import ray

    actor = ray.remote(num_cpus=0)(SampleErrorCounter)
    return actor.options(name=name, get_if_exists=True).remote() if name else actor.remote()


# --- per-sample transform ----------------------------------------------------------------------------

def _first(batch: dict, columns, i: int):
    for c in columns:
        if c in batch:
            v = batch[c][i]
            if v is not None and not (isinstance(v, float) and np.isnan(v)):
                return v
    return None


def decode_text(data) -> str:
    if isinstance(data, (bytes, bytearray, memoryview)):
        data = bytes(data).decode("utf-8")
    if not isinstance(data, str) or not data.strip():
        raise ValueError("empty caption")
    return data.strip()


class ClipSampleTransform:
    """Raw webdataset rows -> ``image`` [n,3,H,W] float32, ``text`` [n,L] int64, ``key``.

    Picklable (the open_clip transform and tokenizer are built lazily in each Ray worker and
    cached there). ``counter`` is an optional :class:`SampleErrorCounter` actor handle.
    """

    def __init__(self, arch: str, is_train: bool = True, counter=None, aug_cfg: dict | None = None):
        self.arch, self.is_train, self.counter, self.aug_cfg = arch, is_train, counter, aug_cfg

    def tools(self):
        cache_key = (self.arch, self.is_train, json.dumps(self.aug_cfg, sort_keys=True))
        if cache_key not in _CACHE:
            from training.model import image_transform, preprocess_config, tokenizer

            _CACHE[cache_key] = (image_transform(self.arch, self.is_train, self.aug_cfg),
                                 tokenizer(self.arch), preprocess_config(self.arch)["image_size"])
        return _CACHE[cache_key]

    def draft_side(self) -> int:
        size = self.tools()[2]
        side = max(size) if isinstance(size, (tuple, list)) else int(size)
        return 2 * side  # margin for the random resized crop

    def decode(self, batch: dict) -> tuple[list, list, list, list]:
        """(keys, PIL images, captions, errors) of the usable rows."""
        keys_all = batch.get("__key__")
        n = len(keys_all) if keys_all is not None else 0
        keys, images, texts, errors = [], [], [], []
        min_side = self.draft_side()
        for i in range(n):
            key = str(keys_all[i])
            try:
                raw = _first(batch, TRAINABLE_FORMATS, i)
                if raw is None:
                    errors.append((key, "no_image", "sample has no image"))
                    continue
                raw_text = _first(batch, TEXT_COLUMNS, i)
                if raw_text is None:
                    errors.append((key, "no_text", "sample has no caption"))
                    continue
                try:
                    text = decode_text(raw_text)
                except (ValueError, UnicodeDecodeError) as exc:
                    errors.append((key, "bad_text", f"{type(exc).__name__}: {exc}"))
                    continue
                image = decode_rgb(bytes(raw), min_side=min_side, flatten_alpha=False)
            except Exception as exc:  # any undecodable image is a per-sample error
                errors.append((key, "bad_image", f"{type(exc).__name__}: {exc}"))
                continue
            keys.append(key)
            images.append(image)
            texts.append(text)
        return keys, images, texts, errors

    def report(self, errors: list) -> None:
        if errors and self.counter is not None:
            add = self.counter.add
            add.remote(errors) if hasattr(add, "remote") else add(errors)

    def __call__(self, batch: dict) -> dict:
        transform, tok, size = self.tools()
        keys, images, texts, errors = self.decode(batch)
        self.report(errors)
        if size is None or isinstance(size, int):
            h = w = int(size)
        else:
            h, w = size
        pixels = (np.stack([transform(im).numpy() for im in images]).astype(np.float32)
                  if images else np.zeros((0, 3, h, w), np.float32))
        tokens = (tok(texts).numpy().astype(np.int64) if texts
                  else np.zeros((0, tok.context_length), np.int64))
        return {"image": pixels, "text": tokens, "key": np.array(keys, dtype=object)}


# --- Ray Data wiring -----------------------------------------------------------------------------------

class WithStorage:
    """A batch function that first makes its process open URLs as the driver does
    (:meth:`curation.common.storage.Storage.apply`, cheap after the first call)."""

    def __init__(self, fn: Callable, storage):
        self.fn, self.storage = fn, storage

    def __call__(self, batch):
        self.storage.apply()
        return self.fn(batch)


def build_dataset(data_cfg, transform: Callable, *, shuffle_files: bool = True,
                  storage=None, seed: int = 0):
    """Ray Dataset of transformed samples for the shards named by ``data.train``.

    ``data_cfg``: the ``data`` section (:class:`training.settings.DataConfig`; a partial mapping
    is merged over ``configs/train/clip.yaml``'s). With ``data.deterministic`` (the default)
    every epoch reads the shards in one seeded order and Ray Data preserves the row order, so the rows each training worker receives are a
    function of the seed alone: a run resumed mid-epoch replays the interrupted epoch's order and
    skips what it had already trained on (the per-epoch variety then comes from the seeded local
    shuffle buffer). Off: a fresh random shard order per epoch and no ordering constraint."""
    import ray
    from ray.data import FileShuffleConfig

    from training.settings import DataConfig, section_view

    data_cfg = section_view(DataConfig, "clip", "data", data_cfg)
    paths, filesystem = resolve_shards(data_cfg.train, storage)
    deterministic = data_cfg.deterministic
    if not shuffle_files:
        shuffle = None
    elif deterministic:
        shuffle = FileShuffleConfig(seed=int(seed), reseed_after_execution=False)
    else:
        shuffle = "files"
    # One read task per shard: with fewer shards than Ray Data's parallelism target it would
    # otherwise split each read's output into small blocks (SplitBlocks), which costs throughput.
    ds = ray.data.read_webdataset(paths, filesystem=filesystem, decoder=None,
                                  include_paths=True,  # ``path``: each row's tar, for per-shard side data
                                  shuffle=shuffle,
                                  override_num_blocks=data_cfg.read_blocks or len(paths),
                                  # Ray Data's default is 1 CPU per read task: on nodes whose
                                  # CPUs are partly held by training workers it would never run
                                  num_cpus=data_cfg.num_cpus)
    if deterministic:
        ds.context.execution_options.preserve_order = True
    if not data_cfg.op_resource_reservation:
        # Ray Data reserves a share of the CPUs for each operator; the light read operator's
        # share then idles while the transform waits (on 2 CPUs the path ran at half speed).
        # Only this dataset's context changes.
        ds.context.op_resource_reservation_enabled = False
    if storage is not None:  # the transform may read side data (concept labels) from the bucket
        transform = WithStorage(transform, storage)
    return ds.map_batches(transform, batch_size=data_cfg.map_batch_size, batch_format="numpy",
                          num_cpus=data_cfg.num_cpus, concurrency=data_cfg.concurrency, zero_copy_batch=True)


def collate(batch: dict) -> dict:
    """numpy columns -> tensors; string/object columns (``key``) stay lists."""
    import torch

    out = {}
    for name, col in batch.items():
        if isinstance(col, np.ndarray) and col.dtype != object:
            out[name] = torch.from_numpy(np.ascontiguousarray(col))
        else:
            out[name] = [str(x) for x in col]
    return out


def _numpy_collate(fn: Callable):
    """Wrap a ``dict of numpy -> dict`` function as Ray Data's NumpyBatchCollateFn."""
    from ray.data.collate_fn import NumpyBatchCollateFn

    class _Collate(NumpyBatchCollateFn):
        def __call__(self, batch):
            return fn(batch)

    return _Collate()


def iter_batches(shard, batch_size: int, *, collate_fn: Callable = collate,
                 shuffle_buffer: int | None = None, prefetch_batches: int = 2, seed: int | None = None):
    """Full batches of ``batch_size`` from a dataset shard (or a whole Dataset)."""
    return shard.iter_torch_batches(batch_size=batch_size, drop_last=True,
                                    collate_fn=_numpy_collate(collate_fn),
                                    local_shuffle_buffer_size=shuffle_buffer or None,
                                    local_shuffle_seed=seed if shuffle_buffer else None,
                                    prefetch_batches=prefetch_batches)
