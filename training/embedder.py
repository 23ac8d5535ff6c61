"""The evaluation embedder interface over a trained model (what training/evaluate.py consumes).

``encode_image(images)`` / ``encode_text(tokens)`` return ``{name: normalised features}``;
plain CLIP has one name, ``"clip"``. ``preprocess`` is open_clip's val transform and
``tokenizer`` open_clip's tokenizer for the architecture.
"""

from __future__ import annotations

import torch
from torch import nn


class ClipEmbedder:
    name = "clip"

    def __init__(self, model: nn.Module, arch: str, device="cpu"):
        from training.checkpoint import unwrap
        from training.model import image_transform, tokenizer

        self.model = unwrap(model)
        self.arch = arch
        self.device = torch.device(device)
        self.preprocess = image_transform(arch, is_train=False)
        self.tokenizer = tokenizer(arch)

    def _encoder(self):
        # the trainer's wrapper (ClipModel) or a bare open_clip model
        return self.model

    @torch.no_grad()
    def encode_image(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        was_training = self.model.training
        self.model.eval()
        try:
            feats = self._encoder().encode_image(images.to(self.device), normalize=True)
        finally:
            self.model.train(was_training)
        return {self.name: feats.float()}

    @torch.no_grad()
    def encode_text(self, tokens: torch.Tensor) -> dict[str, torch.Tensor]:
        was_training = self.model.training
        self.model.eval()
        try:
            feats = self._encoder().encode_text(tokens.to(self.device), normalize=True)
        finally:
            self.model.train(was_training)
        return {self.name: feats.float()}


def embedder_from_checkpoint(path, arch: str | None = None, device="cpu") -> ClipEmbedder:
    """Plain-CLIP embedder from an ``open_clip.pt`` (or a checkpoint directory)."""
    from training.checkpoint import load_open_clip, open_clip_file

    model, _, _ = load_open_clip(path, arch=arch, device=device)
    if arch is None:
        import torch as _t

        arch = _t.load(open_clip_file(path), map_location="cpu", weights_only=True)["name"]
    return ClipEmbedder(model, arch, device=device)
