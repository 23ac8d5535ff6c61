"""CLIP's symmetric InfoNCE, correct across workers.

Each rank scores its local rows against the columns of every rank (features gathered with
gradient), takes the mean over its local rows, and relies on DDP's gradient averaging: the
result equals one process computing the loss over the global batch.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from training.distributed import gather_with_grad, local_targets


def infonce(rows: torch.Tensor, columns_all: torch.Tensor, logit_scale: torch.Tensor | float,
            label_smoothing: float = 0.0) -> torch.Tensor:
    """One direction of InfoNCE, the project's only one: the cross-entropy of
    ``logit_scale * rows @ columns_all.T`` with this rank's positives as labels, averaged over the
    local rows ``[B_local, D]``; ``columns_all`` ``[B_global, D]`` are every rank's (gathered).
    Computed in float32, or wider when the features are, also under autocast."""
    dtype = torch.promote_types(torch.promote_types(rows.dtype, columns_all.dtype), torch.float32)
    with torch.autocast(device_type=rows.device.type, enabled=False):
        logits = logit_scale * rows.to(dtype) @ columns_all.to(dtype).T
        targets = local_targets(rows.shape[0], device=rows.device)
        return F.cross_entropy(logits, targets, label_smoothing=label_smoothing)


def clip_loss(image: torch.Tensor, text: torch.Tensor, logit_scale: torch.Tensor,
              label_smoothing: float = 0.0) -> torch.Tensor:
    """Symmetric InfoNCE of L2-normalised features ``[B_local, D]``; ``logit_scale`` is exp'd:
    ``(infonce(image, text_all) + infonce(text, image_all)) / 2``."""
    if image.shape != text.shape:
        raise ValueError(f"image and text features differ in shape: {tuple(image.shape)} vs "
                         f"{tuple(text.shape)}")
    image_all, text_all = gather_with_grad(image), gather_with_grad(text)
    return (infonce(image, text_all, logit_scale, label_smoothing)
            + infonce(text, image_all, logit_scale, label_smoothing)) / 2
