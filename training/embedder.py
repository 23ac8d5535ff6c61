"""The evaluation embedder for the trainer's models (what training/evaluate.py consumes).

``encode_image(images)`` / ``encode_text(tokens)`` return ``{"clip": normalised features}``;
``preprocess`` is open_clip's val transform and ``tokenizer`` open_clip's tokenizer for the
architecture. The encoding itself is :class:`training.evaluate.OpenClipEmbedder`'s.
"""

from __future__ import annotations

from torch import nn

from training.evaluate import OpenClipEmbedder


class ClipEmbedder(OpenClipEmbedder):
    """:class:`OpenClipEmbedder` for a trained model given by architecture name (DDP unwrapped)."""

    def __init__(self, model: nn.Module, arch: str, device="cpu"):
        from training.checkpoint import unwrap
        from training.model import image_transform, tokenizer

        super().__init__(unwrap(model), image_transform(arch, is_train=False), tokenizer(arch),
                         name="clip", device=device)
        self.arch = arch
