"""All views of one image-text pair for the improved-CLIP recipe (SPEC section 5).

``MultiViewTransform(cfg, preprocess_cfg, tokenizer, seed)`` is called on the CPU side of the
data path (inside a Ray Data map) with a PIL image and its caption and returns::

    {"image": weak view [3, H, W] float, "image_strong": [num_strong, 3, H, W] float,
     "text": weak tokens [L] long, "text_strong": [num_strong, L] long}

``cfg`` is the typed ``views`` section (:class:`training.settings.ViewsConfig`, see
:func:`views_config`; a partial mapping is merged over ``configs/train/improved.yaml``'s ``views``
section, unknown keys and wrong values are errors). Seeding: every call draws its seed from a
``random.Random(seed)`` owned by the transform (give each worker its own ``seed``), unless the
caller passes ``seed=`` explicitly, e.g. ``sample_seed(base, key, epoch)``, which makes a
sample's views independent of which worker made them and in what order.
"""

from __future__ import annotations

import hashlib
import random
from typing import Mapping

import torch

from training.augment.image import ImageViews
from training.augment.text import TextAugmenter
from training.settings import ViewsConfig, section_view

__all__ = ["MultiViewTransform", "sample_seed", "views_config"]


def views_config(cfg: ViewsConfig | Mapping | None = None) -> ViewsConfig:
    """The typed ``views`` section (:class:`training.settings.ViewsConfig`): a view as it is, or
    ``cfg`` (a partial ``views`` section, or a whole config holding one) merged over
    ``configs/train/improved.yaml``'s; an unknown key or a wrong value raises
    ``curation.common.config.ConfigError`` naming it."""
    if isinstance(cfg, Mapping) and isinstance(cfg.get("views"), Mapping):
        cfg = cfg["views"]
    return section_view(ViewsConfig, "improved", "views", cfg)


def sample_seed(base_seed: int, key, epoch: int = 0) -> int:
    """A 63-bit seed from (base seed, sample key, epoch), stable across processes and runs."""
    digest = hashlib.blake2b(f"{int(base_seed)}|{epoch}|{key}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1


class MultiViewTransform:
    """Weak and strong image and text views of one pair (module docstring)."""

    def __init__(self, cfg: ViewsConfig | Mapping | None, preprocess_cfg, tokenizer,
                 seed: int | None = None, thesaurus=None):
        self.cfg = views_config(cfg)
        self.num_strong = self.cfg.num_strong
        if self.num_strong < 1:
            raise ValueError(f"views.num_strong must be >= 1, got {self.num_strong}")
        self.images = ImageViews(self.cfg.image, preprocess_cfg, self.num_strong)
        self.texts = TextAugmenter(self.cfg.text, thesaurus=thesaurus)
        self.tokenizer = tokenizer
        self.seed = int(self.cfg.seed if seed is None else seed)
        self._rng = random.Random(self.seed)

    def text_views(self, caption: str, seed: int) -> tuple[str, list[str]]:
        """The augmented caption strings (weak, [strong...]) for ``seed``, before tokenising."""
        return self.texts.views(caption, random.Random(seed), self.num_strong)

    def __call__(self, image, caption: str, seed: int | None = None) -> dict[str, torch.Tensor]:
        if not isinstance(caption, str):
            raise TypeError(f"caption must be a str, got {type(caption).__name__}")
        if seed is None:
            seed = self._rng.getrandbits(63)
        rng = random.Random(seed)
        weak_img, strong_img = self.images(image, seed=rng.getrandbits(63))
        weak_txt, strong_txt = self.texts.views(caption, rng, self.num_strong)
        tokens = torch.as_tensor(self.tokenizer([weak_txt, *strong_txt]), dtype=torch.long)
        return {"image": weak_img, "image_strong": strong_img,
                "text": tokens[0], "text_strong": tokens[1:]}
