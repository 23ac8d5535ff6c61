"""Contrastive losses: local rows against the globally gathered batch (see training.distributed)."""

from training.losses.clip import clip_loss, infonce

__all__ = ["clip_loss", "infonce"]
