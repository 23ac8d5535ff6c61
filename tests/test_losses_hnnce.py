"""HN-NCE (DiHT): CLIP at beta 0 / alpha 1, the formula evaluated directly, stability, 2 workers."""

import math

import pytest
import torch
import torch.multiprocessing as mp
import torch.nn.functional as F

from tests.gloo import free_port, process_group
from training.losses.hnnce import hnnce_loss


def _features(b, d, seed):
    g = torch.Generator().manual_seed(seed)
    x = F.normalize(torch.randn(b, d, generator=g), dim=1)
    y = F.normalize(x + 0.8 * torch.randn(b, d, generator=g), dim=1)  # correlated pairs
    return x, y


def _clip_reference(x, y, scale):
    logits = scale * x @ y.T
    labels = torch.arange(x.shape[0])
    return (F.cross_entropy(logits, labels) + F.cross_entropy(logits.T, labels)) / 2


def _hnnce_reference(x, y, scale, alpha, beta):
    """The SPEC formula in float64 with plain loops: no logsumexp, no vectorisation."""
    s = (scale * x.double() @ y.double().T).tolist()
    b = len(s)

    def direction(sim):
        total = 0.0
        for i in range(b):
            norm = sum(math.exp(beta * sim[i][k]) for k in range(b) if k != i)
            denominator = alpha * math.exp(sim[i][i])
            for j in range(b):
                if j != i:
                    w_ij = (b - 1) * math.exp(beta * sim[i][j]) / norm
                    denominator += w_ij * math.exp(sim[i][j])
            total += -math.log(math.exp(sim[i][i]) / denominator)
        return total / b

    transposed = [[s[j][i] for j in range(b)] for i in range(b)]
    return (direction(s) + direction(transposed)) / 2


def test_beta0_alpha1_is_the_clip_loss():
    x, y = _features(12, 16, seed=0)
    scale = torch.tensor(14.3)
    got = hnnce_loss(x, y, scale, alpha=1.0, beta=0.0)
    want = _clip_reference(x, y, scale)
    assert got.dtype == torch.float32
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("alpha,beta", [(1.0, 0.5), (0.0, 0.5), (0.5, 1.0), (0.0, 0.0)])
def test_matches_direct_float64_formula(alpha, beta):
    x, y = _features(10, 8, seed=1)
    scale = 9.0
    got = hnnce_loss(x, y, torch.tensor(scale), alpha=alpha, beta=beta).item()
    want = _hnnce_reference(x, y, scale, alpha, beta)
    assert got == pytest.approx(want, rel=1e-5, abs=1e-5)


def _hnnce_reference_autograd(x, y, scale, alpha, beta, detach_weights=False):
    """The SPEC formula in float64 with autograd (plain exp/sum, no logsumexp), weights NOT
    detached unless ``detach_weights`` (the wrong variant the test must tell apart)."""
    def direction(s):
        b = s.shape[0]
        off = ~torch.eye(b, dtype=torch.bool)
        e_beta = torch.exp(beta * s) * off
        w = (b - 1) * e_beta / e_beta.sum(dim=1, keepdim=True)
        if detach_weights:
            w = w.detach()
        denominator = alpha * torch.exp(torch.diagonal(s)) + (w * torch.exp(s) * off).sum(dim=1)
        return -(torch.log(torch.exp(torch.diagonal(s)) / denominator)).mean()

    s = scale * x @ y.T
    return (direction(s) + direction(s.T)) / 2


@pytest.mark.parametrize("alpha,beta", [(1.0, 0.5), (0.0, 0.5), (0.5, 1.0)])
def test_gradients_match_float64_reference_with_undetached_weights(alpha, beta):
    # SPEC 3: the importance weights w_ij are not detached, so the gradient has their term too.
    x, y = _features(10, 8, seed=7)
    scale = 9.0
    got_x, got_y, got_s = (t.clone().requires_grad_(True) for t in (x, y, torch.tensor(scale)))
    hnnce_loss(got_x, got_y, got_s, alpha=alpha, beta=beta).backward()
    grads = {}
    for detach in (False, True):
        rx, ry, rs = (t.double().clone().requires_grad_(True) for t in (x, y, torch.tensor(scale)))
        _hnnce_reference_autograd(rx, ry, rs, alpha, beta, detach_weights=detach).backward()
        grads[detach] = (rx.grad, ry.grad, rs.grad)
    for got, want in zip((got_x.grad, got_y.grad, got_s.grad), grads[False]):
        torch.testing.assert_close(got.double(), want, rtol=1e-4, atol=1e-6)
    # detaching the weights changes the gradients far beyond that tolerance
    assert (grads[True][0] - grads[False][0]).abs().max() > 1e-2
    assert (grads[True][2] - grads[False][2]).abs() > 1e-2


