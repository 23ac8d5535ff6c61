"""The improved-CLIP model (CLIP 🚀, SPEC section 5) on top of any open_clip model.

The open_clip image and text towers (``clip.encode_image`` / ``clip.encode_text`` without
normalisation, i.e. including the towers' own output projection to ``embed_dim``) feed two
separate projector pairs:

- weak pair: a linear projector without bias to ``proj_dim`` (256) per modality, with its own
  logit scale (init ``1 / weak_temperature`` = 1 / 0.07);
- strong pairs: an MLP per modality, ``embed_dim -> hidden -> hidden -> proj_dim`` (``mlp_layers``
  linear layers, BatchNorm + ReLU between them; hidden 4096), with its own logit scale (init
  ``1 / strong_temperature`` = 1 / 0.1). BatchNorm statistics are per strong view.

Both scales are returned exp'd and clamped to ``<= max_logit_scale`` (100); open_clip's own
``logit_scale`` / ``logit_bias`` are unused and frozen.

Text residual dropout: dropout with ``text_residual_dropout`` on the output of every residual
block of the text transformer (the residual stream), only while encoding the *strong* text views
in train mode (0.2 CC3M, 0.05 CC12M, 0 YFCC15M). Optional drop path (stochastic depth,
``drop_path``, linearly increasing with depth as in timm) on every residual block of both
transformer towers in train mode, for all views. Both are forward hooks on open_clip's
``resblocks``, so any open_clip architecture with transformer towers works (including tiny
custom configs); a tower without ``resblocks`` (ResNet, timm, HF) accepts only 0 for them.

``forward(images_weak, texts_weak, images_strong=None, texts_strong=None)`` (or ``forward(batch)``
with a batch dict of the data contract) returns ``image``, ``text`` (normalised weak features),
``logit_scale``, ``logit_scale_strong``, ``image_pooled`` / ``text_pooled`` (the towers' outputs
for the weak pair, before any projector or normalisation) and, with strong views,
``image_strong`` / ``text_strong`` (lists of normalised [B, proj_dim], one per view) and
``image_strong_pooled`` / ``text_strong_pooled`` (lists of the towers' outputs per strong view,
before the strong projector). The ``*_pooled`` keys are what the SSL companions of
:mod:`training.losses.ssl` read.

With several workers on GPUs, :func:`to_sync_batchnorm` converts the BatchNorms of the strong
projectors (and of any SSL projector) to ``nn.SyncBatchNorm``, as the official code does; the
improved recipe does this in ``build_model`` / ``build_loss`` (``model.sync_bn``).
"""

from __future__ import annotations

import contextlib
import functools
import math
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import nn

if TYPE_CHECKING:
    from training.settings import ImprovedProjectors

__all__ = ["ImprovedCLIP", "ImprovedEmbedder", "StrongProjector",
           "find_resblocks", "should_sync_batchnorm", "to_sync_batchnorm"]


class StrongProjector(nn.Sequential):
    """``in -> hidden (BN, ReLU) -> ... -> out``: ``layers`` linear layers (>= 1)."""

    def __init__(self, in_dim: int, hidden_dim: int, out_dim: int, layers: int = 3):
        if layers < 1:
            raise ValueError(f"mlp_layers must be >= 1, got {layers}")
        mods: list[nn.Module] = []
        dim = in_dim
        for _ in range(layers - 1):
            mods += [nn.Linear(dim, hidden_dim, bias=False), nn.BatchNorm1d(hidden_dim),
                     nn.ReLU(inplace=True)]
            dim = hidden_dim
        mods.append(nn.Linear(dim, out_dim))
        super().__init__(*mods)


def find_resblocks(clip: nn.Module, tower: str):
    """``(resblocks ModuleList, batch_first)`` of open_clip's ``"text"`` or ``"image"`` transformer,
    or ``(None, None)`` when the tower is not an open_clip transformer."""
    if tower == "text":
        owners = [getattr(clip, "text", None), clip]  # CustomTextCLIP.text / CLIP.transformer
    elif tower == "image":
        owners = [getattr(clip, "visual", None)]
    else:
        raise ValueError(f"tower must be 'text' or 'image', got {tower!r}")
    for owner in owners:
        transformer = getattr(owner, "transformer", None) if owner is not None else None
        blocks = getattr(transformer, "resblocks", None)
        if isinstance(blocks, nn.ModuleList) and len(blocks):
            return blocks, bool(getattr(transformer, "batch_first", True))
    return None, None


