"""CLIP's symmetric InfoNCE, correct across workers.

Each rank scores its local rows against the columns of every rank (features gathered with
gradient), takes the mean over its local rows, and relies on DDP's gradient averaging: the
result equals one process computing the loss over the global batch.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from training.distributed import gather_with_grad, local_targets


def clip_logits(image: torch.Tensor, text: torch.Tensor, logit_scale: torch.Tensor):
    """(logits_per_image, logits_per_text): local rows [B_local, B_global]."""
    all_image = gather_with_grad(image)
    all_text = gather_with_grad(text)
    return logit_scale * image @ all_text.T, logit_scale * text @ all_image.T


def clip_loss(image: torch.Tensor, text: torch.Tensor, logit_scale: torch.Tensor,
              label_smoothing: float = 0.0) -> torch.Tensor:
    """Symmetric InfoNCE of L2-normalised features ``[B_local, D]``; ``logit_scale`` is exp'd."""
    if image.shape != text.shape:
        raise ValueError(f"image and text features differ in shape: {tuple(image.shape)} vs "
                         f"{tuple(text.shape)}")
    logits_i, logits_t = clip_logits(image, text, logit_scale)
    targets = local_targets(image.shape[0], device=image.device)
    dtype = torch.promote_types(logits_i.dtype, torch.float32)  # softmax in >= fp32 under autocast
    return (F.cross_entropy(logits_i.to(dtype), targets, label_smoothing=label_smoothing)
            + F.cross_entropy(logits_t.to(dtype), targets, label_smoothing=label_smoothing)) / 2
