"""Checkpoints: open_clip-compatible weights plus the trainer's full state for resuming.

A checkpoint directory (what ``ray.train.report`` persists) holds

* ``open_clip.pt``: ``{"epoch", "name", "state_dict"}``, an open_clip model's weights only, which
  ``open_clip.create_model_and_transforms(name, pretrained=PATH)`` loads and
  ``open_clip_train --pretrained PATH --model name`` fine-tunes from. It is *not* an
  ``open_clip_train --resume`` checkpoint: that needs open_clip_train's own ``optimizer`` state
  (it fails with ``KeyError: 'optimizer'``); resume this trainer's runs with this trainer. What the
  model is depends on the recipe (``meta.json``'s ``open_clip`` entry says it):

  - ``clip``, ``diht``: the open_clip model that was trained (DiHT's distillation heads are not
    in it; they only serve training). ``name`` is the architecture.
  - ``improved`` (CLIP 🚀): the towers with the weak linear projector folded into their output
    projections and the weak logit scale, i.e. the weak embedding as a plain open_clip model;
    its architecture differs (``embed_dim = proj_dim``, the recipe's tower overrides), so its
    open_clip model config is saved next to it as ``<name>.json`` (register it with
    ``open_clip.add_model_config``). The strong MLP projector cannot be folded (BatchNorm,
    ReLU): the strong and ensemble embeddings need the checkpoint folder.

* ``train_state.pt``: the whole trained module (model wrapper + trainable loss modules),
  optimizer, scheduler, grad scaler, step and epoch;
* ``checkpoint_complete.json``: ``{"step", "epoch"}``, written by the trainer only after Ray
  Train has uploaded the folder; a folder without it (a worker killed mid-upload) is never
  resumed from. See :func:`newest_complete`.
* ``meta.json``: architecture, recipe, step, epoch, the training config and the ``open_clip``
  entry above (readable without torch). ``pipelines/evaluate.py FOLDER`` rebuilds the recipe's
  model from it and ``train_state.pt`` and evaluates exactly what the trainer evaluated.

Everything is read with ``torch.load(..., weights_only=True)``: a file that needs arbitrary
objects unpickled is refused (:class:`UnsafeCheckpointError`), never executed. Paths may be
local or any fsspec URL (``s3://...``, with the AWS variables / ``storage_options`` applied by
:class:`curation.common.storage.Storage`).
"""

from __future__ import annotations

import json
import os
import pickle
import tempfile
from pathlib import Path

import torch
from torch import nn

OPEN_CLIP_FILE = "open_clip.pt"
STATE_FILE = "train_state.pt"
META_FILE = "meta.json"
COMPLETE_FILE = "checkpoint_complete.json"  # written last, once every other file is in storage
CHECKPOINT_PREFIX = "checkpoint_step"


class UnsafeCheckpointError(ValueError):
    """A checkpoint that cannot be read without unpickling arbitrary objects (refused)."""


def unwrap(module: nn.Module) -> nn.Module:
    """The module inside DDP / torch.compile wrappers."""
    while True:
        if hasattr(module, "module") and isinstance(module.module, nn.Module):
            module = module.module
        elif hasattr(module, "_orig_mod"):
            module = module._orig_mod
        else:
            return module


def clean_state_dict(state: dict) -> dict:
    """Drop DDP's ``module.`` and torch.compile's ``_orig_mod.`` prefixes."""
    out = {}
    for k, v in state.items():
        for prefix in ("module.", "_orig_mod."):
            while k.startswith(prefix):
                k = k[len(prefix):]
        out[k] = v
    return out


# --- reading files (local or URL) -------------------------------------------------------------------------

def _fs(url: str | os.PathLike):
    import fsspec

    return fsspec.core.url_to_fs(str(url))


def join(url: str | os.PathLike, name: str) -> str:
    from curation.common.storage import url_join

    return url_join(str(url), name)


def is_dir(url: str | os.PathLike) -> bool:
    fs, path = _fs(url)
    return fs.isdir(path)


def exists(url: str | os.PathLike) -> bool:
    fs, path = _fs(url)
    return fs.isfile(path)


def read_text(url: str | os.PathLike) -> str:
    fs, path = _fs(url)
    with fs.open(path, "rb") as f:
        return f.read().decode("utf-8")


