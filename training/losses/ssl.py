"""SSL companions of the improved-CLIP recipe (Fini et al., official code facebookresearch/clip-rocket).

Each companion is an ``nn.Module`` that owns its projector / predictor and returns
``weight * term``; the trainer adds it to the CLIP 🚀 loss and optimises its parameters with the
model. Except for SLIP, every term is *cross-modal*: it is computed between image and text features
of the weak pair and of each strong (image view i, text view j) pair, never image-image.

=========  ==================================================================================
BarLIP     Barlow Twins. Projector d -> 3000 -> 3000 -> 8192 (Linear, BN, ReLU); the projections
           are standardised over the global batch (the non-affine final BatchNorm of the
           original Barlow Twins, exact across workers; the official BarLIP projector ends in an
           affine SyncBN instead); C = z_img^T z_txt / N;
           0.025 * [sum_i (1 - C_ii)^2 + 5e-3 * sum_{i != j} C_ij^2], averaged over the weak pair
           and the n x n strong pairs.
SiamLIP    SimSiam. Projector d -> 2048 -> 128 (no bias, BN, last BN without affine), predictor
           128 -> 2048 -> 128 per modality; D(p, z) = 2 - 2 cos(p, stopgrad(z)), image->text and
           text->image, averaged over the weak pair and the n x n strong pairs.
BYOLIP     SiamLIP whose targets come from an EMA copy (momentum 0.99) of the projectors applied
           to the EMA model's features (``target_*`` keys; the online features, detached, when
           the trainer passes none). Call :meth:`after_step` after each optimiser step.
SwALIP     SwAV. Soft assignments by Sinkhorn-Knopp (eps 0.05, 3 iterations, sums all-reduced
           across workers as in SwAV) of one strong view of a modality against the other
           modality's (gathered) strong batch, predicted from the *other* views (swapped
           prediction); uses the strong CLIP embeddings and their logit scale; no parameters;
           weight 0.2.
SLIP       SimCLR (NT-Xent, temperature 0.1) between the two strong *image* views through its own
           MLP d -> 4096 -> 4096 -> 256 (the image-image baseline from SLIP).
=========  ==================================================================================

Separate projectors. ``separate_projectors=True`` (BarLIP, SiamLIP, BYOLIP; config
``loss.ssl.separate_projectors``, default off) gives the strong views their own projectors (and,
for SiamLIP/BYOLIP, predictors; BYOLIP keeps an EMA of each), as the official code's
``--separate-proj-child`` (its ViT-S/16 runs): the weak pair goes through the ``*_global``
heads and every strong view through the ``*_local`` ones. Off, one head serves every view.

Inputs. ``forward(outputs, batch=None)`` reads a model output dict (``batch`` is unused; it
keeps the recipe's ``loss(outputs, batch)`` call shape):

- ``image_pooled`` / ``text_pooled``: the towers' outputs for the weak pair, [B, d_img] /
  [B, d_txt], before the weak / strong projectors (the official code's ``feats_image`` /
  ``feats_text``; ``ImprovedCLIP``'s ``image_pooled``); ``image_strong_pooled`` /
  ``text_strong_pooled``: lists with the same for each strong view (BarLIP, SiamLIP, BYOLIP, SLIP);
- ``target_image_pooled``, ``target_text_pooled``, ``target_image_strong_pooled``,
  ``target_text_strong_pooled``: the same from the EMA model (BYOLIP, optional);
- ``image_strong`` / ``text_strong``: lists of L2-normalised strong embeddings and
  ``logit_scale_strong`` (SwALIP).

``dim`` is the feature size: an int (both towers) or ``(d_img, d_txt)``.

Distributed. Terms over the batch (Barlow cross-correlation, Sinkhorn, SimCLR negatives) use the
global batch through :mod:`training.distributed`; per-sample terms (SimSiam) are local means. The
projectors' hidden BatchNorms see the local batch unless the trainer converts them with
``nn.SyncBatchNorm.convert_sync_batchnorm`` (the official code uses SyncBN).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F

from training.distributed import gather_with_grad, is_distributed, local_targets, world_info
from training.ema import EMA

__all__ = [
    "barlow_twins_loss",
    "negative_cosine",
    "sinkhorn_knopp",
    "swalip_loss",
    "simclr_loss",
    "BarLIP",
    "SiamLIP",
    "BYOLIP",
    "SwALIP",
    "SLIP",
]


# --------------------------------------------------------------------------------------------
# Pure loss functions
# --------------------------------------------------------------------------------------------


def _standardise(z: torch.Tensor, eps: float) -> torch.Tensor:
    """Batch-normalise (no affine) over dim 0 with the biased variance, as BatchNorm in training."""
    mean = z.mean(dim=0, keepdim=True)
    var = z.var(dim=0, unbiased=False, keepdim=True)
    return (z - mean) / torch.sqrt(var + eps)


def barlow_twins_loss(
    z1: torch.Tensor, z2: torch.Tensor, lamb: float = 5e-3, scale: float = 0.025, eps: float = 1e-5
) -> torch.Tensor:
    """Barlow Twins between ``z1`` [B_local, P] and ``z2`` [B_local, P] over the global batch.

    Both are gathered (with gradient), standardised per dimension over the N global samples, and
    ``C = z1n^T z2n / N``; returns ``scale * (sum_i (1 - C_ii)^2 + lamb * sum_{i != j} C_ij^2)``.
    Every rank gets the same (global) value.
    """
    if z1.shape != z2.shape or z1.ndim != 2:
        raise ValueError(f"Barlow Twins needs two [B, P] inputs, got {tuple(z1.shape)} and {tuple(z2.shape)}")
    with torch.autocast(device_type=z1.device.type, enabled=False):
        z1_all, z2_all = gather_with_grad(z1.float()), gather_with_grad(z2.float())
        n = z1_all.shape[0]
        if n < 2:
            raise ValueError("Barlow Twins needs a (global) batch of at least 2 samples")
        c = _standardise(z1_all, eps).T @ _standardise(z2_all, eps) / n
        diag = torch.diagonal(c)
        on_diag = (1.0 - diag).pow(2).sum()
        off_diag = c.pow(2).sum() - diag.pow(2).sum()
        return scale * (on_diag + lamb * off_diag)


def negative_cosine(p: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
    """SimSiam's ``2 - 2 cos(p, stopgrad(z))``, mean over rows; no gradient reaches ``z``."""
    p = F.normalize(p.float(), dim=-1)
    z = F.normalize(z.detach().float(), dim=-1)
    return 2.0 - 2.0 * (p * z).sum(dim=-1).mean()


