"""Few-shot probes (SPEC section 4): projections, zero-shot start, and the k = 1 claim on real digits."""

import pytest
import torch
import torch.nn.functional as F

from training.fewshot import (accuracy, cv_fold_ids, fewshot_sweep, format_fewshot_table, project_to_ball_,
                              projected_logits, projected_probe, projected_probe_cv, sample_shots,
                              train_projected_probes, train_scratch_probes)
from training.eval_settings import eval_config


def fewshot_cfg(**changes):
    """configs/eval/default.yaml's eval.fewshot settings with ``changes``."""
    return eval_config({"fewshot": changes}).fewshot


def test_projection_rescales_only_what_is_outside_the_ball():
    t = torch.tensor([[[3.0, 4.0]], [[0.3, 0.4]], [[1.0, 0.0]]])  # norms 5, 0.5, 1
    project_to_ball_(t, torch.tensor([1.0, 1.0, 0.0]))
    norms = t.flatten(1).norm(dim=1)
    assert torch.allclose(norms, torch.tensor([1.0, 0.5, 0.0]))
    assert torch.allclose(t[0, 0], torch.tensor([0.6, 0.8]))  # same direction
    assert torch.allclose(t[1, 0], torch.tensor([0.3, 0.4]))  # untouched


def _toy(n=60, d=8, c=3, seed=0, noise=0.3):
    g = torch.Generator().manual_seed(seed)
    centres = F.normalize(torch.randn(c, d, generator=g), dim=-1)
    y = torch.arange(n) % c
    x = F.normalize(centres[y] + noise * torch.randn(n, d, generator=g), dim=-1)
    return x, y, centres


def test_probes_respect_their_radii_and_zero_radii_is_zero_shot():
    x, y, centres = _toy()
    w0 = F.normalize(centres + 0.5 * torch.randn(centres.shape, generator=torch.Generator().manual_seed(1)), dim=-1)
    W, b = train_projected_probes(x, y, w0, deltas=[0.0, 0.2, 5.0], delta_bs=[0.0, 0.5, 5.0], steps=50)
    assert W[0].abs().max() == 0 and b[0].abs().max() == 0
    assert W[1].norm() <= 0.2 + 1e-5 and b[1].norm() <= 0.5 + 1e-5
    assert W[2].norm() > 0.2  # a large ball lets the probe move further
    logits = projected_logits(x, w0, W, b, 100.0)
    assert torch.equal(logits[0].argmax(-1), (x @ w0.T).argmax(-1))
    # training the grid together equals training each probe alone
    W1, b1 = train_projected_probes(x, y, w0, deltas=[0.2], delta_bs=[0.5], steps=50)
    assert torch.allclose(W1[0], W[1], atol=1e-5) and torch.allclose(b1[0], b[1], atol=1e-5)


def test_scratch_probe_fits_separable_data_and_decay_shrinks_weights():
    x, y, _ = _toy(noise=0.05)
    W, b = train_scratch_probes(x, y, 3, weight_decays=[0.0, 1.0], steps=300)
    acc = accuracy(torch.einsum("nd,gcd->gnc", x, W) + b[:, None], y)
    assert acc[0] == 1.0
    assert W[1].norm() < W[0].norm()


def test_sample_shots_take_exactly_k_per_class():
    y = torch.arange(100) % 5
    tr = sample_shots(y, k=2, seed=0)
    assert len(tr) == 10 and torch.bincount(y[tr]).tolist() == [2] * 5
    assert not torch.equal(tr, sample_shots(y, 2, seed=1))
    assert len(sample_shots(y, k=20, seed=0)) == 100  # all 20 of each class: no extra label needed
    with pytest.raises(ValueError, match="21-shot needs at least 21"):
        sample_shots(y, k=21, seed=0)


def test_cv_folds_are_stratified_and_balanced():
    y = torch.arange(40) % 10  # 4 shots of 10 classes
    ids = cv_fold_ids(y, 5, seed=0)
    assert torch.bincount(ids).tolist() == [8] * 5
    for c in range(10):  # a class's shots land in different folds
        assert len(set(ids[y == c].tolist())) == 4
    assert cv_fold_ids(y[:10], 5, seed=0).tolist().count(0) == 2  # 1-shot: 2 samples per fold


def test_kshot_uses_only_the_k_shots():
    """The budget: with exactly k labelled images per class in the pool (nothing left for a
    separate validation split) the k-shot sweep runs, and its probes see only those images."""
    x, y, centres = _toy(n=30, c=3, noise=0.4)  # 10 per class
    w0 = F.normalize(centres + 0.6 * torch.randn(centres.shape, generator=torch.Generator().manual_seed(2)), dim=-1)
    out = fewshot_sweep(x, y, x, y, w0, fewshot_cfg(shots=[10], seeds=[0], steps=30))
    row = out["rows"][0]
    assert row["labels_per_class"] == 10
    # the pool is all shots: the projected probe fits them at least as well as zero-shot
    assert row["projected"] >= row["zeroshot"]


