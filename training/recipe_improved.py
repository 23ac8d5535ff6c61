"""The improved-CLIP recipe (CLIP 🚀, Fini et al.; SPEC section 5) on Ray Train, with its SSL companions.

    python training/train.py --config configs/train/improved_clip.yaml           # CLIP 🚀, CPU demo scale
    python training/train.py --config configs/train/improved_byolip.yaml         # + BYOLIP (one file per companion)
    python training/train.py --config configs/train/presets/tiny_cpu.yaml loss.ssl.name=swalip
    python training/train.py --config configs/train/presets/cc12m.yaml data.train=s3://bucket/cc12m

``recipe: improved`` (defaults in ``configs/train/improved.yaml``, merged over ``clip.yaml``) plugs
into the trainer's seams (:mod:`training.recipes`):

* **sample transform** (:class:`MultiViewSampleTransform`, on the Ray Data CPU workers): decode as
  the plain CLIP path (bad samples are per-sample errors), then
  :class:`training.augment.views.MultiViewTransform`: one weak + ``views.num_strong`` strong image
  views and text views per pair (``views.*``, every probability in the config). Seeding
  (``data.views_seeding``): ``worker`` (default) gives every worker process its own RNG seeded
  from ``views.seed`` and the process, so views are fresh every epoch; ``sample`` seeds each
  pair's views from ``(views.seed, key)`` only (the same views every epoch, independent of
  scheduling). The synonym thesaurus is offline (WordNet or MyThes from Debian packages); a
  missing one is a clear error when the job starts.
* **collate** (:meth:`ImprovedRecipe.collate`): numpy -> tensors, checking the multi-view fields
  (``image`` [B,3,H,W], ``image_strong`` [B,n,3,H,W], ``text`` [B,L], ``text_strong`` [B,n,L]).
* **model**: :class:`training.improved_model.ImprovedCLIP` around the open_clip model
  (``model.arch``, with ``model.text_cfg`` / ``model.vision_cfg`` overrides such as CC3M's 6 text
  layers; projector settings in ``model.improved``); BatchNorms become SyncBatchNorm with several
  GPU workers (``model.sync_bn``).
* **loss** (:class:`ImprovedRecipeLoss`, built by :func:`training.objective.improved_objective`;
  an ``nn.Module``, so the companion's projectors and EMA targets are trained / checkpointed with the model): the CLIP 🚀 objective
  (:func:`training.losses.improved.improved_clip_loss`, ``loss.label_smoothing`` (null: 0.1, 0
  with SwALIP, which refuses any other value), ``loss.reduction`` mean | sum) plus the SSL
  companion ``loss.ssl.name`` (none | barlip | siamlip | byolip | swalip | slip) built by
  :func:`training.losses.registry.build_ssl` from ``loss.ssl.<name>`` (its weight and sizes).
  For BYOLIP with ``loss.ssl.byolip.ema_model`` the targets are the features of an EMA copy of
  the whole model (momentum ``loss.ssl.byolip.momentum``). :meth:`ImprovedRecipeLoss.after_step`
  (the companion's ``after_step`` + the model EMA) runs after every optimiser step: called by the
  training loop, or, when the loop has no such hook, automatically at the next forward once the
  online parameters have changed (so it is never applied twice for one step).
* **embedder**: :class:`training.improved_model.ImprovedEmbedder`, names ``weak`` and ``strong``:
  the evaluation reports both and their similarity ensembles ``w * weak + (1 - w) * strong``.

Logged terms: ``loss`` (total), ``clip_rocket`` (the CLIP 🚀 objective), its parts
``global_i2t``/``global_t2i``/``local_i2t``/``local_t2i``, ``ssl_<name>`` (weighted companion) and
the two temperatures' scales ``logit_scale_weak`` / ``logit_scale_strong`` (open_clip's own
``logit_scale`` is unused and frozen in this recipe).

Configs combine as one ``--config FILE`` plus ``key=value`` overrides; :func:`improved_config`
merges several files in order (tests, benchmarks).
"""

from __future__ import annotations

import os
import socket
from collections.abc import Mapping
from typing import Callable

import numpy as np
import torch
from torch import nn

from training.data import ClipSampleTransform
from training.recipes import ClipRecipe, register_recipe
from training.settings import ImprovedConfig, ImprovedLossConfig, ViewsConfig