@torch.no_grad()
def sinkhorn_knopp(scores: torch.Tensor, epsilon: float = 0.05, n_iters: int = 3) -> torch.Tensor:
    """SwAV's Sinkhorn-Knopp: soft assignments [b_local, K] of local samples to K prototypes.

    ``scores`` [b_local, K] are similarities. ``Q = exp(scores / epsilon)``, then ``n_iters``
    rounds of: each prototype's total weight (summed over *all* workers' samples, all_reduce)
    set to 1/K, each sample's to 1/B (B = global batch); finally rows are scaled to sum to 1.
    After the loop rows sum to exactly 1 and prototype totals approach B/K.
    """
    q = scores.detach().float()
    if is_distributed():  # a global shift: exp() cannot overflow, and the result is unchanged
        m = q.max().clone()
        dist.all_reduce(m, op=dist.ReduceOp.MAX)
    else:
        m = q.max()
    q = torch.exp((q - m) / epsilon).T  # [K, b]
    _, world = world_info()
    n_global = q.shape[1] * world
    n_protos = q.shape[0]

    total = q.sum()
    if is_distributed():
        dist.all_reduce(total)
    q = q / total
    for _ in range(n_iters):
        per_proto = q.sum(dim=1, keepdim=True)
        if is_distributed():
            dist.all_reduce(per_proto)
        q = q / per_proto / n_protos
        q = q / q.sum(dim=0, keepdim=True) / n_global
    return (q * n_global).T