def _drop_path(residual: torch.Tensor, p: float, batch_dim: int) -> torch.Tensor:
    shape = [1] * residual.ndim
    shape[batch_dim] = residual.shape[batch_dim]
    keep = residual.new_empty(shape).bernoulli_(1.0 - p)
    return residual * keep / (1.0 - p)


class ImprovedCLIP(nn.Module):
    """open_clip towers + separate weak (linear) and strong (MLP) projectors (module docstring).

    ``clip``: an open_clip model (``CLIP`` or ``CustomTextCLIP``); ``cfg``: the typed
    ``model.improved`` section (:class:`training.settings.ImprovedProjectors`), or a partial
    mapping merged over ``configs/train/improved.yaml``'s (unknown keys are errors).
    """

    def __init__(self, clip: nn.Module, cfg: ImprovedProjectors | Mapping | None = None,
                 arch: str | None = None):
        super().__init__()
        from training.settings import ImprovedProjectors, section_view

        self.cfg = cfg = section_view(ImprovedProjectors, "improved", "model.improved", cfg)
        self.clip = clip
        self.arch = arch
        for name in ("logit_scale", "logit_bias"):  # unused: the projectors have their own
            param = getattr(clip, name, None)
            if isinstance(param, nn.Parameter):
                param.requires_grad_(False)

        embed_dim = self._tower_dim()
        proj, hidden, layers = cfg.proj_dim, cfg.mlp_hidden_dim, cfg.mlp_layers
        self.pooled_dim = embed_dim
        self.image_proj = nn.Linear(embed_dim, proj, bias=False)
        self.text_proj = nn.Linear(embed_dim, proj, bias=False)
        self.image_proj_strong = StrongProjector(embed_dim, hidden, proj, layers)
        self.text_proj_strong = StrongProjector(embed_dim, hidden, proj, layers)
        for t in ("weak_temperature", "strong_temperature"):
            if not getattr(cfg, t) > 0:
                raise ValueError(f"{t} must be > 0, got {getattr(cfg, t)}")
        self.log_scale = nn.Parameter(
            torch.tensor(math.log(1 / cfg.weak_temperature)))
        self.log_scale_strong = nn.Parameter(
            torch.tensor(math.log(1 / cfg.strong_temperature)))
        self.max_logit_scale = cfg.max_logit_scale

        self.text_residual_dropout = cfg.text_residual_dropout
        self.drop_path = cfg.drop_path
        for name, p in (("text_residual_dropout", self.text_residual_dropout),
                        ("drop_path", self.drop_path)):
            if not 0.0 <= p < 1.0:
                raise ValueError(f"{name} must be in [0, 1), got {p}")
        self._strong_text = False
        self._hooks = []
        self._install_hooks()

    # ---- construction helpers -------------------------------------------------------------
    @torch.no_grad()
    def _tower_dim(self) -> int:
        """Output size of open_clip's towers (both towers end in ``embed_dim``)."""
        clip = self.clip
        for owner, name in ((clip, "embed_dim"), (getattr(clip, "text", None), "output_dim"),
                            (getattr(clip, "visual", None), "output_dim")):
            dim = getattr(owner, name, None) if owner is not None else None
            if isinstance(dim, int) and dim > 0:
                return dim
        text_proj = getattr(clip, "text_projection", None)
        if isinstance(text_proj, nn.Linear):
            return int(text_proj.out_features)
        if isinstance(text_proj, torch.Tensor) and text_proj.ndim == 2:
            return int(text_proj.shape[1])
        context = getattr(clip, "context_length", None)
        if not isinstance(context, int):
            raise ValueError("cannot tell the open_clip towers' output size; pass an open_clip "
                             "CLIP or CustomTextCLIP model")
        was_training = clip.training
        clip.eval()
        try:  # last resort: one dummy text through the tower
            return int(clip.encode_text(torch.zeros(1, context, dtype=torch.long)).shape[-1])
        finally:
            clip.train(was_training)

    def _install_hooks(self) -> None:
        text_blocks, text_bf = find_resblocks(self.clip, "text")
        if self.drop_path > 0:
            image_blocks, image_bf = find_resblocks(self.clip, "image")
            if text_blocks is None or image_blocks is None:
                raise ValueError("drop_path needs open_clip's transformer towers (resblocks) for "
                                 "image and text; this architecture lacks one: set it to 0 (timm "
                                 "image towers take vision_cfg.timm_drop_path in the model "
                                 "config)")
            for blocks, batch_first in ((image_blocks, image_bf), (text_blocks, text_bf)):
                n = len(blocks)
                for i, block in enumerate(blocks):
                    rate = self.drop_path * i / max(n - 1, 1)
                    if rate > 0:
                        self._hooks.append(block.register_forward_hook(
                            self._make_drop_path_hook(rate, 0 if batch_first else 1),
                            with_kwargs=True))
        # Drop path first: the residual-stream dropout then acts on the block's final output.
        if self.text_residual_dropout > 0:
            if text_blocks is None:
                raise ValueError("text_residual_dropout needs open_clip's own text transformer "
                                 "(resblocks); this model's text tower has none: set it to 0")
            for block in text_blocks:
                self._hooks.append(block.register_forward_hook(self._residual_dropout_hook))

    def _residual_dropout_hook(self, module, args, output):
        if self._strong_text and self.training:
            return F.dropout(output, self.text_residual_dropout, training=True)
        return None

    def _make_drop_path_hook(self, rate: float, batch_dim: int):
        # a partial of a bound method (not a closure): copy.deepcopy (e.g. an EMA target model)
        # rebinds it to the copy, so the copy's hooks follow the copy's own train/eval mode
        return functools.partial(self._drop_path_hook, rate, batch_dim)

    def _drop_path_hook(self, rate: float, batch_dim: int, module, args, kwargs, output):
        if not self.training:
            return None
        x = args[0] if args else kwargs["q_x"]
        return x + _drop_path(output - x, rate, batch_dim)

    @contextlib.contextmanager
    def strong_text_mode(self):
        """Within this context (and in train mode) the text residual dropout is active."""
        previous, self._strong_text = self._strong_text, True
        try:
            yield
        finally:
            self._strong_text = previous

    # ---- encoders ------------------------------------------------------------------------
    def logit_scale(self) -> torch.Tensor:
        return self.log_scale.clamp(max=math.log(self.max_logit_scale)).exp()

    def logit_scale_strong(self) -> torch.Tensor:
        return self.log_scale_strong.clamp(max=math.log(self.max_logit_scale)).exp()

    @torch.no_grad()
    def clamp_logit_scale(self) -> None:
        """After each optimizer step: 0 <= log scales <= log(max_logit_scale)."""
        for p in (self.log_scale, self.log_scale_strong):
            p.clamp_(0, math.log(self.max_logit_scale))

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        self.clip.set_grad_checkpointing(enable)

    def image_tower(self, images: torch.Tensor) -> torch.Tensor:
        return self.clip.encode_image(images, normalize=False)

    def text_tower(self, texts: torch.Tensor, strong: bool = False) -> torch.Tensor:
        ctx = self.strong_text_mode() if strong else contextlib.nullcontext()
        with ctx:
            return self.clip.encode_text(texts, normalize=False)

    def encode_image(self, images: torch.Tensor, normalize: bool = True) -> torch.Tensor:
        """Weak image embedding (the evaluation default)."""
        x = self.image_proj(self.image_tower(images))
        return F.normalize(x, dim=-1) if normalize else x

    def encode_text(self, texts: torch.Tensor, normalize: bool = True) -> torch.Tensor:
        x = self.text_proj(self.text_tower(texts))
        return F.normalize(x, dim=-1) if normalize else x

    def _strong(self, chunks: Sequence[torch.Tensor], projector: nn.Module) -> list[torch.Tensor]:
        """Per strong view (so BatchNorm statistics are per view): project and normalise."""
        return [F.normalize(projector(chunk), dim=-1) for chunk in chunks]

    # ---- forward -------------------------------------------------------------------------
    def forward(self, images_weak, texts_weak=None, images_strong=None, texts_strong=None) -> dict:
        if isinstance(images_weak, Mapping):
            batch = images_weak
            images_weak, texts_weak = batch["image"], batch["text"]
            images_strong, texts_strong = batch.get("image_strong"), batch.get("text_strong")
        if texts_weak is None:
            raise ValueError("forward needs the weak texts")
        pooled = self.image_tower(images_weak)
        text_pooled = self.text_tower(texts_weak)
        out = {
            "image": F.normalize(self.image_proj(pooled), dim=-1),
            "text": F.normalize(self.text_proj(text_pooled), dim=-1),
            "logit_scale": self.logit_scale(),
            "logit_scale_strong": self.logit_scale_strong(),
            "image_pooled": pooled,
            "text_pooled": text_pooled,
        }
        if images_strong is not None:
            views, n = _stack_views(images_strong, "images_strong")
            chunks = list(self.image_tower(views).chunk(n, dim=0))
            out["image_strong_pooled"] = chunks
            out["image_strong"] = self._strong(chunks, self.image_proj_strong)
        if texts_strong is not None:
            views, n = _stack_views(texts_strong, "texts_strong")
            chunks = list(self.text_tower(views, strong=True).chunk(n, dim=0))
            out["text_strong_pooled"] = chunks
            out["text_strong"] = self._strong(chunks, self.text_proj_strong)
        return out


    # ---- the open_clip export (checkpoint's open_clip.pt) -------------------------------------
    @torch.no_grad()
    def open_clip_export(self) -> dict:
        """What ``open_clip.pt`` holds for this model: the open_clip towers with the weak linear
        projector folded into their output projections, so that a plain open_clip model computes
        the *weak* embedding (the recipe's default), and the weak logit scale as ``logit_scale``.

        Returns ``{"state_dict", "model_cfg", "name", "folded", "holds"}``: ``model_cfg`` is the
        open_clip model config of that state (the architecture's, with the recipe's
        ``text_cfg``/``vision_cfg`` overrides and ``embed_dim = proj_dim`` when folded), ``name``
        the architecture name it is saved under. When a tower's output projection is not a plain
        linear map (e.g. an MLP head) the projector cannot be folded: the state is the towers
        alone (``folded`` False) and ``holds`` says so. The strong MLP projector (BatchNorm,
        ReLU) is never foldable; the trainer checkpoint folder keeps it (``train_state.pt``).
        """
        import copy

        from training.model import model_config

        state = {k: v.detach().cpu().clone() for k, v in self.clip.state_dict().items()}
        cfg = copy.deepcopy(model_config(self.arch)) if self.arch else {}
        for key, value in (getattr(self, "tower_overrides", None) or {}).items():
            cfg[key] = copy.deepcopy(dict(value))
        image_fold = _fold_projection(self.clip, state, _IMAGE_PROJECTIONS, self.image_proj.weight.detach().cpu())
        text_fold = _fold_projection(self.clip, state, _TEXT_PROJECTIONS, self.text_proj.weight.detach().cpu())
        if image_fold is not None and text_fold is not None:
            state.update(image_fold)
            state.update(text_fold)
            if "logit_scale" in state:
                state["logit_scale"] = self.log_scale.detach().cpu().clamp(max=math.log(self.max_logit_scale)).clone()
            cfg["embed_dim"] = self.cfg.proj_dim
            name = f"{self.arch}-clip-rocket-weak"
            holds = ("the open_clip towers with the weak linear projector folded into their output "
                     f"projections (embed_dim {cfg['embed_dim']}) and the weak logit scale: open_clip "
                     "computes the recipe's weak embedding")
            return {"state_dict": state, "model_cfg": cfg, "name": name, "folded": True, "holds": holds}
        name = f"{self.arch}-clip-rocket-towers"
        holds = ("the open_clip towers WITHOUT the recipe's projectors (a tower's output projection is not "
                 "a plain linear map, so the weak projector could not be folded into it): open_clip "
                 "computes the towers' features, not the trained embeddings; evaluate the checkpoint "
                 "folder instead")
        return {"state_dict": state, "model_cfg": cfg, "name": name, "folded": False, "holds": holds}


