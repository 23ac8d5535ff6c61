"""open_clip models by name, the project's tiny configs, and the trainer's model wrapper.

Any open_clip architecture can be named (``ViT-B-32``, ``RN50``, ...); the JSON files in
``configs/models/`` add tiny architectures for CPU runs (registered with
``open_clip.add_model_config``). Nothing is downloaded: models are created with random weights
and optionally initialised from a local checkpoint file.
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from curation.common.config import CONFIG_DIR  # noqa: E402

MODEL_CONFIG_DIR = CONFIG_DIR / "models"
MAX_LOGIT_SCALE = 100.0
_registered = False


def register_model_configs() -> None:
    """Make the architectures in ``configs/models/*.json`` known to open_clip (idempotent)."""
    global _registered
    if _registered:
        return
    import open_clip

    if MODEL_CONFIG_DIR.is_dir():
        open_clip.add_model_config(MODEL_CONFIG_DIR)
    _registered = True


def model_config(arch: str) -> dict:
    import open_clip

    register_model_configs()
    cfg = open_clip.get_model_config(arch)
    if cfg is None:
        raise ValueError(f"unknown open_clip architecture '{arch}' (known: open_clip.list_models() "
                         f"and configs/models/*.json)")
    return cfg


def preprocess_config(arch: str) -> dict:
    """Image size and normalisation of ``arch``, as open_clip's transforms use them."""
    from open_clip.constants import OPENAI_DATASET_MEAN, OPENAI_DATASET_STD

    cfg = model_config(arch)
    pp = dict(cfg.get("preprocess_cfg", {}))
    return {
        "image_size": cfg["vision_cfg"].get("image_size", 224),
        "mean": tuple(pp.get("mean", OPENAI_DATASET_MEAN)),
        "std": tuple(pp.get("std", OPENAI_DATASET_STD)),
        "interpolation": pp.get("interpolation"),
        "resize_mode": pp.get("resize_mode"),
    }


def image_transform(arch: str, is_train: bool, aug_cfg: dict | None = None):
    """open_clip's own train (random resized crop) or val (resize + centre crop) transform."""
    import open_clip

    pp = preprocess_config(arch)
    return open_clip.image_transform(pp["image_size"], is_train=is_train, mean=pp["mean"],
                                     std=pp["std"], interpolation=pp["interpolation"],
                                     resize_mode=pp["resize_mode"], aug_cfg=aug_cfg or None)


def tokenizer(arch: str):
    import open_clip

    register_model_configs()
    return open_clip.get_tokenizer(arch)


def create_clip(arch: str, init_checkpoint: str | None = None, **kwargs) -> nn.Module:
    """An open_clip model with random weights, or loaded from a local checkpoint file."""
    import open_clip

    model_config(arch)  # clear error for unknown names
    model = open_clip.create_model(arch, pretrained=None, **kwargs)
    if init_checkpoint:
        if not Path(init_checkpoint).is_file():
            raise FileNotFoundError(f"model.init_checkpoint not found: {init_checkpoint}")
        open_clip.load_checkpoint(model, str(init_checkpoint))
    return model


class ClipModel(nn.Module):
    """Plain CLIP: wraps an open_clip model and returns the feature dict the losses consume.

    ``forward(batch)`` returns ``image``/``text`` (L2-normalised), ``logit_scale`` (exp'd,
    clamped to <= 100) and ``image_pooled`` (the image tower's output before normalisation,
    ``[B, pooled_dim]``). Recipes with extra heads subclass this and add keys. The open_clip
    model is ``self.clip``; only it goes into the open_clip-compatible checkpoint.
    """

    def __init__(self, clip: nn.Module, arch: str):
        super().__init__()
        self.clip = clip
        self.arch = arch
        self.pooled_dim = int(model_config(arch)["embed_dim"])

    def encode_image(self, image: torch.Tensor, normalize: bool = True) -> torch.Tensor:
        return self.clip.encode_image(image, normalize=normalize)

    def encode_text(self, text: torch.Tensor, normalize: bool = True) -> torch.Tensor:
        return self.clip.encode_text(text, normalize=normalize)

    def logit_scale(self) -> torch.Tensor:
        return self.clip.logit_scale.exp().clamp(max=MAX_LOGIT_SCALE)

    def forward(self, batch: dict) -> dict:
        pooled = self.clip.encode_image(batch["image"], normalize=False)
        return {
            "image": F.normalize(pooled, dim=-1),
            "text": self.encode_text(batch["text"]),
            "logit_scale": self.logit_scale(),
            "image_pooled": pooled,
        }

    @torch.no_grad()
    def clamp_logit_scale(self) -> None:
        """After each optimizer step, as open_clip_train does: 0 <= log scale <= log(100)."""
        self.clip.logit_scale.clamp_(0, torch.log(torch.tensor(MAX_LOGIT_SCALE)).item())

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        self.clip.set_grad_checkpointing(enable)