__all__ = ["ImprovedRecipe", "ImprovedRecipeLoss", "MultiViewSampleTransform", "improved_config",
           "ssl_settings"]

_VIEWS: dict = {}  # per-process cache: (arch, views cfg, seeding) -> MultiViewTransform
SEEDING_MODES = ("worker", "sample")


# --- configuration ---------------------------------------------------------------------------------------

def improved_config(*files, overrides=()) -> dict:
    """The training config of ``recipe: improved`` with several YAML files merged in order (each
    strictly: unknown keys are errors), then ``key=value`` overrides; e.g.
    ``improved_config("configs/train/improved_barlip.yaml", "configs/train/presets/tiny_cpu.yaml")``.
    """
    from curation.common.config import apply_overrides, deep_merge, load_yaml
    from training.train import default_config

    cfg = default_config("improved")
    for f in files:
        cfg = deep_merge(cfg, load_yaml(f))
    cfg = apply_overrides(cfg, list(overrides))
    if cfg.get("recipe") != "improved":
        raise ValueError(f"improved_config builds recipe 'improved' configs, got recipe={cfg.get('recipe')!r}")
    return cfg


SEPARATE_PROJECTOR_COMPANIONS = ("barlip", "siamlip", "byolip")
DEFAULT_LABEL_SMOOTHING = 0.1


def loss_view(loss_cfg: ImprovedLossConfig | Mapping) -> ImprovedLossConfig:
    """The typed ``loss`` section; a partial mapping is merged over ``configs/train/improved.yaml``'s."""
    from training.settings import section_view

    return section_view(ImprovedLossConfig, "improved", "loss", loss_cfg)


def ssl_settings(loss_cfg: ImprovedLossConfig | Mapping) -> tuple[str, dict | None, dict]:
    """``(name, build_ssl section or None, recipe-level extras)`` from the ``loss`` section
    (:func:`loss_view`).

    ``loss.ssl.name`` selects the companion and ``loss.ssl.<name>`` holds its keyword arguments
    (``training.losses.ssl``); ``loss.ssl.separate_projectors`` (BarLIP, SiamLIP, BYOLIP) is
    passed to the companion when true; ``ema_model`` (BYOLIP only) is the recipe's and is
    returned in ``extras``.
    """
    from training.losses.registry import SSL_COMPANIONS
    from training.settings import as_dict

    ssl = loss_view(loss_cfg).ssl
    name = str(ssl.name or "none").lower()
    if name in ("none", "null"):
        return "none", None, {}
    if name not in SSL_COMPANIONS:
        raise ValueError(f"unknown loss.ssl.name {ssl.name!r}; choose one of "
                         f"{sorted(SSL_COMPANIONS)} or none")
    params = as_dict(getattr(ssl, name))
    if ssl.separate_projectors:
        if name not in SEPARATE_PROJECTOR_COMPANIONS:
            raise ValueError(f"loss.ssl.separate_projectors applies to {', '.join(SEPARATE_PROJECTOR_COMPANIONS)}; "
                             f"{name} has no per-view projectors (swalip: no projector at all; slip: "
                             "strong image views only)")
        params["separate_projectors"] = True
    extras = {}
    if name == "byolip":
        extras["ema_model"] = bool(params.pop("ema_model"))
    return name, {"name": name, **params}, extras


def loss_settings(loss_cfg: ImprovedLossConfig | Mapping) -> dict:
    """``{"label_smoothing", "reduction"}`` of the CLIP 🚀 term, checked against the companion.

    ``loss.label_smoothing: null`` means the recipe's default: 0.1 on the strong pairs, but 0
    with SwALIP; an explicit non-zero value with SwALIP is a config error (the official
    ``SwALIPLoss`` asserts ``label_smoothing == 0.0``, and its SwALIP runs use 0). ``loss.reduction``:
    ``mean`` | ``sum`` (official ``--loss-avg-or-sum``; :mod:`training.losses.improved`).
    """
    loss_cfg = loss_view(loss_cfg)
    name = str(loss_cfg.ssl.name or "none").lower()
    smoothing = loss_cfg.label_smoothing
    if smoothing is None:
        smoothing = 0.0 if name == "swalip" else DEFAULT_LABEL_SMOOTHING
    if name == "swalip" and smoothing != 0.0:
        raise ValueError(f"loss.label_smoothing={smoothing:g} with loss.ssl.name=swalip: SwALIP is trained "
                         "without label smoothing (the official SwALIPLoss refuses it); set "
                         "loss.label_smoothing=0 or null")
    return {"label_smoothing": float(smoothing), "reduction": loss_cfg.reduction}


