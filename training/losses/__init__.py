"""Contrastive losses: local rows against the globally gathered batch (see training.distributed)."""

from training.losses.clip import clip_logits, clip_loss

__all__ = ["clip_loss", "clip_logits"]
