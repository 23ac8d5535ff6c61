"""The CLIP 🚀 objective of "Improved baselines for vision-language pre-training" (Fini et al.).

Per pair the model sees one weak view (image and text) and ``n`` strong views of each (``n = 2``).
The weak pair goes through the linear projector with logit scale ``t_w``; every strong view through
the MLP projector with its own scale ``t_s``. For one direction (image -> text, rows = images):

    global = CE( t_w * x_w @ Y_w^T , positives )                        # no label smoothing
    local  = mean over (i, j) in n x n of CE_eps( t_s * x_s[i] @ Y_s[j]^T , positives )
    L_i2t  = (global + n * local) / (1 + n)                             # = (global + 2 local) / 3

and ``L_t2i`` is the same with texts as rows; the loss is ``(L_i2t + L_t2i) / 2`` (``reduction="mean"``,
the official ``--loss-avg-or-sum avg``, its CC3M runs) or ``L_i2t + L_t2i`` (``reduction="sum"``, the
official ``sum``: ``loss = clip_loss * 2``, its CC12M, YFCC15M and 29M runs; an SSL companion added
to it then weighs half as much relative to the CLIP term). ``CE_eps`` is
cross-entropy with label smoothing ``eps = 0.1`` (``F.cross_entropy(label_smoothing=eps)``, so the
smoothing mass is spread over all global columns). This is the formula of the official code
(facebookresearch/clip-rocket, ``losses.CL2LLoss``: ``clip_loss_image = (clip_loss_image_global +
clip_loss_image_local * num_augs) / (1 + num_augs)`` with ``clip_loss_image_local`` the mean over
the ``num_augs ** 2`` strong (image view, text view) pairs).

As everywhere in ``training/losses``: rows are this rank's samples, columns the gathered global
batch, and the loss is averaged over local rows.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
import torch.nn as nn

from training.distributed import gather_with_grad
from training.losses.clip import infonce

__all__ = ["REDUCTIONS", "improved_clip_loss", "ImprovedCLIPLoss"]

REDUCTIONS = ("mean", "sum")  # how the two directions combine (official --loss-avg-or-sum avg|sum)


def check_reduction(reduction: str) -> str:
    if reduction not in REDUCTIONS:
        raise ValueError(f"loss.reduction must be one of {REDUCTIONS}, got {reduction!r}")
    return reduction


def improved_clip_loss(
    image: torch.Tensor,
    text: torch.Tensor,
    logit_scale: torch.Tensor | float,
    image_strong: Sequence[torch.Tensor] = (),
    text_strong: Sequence[torch.Tensor] = (),
    logit_scale_strong: torch.Tensor | float | None = None,
    label_smoothing: float = 0.1,
    return_parts: bool = False,
    reduction: str = "mean",
):
    """The CLIP 🚀 loss (module docstring). All features L2-normalised [B_local, D].

    ``image_strong``/``text_strong``: lists of ``n`` strong views each (same ``n``; ``n = 0`` gives
    plain CLIP). ``reduction``: ``"mean"`` of the two directions or their ``"sum"`` (module
    docstring). ``return_parts=True`` returns ``(loss, {"global_i2t", "global_t2i", "local_i2t",
    "local_t2i"})`` for logging.
    """
    check_reduction(reduction)
    factor = 2.0 if reduction == "sum" else 1.0
    image_strong, text_strong = list(image_strong), list(text_strong)
    if len(image_strong) != len(text_strong):
        raise ValueError(
            f"need as many strong image views as strong text views, got {len(image_strong)} and {len(text_strong)}"
        )
    n = len(image_strong)
    if n and logit_scale_strong is None:
        raise ValueError("strong views need their own logit_scale_strong")

    image_all, text_all = gather_with_grad(image), gather_with_grad(text)
    g_i2t = infonce(image, text_all, logit_scale)
    g_t2i = infonce(text, image_all, logit_scale)
    parts = {"global_i2t": g_i2t, "global_t2i": g_t2i}
    if n == 0:
        loss = factor * (g_i2t + g_t2i) / 2
        return (loss, parts) if return_parts else loss

    image_strong_all = [gather_with_grad(x) for x in image_strong]
    text_strong_all = [gather_with_grad(y) for y in text_strong]
    l_i2t = sum(
        infonce(x, y_all, logit_scale_strong, label_smoothing)
        for x in image_strong
        for y_all in text_strong_all
    ) / (n * n)
    l_t2i = sum(
        infonce(y, x_all, logit_scale_strong, label_smoothing)
        for y in text_strong
        for x_all in image_strong_all
    ) / (n * n)
    loss_i2t = (g_i2t + n * l_i2t) / (1 + n)
    loss_t2i = (g_t2i + n * l_t2i) / (1 + n)
    loss = factor * (loss_i2t + loss_t2i) / 2
    parts.update(local_i2t=l_i2t, local_t2i=l_t2i)
    return (loss, parts) if return_parts else loss


class ImprovedCLIPLoss(nn.Module):
    """:func:`improved_clip_loss` over a model output dict.

    Reads ``image``, ``text``, ``logit_scale`` (weak pair) and ``image_strong``, ``text_strong``
    (lists of normalised strong-view embeddings) with ``logit_scale_strong`` (the keys of
    ``training.improved_model.ImprovedCLIP``); ``batch`` is unused. No parameters.
    """

    def __init__(self, label_smoothing: float = 0.1, reduction: str = "mean"):
        super().__init__()
        if not 0.0 <= label_smoothing < 1.0:
            raise ValueError(f"label_smoothing must be in [0, 1), got {label_smoothing}")
        self.label_smoothing = float(label_smoothing)
        self.reduction = check_reduction(reduction)

    def forward(self, outputs: Mapping, batch: Mapping | None = None) -> torch.Tensor:
        return improved_clip_loss(
            outputs["image"],
            outputs["text"],
            outputs["logit_scale"],
            outputs.get("image_strong", ()),
            outputs.get("text_strong", ()),
            outputs.get("logit_scale_strong"),
            label_smoothing=self.label_smoothing,
            reduction=self.reduction,
        )