# --- data ---------------------------------------------------------------------------------------------------

def worker_seed(base_seed: int) -> int:
    """A seed for this process's view RNG from the base seed, the host and the process id."""
    from training.augment.views import sample_seed

    return sample_seed(base_seed, f"worker:{socket.gethostname()}:{os.getpid()}")


class MultiViewSampleTransform(ClipSampleTransform):
    """Raw webdataset rows -> the multi-view batch (numpy) of the improved recipe.

    Returns ``image`` [n,3,H,W] float32, ``image_strong`` [n,s,3,H,W] float32, ``text`` [n,L]
    int64, ``text_strong`` [n,s,L] int64 and ``key``. Undecodable samples and samples whose views
    cannot be made are dropped and counted (``bad_image``, ``bad_text``, ``bad_views``), never
    fatal. Picklable; the views transform is built once per worker process.
    """

    def __init__(self, arch: str, views_cfg: ViewsConfig | Mapping | None = None, seeding: str = "worker",
                 counter=None):
        from training.augment.views import views_config

        super().__init__(arch, is_train=True, counter=counter)
        if seeding not in SEEDING_MODES:
            raise ValueError(f"data.views_seeding must be one of {SEEDING_MODES}, got {seeding!r}")
        self.views_cfg = views_config(views_cfg)  # unknown keys fail here, on the driver
        self.seeding = seeding

    def views(self):
        """This process's :class:`MultiViewTransform` (built on first use)."""
        cache_key = (self.arch, self.views_cfg, self.seeding)  # a frozen dataclass of tuples: hashable
        if cache_key not in _VIEWS:
            from training.augment.views import MultiViewTransform
            from training.model import preprocess_config, tokenizer

            base = self.views_cfg.seed
            seed = worker_seed(base) if self.seeding == "worker" else base
            _VIEWS[cache_key] = MultiViewTransform(self.views_cfg, preprocess_config(self.arch),
                                                   tokenizer(self.arch), seed=seed)
        return _VIEWS[cache_key]

    def image_size(self) -> tuple[int, int]:
        from training.augment.image import normalization
        from training.model import preprocess_config

        return normalization(preprocess_config(self.arch))[0]

    def draft_side(self) -> int:
        return 2 * max(self.image_size())  # margin for the random resized crops

    def empty(self) -> dict:
        mv = self.views()
        h, w = self.image_size()
        n, length = mv.num_strong, int(mv.tokenizer.context_length)
        return {"image": np.zeros((0, 3, h, w), np.float32),
                "image_strong": np.zeros((0, n, 3, h, w), np.float32),
                "text": np.zeros((0, length), np.int64), "text_strong": np.zeros((0, n, length), np.int64),
                "key": np.array([], dtype=object)}

    def __call__(self, batch: dict) -> dict:
        from training.augment.views import sample_seed

        mv = self.views()
        keys, images, texts, errors = self.decode(batch)
        rows, kept = [], []
        base = self.views_cfg.seed
        for key, image, text in zip(keys, images, texts):
            try:
                seed = sample_seed(base, key) if self.seeding == "sample" else None
                rows.append(mv(image, text, seed=seed))
                kept.append(key)
            except Exception as exc:  # one bad pair never fails the whole job
                errors.append((key, "bad_views", f"{type(exc).__name__}: {exc}"))
        self.report(errors)
        if not rows:
            return self.empty()
        out = {name: np.stack([r[name].numpy() for r in rows])
               for name in ("image", "image_strong", "text", "text_strong")}
        out["image"] = out["image"].astype(np.float32, copy=False)
        out["image_strong"] = out["image_strong"].astype(np.float32, copy=False)
        out["text"] = out["text"].astype(np.int64, copy=False)
        out["text_strong"] = out["text_strong"].astype(np.int64, copy=False)
        out["key"] = np.array(kept, dtype=object)
        return out