# (module path, attribute) of open_clip's output projections: ViT / ModifiedResNet / timm image
# towers; CLIP / CustomTextCLIP / HF text towers
_IMAGE_PROJECTIONS = (("visual", "proj"), ("visual.attnpool", "c_proj"), ("visual.head", "proj"))
_TEXT_PROJECTIONS = (("", "text_projection"), ("text", "text_projection"), ("text", "proj"))


def _fold_projection(clip: nn.Module, state: dict, candidates, weight: torch.Tensor) -> dict | None:
    """State-dict entries of the first linear output projection among ``candidates`` composed with
    ``weight`` [P, E] (a bias-free linear map applied after it); None when none is linear."""
    for path, attr in candidates:
        try:
            owner = clip.get_submodule(path) if path else clip
            proj = getattr(owner, attr)
        except AttributeError:
            continue
        key = f"{path}.{attr}" if path else attr
        if isinstance(proj, nn.Parameter) and proj.ndim == 2 and proj.shape[1] == weight.shape[1]:
            return {key: state[key] @ weight.T}  # x @ P -> x @ P @ W^T
        if isinstance(proj, nn.Linear) and proj.out_features == weight.shape[1]:
            out = {f"{key}.weight": weight @ state[f"{key}.weight"]}
            if proj.bias is not None:
                out[f"{key}.bias"] = weight @ state[f"{key}.bias"]
            return out
        if proj is not None:
            return None  # an MLP or other head: not foldable
    return None