def test_cross_validated_choice_is_never_below_zero_shot_on_its_own_validation():
    x, y, centres = _toy(n=24, c=3, noise=0.5, seed=3)
    for noise_seed in range(3):
        w0 = F.normalize(centres + 0.8 * torch.randn(centres.shape, generator=torch.Generator().manual_seed(noise_seed)),
                         dim=-1)
        p = projected_probe_cv(x, y, w0, fewshot_cfg(steps=30, cv_folds=4))
        assert p["cv_acc"] >= p["cv_acc_zeroshot"]
        zs_logits = x @ w0.T
        if (p["delta_rel"], p["delta_b"]) == (0.0, 0.0):  # zero-shot chosen: exactly its predictions
            assert torch.equal(p["predict"](x).argmax(-1), zs_logits.argmax(-1))
    # a perfect zero-shot classifier is kept (ties go to the smallest radii)
    p = projected_probe_cv(x, y, centres, fewshot_cfg(steps=30, cv_folds=4, delta_rel=[0.0, 0.5], delta_b=[0.0]))
    assert p["cv_acc_zeroshot"] == accuracy(x @ centres.T, y).item()
    if p["cv_acc"] == p["cv_acc_zeroshot"]:
        assert (p["delta_rel"], p["delta_b"]) == (0.0, 0.0)


def test_projected_probe_chooses_radii_on_validation():
    """With a perfect zero-shot classifier, validation keeps it (smallest radii on ties)."""
    x, y, centres = _toy()
    p = projected_probe(x[:30], y[:30], x[30:], y[30:], centres, fewshot_cfg(steps=30))
    assert p["val_acc"] == accuracy(x[30:] @ centres.T, y[30:]).item()
    assert (p["delta_rel"], p["delta_b"]) == (0.0, 0.0)


def test_projected_probe_at_one_shot_is_at_least_zero_shot_on_digits():
    """The SPEC's claim at k = 1, on real data.

    Setup (features where zero-shot is informative but imperfect): scikit-learn's real digits,
    pixels centred on a disjoint split A and mapped by a fixed random projection to 32-d, then
    L2-normalised. The "zero-shot" classifier W0 is the normalised mean of 2 images per class
    from split A plus Gaussian noise (std 0.25 per dimension), standing in for text embeddings
    (about 50% accuracy). The shots come from split B (1 per class, the radii chosen by
    cross-validation within them: no other labels), accuracy is measured on split C; averaged
    over 5 seeds.
    """
    from sklearn.datasets import load_digits

    digits = load_digits()
    X, y = torch.tensor(digits.data, dtype=torch.float32), torch.tensor(digits.target)
    perm = torch.randperm(len(y), generator=torch.Generator().manual_seed(0))
    A, B, C = perm[:300], perm[300:1000], perm[1000:]
    g = torch.Generator().manual_seed(1)
    feats = F.normalize((X - X[A].mean(0)) @ torch.randn(64, 32, generator=g), dim=-1)
    w0 = torch.stack([feats[A[y[A] == c][:2]].mean(0) for c in range(10)])
    w0 = F.normalize(w0 + 0.25 * torch.randn(10, 32, generator=g), dim=-1)

    result = fewshot_sweep(feats[B], y[B], feats[C], y[C], w0, fewshot_cfg(shots=[1], seeds=[0, 1, 2, 3, 4]))
    row = result["rows"][0]
    zs = accuracy(feats[C] @ w0.T, y[C]).item()
    assert row["zeroshot"] == pytest.approx(zs) and 0.3 < zs < 0.8  # informative, imperfect
    # the 1-shot projected probe, its radii chosen within the 10 shots, is >= zero-shot on average
    assert row["projected"] >= row["zeroshot"]
    assert row["projected"] == pytest.approx(sum(row["projected_per_seed"]) / 5)
    for radii, acc in zip(row["chosen_radii"], row["projected_per_seed"]):
        if radii == (0.0, 0.0):  # cross-validation kept zero-shot: exactly its accuracy
            assert acc == pytest.approx(zs)
    # (with 1 label per class and no other labels, cross-validation mostly keeps zero-shot here,
    # and the from-scratch probe does better on these features: README, Evaluation)
    table = format_fewshot_table(result)
    assert f"{100 * row['projected']:.1f}" in table and f"{100 * zs:.1f}" in table
