"""The CLIP 🚀 objective: weak InfoNCE + label-smoothed strong pairs, (global + n local) / (1 + n)."""

import pytest
import torch
import torch.nn.functional as F

from training.losses.improved import ImprovedCLIPLoss, improved_clip_loss


def _feats(seed, b=6, d=8, n_views=2):
    g = torch.Generator().manual_seed(seed)

    def unit():
        return F.normalize(torch.randn(b, d, generator=g), dim=1)

    return unit(), unit(), [unit() for _ in range(n_views)], [unit() for _ in range(n_views)]


def _smoothed_ce(logits, eps):
    """Label-smoothed CE by hand: -(1 - eps) log p_ii - eps / C sum_c log p_ic, mean over rows."""
    b, c = logits.shape
    total = 0.0
    for i in range(b):
        log_p = logits[i] - torch.logsumexp(logits[i], dim=0)
        total = total - (1 - eps) * log_p[i] - eps / c * log_p.sum()
    return total / b


def _reference(x, y, xs, ys, t_weak, t_strong, eps):
    g_i2t = _smoothed_ce(t_weak * x @ y.T, 0.0)
    g_t2i = _smoothed_ce(t_weak * y @ x.T, 0.0)
    n = len(xs)
    pairs = [(a, c) for a in range(n) for c in range(n)]
    l_i2t = sum(_smoothed_ce(t_strong * xs[a] @ ys[c].T, eps) for a, c in pairs) / len(pairs)
    l_t2i = sum(_smoothed_ce(t_strong * ys[c] @ xs[a].T, eps) for a, c in pairs) / len(pairs)
    return ((g_i2t + 2 * l_i2t) / 3 + (g_t2i + 2 * l_t2i) / 3) / 2


def test_label_smoothing_matches_hand_written_smoothed_ce():
    x, y, xs, ys = _feats(0)
    loss, parts = improved_clip_loss(x, y, 10.0, xs, ys, 7.0, label_smoothing=0.1, return_parts=True)
    want_local = sum(_smoothed_ce(7.0 * xs[a] @ ys[c].T, 0.1) for a in range(2) for c in range(2)) / 4
    torch.testing.assert_close(parts["local_i2t"], want_local)
    # the weak pair has no smoothing
    torch.testing.assert_close(parts["global_i2t"], F.cross_entropy(10.0 * x @ y.T, torch.arange(6)))


@pytest.mark.parametrize("eps", [0.1, 0.0, 0.3])
def test_full_objective_matches_reference(eps):
    x, y, xs, ys = _feats(1)
    got = improved_clip_loss(x, y, torch.tensor(12.0), xs, ys, torch.tensor(9.0), label_smoothing=eps)
    torch.testing.assert_close(got, _reference(x, y, xs, ys, 12.0, 9.0, eps))


def test_without_strong_views_it_is_clip():
    x, y, _, _ = _feats(2)
    logits = 14.0 * x @ y.T
    labels = torch.arange(x.shape[0])
    want = (F.cross_entropy(logits, labels) + F.cross_entropy(logits.T, labels)) / 2
    torch.testing.assert_close(improved_clip_loss(x, y, 14.0), want)


def test_gradients_reach_both_logit_scales_and_every_view():
    x, y, xs, ys = _feats(3)
    leaves = [t.clone().requires_grad_(True) for t in [x, y, *xs, *ys]]
    t_w = torch.tensor(10.0, requires_grad=True)
    t_s = torch.tensor(10.0, requires_grad=True)
    loss = improved_clip_loss(leaves[0], leaves[1], t_w, leaves[2:4], leaves[4:6], t_s)
    loss.backward()
    for t in [*leaves, t_w, t_s]:
        assert t.grad is not None and torch.isfinite(t.grad).all() and t.grad.abs().sum() > 0


def test_module_reads_the_output_dict():
    x, y, xs, ys = _feats(4)
    out = {"image": x, "text": y, "logit_scale": torch.tensor(11.0), "image_strong": xs, "text_strong": ys,
           "logit_scale_strong": torch.tensor(8.0)}
    torch.testing.assert_close(
        ImprovedCLIPLoss(0.1)(out), improved_clip_loss(x, y, 11.0, xs, ys, 8.0, label_smoothing=0.1)
    )


def test_bad_views_give_clear_errors():
    x, y, xs, ys = _feats(5)
    with pytest.raises(ValueError, match="as many strong"):
        improved_clip_loss(x, y, 10.0, xs, ys[:1], 10.0)
    with pytest.raises(ValueError, match="logit_scale_strong"):
        improved_clip_loss(x, y, 10.0, xs, ys)
    with pytest.raises(ValueError, match="label_smoothing"):
        ImprovedCLIPLoss(1.5)


# --- issue 13: loss.reduction (official --loss-avg-or-sum) -------------------------------------------

@pytest.mark.parametrize("n_views", [2, 0])
def test_sum_reduction_adds_the_two_directions(n_views):
    x, y, xs, ys = _feats(6, n_views=n_views)
    scale_s = 9.0 if n_views else None
    mean, parts = improved_clip_loss(x, y, 12.0, xs, ys, scale_s, return_parts=True)
    total = improved_clip_loss(x, y, 12.0, xs, ys, scale_s, reduction="sum")
    if n_views:
        per_dir = [(parts[f"global_{d}"] + 2 * parts[f"local_{d}"]) / 3 for d in ("i2t", "t2i")]
    else:
        per_dir = [parts["global_i2t"], parts["global_t2i"]]
    torch.testing.assert_close(total, per_dir[0] + per_dir[1])  # the official `clip_loss * 2`
    torch.testing.assert_close(total, 2 * mean)
    if n_views:
        torch.testing.assert_close(total, 2 * _reference(x, y, xs, ys, 12.0, 9.0, 0.1))
    out = {"image": x, "text": y, "logit_scale": torch.tensor(12.0), "image_strong": xs, "text_strong": ys,
           "logit_scale_strong": torch.tensor(9.0) if n_views else None}
    torch.testing.assert_close(ImprovedCLIPLoss(0.1, reduction="sum")(out), total)
    with pytest.raises(ValueError, match="loss.reduction"):
        improved_clip_loss(x, y, 12.0, xs, ys, scale_s, reduction="avg")
