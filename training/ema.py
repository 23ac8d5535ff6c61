"""Exponential-moving-average (momentum) target copy of a module, as used by BYOL / BYOLIP.

After each optimiser step::

    theta_target <- m * theta_target + (1 - m) * theta_online      (m = 0.99 by default)

for every parameter; buffers (BatchNorm running statistics, counters) are copied from the online
module. The target never receives gradients (its parameters have ``requires_grad=False``; filter
on ``requires_grad`` when building optimiser groups).
"""

from __future__ import annotations

import copy

import torch
import torch.nn as nn

from training.checkpoint import unwrap

__all__ = ["EMA"]


class EMA(nn.Module):
    """Momentum copy of ``online``: call :meth:`update` with the online module after each step."""

    def __init__(self, online: nn.Module, momentum: float = 0.99):
        super().__init__()
        if not 0.0 <= momentum <= 1.0:
            raise ValueError(f"EMA momentum must be in [0, 1], got {momentum}")
        self.momentum = float(momentum)
        self.module = copy.deepcopy(unwrap(online))
        self.module.requires_grad_(False)

    @torch.no_grad()
    def update(self, online: nn.Module) -> None:
        online = unwrap(online)
        target_params = dict(self.module.named_parameters())
        online_params = dict(online.named_parameters())
        if target_params.keys() != online_params.keys():
            raise ValueError("EMA target and online module have different parameters")
        m = self.momentum
        for name, p_t in target_params.items():
            p_t.mul_(m).add_(online_params[name].detach().to(p_t.dtype), alpha=1.0 - m)
        online_buffers = dict(online.named_buffers())
        for name, b_t in self.module.named_buffers():
            b_t.copy_(online_buffers[name])

    def forward(self, *args, **kwargs):
        return self.module(*args, **kwargs)