def test_hard_negatives_raise_the_loss_and_alpha0_lowers_it():
    # beta > 0 up-weights the hardest negatives, so (weights averaging B - 1) the loss can only grow;
    # dropping the positive from the denominator (alpha 0) can only lower it.
    x, y = _features(16, 8, seed=2)
    scale = torch.tensor(10.0)
    clip = hnnce_loss(x, y, scale, alpha=1.0, beta=0.0)
    hard = hnnce_loss(x, y, scale, alpha=1.0, beta=0.5)
    no_pos = hnnce_loss(x, y, scale, alpha=0.0, beta=0.5)
    assert hard > clip
    assert no_pos < hard


@pytest.mark.parametrize("alpha", [1.0, 0.0])
def test_finite_gradients_at_scale_100_with_near_duplicates(alpha):
    g = torch.Generator().manual_seed(3)
    base = torch.randn(1, 32, generator=g)
    x = F.normalize(base + 1e-4 * torch.randn(16, 32, generator=g), dim=1).requires_grad_(True)
    y = F.normalize(base + 1e-4 * torch.randn(16, 32, generator=g), dim=1).requires_grad_(True)
    scale = torch.tensor(100.0, requires_grad=True)
    loss = hnnce_loss(x, y, scale, alpha=alpha, beta=0.5)
    loss.backward()
    assert torch.isfinite(loss)
    for grad in (x.grad, y.grad, scale.grad):
        assert grad is not None and torch.isfinite(grad).all()
    assert x.grad.abs().sum() > 0


def test_low_precision_inputs_are_computed_in_float32():
    x, y = _features(8, 16, seed=4)
    loss = hnnce_loss(x.bfloat16(), y.bfloat16(), torch.tensor(20.0), beta=0.5)
    assert loss.dtype == torch.float32
    want = hnnce_loss(x.bfloat16().float(), y.bfloat16().float(), torch.tensor(20.0), beta=0.5)
    torch.testing.assert_close(loss, want)


def test_bad_input_gives_clear_errors():
    x, y = _features(4, 8, seed=5)
    with pytest.raises(ValueError, match="at least 2"):
        hnnce_loss(x[:1], y[:1], 10.0)
    with pytest.raises(ValueError, match=r"\[B, D\]"):
        hnnce_loss(x, y[:3], 10.0)
    with pytest.raises(ValueError, match="alpha"):
        hnnce_loss(x, y, 10.0, alpha=-1.0)


# ---- two workers (gloo) equal one process over the global batch ----------------------------------

_ALPHA, _BETA = 1.0, 0.5


def _worker(rank, world, port, data_file, out_dir):
    with process_group(rank, world, port):
        data = torch.load(data_file)
        n = data["image"].shape[0] // world
        x = data["image"][rank * n : (rank + 1) * n].clone().requires_grad_(True)
        y = data["text"][rank * n : (rank + 1) * n].clone().requires_grad_(True)
        scale = data["scale"].clone().requires_grad_(True)
        loss = hnnce_loss(x, y, scale, alpha=_ALPHA, beta=_BETA)
        loss.backward()
        # DDP averages gradients over ranks; for inputs that is the local gradient / world.
        torch.save(
            {"loss": loss.detach(), "gx": x.grad / world, "gy": y.grad / world, "gs": scale.grad},
            f"{out_dir}/{rank}.pt",
        )


def test_two_workers_equal_one_process(tmp_path):
    x, y = _features(12, 8, seed=6)
    scale = torch.tensor(20.0)
    torch.save({"image": x, "text": y, "scale": scale}, tmp_path / "data.pt")
    mp.spawn(
        _worker,
        args=(2, free_port(), str(tmp_path / "data.pt"), str(tmp_path)),
        nprocs=2,
        join=True,
    )
    ranks = [torch.load(tmp_path / f"{r}.pt") for r in range(2)]

    xs, ys, ss = x.clone().requires_grad_(True), y.clone().requires_grad_(True), scale.clone().requires_grad_(True)
    single = hnnce_loss(xs, ys, ss, alpha=_ALPHA, beta=_BETA)
    single.backward()

    torch.testing.assert_close((ranks[0]["loss"] + ranks[1]["loss"]) / 2, single.detach())
    torch.testing.assert_close(torch.cat([r["gx"] for r in ranks]), xs.grad)
    torch.testing.assert_close(torch.cat([r["gy"] for r in ranks]), ys.grad)
    torch.testing.assert_close((ranks[0]["gs"] + ranks[1]["gs"]) / 2, ss.grad)
    # each rank alone sees a different loss: the check above is not trivially satisfied
    assert not torch.allclose(ranks[0]["loss"], ranks[1]["loss"])
