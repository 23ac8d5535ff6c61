"""HN-NCE: the hard-negative contrastive loss of DiHT (Radenovic et al., CVPR 2023, section 3.3).

With L2-normalised image/text embeddings x_i, y_j and s_ij = logit_scale * x_i . y_j over a
(global) batch of B pairs::

    L_i2t = -(1/B) sum_i log( e^{s_ii} / ( alpha e^{s_ii} + sum_{j != i} w_ij e^{s_ij} ) )
    w_ij  = (B - 1) e^{beta s_ij} / sum_{k != i} e^{beta s_ik}

``L_t2i`` is the same on the transposed similarity matrix and the loss is ``(L_i2t + L_t2i) / 2``.
``beta = 0, alpha = 1`` is exactly the CLIP / InfoNCE loss; ``alpha = 0`` drops the positive from
the denominator. The weights ``w_ij`` are *not* detached (gradients flow through them).

Everything is computed in float32 and in log space::

    log w_ij        = log(B - 1) + beta s_ij - logsumexp_{k != i}(beta s_ik)
    log denominator = logsumexp( [log(alpha) + s_ii] U {log w_ij + s_ij : j != i} )
    loss_i          = log denominator - s_ii

Distributed: each rank computes its local rows against all gathered columns
(:func:`training.distributed.gather_with_grad`), ``B`` is the global batch, and the loss is the mean
over local rows, so with DDP gradient averaging it equals one process over the global batch.
"""

from __future__ import annotations

import math

import torch

from training.distributed import gather_with_grad, local_targets

__all__ = ["hnnce_loss", "hnnce_directional"]


def hnnce_directional(
    logits: torch.Tensor, targets: torch.Tensor, alpha: float = 1.0, beta: float = 0.5
) -> torch.Tensor:
    """Mean HN-NCE over the rows of ``logits`` [b, B] (row r's positive is column ``targets[r]``).

    ``logits`` are the scaled similarities ``s`` of ``b`` query rows against all ``B`` candidates;
    the result is ``mean_r (logsumexp(denominator terms of r) - s_r,targets[r])`` in float32.
    """
    if alpha < 0:
        raise ValueError(f"HN-NCE alpha must be >= 0, got {alpha}")
    if logits.ndim != 2:
        raise ValueError(f"HN-NCE logits must be [rows, columns], got shape {tuple(logits.shape)}")
    n_rows, n_cols = logits.shape
    if n_cols < 2:
        raise ValueError("HN-NCE needs a (global) batch of at least 2 pairs: it has no negatives")
    s = logits.float()
    rows = torch.arange(n_rows, device=s.device)
    pos_mask = torch.zeros_like(s, dtype=torch.bool)
    pos_mask[rows, targets] = True
    pos = s[rows, targets]

    # log normaliser of the weights over the negatives k != i
    log_norm = torch.logsumexp((beta * s).masked_fill(pos_mask, float("-inf")), dim=1, keepdim=True)
    # log(w_ij e^{s_ij}) = log(B - 1) + (1 + beta) s_ij - log_norm_i for j != i; the positive's slot
    # is replaced by log(alpha) + s_ii (-inf for alpha = 0: no positive in the denominator)
    terms = (1.0 + beta) * s + (math.log(n_cols - 1) - log_norm)
    pos_term = pos + math.log(alpha) if alpha > 0 else torch.full_like(pos, float("-inf"))
    terms = terms.index_put((rows, targets), pos_term)
    log_denominator = torch.logsumexp(terms, dim=1)
    return (log_denominator - pos).mean()


def hnnce_loss(
    image: torch.Tensor,
    text: torch.Tensor,
    logit_scale: torch.Tensor | float,
    alpha: float = 1.0,
    beta: float = 0.5,
) -> torch.Tensor:
    """Symmetric HN-NCE of local rows vs the gathered global batch (scalar float32 tensor).

    ``image``, ``text``: L2-normalised [B_local, D]; ``logit_scale``: the exp'd scale (<= 100).
    Defaults ``alpha=1, beta=0.5`` as in the public implementations (Scenic VFC, CoVR).
    """
    if image.shape != text.shape or image.ndim != 2:
        raise ValueError(
            f"image and text features must both be [B, D]; got {tuple(image.shape)} and {tuple(text.shape)}"
        )
    device_type = image.device.type
    with torch.autocast(device_type=device_type, enabled=False):
        image = image.float()
        text = text.float()
        scale = torch.as_tensor(logit_scale, device=image.device).float()
        image_all = gather_with_grad(image)
        text_all = gather_with_grad(text)
        targets = local_targets(image.shape[0], device=image.device)
        loss_i2t = hnnce_directional(scale * image @ text_all.T, targets, alpha, beta)
        loss_t2i = hnnce_directional(scale * text @ image_all.T, targets, alpha, beta)
    return (loss_i2t + loss_t2i) / 2
