"""AdamW with open_clip's weight-decay exclusions and a cosine schedule with linear warm-up."""

from __future__ import annotations

import math

import torch
from torch import nn


def no_weight_decay(name: str, param: torch.Tensor) -> bool:
    """Biases, norms, gains and the logit scale (as open_clip_train: ndim < 2 or by name)."""
    leaf = name.rsplit(".", 1)[-1]
    return (param.ndim < 2 or "bias" in leaf or "logit_scale" in name or ".bn" in name
            or ".ln" in name or "norm" in name or leaf in ("gain", "gamma", "beta"))


def param_groups(module: nn.Module, weight_decay: float) -> list[dict]:
    decay, no_decay = [], []
    for name, p in module.named_parameters():
        if p.requires_grad:
            (no_decay if no_weight_decay(name, p) else decay).append(p)
    return [{"params": no_decay, "weight_decay": 0.0, "name": "no_decay"},
            {"params": decay, "weight_decay": weight_decay, "name": "decay"}]


def build_optimizer(module: nn.Module, cfg) -> torch.optim.Optimizer:
    """AdamW from the ``train`` section (:class:`training.settings.TrainSection`; a partial
    mapping is merged over ``configs/train/clip.yaml``'s)."""
    from training.settings import TrainSection, section_view

    cfg = section_view(TrainSection, "clip", "train", cfg)
    return torch.optim.AdamW(param_groups(module, cfg.weight_decay), lr=cfg.lr, betas=(cfg.beta1, cfg.beta2),
                             eps=cfg.eps)


def cosine_lr_multiplier(step: int, warmup_steps: int, total_steps: int, min_ratio: float = 0.0) -> float:
    """open_clip_train's ``cosine_lr``: (step+1)/warmup during warm-up, then cosine to min_ratio."""
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    decay_steps = max(1, total_steps - warmup_steps)
    progress = min(1.0, (step - warmup_steps) / decay_steps)
    return min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))


def build_scheduler(optimizer: torch.optim.Optimizer, warmup_steps: int, total_steps: int,
                    min_ratio: float = 0.0) -> torch.optim.lr_scheduler.LambdaLR:
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: cosine_lr_multiplier(s, warmup_steps, total_steps, min_ratio))