def safe_torch_load(url: str | os.PathLike, map_location="cpu"):
    """``torch.load(..., weights_only=True)`` of a local file or URL: tensors, numbers, strings
    and plain containers only. Anything else (a crafted pickle) raises
    :class:`UnsafeCheckpointError` without running it."""
    fs, path = _fs(url)
    try:
        with fs.open(path, "rb") as f:
            return torch.load(f, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise UnsafeCheckpointError(
            f"refusing to load {url}: it holds objects other than tensors and plain containers, and "
            f"checkpoints are never unpickled beyond weights_only=True ({first})") from None


# --- saving -------------------------------------------------------------------------------------------------

def save_open_clip(path: str | Path, clip: nn.Module, arch: str, epoch: int) -> None:
    state = clean_state_dict({k: v.detach().cpu() for k, v in unwrap(clip).state_dict().items()})
    torch.save({"epoch": int(epoch), "name": arch, "state_dict": state}, path)


def _jsonable(cfg):
    return json.loads(json.dumps(cfg, default=str))


def save_checkpoint(directory: str | Path, *, module: nn.Module, clip: nn.Module | None, arch: str,
                    recipe: str, step: int, epoch: int, optimizer=None, scheduler=None,
                    scaler=None, extra: dict | None = None) -> Path:
    """Write ``open_clip.pt`` (see the module docstring for what it holds per recipe),
    ``train_state.pt`` and ``meta.json`` into the local ``directory``."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    inner = unwrap(module)
    model = getattr(inner, "model", inner)
    open_clip_meta = None
    if hasattr(model, "open_clip_export"):  # CLIP 🚀: weak projector folded into the towers
        export = model.open_clip_export()
        torch.save({"epoch": int(epoch), "name": export["name"], "state_dict": export["state_dict"]},
                   directory / OPEN_CLIP_FILE)
        config_file = f"{export['name']}.json"
        (directory / config_file).write_text(json.dumps(export["model_cfg"], indent=2))
        open_clip_meta = {"arch": export["name"], "config": config_file, "folded": export["folded"],
                          "holds": export["holds"]}
    elif clip is not None:  # recipes whose model has no plain open_clip inside skip this file
        save_open_clip(directory / OPEN_CLIP_FILE, clip, arch, epoch)
        open_clip_meta = {"arch": arch, "config": None,
                          "holds": "the open_clip model that was trained (towers, projections, logit scale)"}
    state = {
        "module": clean_state_dict({k: v.detach().cpu() for k, v in inner.state_dict().items()}),
        "optimizer": optimizer.state_dict() if optimizer is not None else None,
        "scheduler": scheduler.state_dict() if scheduler is not None else None,
        "scaler": scaler.state_dict() if scaler is not None and scaler.is_enabled() else None,
        "step": int(step),
        "epoch": int(epoch),
    }
    torch.save(state, directory / STATE_FILE)
    meta = {"arch": arch, "recipe": recipe, "step": int(step), "epoch": int(epoch), **(extra or {})}
    if open_clip_meta is not None:
        meta["open_clip"] = open_clip_meta
    train_config = getattr(model, "train_config", None)
    if train_config is not None and "config" not in meta:
        meta["config"] = _jsonable(train_config)
    (directory / META_FILE).write_text(json.dumps(meta, indent=2))
    return directory


# --- completeness and resume ---------------------------------------------------------------------------------

def checkpoint_dir_name(step: int) -> str:
    """The folder name of the checkpoint taken at ``step`` (sortable: zero-padded)."""
    return f"{CHECKPOINT_PREFIX}_{int(step):010d}"


def mark_complete(run_url: str, step: int, epoch: int, storage=None) -> str:
    """Write the completeness marker of ``<run_url>/<checkpoint_dir_name(step)>`` (after its upload)."""
    from training.data import url_to_fs

    url = join(join(run_url, checkpoint_dir_name(step)), COMPLETE_FILE)
    fs, path = url_to_fs(url, storage)
    fs.pipe_file(path, json.dumps({"step": int(step), "epoch": int(epoch)}).encode())
    return url


def newest_complete(run_url: str, storage=None) -> tuple[str, int] | None:
    """``(folder URL, step)`` of the newest checkpoint under ``run_url`` whose marker exists, or
    None. One listing of the run folder: a run keeps ``run.num_to_keep`` checkpoints."""
    from curation.common.storage import is_remote
    from training.data import url_to_fs

    fs, path = url_to_fs(run_url, storage)
    best = None
    for marker in fs.glob(f"{path.rstrip('/')}/{CHECKPOINT_PREFIX}_*/{COMPLETE_FILE}"):
        try:
            step = int(json.loads(fs.cat_file(marker))["step"])
        except (ValueError, KeyError, TypeError, OSError):
            continue  # an unreadable marker: not a complete checkpoint
        folder = marker.rsplit("/", 1)[0]
        if is_remote(run_url):
            folder = run_url.split("://", 1)[0] + "://" + folder.lstrip("/")
        if best is None or step > best[1]:
            best = (folder, step)
    return best


def fetch_dir(url: str, local: str | Path, storage=None) -> Path:
    """Copy the checkpoint folder ``url`` (local or URL) into the local folder ``local``."""
    from training.data import url_to_fs

    fs, path = url_to_fs(url, storage)
    local = Path(local)
    local.mkdir(parents=True, exist_ok=True)
    for file in fs.find(path):
        target = local / file[len(path.rstrip("/")) + 1:]
        target.parent.mkdir(parents=True, exist_ok=True)
        fs.get_file(file, str(target))
    return local


# --- loading ------------------------------------------------------------------------------------------------

def load_train_state(directory: str | Path, *, module: nn.Module, optimizer=None, scheduler=None,
                     scaler=None, map_location="cpu") -> dict:
    """Restore what :func:`save_checkpoint` wrote; returns ``{"step", "epoch"}``."""
    state = safe_torch_load(join(directory, STATE_FILE), map_location=map_location)
    unwrap(module).load_state_dict(state["module"])
    if optimizer is not None and state.get("optimizer") is not None:
        optimizer.load_state_dict(state["optimizer"])
    if scheduler is not None and state.get("scheduler") is not None:
        scheduler.load_state_dict(state["scheduler"])
    if scaler is not None and state.get("scaler") is not None:
        scaler.load_state_dict(state["scaler"])
    return {"step": int(state["step"]), "epoch": int(state["epoch"])}


def read_meta(directory: str | Path) -> dict:
    return json.loads(read_text(join(directory, META_FILE)))


def open_clip_file(path: str | Path) -> str:
    """Accept a checkpoint directory or the ``open_clip.pt`` file itself (path or URL)."""
    return join(path, OPEN_CLIP_FILE) if is_dir(path) else str(path)


def register_open_clip_config(name: str, model_cfg: dict) -> None:
    """Make ``name`` an open_clip architecture with ``model_cfg`` (open_clip reads configs from
    files: a temporary one is written)."""
    import open_clip

    with tempfile.TemporaryDirectory() as tmp:
        file = Path(tmp) / f"{name}.json"
        file.write_text(json.dumps(model_cfg))
        open_clip.add_model_config(file)


def open_clip_arch(file: str, arch: str | None = None) -> str:
    """The architecture of an ``open_clip.pt`` (path or URL): ``arch`` if given, else its
    folder's ``meta.json`` (registering a saved model config next to it), else the file's
    ``name``."""
    from curation.common.storage import is_remote

    folder = file.rsplit("/", 1)[0] if (is_remote(file) or "/" in file) else "."
    meta_url = join(folder, META_FILE)
    if arch is None and exists(meta_url):
        entry = json.loads(read_text(meta_url)).get("open_clip") or {}
        if entry.get("config") and exists(join(folder, entry["config"])):
            register_open_clip_config(entry["arch"], json.loads(read_text(join(folder, entry["config"]))))
        arch = entry.get("arch") or json.loads(read_text(meta_url))["arch"]
    if arch is None:
        arch = safe_torch_load(file)["name"]
    return arch


def load_open_clip_state(file: str | os.PathLike) -> dict:
    """The ``state_dict`` of an open_clip checkpoint file (or a bare state dict), prefixes cleaned."""
    ckpt = safe_torch_load(file)
    state = ckpt.get("state_dict", ckpt) if isinstance(ckpt, dict) else None
    if not isinstance(state, dict) or not state:
        raise ValueError(f"{file} holds no state_dict")
    return clean_state_dict(state)


def load_open_clip(path: str | Path, arch: str | None = None, device="cpu"):
    """``(model, preprocess_train, preprocess_val)`` of an ``open_clip.pt`` or a checkpoint folder
    (local or URL): an open_clip model of its architecture with its weights."""
    import open_clip

    from training.model import register_model_configs

    register_model_configs()
    file = open_clip_file(path)
    if not exists(file):
        raise FileNotFoundError(f"no open_clip checkpoint at {path}")
    arch = open_clip_arch(file, arch)
    model, preprocess_train, preprocess_val = open_clip.create_model_and_transforms(arch, device=device)
    model.load_state_dict(load_open_clip_state(file))
    return model, preprocess_train, preprocess_val


def load_trained_model(directory: str | Path, device="cpu"):
    """``(recipe, model, meta)``: the recipe's model rebuilt from a checkpoint folder's
    ``meta.json`` (its training config) with the weights of ``train_state.pt``; e.g.
    ``recipe.embedder(model)`` is what the trainer evaluated. Raises ``ValueError`` for folders
    without a training config (older checkpoints: use ``open_clip.pt``)."""
    from dataclasses import replace

    from training.recipes import get_recipe

    meta = read_meta(directory)
    cfg = meta.get("config")
    if not cfg:
        raise ValueError(f"{directory}: meta.json has no training config (a checkpoint from an older "
                         "version); evaluate its open_clip.pt")
    from training.model import register_model_configs
    from training.settings import plain_config, train_config

    view = train_config(plain_config(cfg))  # recorded before a key was added: the defaults fill it
    model_cfg = replace(view.model, init_checkpoint=None)  # the weights come from train_state.pt
    if hasattr(model_cfg, "sync_bn"):
        model_cfg = replace(model_cfg, sync_bn=False)
    register_model_configs()
    recipe = get_recipe(replace(view, model=model_cfg))
    model = recipe.build_model()
    state = safe_torch_load(join(directory, STATE_FILE))["module"]
    own = {k[len("model."):]: v for k, v in state.items() if k.startswith("model.")}
    model.load_state_dict(own)
    return recipe, model.to(device).eval(), meta