def check_multiview_batch(batch: Mapping) -> None:
    """Shapes of a collated multi-view batch; a clear error instead of a shape error in the model."""
    missing = [k for k in ("image", "text", "image_strong", "text_strong") if k not in batch]
    if missing:
        raise ValueError(f"the improved recipe's batches need {missing}: is the dataset built with "
                         "its sample_transform (MultiViewSampleTransform)?")
    img, img_s, txt, txt_s = (batch[k] for k in ("image", "image_strong", "text", "text_strong"))
    b = img.shape[0]
    if img.ndim != 4 or img_s.ndim != 5 or txt.ndim != 2 or txt_s.ndim != 3:
        raise ValueError("multi-view batch shapes must be image [B,3,H,W], image_strong [B,n,3,H,W], "
                         f"text [B,L], text_strong [B,n,L]; got {tuple(img.shape)}, {tuple(img_s.shape)}, "
                         f"{tuple(txt.shape)}, {tuple(txt_s.shape)}")
    if not (img_s.shape[0] == txt.shape[0] == txt_s.shape[0] == b) or img_s.shape[1] != txt_s.shape[1]:
        raise ValueError("multi-view batch fields disagree on the batch size or the number of strong views")


# --- loss ---------------------------------------------------------------------------------------------------

def _param_versions(module: nn.Module) -> tuple[int, ...]:
    """In-place update counters of ``module``'s trainable parameters (an optimiser step bumps them)."""
    return tuple(p._version for p in module.parameters() if p.requires_grad)


class ImprovedRecipeLoss(nn.Module):
    """CLIP 🚀 objective + optional SSL companion (+ the EMA model for BYOLIP): ``loss(out, batch)``.

    ``online``: the online model (kept as a plain reference, not a submodule); needed for
    ``target_momentum`` (an EMA copy of it supplies the ``target_*`` features).
    """

    def __init__(self, label_smoothing: float = 0.1, ssl: nn.Module | None = None, ssl_name: str = "none",
                 online: nn.Module | None = None, target_momentum: float | None = None,
                 reduction: str = "mean"):
        super().__init__()
        from training.ema import EMA
        from training.losses.improved import ImprovedCLIPLoss
        from training.losses.ssl import SwALIP

        if (isinstance(ssl, SwALIP) or ssl_name == "swalip") and float(label_smoothing) != 0.0:
            raise ValueError(f"SwALIP is trained without label smoothing (the official SwALIPLoss "
                             f"refuses it); got label_smoothing={label_smoothing:g}: set "
                             "loss.label_smoothing=0")
        self.clip_loss = ImprovedCLIPLoss(label_smoothing, reduction)
        self.ssl = ssl
        self.ssl_name = ssl_name
        self.target = None
        if target_momentum is not None:
            if online is None:
                raise ValueError("an EMA target model needs the online model")
            self.target = EMA(online, target_momentum)
        self.__dict__["_online"] = online  # not registered: it is trained (and saved) as the model
        self._versions: tuple | None = None
        companion_hook = getattr(type(ssl), "after_step", None) if ssl is not None else None
        self._has_updates = self.target is not None or companion_hook not in (None, _noop_after_step())

    # -- after each optimiser step ------------------------------------------------------------
    @torch.no_grad()
    def after_step(self) -> None:
        """The companion's ``after_step`` (BYOLIP's projector EMA) and the model EMA update."""
        if self.ssl is not None and hasattr(self.ssl, "after_step"):
            self.ssl.after_step()
        if self.target is not None:
            self.target.update(self._online)
        self._versions = self._watch_versions()

    def _watch_versions(self):
        parts = []
        if self._online is not None:
            parts.append(_param_versions(self._online))
        if self.ssl is not None:
            parts.append(_param_versions(self.ssl))
        return tuple(parts)

    def _maybe_after_step(self) -> None:
        """Apply a missed ``after_step`` once the parameters changed since the last one (a loop
        without the hook); the first forward only records the state (also after a resume)."""
        if not (self._has_updates and self.training and torch.is_grad_enabled()):
            return
        versions = self._watch_versions()
        if self._versions is None:
            self._versions = versions
        elif versions != self._versions:
            self.after_step()

    # -- the loss ---------------------------------------------------------------------------
    @torch.no_grad()
    def target_outputs(self, batch: Mapping) -> dict:
        """The EMA model's tower features for the batch, under the ``target_*`` keys BYOLIP reads."""
        t = self.target(batch)
        out = {"target_image_pooled": t["image_pooled"], "target_text_pooled": t["text_pooled"]}
        if "image_strong_pooled" in t:
            out["target_image_strong_pooled"] = t["image_strong_pooled"]
        if "text_strong_pooled" in t:
            out["target_text_strong_pooled"] = t["text_strong_pooled"]
        return out

    def forward(self, out: Mapping, batch: Mapping | None = None) -> dict:
        from training.losses.improved import improved_clip_loss

        self._maybe_after_step()
        loss, parts = improved_clip_loss(
            out["image"], out["text"], out["logit_scale"], out.get("image_strong", ()),
            out.get("text_strong", ()), out.get("logit_scale_strong"),
            label_smoothing=self.clip_loss.label_smoothing, return_parts=True,
            reduction=self.clip_loss.reduction)
        terms = {"clip_rocket": loss.detach(), **{k: v.detach() for k, v in parts.items()},
                 "logit_scale_weak": torch.as_tensor(out["logit_scale"]).detach()}
        if out.get("logit_scale_strong") is not None:
            terms["logit_scale_strong"] = torch.as_tensor(out["logit_scale_strong"]).detach()
        total = loss
        if self.ssl is not None:
            if self.target is not None:
                if batch is None:
                    raise ValueError("the EMA target model needs the batch")
                out = {**out, **self.target_outputs(batch)}
            ssl = self.ssl(out, batch)
            total = total + ssl
            terms[f"ssl_{self.ssl_name}"] = ssl.detach()
        return {"loss": total, **terms}