def _stack_views(views, name: str) -> tuple[torch.Tensor, int]:
    """Views as a list of ``n`` tensors [B, ...] or one tensor [B, n, ...] -> ([n*B, ...], n),
    view-major (view 0 of every sample first)."""
    if isinstance(views, torch.Tensor):
        if views.ndim < 3:
            raise ValueError(f"{name} must be [B, n_views, ...], got shape {tuple(views.shape)}")
        n = views.shape[1]
        return views.transpose(0, 1).reshape(-1, *views.shape[2:]), n
    if isinstance(views, Sequence) and views:
        return torch.cat(list(views), dim=0), len(views)
    raise ValueError(f"{name} must be a tensor [B, n_views, ...] or a non-empty list of tensors")


class ImprovedEmbedder:
    """Evaluation embedder: ``{"weak": ..., "strong": ...}`` normalised features per input.

    ``encode_*`` run without gradients in eval mode (the model's mode is restored afterwards);
    the strong embedding is the strong MLP projector's output (eval BatchNorm, no dropout).
    """

    names = ("weak", "strong")

    def __init__(self, model: ImprovedCLIP, preprocess=None, tokenizer=None):
        self.model = model
        self.preprocess = preprocess
        self.tokenizer = tokenizer

    @contextlib.contextmanager
    def _eval(self):
        was_training = self.model.training
        self.model.eval()
        try:
            with torch.no_grad():
                yield
        finally:
            self.model.train(was_training)

    def _device(self) -> torch.device:
        return next(self.model.parameters()).device

    def encode_image(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        with self._eval():
            pooled = self.model.image_tower(images.to(self._device()))
            return {"weak": F.normalize(self.model.image_proj(pooled), dim=-1),
                    "strong": F.normalize(self.model.image_proj_strong(pooled), dim=-1)}

    def encode_text(self, tokens: torch.Tensor) -> dict[str, torch.Tensor]:
        with self._eval():
            pooled = self.model.text_tower(tokens.to(self._device()))
            return {"weak": F.normalize(self.model.text_proj(pooled), dim=-1),
                    "strong": F.normalize(self.model.text_proj_strong(pooled), dim=-1)}


def should_sync_batchnorm(mode="auto") -> bool:
    """Whether to convert BatchNorms to ``nn.SyncBatchNorm`` (``model.sync_bn``).

    ``auto``: when a process group with more than one rank is initialised and its backend is
    NCCL (SyncBatchNorm needs GPU tensors; on CPU/gloo workers each rank keeps local statistics);
    ``true``: whenever there is more than one rank (fails on CPU); ``false``: never.
    """
    import torch.distributed as dist

    if mode in (False, "false", None):
        return False
    if mode not in (True, "true", "auto"):
        raise ValueError(f"model.sync_bn must be auto, true or false, got {mode!r}")
    if not (dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1):
        return False
    return mode in (True, "true") or dist.get_backend() == "nccl"


def to_sync_batchnorm(module: nn.Module, mode="auto") -> nn.Module:
    """``module`` with its BatchNorms converted to SyncBatchNorm when :func:`should_sync_batchnorm`."""
    if should_sync_batchnorm(mode):
        return nn.SyncBatchNorm.convert_sync_batchnorm(module)
    return module
