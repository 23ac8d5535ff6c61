"""Concept distillation: soft CE against stored top-k targets, heads, samples without targets."""

import math

import pytest
import torch

from training.losses.distill import ConceptDistillLoss, ConceptHeads, topk_soft_cross_entropy


def _reference(logits, ids, probs, temperature, valid):
    """Loop version: renormalised tempered top-k teacher vs the student's tempered log-softmax."""
    total, count = 0.0, 0
    for b in range(logits.shape[0]):
        slots = [(int(i), float(p)) for i, p in zip(ids[b], probs[b]) if i >= 0 and p > 0]
        if not valid[b] or not slots:
            continue
        powered = [(i, p ** (1.0 / temperature)) for i, p in slots]
        mass = sum(p for _, p in powered)
        z = [float(v) / temperature for v in logits[b]]
        log_norm = math.log(sum(math.exp(v) for v in z))
        total += -sum(p / mass * (z[i] - log_norm) for i, p in powered)
        count += 1
    return temperature**2 * total / count


def _targets():
    ids = torch.tensor([[3, 0, 5], [1, 2, -1], [4, 1, 0], [-1, -1, -1]])
    probs = torch.tensor([[0.5, 0.2, 0.1], [0.7, 0.1, 0.0], [0.3, 0.3, 0.2], [0.0, 0.0, 0.0]])
    return ids, probs


@pytest.mark.parametrize("temperature", [1.0, 2.0, 0.5])
def test_matches_loop_reference(temperature):
    logits = torch.randn(4, 6, generator=torch.Generator().manual_seed(0))
    ids, probs = _targets()
    valid = torch.tensor([True, True, False, True])  # row 2 flagged off, row 3 has no ids
    got = topk_soft_cross_entropy(logits, ids, probs, temperature, valid).item()
    assert got == pytest.approx(_reference(logits, ids, probs, temperature, valid), rel=1e-5)


def test_top_k_probabilities_are_renormalised():
    logits = torch.randn(4, 6, generator=torch.Generator().manual_seed(1))
    ids, probs = _targets()
    a = topk_soft_cross_entropy(logits, ids, probs)
    b = topk_soft_cross_entropy(logits, ids, probs * 0.25)
    torch.testing.assert_close(a, b)


def test_samples_without_targets_contribute_nothing():
    logits = torch.randn(4, 6, generator=torch.Generator().manual_seed(2)).requires_grad_(True)
    ids, probs = _targets()
    valid = torch.tensor([True, False, True, True])
    loss = topk_soft_cross_entropy(logits, ids, probs, 1.0, valid)
    loss.backward()
    keep = [0, 2]  # row 1 flagged off, row 3 has only padding
    alone = topk_soft_cross_entropy(logits.detach()[keep], ids[keep], probs[keep])
    torch.testing.assert_close(loss.detach(), alone)
    assert torch.all(logits.grad[[1, 3]] == 0)
    assert torch.all(logits.grad[keep].abs().sum(dim=1) > 0)


def test_batch_without_targets_is_exactly_zero_with_a_graph():
    crit = ConceptDistillLoss(in_dim=8, n_objects=6, n_attributes=5, weight=0.5)
    feats = torch.randn(3, 8)
    batch = {
        "obj_ids": torch.full((3, 4), -1),
        "obj_probs": torch.zeros(3, 4),
        "attr_ids": torch.tensor([[1, 0, -1, -1]] * 3),
        "attr_probs": torch.tensor([[0.6, 0.3, 0.0, 0.0]] * 3),
        "has_concepts": torch.zeros(3, dtype=torch.bool),
    }
    loss = crit(feats, batch)
    assert loss.item() == 0.0
    assert loss.requires_grad
    loss.backward()
    for p in crit.parameters():
        assert p.grad is not None and torch.all(p.grad == 0)


def test_heads_learn_a_toy_teacher():
    torch.manual_seed(0)
    n, d, n_obj, n_attr, k = 64, 16, 10, 7, 3
    feats = torch.randn(n, d)

    def teacher(n_classes):
        probs = torch.softmax(3.0 * feats @ torch.randn(d, n_classes), dim=1)
        top = probs.topk(k, dim=1)
        return top.indices, top.values

    obj_ids, obj_probs = teacher(n_obj)
    attr_ids, attr_probs = teacher(n_attr)
    batch = {"obj_ids": obj_ids, "obj_probs": obj_probs, "attr_ids": attr_ids, "attr_probs": attr_probs}
    crit = ConceptDistillLoss(d, n_obj, n_attr, weight=1.0, temperature=1.0)
    opt = torch.optim.Adam(crit.parameters(), lr=0.05)
    losses = []
    for _ in range(40):
        loss = crit(feats, batch)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.6 * losses[0]
    # the student's top-1 object now agrees with the teacher's on most samples
    agree = (crit.heads(feats)["obj_logits"].argmax(dim=1) == obj_ids[:, 0]).float().mean()
    assert agree > 0.8


def test_heads_shapes_vocab_and_errors():
    heads = ConceptHeads(8, 6, 5)
    out = heads(torch.randn(2, 8))
    assert out["obj_logits"].shape == (2, 6) and out["attr_logits"].shape == (2, 5)
    crit = ConceptDistillLoss.from_vocab({"objects": ["dog", "cat"], "attributes": ["red"]}, in_dim=8)
    assert crit.heads.objects.out_features == 2 and crit.heads.attributes.out_features == 1
    with pytest.raises(ValueError, match="vocab"):
        ConceptDistillLoss.from_vocab({"objects": ["dog"]}, in_dim=8)
    with pytest.raises(KeyError, match="attr_ids"):
        crit(torch.randn(2, 8), {"obj_ids": torch.zeros(2, 1).long(), "obj_probs": torch.ones(2, 1)})
    with pytest.raises(ValueError, match="number of classes"):
        topk_soft_cross_entropy(torch.randn(2, 3), torch.tensor([[5], [0]]), torch.tensor([[1.0], [1.0]]))
    with pytest.raises(ValueError, match="temperature"):
        topk_soft_cross_entropy(torch.randn(2, 3), torch.tensor([[1], [0]]), torch.ones(2, 1), temperature=0)