def _noop_after_step():
    from training.losses.ssl import SSLCompanion

    return SSLCompanion.after_step


# --- the recipe ---------------------------------------------------------------------------------------------

@register_recipe("improved")
class ImprovedRecipe(ClipRecipe):
    """CLIP 🚀: multi-view data, separate weak/strong projectors, CLIP 🚀 loss + SSL companion."""

    config_keys = ("data.views_seeding", "views", "model.text_cfg", "model.vision_cfg", "model.sync_bn",
                   "model.improved", "loss.reduction", "loss.ssl")
    config_class = ImprovedConfig  # the typed view of improved.yaml's sections (training/settings.py)

    def __init__(self, cfg: ImprovedConfig | Mapping):
        super().__init__(cfg)
        loss_settings(self.cfg.loss)  # config errors (SwALIP + smoothing) on the driver
        ssl_settings(self.cfg.loss)

    def sample_transform(self, is_train: bool = True, counter=None) -> Callable:
        if not is_train:
            return super().sample_transform(is_train=False, counter=counter)
        t = MultiViewSampleTransform(self.arch, self.cfg.views, seeding=self.cfg.data.views_seeding,
                                     counter=counter)
        t.views()  # build it here once: a missing thesaurus or bad view config fails before training
        return t

    def collate(self, batch: dict) -> dict:
        from training.data import collate

        out = collate(batch)
        check_multiview_batch(out)
        return out

    def tower_kwargs(self) -> dict:
        """``text_cfg`` / ``vision_cfg`` overrides merged into the architecture's own config."""
        from training.model import model_config

        m, kwargs = self.cfg.model, {}
        base = model_config(self.arch)
        for key in ("text_cfg", "vision_cfg"):
            if getattr(m, key):
                kwargs[key] = {**base.get(key, {}), **getattr(m, key)}
        return kwargs

    def build_model(self) -> nn.Module:
        from training.improved_model import ImprovedCLIP, to_sync_batchnorm
        from training.model import create_clip
        from training.settings import as_dict

        m = self.cfg.model
        towers = self.tower_kwargs()
        clip = create_clip(self.arch, init_checkpoint=m.init_checkpoint, **towers)
        model = ImprovedCLIP(clip, m.improved, arch=self.arch)
        model.tower_overrides = towers          # in the exported open_clip model config
        model.train_config = as_dict(self.cfg)  # in meta.json: evaluate.py rebuilds this model
        return to_sync_batchnorm(model, m.sync_bn)

    def embedder(self, model: nn.Module, device="cpu"):
        from training.checkpoint import unwrap
        from training.improved_model import ImprovedEmbedder
        from training.model import image_transform, tokenizer

        model = unwrap(model).to(device)
        return ImprovedEmbedder(model, image_transform(self.arch, is_train=False), tokenizer(self.arch))
