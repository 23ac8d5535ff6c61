"""SSL companions (BarLIP, SiamLIP, BYOLIP, SwALIP, SLIP), the EMA target, the registry, and the
batch-level terms (with the CLIP 🚀 loss) on two gloo workers vs one process."""

import math

import pytest
import torch
import torch.multiprocessing as mp
import torch.nn as nn
import torch.nn.functional as F

from tests.gloo import free_port, process_group
from training.ema import EMA
from training.losses.improved import improved_clip_loss
from training.losses.registry import SSL_COMPANIONS, build_ssl
from training.losses.ssl import (
    BYOLIP,
    SLIP,
    BarLIP,
    SiamLIP,
    SwALIP,
    barlow_twins_loss,
    negative_cosine,
    simclr_loss,
    sinkhorn_knopp,
    swalip_loss,
)


def _randn(seed, *shape):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def _unit(seed, *shape):
    return F.normalize(_randn(seed, *shape), dim=-1)


# ---- Barlow Twins -----------------------------------------------------------------------------


def _barlow_reference(z1, z2, lamb, scale, eps=1e-5):
    """Cross-correlation by explicit sums over samples, then the on/off-diagonal sums."""
    n, p = z1.shape
    z1, z2 = z1.double().tolist(), z2.double().tolist()

    def standardised(z):
        cols = []
        for k in range(p):
            mean = sum(z[b][k] for b in range(n)) / n
            var = sum((z[b][k] - mean) ** 2 for b in range(n)) / n
            cols.append([(z[b][k] - mean) / math.sqrt(var + eps) for b in range(n)])
        return cols  # [p][n]

    a, b = standardised(z1), standardised(z2)
    loss = 0.0
    for i in range(p):
        for j in range(p):
            c_ij = sum(a[i][s] * b[j][s] for s in range(n)) / n
            loss += (1 - c_ij) ** 2 if i == j else lamb * c_ij**2
    return scale * loss


def test_barlow_twins_matches_explicit_sums():
    z1, z2 = _randn(0, 7, 5), _randn(1, 7, 5) + 0.5 * _randn(0, 7, 5)
    got = barlow_twins_loss(z1, z2, lamb=5e-3, scale=0.025).item()
    assert got == pytest.approx(_barlow_reference(z1, z2, 5e-3, 0.025), rel=1e-5)
    # perfectly correlated, decorrelated features (orthogonal columns) give ~0
    q, _ = torch.linalg.qr(_randn(2, 16, 4) - _randn(2, 16, 4).mean(0))
    assert barlow_twins_loss(q, q, eps=0.0).item() == pytest.approx(0.0, abs=1e-4)


def test_barlip_averages_the_weak_pair_and_all_strong_pairs():
    torch.manual_seed(0)
    m = BarLIP((6, 5), weight=2.0, hidden_dim=16, proj_dim=8)
    img, txt = _randn(3, 10, 6), _randn(4, 10, 5)
    img_s, txt_s = [_randn(5, 10, 6), _randn(6, 10, 6)], [_randn(7, 10, 5), _randn(8, 10, 5)]
    got = m.loss(img, txt, img_s, txt_s)
    zi = [m.image_projector(x) for x in [img, *img_s]]
    zt = [m.text_projector(y) for y in [txt, *txt_s]]
    pairs = [(zi[0], zt[0])] + [(zi[a], zt[c]) for a in (1, 2) for c in (1, 2)]  # never image-image
    want = 2.0 * sum(barlow_twins_loss(a, b) for a, b in pairs) / 5
    torch.testing.assert_close(got, want)


# ---- SimSiam / BYOL -----------------------------------------------------------------------------


