"""Image views of the improved-CLIP recipe (SPEC section 5) with torchvision's v2 transforms.

- weak view: RandomResizedCrop(scale (0.5, 1), bicubic), no flip;
- strong views: RandomResizedCrop(scale (0.08, 1), bicubic); ColorJitter(0.4, 0.4, 0.4, 0.1)
  with p 0.8; grayscale with p 0.2; Gaussian blur (sigma in [0.1, 2]) with p 0.5; horizontal
  flip with p 0.5.

Each ends with ``ToImage -> ToDtype(float32, scale) -> Normalize(mean, std)`` with the model's
own normalisation (open_clip's ``preprocess_cfg``: ``get_model_preprocess_cfg(model)`` or
``training.model.preprocess_config(arch)``). Every number is in the ``views.image`` config.

torchvision draws from torch's global RNG; :func:`seeded` runs a transform under a forked,
explicitly seeded RNG so a view depends only on (image, config, seed) and the caller's RNG is
left as it was.
"""

from __future__ import annotations

import contextlib
from typing import Mapping, Sequence

import torch
from torchvision.transforms import InterpolationMode, v2

from training.settings import ImageViewsConfig, StrongImageView, WeakImageView, section_view

__all__ = ["ImageViews", "PILGaussianBlur", "build_strong_transform", "build_weak_transform",
           "normalization", "seeded"]

_INTERPOLATION = {"bicubic": InterpolationMode.BICUBIC, "bilinear": InterpolationMode.BILINEAR,
                  "nearest": InterpolationMode.NEAREST}


@contextlib.contextmanager
def seeded(seed: int):
    """Run torch-random code deterministically from ``seed`` without touching the caller's RNG
    (CPU only: the views are made on CPU workers)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(int(seed) % (2 ** 63))
        yield


def normalization(preprocess_cfg: Mapping | object) -> tuple[tuple[int, int], tuple, tuple]:
    """``(size (H, W), mean, std)`` from an open_clip preprocess config (a dict with ``size`` or
    ``image_size``, ``mean``, ``std``; or an object with those attributes)."""
    from open_clip.constants import OPENAI_DATASET_MEAN, OPENAI_DATASET_STD

    get = (preprocess_cfg.get if isinstance(preprocess_cfg, Mapping)
           else lambda k, d=None: getattr(preprocess_cfg, k, d))
    size = get("size", None) or get("image_size", None)
    if size is None:
        raise ValueError("preprocess config has no image size ('size' or 'image_size')")
    if isinstance(size, int):
        size = (size, size)
    size = tuple(int(s) for s in size)
    if len(size) != 2:
        raise ValueError(f"image size must be an int or (H, W), got {size}")
    mean = tuple(float(m) for m in (get("mean", None) or OPENAI_DATASET_MEAN))
    std = tuple(float(s) for s in (get("std", None) or OPENAI_DATASET_STD))
    return size, mean, std


def _interpolation(name: str) -> InterpolationMode:
    try:
        return _INTERPOLATION[str(name).lower()]
    except KeyError:
        raise ValueError(f"interpolation must be one of {sorted(_INTERPOLATION)}, got {name!r}")


def _rrc(size: tuple[int, int], cfg: WeakImageView | StrongImageView) -> v2.RandomResizedCrop:
    return v2.RandomResizedCrop(size, scale=cfg.scale, ratio=cfg.ratio,
                                interpolation=_interpolation(cfg.interpolation), antialias=True)


class PILGaussianBlur(torch.nn.Module):
    """Gaussian blur with sigma ~ U(sigma) drawn from torch's RNG, by PIL's exact
    ``ImageFilter.GaussianBlur`` (as in the official code, from MoCo v2/SLIP; several times faster
    on CPU than torchvision's kernel-size-truncated blur of a PIL image)."""

    def __init__(self, sigma: tuple[float, float] = (0.1, 2.0)):
        super().__init__()
        lo, hi = sigma
        if not 0 < lo <= hi:
            raise ValueError(f"blur sigma must be 0 < low <= high, got {sigma}")
        self.sigma = (lo, hi)

    def forward(self, image):
        from PIL import ImageFilter

        sigma = float(torch.empty(1).uniform_(*self.sigma))
        return image.filter(ImageFilter.GaussianBlur(radius=sigma))


def _finish(mean: Sequence[float], std: Sequence[float]) -> list:
    return [v2.ToImage(), v2.ToDtype(torch.float32, scale=True), v2.Normalize(mean, std)]


def build_weak_transform(cfg: WeakImageView, preprocess_cfg) -> v2.Compose:
    """PIL image -> normalised float tensor [3, H, W] (``views.image.weak``)."""
    size, mean, std = normalization(preprocess_cfg)
    ops = [_rrc(size, cfg)]
    if cfg.hflip > 0:
        ops.append(v2.RandomHorizontalFlip(cfg.hflip))
    return v2.Compose(ops + _finish(mean, std))


def build_strong_transform(cfg: StrongImageView, preprocess_cfg) -> v2.Compose:
    """PIL image -> normalised float tensor [3, H, W] (``views.image.strong``)."""
    size, mean, std = normalization(preprocess_cfg)
    ops: list = [_rrc(size, cfg)]
    cj = cfg.color_jitter
    if cj.p > 0:
        ops.append(v2.RandomApply([v2.ColorJitter(brightness=cj.brightness, contrast=cj.contrast,
                                                  saturation=cj.saturation, hue=cj.hue)], p=cj.p))
    if cfg.grayscale_p > 0:
        ops.append(v2.RandomGrayscale(cfg.grayscale_p))
    blur = cfg.blur
    if blur.p > 0:
        op = (PILGaussianBlur(blur.sigma) if blur.kernel_size is None
              else v2.GaussianBlur(blur.kernel_size, sigma=blur.sigma))
        ops.append(v2.RandomApply([op], p=blur.p))
    if cfg.hflip > 0:
        ops.append(v2.RandomHorizontalFlip(cfg.hflip))
    return v2.Compose(ops + _finish(mean, std))


class ImageViews:
    """One weak and ``num_strong`` strong views of a PIL image, from ``views.image`` (the typed
    :class:`training.settings.ImageViewsConfig`; a partial mapping is merged over
    ``configs/train/improved.yaml``'s)."""

    def __init__(self, cfg: ImageViewsConfig | Mapping, preprocess_cfg, num_strong: int = 2):
        cfg = section_view(ImageViewsConfig, "improved", "views.image", cfg)
        self.weak = build_weak_transform(cfg.weak, preprocess_cfg)
        self.strong = build_strong_transform(cfg.strong, preprocess_cfg)
        self.num_strong = int(num_strong)

    def __call__(self, image, seed: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """``(weak [3, H, W], strong [num_strong, 3, H, W])``; deterministic given ``seed``."""
        from PIL import Image

        if not isinstance(image, Image.Image):
            raise TypeError(f"image must be a PIL image, got {type(image).__name__}")
        if image.mode != "RGB":
            image = image.convert("RGB")
        ctx = seeded(seed) if seed is not None else contextlib.nullcontext()
        with ctx:
            weak = self.weak(image)
            strong = torch.stack([self.strong(image) for _ in range(self.num_strong)])
        return weak, strong
