"""Checkpoints: open_clip-compatible weights plus the trainer's full state for resuming.

A checkpoint directory (what ``ray.train.report`` persists) holds

* ``open_clip.pt``: ``{"epoch", "name", "state_dict"}`` with the open_clip model's weights only,
  exactly what ``open_clip.create_model_and_transforms(arch, pretrained=PATH)`` and
  ``open_clip_train --resume`` read;
* ``train_state.pt``: the whole trained module (model wrapper + trainable loss modules),
  optimizer, scheduler, grad scaler, step and epoch;
* ``meta.json``: architecture, recipe, step, epoch (readable without torch).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import nn

OPEN_CLIP_FILE = "open_clip.pt"
STATE_FILE = "train_state.pt"
META_FILE = "meta.json"


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


def save_open_clip(path: str | Path, clip: nn.Module, arch: str, epoch: int) -> None:
    state = clean_state_dict({k: v.detach().cpu() for k, v in unwrap(clip).state_dict().items()})
    torch.save({"epoch": int(epoch), "name": arch, "state_dict": state}, path)


def save_checkpoint(directory: str | Path, *, module: nn.Module, clip: nn.Module | None, arch: str,
                    recipe: str, step: int, epoch: int, optimizer=None, scheduler=None,
                    scaler=None, extra: dict | None = None) -> Path:
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    if clip is not None:  # recipes whose model has no plain open_clip inside skip this file
        save_open_clip(directory / OPEN_CLIP_FILE, clip, arch, epoch)
    state = {
        "module": clean_state_dict({k: v.detach().cpu() for k, v in unwrap(module).state_dict().items()}),
        "optimizer": optimizer.state_dict() if optimizer is not None else None,
        "scheduler": scheduler.state_dict() if scheduler is not None else None,
        "scaler": scaler.state_dict() if scaler is not None and scaler.is_enabled() else None,
        "step": int(step),
        "epoch": int(epoch),
    }
    torch.save(state, directory / STATE_FILE)
    meta = {"arch": arch, "recipe": recipe, "step": int(step), "epoch": int(epoch), **(extra or {})}
    (directory / META_FILE).write_text(json.dumps(meta, indent=2))
    return directory


def load_train_state(directory: str | Path, *, module: nn.Module, optimizer=None, scheduler=None,
                     scaler=None, map_location="cpu") -> dict:
    """Restore what :func:`save_checkpoint` wrote; returns ``{"step", "epoch"}``."""
    state = torch.load(Path(directory) / STATE_FILE, map_location=map_location, weights_only=False)
    unwrap(module).load_state_dict(state["module"])
    if optimizer is not None and state.get("optimizer") is not None:
        optimizer.load_state_dict(state["optimizer"])
    if scheduler is not None and state.get("scheduler") is not None:
        scheduler.load_state_dict(state["scheduler"])
    if scaler is not None and state.get("scaler") is not None:
        scaler.load_state_dict(state["scaler"])
    return {"step": int(state["step"]), "epoch": int(state["epoch"])}


def read_meta(directory: str | Path) -> dict:
    return json.loads((Path(directory) / META_FILE).read_text())


def open_clip_file(path: str | Path) -> Path:
    """Accept a checkpoint directory or the ``open_clip.pt`` file itself."""
    path = Path(path)
    return path / OPEN_CLIP_FILE if path.is_dir() else path


def load_open_clip(path: str | Path, arch: str | None = None, device="cpu"):
    """``(model, preprocess_train, preprocess_val)`` through open_clip's own loader."""
    import open_clip

    from training.model import register_model_configs

    register_model_configs()
    file = open_clip_file(path)
    if not file.is_file():
        raise FileNotFoundError(f"no open_clip checkpoint at {path}")
    if arch is None:
        meta = file.parent / META_FILE
        arch = (json.loads(meta.read_text())["arch"] if meta.exists()
                else torch.load(file, map_location="cpu", weights_only=True)["name"])
    return open_clip.create_model_and_transforms(arch, pretrained=str(file), device=device)