def test_simsiam_stop_gradient_and_value():
    p = _randn(9, 6, 4).requires_grad_(True)
    z = _randn(10, 6, 4).requires_grad_(True)
    loss = negative_cosine(p, z)
    pd, zd = p.detach(), z.detach()
    want = 2 - 2 * sum(float(pd[i] @ zd[i] / (pd[i].norm() * zd[i].norm())) for i in range(6)) / 6
    assert loss.item() == pytest.approx(want, rel=1e-5)
    grad_p, grad_z = torch.autograd.grad(loss, [p, z], allow_unused=True)
    assert grad_z is None  # no gradient flows into the target branch
    assert grad_p is not None and grad_p.abs().sum() > 0


def test_siamlip_terms_are_cross_modal_and_targets_get_no_gradient():
    torch.manual_seed(0)
    m = SiamLIP((6, 5), hidden_dim=16, proj_dim=4)
    img, txt = _randn(11, 8, 6), _randn(12, 8, 5)
    img_s, txt_s = [_randn(13, 8, 6), _randn(14, 8, 6)], [_randn(15, 8, 5), _randn(16, 8, 5)]
    got = m.loss(img, txt, img_s, txt_s)
    pj, pr = m.projectors, m.predictors
    zi = [pj["image"](x) for x in [img, *img_s]]
    zt = [pj["text"](y) for y in [txt, *txt_s]]
    terms = [negative_cosine(pr["image"](zi[0]), zt[0]), negative_cosine(pr["text"](zt[0]), zi[0])]
    terms += [negative_cosine(pr["image"](zi[a]), zt[c]) for a in (1, 2) for c in (1, 2)]
    terms += [negative_cosine(pr["text"](zt[c]), zi[a]) for c in (1, 2) for a in (1, 2)]
    torch.testing.assert_close(got, sum(terms) / 10)

    # Stop-gradient: the projectors' gradient equals that of the same terms with the targets
    # replaced by constants (only the prediction branch carries gradient).
    m.zero_grad()
    got.backward()
    grads = [p.grad.clone() for p in pj.parameters()]
    m.zero_grad()
    with torch.no_grad():
        zi_c = [pj["image"](x) for x in [img, *img_s]]
        zt_c = [pj["text"](y) for y in [txt, *txt_s]]
    zi = [pj["image"](x) for x in [img, *img_s]]
    zt = [pj["text"](y) for y in [txt, *txt_s]]

    def cos_term(p, z):
        return 2 - 2 * F.cosine_similarity(p, z).mean()

    ref = [cos_term(pr["image"](zi[0]), zt_c[0]), cos_term(pr["text"](zt[0]), zi_c[0])]
    ref += [cos_term(pr["image"](zi[a]), zt_c[c]) for a in (1, 2) for c in (1, 2)]
    ref += [cos_term(pr["text"](zt[c]), zi_c[a]) for c in (1, 2) for a in (1, 2)]
    (sum(ref) / 10).backward()
    for g, p in zip(grads, pj.parameters()):
        torch.testing.assert_close(g, p.grad, rtol=1e-4, atol=1e-6)


def test_byolip_targets_come_from_the_ema_projectors():
    torch.manual_seed(0)
    m = BYOLIP((6, 5), hidden_dim=16, proj_dim=4, momentum=0.9)
    img, txt = _randn(17, 8, 6), _randn(18, 8, 5)
    loss = m.loss(img, txt)
    loss.backward()
    assert all(p.grad is None for p in m.target_projectors.parameters())
    assert all(not p.requires_grad for p in m.target_projectors.parameters())
    # identical at start, so the loss equals SiamLIP's with the same weights
    siam = SiamLIP((6, 5), hidden_dim=16, proj_dim=4)
    siam.load_state_dict({k: v for k, v in m.state_dict().items() if not k.startswith("target_")})
    torch.testing.assert_close(loss, siam.loss(img, txt))

    opt = torch.optim.SGD([p for p in m.parameters() if p.requires_grad], lr=0.5)
    before = [p.detach().clone() for p in m.target_projectors.module.parameters()]
    opt.step()
    m.after_step()
    for t, b, o in zip(m.target_projectors.module.parameters(), before, m.projectors.parameters()):
        torch.testing.assert_close(t, 0.9 * b + 0.1 * o.detach())
    # EMA-model features, when given, are the targets
    tgt = {"image": _randn(19, 8, 6), "text": _randn(20, 8, 5), "image_strong": [], "text_strong": []}
    assert not torch.allclose(m.loss(img, txt, targets=tgt), m.loss(img, txt))


