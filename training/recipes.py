"""Training recipes: a small registry keyed by the config's ``recipe`` name.

A recipe decides the three things that differ between CLIP variants; the training loop only
calls these methods and knows nothing else about them:

(a) :meth:`Recipe.sample_transform`: the per-sample transform run on Ray Data CPU workers
    (default: decode, open_clip train transform, open_clip tokenizer, keep ``key``);
(b) :meth:`Recipe.build_model`: the model wrapper, an ``nn.Module`` whose ``forward(batch)``
    returns the feature dict (default: :class:`training.model.ClipModel`) and which exposes the
    open_clip model as ``.clip``;
(c) :meth:`Recipe.build_loss`: ``loss(outputs, batch) -> {"loss": total, **named terms}``, the
    recipe's objective, chosen for all recipes in one place (:func:`training.objective.build_objective`,
    keyed by the config). A loss that is an ``nn.Module`` with parameters is trained and
    checkpointed with the model.

Recipes may also override :meth:`collate` (numpy batch -> tensors), :meth:`embedder` (the
evaluation interface) and add keys to the config in ``configs/train/<recipe>.yaml`` (merged over
``configs/train/clip.yaml`` when ``recipe=<name>``).

Register a new recipe with::

    @register_recipe("diht")
    class DiHTRecipe(ClipRecipe): ...
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Callable

from torch import nn

from training.settings import TrainConfig, plain_config, train_config

RECIPES: dict[str, type] = {}
# modules imported on first use of a name that is not registered yet (a new recipe adds its own)
RECIPE_MODULES = {"diht": "training.recipe_diht", "improved": "training.recipe_improved"}


def register_recipe(name: str):
    def deco(cls):
        cls.name = name
        RECIPES[name] = cls
        return cls
    return deco


def recipe_class(name: str) -> type:
    """The recipe class registered as ``name``, importing its module (:data:`RECIPE_MODULES`) on
    first use. A name that no module registers is ``ValueError("unknown recipe ...")``; an import
    failure inside a recipe's module (a missing dependency) is re-raised as it is."""
    if name not in RECIPES and name in RECIPE_MODULES:
        import importlib

        importlib.import_module(RECIPE_MODULES[name])
    if name not in RECIPES:
        known = sorted(set(RECIPES) | set(RECIPE_MODULES))
        raise ValueError(f"unknown recipe '{name}' (known: {', '.join(known)})")
    return RECIPES[name]


def get_recipe(cfg) -> "Recipe":
    """The recipe of ``cfg``: a typed view (:func:`training.settings.train_config`), or a plain
    config dict (e.g. a checkpoint's ``meta.json``, maybe written before a key was added: merged
    over the recipe's defaults, then parsed)."""
    view = cfg if isinstance(cfg, TrainConfig) else train_config(plain_config(cfg))
    return recipe_class(view.recipe)(view)


class Recipe:
    name = "base"
    # dotted config keys that configs/train/<name>.yaml adds to configs/train/clip.yaml (every
    # other key of that file must exist there: it is merged strictly)
    config_keys: tuple[str, ...] = ()
    # the typed view of this recipe's config (training/settings.py: a TrainConfig subclass that
    # types the recipe's own sections); None: training.settings.TrainConfig
    config_class: type | None = None

    def __init__(self, cfg: TrainConfig | Mapping):
        self.cfg = train_config(cfg)  # a merged plain config is parsed here (a view stays as it is)
        self.arch = self.cfg.model.arch

    def sample_transform(self, is_train: bool = True, counter=None) -> Callable:
        raise NotImplementedError

    def build_model(self) -> nn.Module:
        raise NotImplementedError

    def build_loss(self, model: nn.Module) -> Callable:
        from training.objective import build_objective

        return build_objective(self.cfg, model)

    def collate(self, batch: dict) -> dict:
        from training.data import collate

        return collate(batch)

    def embedder(self, model: nn.Module, device="cpu"):
        from training.embedder import ClipEmbedder

        return ClipEmbedder(model, self.arch, device=device)


class ClipLossModule:
    """Plain CLIP loss on the wrapper's outputs (no trainable parameters)."""

    def __init__(self, label_smoothing: float = 0.0):
        self.label_smoothing = float(label_smoothing)

    def __call__(self, out: dict, batch: dict) -> dict:
        from training.losses.clip import clip_loss

        loss = clip_loss(out["image"], out["text"], out["logit_scale"], self.label_smoothing)
        return {"loss": loss, "clip": loss.detach()}


@register_recipe("clip")
class ClipRecipe(Recipe):
    """Plain CLIP: open_clip model, symmetric InfoNCE across workers."""

    def sample_transform(self, is_train: bool = True, counter=None) -> Callable:
        from training.data import ClipSampleTransform

        aug = self.cfg.data.aug_cfg or None
        return ClipSampleTransform(self.arch, is_train=is_train, counter=counter,
                                   aug_cfg=aug if is_train else None)

    def build_model(self) -> nn.Module:
        from training.model import ClipModel, create_clip
        from training.settings import as_dict

        clip = create_clip(self.arch, init_checkpoint=self.cfg.model.init_checkpoint)
        model = ClipModel(clip, self.arch)
        model.train_config = as_dict(self.cfg)  # in meta.json: evaluate.py rebuilds this model
        return model
