"""The main objective of every recipe, chosen in one place: :func:`build_objective`.

``build_objective(cfg, model)`` returns the loss the training loop wraps with the model in
:class:`training.loop.TrainModule`: ``loss(outputs, batch) -> {"loss": total, **named terms}``.
It is keyed by ``cfg.recipe`` and configured by ``cfg.loss`` (the typed view of
:mod:`training.settings`; as open_clip's
``create_loss`` is by its arguments):

========== ============================================================== =================================
recipe     objective                                                      ``loss`` keys
========== ============================================================== =================================
clip       :class:`training.recipes.ClipLossModule` (symmetric InfoNCE)   ``label_smoothing``
diht       :class:`training.recipe_diht.DiHTLoss`: HN-NCE + concept       ``hnnce.*``, ``distill.*``
           distillation heads (trained with the model)
improved   :class:`training.recipe_improved.ImprovedRecipeLoss`: CLIP 🚀  ``label_smoothing``, ``reduction``,
           + SSL companion (+ BYOLIP's EMA model)                         ``ssl.*``
========== ============================================================== =================================

An objective that is an ``nn.Module`` with parameters is trained and checkpointed with the model
(``train_state.pt`` keys ``loss.*``). A new recipe adds its builder to :data:`OBJECTIVES`.
"""

from __future__ import annotations

from typing import Callable

from torch import nn

from training.settings import DiHTConfig, ImprovedConfig, TrainConfig


def clip_objective(cfg: TrainConfig, model: nn.Module) -> Callable:
    from training.recipes import ClipLossModule

    return ClipLossModule(cfg.loss.label_smoothing)


def diht_objective(cfg: DiHTConfig, model: nn.Module) -> nn.Module:
    from training.recipe_diht import DiHTLoss, concepts_url, hnnce_settings, read_vocab

    alpha, beta = hnnce_settings(cfg.loss)
    distill_cfg = cfg.loss.distill
    distill = None
    if distill_cfg.enabled:
        from training.losses.distill import ConceptDistillLoss

        in_dim = getattr(model, "pooled_dim", None)
        if not in_dim:
            raise ValueError("recipe diht: the model wrapper has no pooled_dim for the concept heads")
        distill = ConceptDistillLoss.from_vocab(
            read_vocab(concepts_url(cfg)), int(in_dim),
            weight=distill_cfg.weight, temperature=distill_cfg.temperature)
    return DiHTLoss(alpha, beta, distill)


def improved_objective(cfg: ImprovedConfig, model: nn.Module) -> nn.Module:
    from training.checkpoint import unwrap
    from training.improved_model import to_sync_batchnorm
    from training.losses.registry import build_ssl
    from training.recipe_improved import ImprovedRecipeLoss, loss_settings, ssl_settings

    model = unwrap(model)
    loss_cfg = cfg.loss
    settings = loss_settings(loss_cfg)
    name, section, extras = ssl_settings(loss_cfg)
    ssl = build_ssl(section, model.pooled_dim) if section else None
    if ssl is not None:
        ssl = to_sync_batchnorm(ssl, cfg.model.sync_bn)
    momentum = float(section["momentum"]) if extras.get("ema_model") else None
    return ImprovedRecipeLoss(settings["label_smoothing"], ssl=ssl, ssl_name=name,
                              online=model, target_momentum=momentum, reduction=settings["reduction"])


OBJECTIVES: dict[str, Callable[[TrainConfig, nn.Module], Callable]] = {
    "clip": clip_objective,
    "diht": diht_objective,
    "improved": improved_objective,
}


def build_objective(cfg: TrainConfig, model: nn.Module) -> Callable:
    """The loss of recipe ``cfg.recipe`` for ``model`` (the recipe's model wrapper: DiHT's heads
    read its ``pooled_dim``, the improved recipe's EMA copies it)."""
    name = cfg.recipe
    if name not in OBJECTIVES:
        raise ValueError(f"no objective for recipe '{name}' (known: {', '.join(sorted(OBJECTIVES))})")
    return OBJECTIVES[name](cfg, model)