def test_ema_update_follows_the_formula_and_copies_buffers():
    online = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4))
    ema = EMA(online, momentum=0.99)
    start = [p.detach().clone() for p in ema.parameters()]
    with torch.no_grad():
        for p in online.parameters():
            p.add_(torch.randn_like(p))
    online(torch.randn(5, 3))  # changes BN running stats
    ema.update(online)
    for t, s, o in zip(ema.module.parameters(), start, online.parameters()):
        torch.testing.assert_close(t, 0.99 * s + 0.01 * o.detach())
    torch.testing.assert_close(ema.module[1].running_mean, online[1].running_mean)
    with pytest.raises(ValueError, match="momentum"):
        EMA(online, momentum=1.5)
    with pytest.raises(ValueError, match="different parameters"):
        ema.update(nn.Linear(3, 4))


def test_ema_sees_through_torch_compile():
    """The target is the plain module, and a compiled online module updates it (no compile runs:
    torch.compile only wraps the module until its first call)."""
    online = nn.Linear(3, 4)
    ema = EMA(torch.compile(online), momentum=0.5)
    assert type(ema.module) is nn.Linear
    with torch.no_grad():
        online.weight.add_(1.0)
    start = ema.module.weight.detach().clone()
    ema.update(torch.compile(online))
    torch.testing.assert_close(ema.module.weight, 0.5 * start + 0.5 * online.weight.detach())


# ---- SwAV / Sinkhorn ------------------------------------------------------------------------------


def _sinkhorn_reference(scores, eps, iters):
    """SwAV's algorithm in float64 with explicit row/column loops (K prototypes x B samples)."""
    scores = scores.detach()
    b, k = scores.shape
    q = [[math.exp(float(scores[s, p]) / eps) for s in range(b)] for p in range(k)]
    total = sum(map(sum, q))
    q = [[v / total for v in row] for row in q]
    for _ in range(iters):
        q = [[v / sum(row) / k for v in row] for row in q]
        col = [sum(q[p][s] for p in range(k)) for s in range(b)]
        q = [[q[p][s] / col[s] / b for s in range(b)] for p in range(k)]
    return torch.tensor([[q[p][s] * b for p in range(k)] for s in range(b)], dtype=torch.float64)


