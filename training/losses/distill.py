"""Concept distillation (DiHT section 3.2): student heads matched to stored teacher top-k targets.

The teacher's object / attribute classifiers were run offline (``pipelines/label_concepts.py``) and
only their top-k softmax probabilities are stored (``obj_ids``/``obj_probs``, ``attr_ids``/
``attr_probs``: [B, K], ids ``-1`` and probs ``0`` where a slot or a sample has no target). The
student gets two linear heads on its pooled image feature (:class:`ConceptHeads`) trained with a
soft cross-entropy against those targets::

    q = renormalise( p_topk ** (1 / T) )           # the teacher's softmax at temperature T,
                                                   # restricted to its top-k classes
    L = T^2 * mean_{samples with targets} ( - sum_k q_k log softmax(z / T)_{id_k} )

(``p ** (1/T)`` renormalised is exactly ``softmax(teacher_logits / T)`` restricted to the top-k;
``T = 1`` just renormalises the top-k. ``T^2`` keeps gradient magnitudes comparable across
temperatures, as in Hinton et al.) The total is ``lambda * (L_objects + L_attributes)``.

Samples without targets (``has_concepts`` False, or no valid id) contribute nothing; a batch with
none gives exactly 0 that is still connected to the graph (so DDP sees every parameter used).
The mean is over this rank's samples with targets (no cross-rank reweighting).
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
import torch.nn as nn
import torch.nn.functional as F

__all__ = ["ConceptHeads", "ConceptDistillLoss", "topk_soft_cross_entropy"]


def topk_soft_cross_entropy(
    logits: torch.Tensor,
    ids: torch.Tensor,
    probs: torch.Tensor,
    temperature: float = 1.0,
    valid: torch.Tensor | None = None,
) -> torch.Tensor:
    """Soft CE of ``logits`` [B, C] against sparse top-k targets ``ids``/``probs`` [B, K].

    ``valid`` [B] bool (optional) marks samples that have targets; samples whose ids are all -1
    (or whose probs sum to 0) are excluded too. Returns the mean over included samples, times
    ``temperature ** 2``; exactly 0 (with a graph through ``logits``) when none is included.
    """
    if temperature <= 0:
        raise ValueError(f"distillation temperature must be > 0, got {temperature}")
    if ids.shape != probs.shape or ids.ndim != 2 or ids.shape[0] != logits.shape[0]:
        raise ValueError(
            f"targets must be [B, K] ids and probs matching logits [B, C]; got ids {tuple(ids.shape)}, "
            f"probs {tuple(probs.shape)}, logits {tuple(logits.shape)}"
        )
    n_classes = logits.shape[1]
    ids = ids.to(logits.device).long()
    probs = probs.to(logits.device).float()
    slot_ok = (ids >= 0) & (probs > 0)
    if bool(((ids >= n_classes) & slot_ok).any()):
        raise ValueError(f"target id >= number of classes ({n_classes}): vocabulary and head disagree")
    # Tempered teacher over its top-k: p^(1/T), renormalised (a row of zeros stays zeros).
    q = torch.where(slot_ok, probs.clamp_min(1e-30).pow(1.0 / temperature), torch.zeros_like(probs))
    mass = q.sum(dim=1, keepdim=True)
    row_ok = mass.squeeze(1) > 0
    if valid is not None:
        row_ok = row_ok & valid.to(logits.device).bool()
    q = q / mass.clamp_min(1e-30)

    log_p = F.log_softmax(logits.float() / temperature, dim=1)
    picked = log_p.gather(1, ids.clamp_min(0))  # [B, K]; invalid slots have q = 0
    per_sample = -(q * picked).sum(dim=1)
    # Rows without targets are zeroed (torch.where, so they carry no gradient); with none at all
    # the result is exactly 0 and still depends on ``logits``.
    n_ok = row_ok.sum().clamp_min(1)
    loss = torch.where(row_ok, per_sample, torch.zeros_like(per_sample)).sum() / n_ok
    return loss * temperature**2


class ConceptHeads(nn.Module):
    """Two linear heads on the student's pooled image feature: object and attribute logits."""

    def __init__(self, in_dim: int, n_objects: int, n_attributes: int):
        super().__init__()
        if min(in_dim, n_objects, n_attributes) < 1:
            raise ValueError("ConceptHeads needs in_dim, n_objects and n_attributes >= 1")
        self.objects = nn.Linear(in_dim, n_objects)
        self.attributes = nn.Linear(in_dim, n_attributes)

    def forward(self, pooled: torch.Tensor) -> dict[str, torch.Tensor]:
        return {"obj_logits": self.objects(pooled), "attr_logits": self.attributes(pooled)}


class ConceptDistillLoss(nn.Module):
    """``weight * (L_objects + L_attributes)`` with its own :class:`ConceptHeads`.

    ``forward(image_pooled, batch)`` reads ``obj_ids``, ``obj_probs``, ``attr_ids``,
    ``attr_probs`` and the optional ``has_concepts`` from ``batch`` (the data path's dict).
    Being an ``nn.Module``, the trainer optimises the heads with the model.
    """

    def __init__(
        self,
        in_dim: int,
        n_objects: int,
        n_attributes: int,
        weight: float = 1.0,
        temperature: float = 1.0,
    ):
        super().__init__()
        if temperature <= 0:
            raise ValueError(f"distillation temperature must be > 0, got {temperature}")
        self.heads = ConceptHeads(in_dim, n_objects, n_attributes)
        self.weight = float(weight)
        self.temperature = float(temperature)

    @classmethod
    def from_vocab(cls, vocab: Mapping, in_dim: int, **kwargs) -> ConceptDistillLoss:
        """Sizes from a ``concepts/vocab.json`` dict (``{"objects": [...], "attributes": [...]}``)."""
        try:
            n_obj, n_attr = len(vocab["objects"]), len(vocab["attributes"])
        except (KeyError, TypeError) as e:
            raise ValueError("concept vocab must have 'objects' and 'attributes' lists") from e
        return cls(in_dim, n_obj, n_attr, **kwargs)

    def forward(self, image_pooled: torch.Tensor, batch: Mapping) -> torch.Tensor:
        missing = [k for k in ("obj_ids", "obj_probs", "attr_ids", "attr_probs") if k not in batch]
        if missing:
            raise KeyError(f"concept distillation needs batch keys {missing} (run label_concepts first)")
        out = self.heads(image_pooled)
        valid = batch.get("has_concepts")
        obj = topk_soft_cross_entropy(
            out["obj_logits"], batch["obj_ids"], batch["obj_probs"], self.temperature, valid
        )
        attr = topk_soft_cross_entropy(
            out["attr_logits"], batch["attr_ids"], batch["attr_probs"], self.temperature, valid
        )
        return self.weight * (obj + attr)