def _soft_cross_entropy(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    return -(targets * F.log_softmax(logits, dim=1)).sum(dim=1).mean()


def swalip_loss(
    image_strong: Sequence[torch.Tensor],
    text_strong: Sequence[torch.Tensor],
    logit_scale: torch.Tensor | float,
    epsilon: float = 0.05,
    n_iters: int = 3,
) -> torch.Tensor:
    """SwALIP between two strong image views and two strong text views (normalised [b, D]).

    For image view a and text view c: logits ``x_a @ Y_c^T`` (Y gathered); the target is the
    Sinkhorn assignment of the *other* pair of views ``(1-a, 1-c)``; symmetric for text rows;
    soft CE of ``logit_scale * logits``, averaged over the 4 (a, c) pairs and the 2 directions
    (official ``SwALIPLoss``).
    """
    if len(image_strong) != 2 or len(text_strong) != 2:
        raise ValueError("SwALIP's swapped prediction needs exactly 2 strong image and 2 strong text views")
    with torch.autocast(device_type=image_strong[0].device.type, enabled=False):
        xs = [x.float() for x in image_strong]
        ys = [y.float() for y in text_strong]
        xs_all = [gather_with_grad(x) for x in xs]
        ys_all = [gather_with_grad(y) for y in ys]
        img_logits = [[x @ y_all.T for y_all in ys_all] for x in xs]  # [image view][text view]
        txt_logits = [[y @ x_all.T for x_all in xs_all] for y in ys]  # [text view][image view]
        img_targets = [[sinkhorn_knopp(lg, epsilon, n_iters) for lg in row] for row in img_logits]
        txt_targets = [[sinkhorn_knopp(lg, epsilon, n_iters) for lg in row] for row in txt_logits]
        loss = 0.0
        for a in range(2):
            for c in range(2):
                loss = loss + (
                    _soft_cross_entropy(logit_scale * img_logits[a][c], img_targets[1 - a][1 - c])
                    + _soft_cross_entropy(logit_scale * txt_logits[a][c], txt_targets[1 - a][1 - c])
                ) / 2
        return loss / 4


def simclr_loss(q_a: torch.Tensor, q_b: torch.Tensor, temperature: float = 0.1) -> torch.Tensor:
    """NT-Xent between two views [b_local, D] (normalised here) against the gathered global batch.

    Row i of view a: positive = view b of the same sample; negatives = the other 2N-2 samples of
    both views (itself excluded). Mean of the a->b and b->a directions, as SLIP's ``SIMCLRLoss``.
    """
    with torch.autocast(device_type=q_a.device.type, enabled=False):
        q_a = F.normalize(q_a.float(), dim=-1)
        q_b = F.normalize(q_b.float(), dim=-1)
        k_a, k_b = gather_with_grad(q_a), gather_with_grad(q_b)
        targets = local_targets(q_a.shape[0], device=q_a.device)
        self_mask = F.one_hot(targets, k_a.shape[0]).bool()
        logits_aa = (q_a @ k_a.T / temperature).masked_fill(self_mask, float("-inf"))
        logits_bb = (q_b @ k_b.T / temperature).masked_fill(self_mask, float("-inf"))
        logits_ab = q_a @ k_b.T / temperature
        logits_ba = q_b @ k_a.T / temperature
        loss_a = F.cross_entropy(torch.cat([logits_ab, logits_aa], dim=1), targets)
        loss_b = F.cross_entropy(torch.cat([logits_ba, logits_bb], dim=1), targets)
        return (loss_a + loss_b) / 2


# --------------------------------------------------------------------------------------------
# Modules
# --------------------------------------------------------------------------------------------


def _dims(dim) -> tuple[int, int]:
    if isinstance(dim, int):
        return dim, dim
    try:
        d_img, d_txt = (int(d) for d in dim)
    except (TypeError, ValueError) as e:
        raise ValueError(f"dim must be an int or (image_dim, text_dim), got {dim!r}") from e
    return d_img, d_txt


def _mlp(in_dim: int, hidden: Sequence[int], out_dim: int, bias: bool = True, last_bn: bool = False):
    layers: list[nn.Module] = []
    d = in_dim
    for h in hidden:
        layers += [nn.Linear(d, h, bias=bias), nn.BatchNorm1d(h), nn.ReLU(inplace=True)]
        d = h
    layers.append(nn.Linear(d, out_dim, bias=bias))
    if last_bn:
        layers.append(nn.BatchNorm1d(out_dim, affine=False))
    return nn.Sequential(*layers)


def _views(outputs: Mapping, key: str) -> list[torch.Tensor]:
    views = outputs.get(key)
    return [] if views is None else list(views)


def _require(outputs: Mapping, *keys: str):
    missing = [k for k in keys if outputs.get(k) is None]
    if missing:
        raise KeyError(f"SSL companion needs model outputs {missing}")
    return [outputs[k] for k in keys]


class SSLCompanion(nn.Module):
    """The base of every companion: its ``weight`` in the total loss and an ``after_step`` hook."""

    def __init__(self, weight: float):
        super().__init__()
        self.weight = float(weight)

    def after_step(self) -> None:
        """Called by the trainer after each optimiser step (EMA updates); no-op by default."""


class BarLIP(SSLCompanion):
    """Barlow Twins between image and text projections (see module docstring)."""

    def __init__(
        self,
        dim,
        weight: float = 1.0,
        hidden_dim: int = 3000,
        proj_dim: int = 8192,
        lamb: float = 5e-3,
        scale_loss: float = 0.025,
        separate_projectors: bool = False,
    ):
        super().__init__(weight)
        d_img, d_txt = _dims(dim)
        self.image_projector = _mlp(d_img, [hidden_dim, hidden_dim], proj_dim)
        self.text_projector = _mlp(d_txt, [hidden_dim, hidden_dim], proj_dim)
        self.separate_projectors = bool(separate_projectors)
        if self.separate_projectors:  # the strong views' own heads (official --separate-proj-child)
            self.image_projector_strong = _mlp(d_img, [hidden_dim, hidden_dim], proj_dim)
            self.text_projector_strong = _mlp(d_txt, [hidden_dim, hidden_dim], proj_dim)
        self.lamb, self.scale_loss = float(lamb), float(scale_loss)

    def strong_projectors(self):
        """(image, text) projectors of the strong views."""
        if self.separate_projectors:
            return self.image_projector_strong, self.text_projector_strong
        return self.image_projector, self.text_projector

    def loss(self, image, text, image_strong=(), text_strong=()) -> torch.Tensor:
        pairs = [(self.image_projector(image), self.text_projector(text))]
        proj_img, proj_txt = self.strong_projectors()
        zi = [proj_img(x) for x in image_strong]
        zt = [proj_txt(y) for y in text_strong]
        pairs += [(a, b) for a in zi for b in zt]
        total = sum(barlow_twins_loss(a, b, self.lamb, self.scale_loss) for a, b in pairs)
        return self.weight * total / len(pairs)

    def forward(self, outputs: Mapping, batch: Mapping | None = None) -> torch.Tensor:
        image, text = _require(outputs, "image_pooled", "text_pooled")
        return self.loss(image, text, _views(outputs, "image_strong_pooled"), _views(outputs, "text_strong_pooled"))


def _siam_heads(d_img: int, d_txt: int, hidden_dim: int, proj_dim: int):
    """SimSiam projectors and predictors per modality."""
    def predictor():
        return nn.Sequential(nn.Linear(proj_dim, hidden_dim, bias=False), nn.BatchNorm1d(hidden_dim),
                             nn.ReLU(inplace=True), nn.Linear(hidden_dim, proj_dim))

    projectors = nn.ModuleDict({
        "image": _mlp(d_img, [hidden_dim], proj_dim, bias=False, last_bn=True),
        "text": _mlp(d_txt, [hidden_dim], proj_dim, bias=False, last_bn=True),
    })
    return projectors, nn.ModuleDict({"image": predictor(), "text": predictor()})


class SiamLIP(SSLCompanion):
    """SimSiam across modalities: predict the other modality's stop-gradient projection."""

    def __init__(self, dim, weight: float = 1.0, hidden_dim: int = 2048, proj_dim: int = 128,
                 separate_projectors: bool = False):
        super().__init__(weight)
        d_img, d_txt = _dims(dim)
        self.projectors, self.predictors = _siam_heads(d_img, d_txt, hidden_dim, proj_dim)
        self.separate_projectors = bool(separate_projectors)
        if self.separate_projectors:  # the strong views' own heads (official --separate-proj-child)
            self.projectors_strong, self.predictors_strong = _siam_heads(d_img, d_txt, hidden_dim, proj_dim)

    def strong_heads(self):
        """(projectors, predictors) of the strong views."""
        if self.separate_projectors:
            return self.projectors_strong, self.predictors_strong
        return self.projectors, self.predictors

    def _targets(self, online_z, targets):
        """The z that the predictions are matched to: SimSiam uses the online projections
        themselves (their gradient is stopped in :func:`negative_cosine`)."""
        return online_z

    def loss(self, image, text, image_strong=(), text_strong=(), targets=None) -> torch.Tensor:
        proj, pred = self.projectors, self.predictors
        proj_s, pred_s = self.strong_heads()
        z = (
            proj["image"](image),
            proj["text"](text),
            [proj_s["image"](x) for x in image_strong],
            [proj_s["text"](y) for y in text_strong],
        )
        p_img, p_txt = pred["image"](z[0]), pred["text"](z[1])
        p_img_s = [pred_s["image"](v) for v in z[2]]
        p_txt_s = [pred_s["text"](v) for v in z[3]]
        z_img, z_txt, z_img_s, z_txt_s = self._targets(z, targets)
        terms = [negative_cosine(p_img, z_txt), negative_cosine(p_txt, z_img)]
        terms += [negative_cosine(p, v) for p in p_img_s for v in z_txt_s]
        terms += [negative_cosine(p, v) for p in p_txt_s for v in z_img_s]
        return self.weight * sum(terms) / len(terms)

    def forward(self, outputs: Mapping, batch: Mapping | None = None) -> torch.Tensor:
        image, text = _require(outputs, "image_pooled", "text_pooled")
        targets = None
        if outputs.get("target_image_pooled") is not None:
            targets = {
                "image": outputs["target_image_pooled"],
                "text": outputs["target_text_pooled"],
                "image_strong": _views(outputs, "target_image_strong_pooled"),
                "text_strong": _views(outputs, "target_text_strong_pooled"),
            }
        return self.loss(
            image, text, _views(outputs, "image_strong_pooled"), _views(outputs, "text_strong_pooled"), targets
        )


class BYOLIP(SiamLIP):
    """SiamLIP with targets from an EMA copy of the projectors (momentum 0.99).

    ``targets`` (dict with ``image``, ``text``, ``image_strong``, ``text_strong``) are the EMA
    model's pooled features; without them the online features are used (detached). With
    ``separate_projectors`` the strong views' projectors have their own EMA copy.
    """

    def __init__(self, dim, weight: float = 1.0, hidden_dim: int = 2048, proj_dim: int = 128, momentum: float = 0.99,
                 separate_projectors: bool = False):
        super().__init__(dim, weight, hidden_dim, proj_dim, separate_projectors)
        self.target_projectors = EMA(self.projectors, momentum)
        if self.separate_projectors:
            self.target_projectors_strong = EMA(self.projectors_strong, momentum)

    def loss(self, image, text, image_strong=(), text_strong=(), targets=None) -> torch.Tensor:
        if targets is None:
            targets = {"image": image, "text": text, "image_strong": image_strong, "text_strong": text_strong}
        return super().loss(image, text, image_strong, text_strong, targets)

    @torch.no_grad()
    def _targets(self, online_z, targets):
        proj = self.target_projectors.module
        proj_s = self.target_projectors_strong.module if self.separate_projectors else proj
        proj.train(self.training)
        proj_s.train(self.training)
        return (
            proj["image"](targets["image"].detach()),
            proj["text"](targets["text"].detach()),
            [proj_s["image"](x.detach()) for x in targets["image_strong"]],
            [proj_s["text"](y.detach()) for y in targets["text_strong"]],
        )

    def after_step(self) -> None:
        self.target_projectors.update(self.projectors)
        if self.separate_projectors:
            self.target_projectors_strong.update(self.projectors_strong)


class SwALIP(SSLCompanion):
    """SwAV-style swapped prediction between the strong image and text embeddings (no parameters)."""

    def __init__(self, dim=None, weight: float = 0.2, epsilon: float = 0.05, sinkhorn_iters: int = 3):
        super().__init__(weight)
        if epsilon <= 0 or sinkhorn_iters < 1:
            raise ValueError("SwALIP needs epsilon > 0 and sinkhorn_iters >= 1")
        self.epsilon, self.sinkhorn_iters = float(epsilon), int(sinkhorn_iters)

    def loss(self, image_strong, text_strong, logit_scale) -> torch.Tensor:
        return self.weight * swalip_loss(image_strong, text_strong, logit_scale, self.epsilon, self.sinkhorn_iters)

    def forward(self, outputs: Mapping, batch: Mapping | None = None) -> torch.Tensor:
        image_strong, text_strong, scale = _require(outputs, "image_strong", "text_strong", "logit_scale_strong")
        return self.loss(list(image_strong), list(text_strong), scale)


class SLIP(SSLCompanion):
    """SimCLR between the two strong image views through its own MLP (SLIP's image-image term)."""

    def __init__(
        self, dim, weight: float = 1.0, hidden_dim: int = 4096, proj_dim: int = 256, temperature: float = 0.1
    ):
        super().__init__(weight)
        d_img, _ = _dims(dim)
        self.projector = _mlp(d_img, [hidden_dim, hidden_dim], proj_dim)
        self.temperature = float(temperature)

    def loss(self, image_strong) -> torch.Tensor:
        if len(image_strong) != 2:
            raise ValueError(f"SLIP needs exactly 2 strong image views, got {len(image_strong)}")
        q_a, q_b = (self.projector(x) for x in image_strong)
        return self.weight * simclr_loss(q_a, q_b, self.temperature)

    def forward(self, outputs: Mapping, batch: Mapping | None = None) -> torch.Tensor:
        (views,) = _require(outputs, "image_strong_pooled")
        return self.loss(list(views))