def test_sinkhorn_marginals_and_reference():
    scores = _unit(21, 8, 5) @ _unit(22, 12, 5).T  # cosine similarities, 8 samples x 12 prototypes
    q = sinkhorn_knopp(scores, epsilon=0.05, n_iters=3)
    torch.testing.assert_close(q.double(), _sinkhorn_reference(scores, 0.05, 3), rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(q.sum(dim=1), torch.ones(8))  # every sample is a full assignment
    # prototype totals approach the uniform B / K: closer than the plain softmax, and tight when run long
    uniform = torch.full((12,), 8 / 12)
    softmax_gap = (torch.softmax(scores / 0.05, dim=1).sum(0) - uniform).abs().max()
    assert (q.sum(0) - uniform).abs().max() < softmax_gap
    q_long = sinkhorn_knopp(scores, epsilon=0.05, n_iters=500)
    torch.testing.assert_close(q_long.sum(0), uniform, atol=1e-3, rtol=0)
    torch.testing.assert_close(q_long.sum(1), torch.ones(8))


def test_swalip_is_swapped_prediction_against_sinkhorn_targets():
    xs = [_unit(23, 6, 4).requires_grad_(True), _unit(24, 6, 4)]
    ys = [_unit(25, 6, 4), _unit(26, 6, 4)]
    got = swalip_loss(xs, ys, torch.tensor(10.0))
    (grad_got,) = torch.autograd.grad(got, xs[0])

    def soft_ce(logits, target):
        return -(target * torch.log_softmax(logits, dim=1)).sum(1).mean()

    want = 0.0
    for a in range(2):
        for c in range(2):
            tgt_img = _sinkhorn_reference(xs[1 - a] @ ys[1 - c].T, 0.05, 3).float()
            tgt_txt = _sinkhorn_reference(ys[1 - a] @ xs[1 - c].T, 0.05, 3).float()
            want += (soft_ce(10.0 * xs[a] @ ys[c].T, tgt_img) + soft_ce(10.0 * ys[a] @ xs[c].T, tgt_txt)) / 2
    torch.testing.assert_close(got, want / 4, rtol=1e-4, atol=1e-5)
    # the Sinkhorn targets are constants: the gradient equals the reference's with fixed targets
    (grad_want,) = torch.autograd.grad(want / 4, xs[0])
    torch.testing.assert_close(grad_got, grad_want, rtol=1e-4, atol=1e-5)
    xs = [x.detach() for x in xs]
    m = SwALIP()
    assert m.weight == 0.2 and not list(m.parameters())
    out = {"image_strong": xs, "text_strong": ys, "logit_scale_strong": torch.tensor(10.0)}
    torch.testing.assert_close(m(out), 0.2 * got)
    with pytest.raises(ValueError, match="exactly 2"):
        swalip_loss(xs[:1], ys[:1], 10.0)


# ---- SimCLR (SLIP) --------------------------------------------------------------------------------


def _nt_xent_reference(a, b, t):
    a, b = F.normalize(a.double(), dim=1), F.normalize(b.double(), dim=1)
    n = a.shape[0]

    def direction(q, other):
        total = 0.0
        for i in range(n):
            pos = math.exp(float(q[i] @ other[i]) / t)
            negs = sum(math.exp(float(q[i] @ other[j]) / t) for j in range(n) if j != i)
            negs += sum(math.exp(float(q[i] @ q[j]) / t) for j in range(n) if j != i)
            total += -math.log(pos / (pos + negs))
        return total / n

    return (direction(a, b) + direction(b, a)) / 2


def test_simclr_matches_explicit_loop():
    a, b = _randn(27, 7, 5), _randn(28, 7, 5)
    assert simclr_loss(a, b, 0.1).item() == pytest.approx(_nt_xent_reference(a, b, 0.1), rel=1e-5)
    assert simclr_loss(a, b, 0.5).item() == pytest.approx(_nt_xent_reference(a, b, 0.5), rel=1e-5)


def test_slip_uses_only_the_two_strong_image_views():
    torch.manual_seed(0)
    m = SLIP(6, weight=0.5, hidden_dim=16, proj_dim=8)
    views = [_randn(29, 8, 6), _randn(30, 8, 6)]
    want = 0.5 * simclr_loss(m.projector(views[0]), m.projector(views[1]), 0.1)
    torch.testing.assert_close(m({"image_strong_pooled": views}), want)
    with pytest.raises(ValueError, match="exactly 2"):
        m.loss(views[:1])
    with pytest.raises(KeyError, match="image_strong_pooled"):
        m({"image_pooled": views[0]})


# ---- registry and the dict interface ------------------------------------------------------------

_SMALL = {
    "barlip": {"hidden_dim": 16, "proj_dim": 8},
    "siamlip": {"hidden_dim": 16, "proj_dim": 4},
    "byolip": {"hidden_dim": 16, "proj_dim": 4},
    "swalip": {},
    "slip": {"hidden_dim": 16, "proj_dim": 8},
}


@pytest.mark.parametrize("name", sorted(SSL_COMPANIONS))
def test_registry_builds_each_companion_and_it_trains(name):
    torch.manual_seed(0)
    m = build_ssl({"name": name, "weight": 0.3, **_SMALL[name]}, (6, 5))
    assert isinstance(m, SSL_COMPANIONS[name]) and m.weight == 0.3
    img_s = [_randn(31, 8, 6).requires_grad_(True), _randn(32, 8, 6).requires_grad_(True)]
    out = {
        "image_pooled": _randn(33, 8, 6),
        "text_pooled": _randn(34, 8, 5),
        "image_strong_pooled": img_s,
        "text_strong_pooled": [_randn(35, 8, 5), _randn(36, 8, 5)],
        "image_strong": [F.normalize(x, dim=1)[:, :4] for x in img_s],
        "text_strong": [_unit(37, 8, 4), _unit(38, 8, 4)],
        "logit_scale_strong": torch.tensor(10.0),
    }
    loss = m(out)
    assert loss.ndim == 0 and torch.isfinite(loss)
    loss.backward()
    trainable = [p for p in m.parameters() if p.requires_grad]
    assert all(p.grad is not None for p in trainable)
    if name != "siamlip" and name != "byolip":  # SimSiam's image term reaches the strong views too
        assert img_s[0].grad is not None and img_s[0].grad.abs().sum() > 0
    m.after_step()


def test_registry_none_and_errors():
    assert build_ssl(None, 8) is None
    assert build_ssl({"name": "none"}, 8) is None
    assert build_ssl({"name": None, "weight": 1.0}, 8) is None
    with pytest.raises(ValueError, match="unknown ssl companion"):
        build_ssl({"name": "dino"}, 8)
    with pytest.raises(ValueError, match="unknown parameter"):
        build_ssl({"name": "barlip", "lambda": 1.0}, 8)
    with pytest.raises(ValueError, match="dim"):
        build_ssl({"name": "slip"}, "big")


# ---- two gloo workers equal one process (batch-level terms) ---------------------------------------


def _cases(t):
    """Loss functions of the tensors ``t`` (each [B, D]); rows are sliced per rank."""
    return {
        "improved": lambda: improved_clip_loss(
            t["x"], t["y"], t["scale"], [t["xa"], t["xb"]], [t["ya"], t["yb"]], t["scale_s"], label_smoothing=0.1
        ),
        "barlow": lambda: barlow_twins_loss(t["x"], t["y"]),
        "swalip": lambda: swalip_loss([t["xa"], t["xb"]], [t["ya"], t["yb"]], t["scale_s"]),
        "simclr": lambda: simclr_loss(t["xa"], t["xb"], 0.1),
    }


_ROWS = ["x", "y", "xa", "xb", "ya", "yb"]


def _run(data, rank, world):
    n = data["x"].shape[0] // world
    results = {}
    for name in _cases(data):
        t = {k: data[k][rank * n : (rank + 1) * n].clone().requires_grad_(True) for k in _ROWS}
        t["scale"] = data["scale"].clone().requires_grad_(True)
        t["scale_s"] = data["scale_s"].clone().requires_grad_(True)
        loss = _cases(t)[name]()
        loss.backward()
        results[name] = {"loss": loss.detach(), **{k: t[k].grad / world for k in _ROWS if t[k].grad is not None}}
        results[name].update(gs=t["scale"].grad, gss=t["scale_s"].grad)
    return results


def _worker(rank, world, port, data_file, out_dir):
    with process_group(rank, world, port):
        torch.save(_run(torch.load(data_file), rank, world), f"{out_dir}/{rank}.pt")


def test_two_workers_equal_one_process(tmp_path):
    data = {k: _unit(40 + i, 8, 6) for i, k in enumerate(_ROWS)}
    data["scale"], data["scale_s"] = torch.tensor(12.0), torch.tensor(9.0)
    torch.save(data, tmp_path / "data.pt")
    mp.spawn(_worker, args=(2, free_port(), str(tmp_path / "data.pt"), str(tmp_path)), nprocs=2)
    ranks = [torch.load(tmp_path / f"{r}.pt") for r in range(2)]
    single = _run(data, 0, 1)
    for name, want in single.items():
        r0, r1 = ranks[0][name], ranks[1][name]
        torch.testing.assert_close((r0["loss"] + r1["loss"]) / 2, want["loss"], msg=name)
        for k in _ROWS:
            if k in want:
                torch.testing.assert_close(torch.cat([r0[k], r1[k]]), want[k], msg=f"{name} d/d{k}")
        for k in ("gs", "gss"):
            if want[k] is not None:
                torch.testing.assert_close((r0[k] + r1[k]) / 2, want[k], msg=f"{name} {k}")


# ---- issue 13: separate companion projectors for the strong views (official --separate-proj-child) ----

def _ssl_outputs(seed=40, b=8, d=6):
    return {"image_pooled": _randn(seed, b, d), "text_pooled": _randn(seed + 1, b, d),
            "image_strong_pooled": [_randn(seed + 2, b, d), _randn(seed + 3, b, d)],
            "text_strong_pooled": [_randn(seed + 4, b, d), _randn(seed + 5, b, d)]}


@pytest.mark.parametrize("name", ["barlip", "siamlip", "byolip"])
def test_separate_projectors_give_the_strong_views_their_own_heads(name):
    torch.manual_seed(0)
    shared = build_ssl({"name": name, **_SMALL[name]}, 6)
    torch.manual_seed(0)
    separate = build_ssl({"name": name, **_SMALL[name], "separate_projectors": True}, 6)
    n_shared = sum(p.numel() for p in shared.parameters() if p.requires_grad)
    n_sep = sum(p.numel() for p in separate.parameters() if p.requires_grad)
    assert n_sep == 2 * n_shared  # one more copy of every projector (and predictor)
    assert not shared.separate_projectors  # the default is off
    out = _ssl_outputs()
    loss = separate(out)
    loss.backward()
    weak = [separate.image_projector, separate.text_projector] if name == "barlip" else \
        [separate.projectors, separate.predictors]
    strong = [separate.image_projector_strong, separate.text_projector_strong] if name == "barlip" else \
        [separate.projectors_strong, separate.predictors_strong]
    for module in weak + strong:  # the weak pair trains the weak heads, the strong pairs the strong ones
        assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in module.parameters())
    # the weak heads see only the weak pair: with the strong views removed their gradients are equal
    weak_grads = [p.grad.clone() for m in weak for p in m.parameters()]
    separate.zero_grad()
    only_weak = {**out, "image_strong_pooled": [], "text_strong_pooled": []}
    n_terms_all = 5 if name == "barlip" else 10  # weak pair + 2x2 strong pairs (x2 directions for SimSiam)
    n_terms_weak = 1 if name == "barlip" else 2
    (separate(only_weak) * n_terms_weak / n_terms_all).backward()
    for g, p in zip(weak_grads, [p for m in weak for p in m.parameters()]):
        torch.testing.assert_close(p.grad, g, rtol=1e-4, atol=1e-6)
    if name == "byolip":  # each head has its own EMA target
        before = [p.clone() for p in separate.target_projectors_strong.parameters()]
        with torch.no_grad():
            for p in separate.projectors_strong.parameters():
                p.add_(1.0)
        separate.after_step()
        moved = [not torch.equal(a, b) for a, b in zip(before, separate.target_projectors_strong.parameters())]
        assert all(moved)


def test_separate_projectors_config_and_refusals():
    from training.recipe_improved import ssl_settings

    name, section, _ = ssl_settings({"ssl": {"name": "barlip", "separate_projectors": True, "barlip": {}}})
    # the section is loss.ssl.barlip (improved.yaml's values) with the flag added when true
    assert section["name"] == "barlip" and section["separate_projectors"] is True
    _, section, _ = ssl_settings({"ssl": {"name": "barlip", "separate_projectors": False, "barlip": {}}})
    assert section["name"] == "barlip" and "separate_projectors" not in section
    for other in ("swalip", "slip"):
        with pytest.raises(ValueError, match="separate_projectors applies to barlip, siamlip, byolip"):
            ssl_settings({"ssl": {"name": other, "separate_projectors": True}})
