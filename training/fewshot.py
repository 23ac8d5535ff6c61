"""Few-shot linear probes on frozen features (SPEC section 4, DiHT section 4).

* **Zero-shot-initialised projected probe**: logits = s * x^T (W0 + W) + b, with W0 the
  zero-shot classifier (rows: prompt-averaged, normalised class text embeddings), s the fixed
  logit scale (100 as in CLIP; a re-parametrisation of the SPEC's x^T (W0 + W) + b) and the
  learned deviation W and bias b kept in Frobenius balls ||W|| <= delta, ||b|| <= delta_b by
  projected gradient descent (after every optimiser step W and b are rescaled back into their
  balls). delta = 0, delta_b = 0 is exactly zero-shot. In the k-shot sweep the radii are chosen
  *within the k shots* by stratified cross-validation over them (``cv_folds`` folds; every
  candidate (delta, delta_b) of the grid, including (0, 0) = zero-shot, is trained on the other
  folds and scored on the held-out one; ties go to the smaller radii), then the chosen radii are
  refitted on all k shots. So a "k-shot" result uses exactly k labels per class, and the chosen
  probe is never worse than zero-shot on its own cross-validation.
* **From-scratch baseline**: logits = x^T W + b, W from zero, CE + weight_decay * ||W||^2,
  the weight decay chosen the same way (cross-validation over the k shots).

All probes of one grid (radii pairs, or weight decays) train at once as a batch of independent
probes (Adam is per-coordinate, so summing their losses gives each probe its own update).
:func:`fewshot_sweep` runs the k-shot sweep (k-shot training set and a validation set drawn per
seed from the training pool, radii / decay chosen by cross-validation within them, accuracy
on the test split) and :func:`format_fewshot_table` prints it.
"""

from __future__ import annotations

import contextlib
import itertools
import math

from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F

if TYPE_CHECKING:
    from training.eval_settings import FewshotSettings, LinearProbeSettings

# The settings are the ``eval.fewshot`` section (configs/eval/default.yaml) as a
# training.eval_settings.FewshotSettings view; the YAML holds their defaults.


def project_to_ball_(t: torch.Tensor, radius: torch.Tensor) -> None:
    """In place: rescale each ``t[g]`` to Frobenius norm <= ``radius[g]`` (leading dim = probe)."""
    norms = t.flatten(1).norm(dim=1)
    factor = torch.where(norms > radius, radius / norms.clamp_min(1e-12), torch.ones_like(norms))
    t.mul_(factor.view(-1, *([1] * (t.dim() - 1))))


def projected_logits(x, w0, W, b, logit_scale: float) -> torch.Tensor:
    """[G, N, C] logits of G probes: s * x (W0 + W_g)^T + b_g."""
    return logit_scale * torch.einsum("nd,gcd->gnc", x, w0.unsqueeze(0) + W) + b.unsqueeze(1)


def train_projected_probes(x, y, w0, deltas, delta_bs, logit_scale=100.0, steps=200, lr=1e-2,
                           num_threads=1, mask=None):
    """Train one projected probe per (deltas[g], delta_bs[g]); returns W [G, C, D], b [G, C].

    ``mask`` [G, N] (0/1): the samples each probe trains on (all when None); a probe with none
    stays at W = 0, b = 0 (zero-shot)."""
    with torch_threads(num_threads):
        return _train_projected(x, y, w0, deltas, delta_bs, logit_scale, steps, lr, mask)


def _masked_mean_ce(logits, y, mask):
    """Per-probe mean CE over its masked samples, summed over probes (independent under Adam)."""
    G, N, C = logits.shape
    ce = F.cross_entropy(logits.reshape(-1, C), y.repeat(G), reduction="none").view(G, N)
    if mask is None:
        return ce.mean(1)
    return (ce * mask).sum(1) / mask.sum(1).clamp_min(1.0)


def _train_projected(x, y, w0, deltas, delta_bs, logit_scale, steps, lr, mask=None):
    x, w0 = x.float(), w0.float()
    deltas = torch.as_tensor(deltas, dtype=torch.float32)
    delta_bs = torch.as_tensor(delta_bs, dtype=torch.float32)
    G, (C, D) = len(deltas), w0.shape
    W = torch.zeros(G, C, D, requires_grad=True)
    b = torch.zeros(G, C, requires_grad=True)
    opt = torch.optim.Adam([W, b], lr=lr)
    mask = None if mask is None else torch.as_tensor(mask, dtype=torch.float32)
    for _ in range(steps):
        logits = projected_logits(x, w0, W, b, logit_scale)
        loss = _masked_mean_ce(logits, y, mask).sum()
        opt.zero_grad()
        loss.backward()
        opt.step()
        with torch.no_grad():
            project_to_ball_(W, deltas)
            project_to_ball_(b, delta_bs)
    return W.detach(), b.detach()


def scratch_logits(x, W, b) -> torch.Tensor:
    return torch.einsum("nd,gcd->gnc", x, W) + b.unsqueeze(1)


def train_scratch_probes(x, y, num_classes, weight_decays, steps=200, lr=1e-2, num_threads=1, mask=None):
    """Train one from-scratch probe per weight decay; returns W [G, C, D], b [G, C] (``mask``
    as in :func:`train_projected_probes`)."""
    with torch_threads(num_threads):
        return _train_scratch(x, y, num_classes, weight_decays, steps, lr, mask)


def _train_scratch(x, y, num_classes, weight_decays, steps, lr, mask=None):
    x = x.float()
    wd = torch.as_tensor(weight_decays, dtype=torch.float32)
    G, D = len(wd), x.shape[1]
    W = torch.zeros(G, num_classes, D, requires_grad=True)
    b = torch.zeros(G, num_classes, requires_grad=True)
    opt = torch.optim.Adam([W, b], lr=lr)
    mask = None if mask is None else torch.as_tensor(mask, dtype=torch.float32)
    for _ in range(steps):
        logits = scratch_logits(x, W, b)
        loss = _masked_mean_ce(logits, y, mask) + wd * W.pow(2).flatten(1).sum(1)
        opt.zero_grad()
        loss.sum().backward()
        opt.step()
    return W.detach(), b.detach()


def accuracy(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Top-1 accuracy per probe of [G, N, C] logits (or [N, C] -> scalar)."""
    return (logits.argmax(-1) == y).float().mean(-1)


def _pick(val_acc: torch.Tensor, order: list[int]) -> int:
    """Index of the best validation accuracy; ties go to the earliest in ``order``."""
    best = val_acc.max()
    return next(i for i in order if val_acc[i] >= best - 1e-9)


def projected_probe(train_x, train_y, val_x, val_y, w0, cfg: FewshotSettings) -> dict:
    """Fit the projected-probe grid, choose the radii on validation; returns a dict with the
    chosen ``delta``, ``delta_b``, ``val_acc`` and a ``predict(x) -> logits`` callable."""
    w0 = F.normalize(w0.float(), dim=-1)
    w0_norm = w0.norm().item()
    grid = list(itertools.product(cfg.delta_rel, cfg.delta_b))
    deltas = [r * w0_norm for r, _ in grid]
    W, b = train_projected_probes(train_x, train_y, w0, deltas, [db for _, db in grid],
                                  cfg.logit_scale, cfg.steps, cfg.lr_projected, cfg.num_threads)
    val_acc = accuracy(projected_logits(val_x.float(), w0, W, b, cfg.logit_scale), val_y)
    order = sorted(range(len(grid)), key=lambda g: (grid[g][0] + grid[g][1], grid[g]))
    g = _pick(val_acc, order)
    Wg, bg = W[g:g + 1], b[g:g + 1]
    return {"delta": deltas[g], "delta_rel": grid[g][0], "delta_b": grid[g][1],
            "val_acc": val_acc[g].item(),
            "predict": lambda x: projected_logits(x.float(), w0, Wg, bg, cfg.logit_scale)[0]}


def scratch_probe(train_x, train_y, val_x, val_y, num_classes, cfg: LinearProbeSettings) -> dict:
    """Fit the from-scratch grid (``cfg``: the ``eval.linear_probe`` settings), choose the weight
    decay on validation (ties: larger decay)."""
    wds = list(cfg.weight_decay)
    W, b = train_scratch_probes(train_x, train_y, num_classes, wds, cfg.steps, cfg.lr, cfg.num_threads)
    val_acc = accuracy(scratch_logits(val_x.float(), W, b), val_y)
    g = _pick(val_acc, sorted(range(len(wds)), key=lambda i: -wds[i]))
    Wg, bg = W[g:g + 1], b[g:g + 1]
    return {"weight_decay": wds[g], "val_acc": val_acc[g].item(),
            "predict": lambda x: scratch_logits(x.float(), Wg, bg)[0]}


def cv_fold_ids(y: torch.Tensor, n_folds: int, seed: int = 0) -> torch.Tensor:
    """A fold id in ``[0, F)`` per sample, F = min(n_folds, N), stratified: each class's samples
    (in a seeded random order) take consecutive folds, continuing where the previous class
    stopped, so every fold holds about N / F samples and classes spread over the folds."""
    n = len(y)
    folds = max(1, min(int(n_folds), n))
    gen = torch.Generator().manual_seed(seed)
    ids = torch.empty(n, dtype=torch.long)
    nxt = 0
    for c in torch.unique(y).tolist():
        idx = torch.nonzero(y == c).flatten()
        idx = idx[torch.randperm(len(idx), generator=gen)]
        for i in idx.tolist():
            ids[i] = nxt % folds
            nxt += 1
    return ids


def _cv_masks(fold_ids: torch.Tensor, grid_size: int) -> tuple[torch.Tensor, int]:
    """Training masks [F * grid_size, N] (fold-major) and F."""
    folds = int(fold_ids.max()) + 1
    train = torch.stack([(fold_ids != f).float() for f in range(folds)])  # [F, N]
    return train.repeat_interleave(grid_size, dim=0), folds


def _cv_accuracy(logits: torch.Tensor, y: torch.Tensor, fold_ids: torch.Tensor, folds: int,
                 grid_size: int) -> torch.Tensor:
    """Cross-validated accuracy per grid entry: each sample scored by the probe of its held-out
    fold. ``logits`` [F * grid_size, N, C] (fold-major)."""
    correct = (logits.argmax(-1) == y).view(folds, grid_size, -1)  # [F, G, N]
    held_out = torch.stack([fold_ids == f for f in range(folds)])  # [F, N]
    return (correct & held_out[:, None, :]).sum((0, 2)).float() / len(y)


def projected_probe_cv(x, y, w0, cfg: FewshotSettings, cv_seed: int = 0) -> dict:
    """The projected probe with its radii chosen by cross-validation within ``(x, y)`` (the k
    shots), then refitted on all of them. Returns ``delta``, ``delta_rel``, ``delta_b``,
    ``cv_acc`` (of the chosen radii), ``cv_acc_zeroshot`` (of radii 0, i.e. zero-shot, which is
    always a candidate: ``cv_acc >= cv_acc_zeroshot``) and ``predict(x) -> logits``. ``cv_seed``
    seeds the folds."""
    y = y.long()
    w0 = F.normalize(w0.float(), dim=-1)
    w0_norm = w0.norm().item()
    grid = list(itertools.product(cfg.delta_rel, cfg.delta_b))
    if (0.0, 0.0) not in grid:
        grid.append((0.0, 0.0))  # zero-shot is always a candidate
    deltas = [r * w0_norm for r, _ in grid]
    delta_bs = [db for _, db in grid]
    fold_ids = cv_fold_ids(y, cfg.cv_folds, seed=cv_seed)
    masks, folds = _cv_masks(fold_ids, len(grid))
    if folds < 2:  # one labelled sample: nothing to validate on, keep zero-shot
        g = grid.index((0.0, 0.0))
        cv = torch.zeros(len(grid))
    else:
        W, b = train_projected_probes(x, y, w0, deltas * folds, delta_bs * folds, cfg.logit_scale,
                                      cfg.steps, cfg.lr_projected, cfg.num_threads, mask=masks)
        cv = _cv_accuracy(projected_logits(x.float(), w0, W, b, cfg.logit_scale), y, fold_ids, folds, len(grid))
        order = sorted(range(len(grid)), key=lambda i: (grid[i][0] + grid[i][1], grid[i]))
        g = _pick(cv, order)
    Wg, bg = train_projected_probes(x, y, w0, [deltas[g]], [delta_bs[g]], cfg.logit_scale, cfg.steps,
                                    cfg.lr_projected, cfg.num_threads)
    return {"delta": deltas[g], "delta_rel": grid[g][0], "delta_b": grid[g][1],
            "cv_acc": cv[g].item(), "cv_acc_zeroshot": cv[grid.index((0.0, 0.0))].item(),
            "predict": lambda z: projected_logits(z.float(), w0, Wg, bg, cfg.logit_scale)[0]}


def scratch_probe_cv(x, y, num_classes, cfg: FewshotSettings, cv_seed: int = 0) -> dict:
    """The from-scratch probe with its weight decay chosen by cross-validation within ``(x, y)``
    (ties: larger decay), refitted on all of them."""
    y = y.long()
    wds = list(cfg.weight_decay)
    fold_ids = cv_fold_ids(y, cfg.cv_folds, seed=cv_seed)
    masks, folds = _cv_masks(fold_ids, len(wds))
    order = sorted(range(len(wds)), key=lambda i: -wds[i])
    if folds < 2:
        g, cv = order[0], torch.zeros(len(wds))
    else:
        W, b = train_scratch_probes(x, y, num_classes, wds * folds, cfg.steps, cfg.lr_scratch,
                                    cfg.num_threads, mask=masks)
        cv = _cv_accuracy(scratch_logits(x.float(), W, b), y, fold_ids, folds, len(wds))
        g = _pick(cv, order)
    Wg, bg = train_scratch_probes(x, y, num_classes, [wds[g]], cfg.steps, cfg.lr_scratch, cfg.num_threads)
    return {"weight_decay": wds[g], "cv_acc": cv[g].item(),
            "predict": lambda z: scratch_logits(z.float(), Wg, bg)[0]}


def sample_shots(labels: torch.Tensor, k: int, seed: int) -> torch.Tensor:
    """Per class: k training indices (the only labels a k-shot probe sees)."""
    gen = torch.Generator().manual_seed(seed)
    train_idx = []
    for c in torch.unique(labels).tolist():
        idx = torch.nonzero(labels == c).flatten()
        idx = idx[torch.randperm(len(idx), generator=gen)]
        if len(idx) < k:
            raise ValueError(f"class {c} has {len(idx)} training samples; {k}-shot needs at least {k}")
        train_idx.append(idx[:k])
    return torch.cat(train_idx)


def fewshot_sweep(train_x, train_y, test_x, test_y, w0, cfg: FewshotSettings) -> dict:
    """The k-shot sweep: zero-shot, projected probe and from-scratch probe test accuracy (mean
    and std over seeds) for every k in ``cfg.shots`` (``cfg``: the ``eval.fewshot`` settings)."""
    with torch_threads(cfg.num_threads):
        return _sweep(train_x, train_y.long(), test_x, test_y.long(), w0, cfg)


@contextlib.contextmanager
def torch_threads(n):
    """Tiny full-batch problems: one thread is fastest (and kind to a shared machine)."""
    old = torch.get_num_threads()
    if n:
        torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(old)


def _sweep(train_x, train_y, test_x, test_y, w0, cfg):
    num_classes = w0.shape[0]
    zs = accuracy(F.normalize(test_x.float(), dim=-1) @ F.normalize(w0.float(), dim=-1).T, test_y).item()
    rows = []
    for k in cfg.shots:
        proj, scratch, radii, decays = [], [], [], []
        for seed in cfg.seeds:
            tr = sample_shots(train_y, k, seed)  # k labels per class, nothing else
            p = projected_probe_cv(train_x[tr], train_y[tr], w0, cfg, cv_seed=seed)
            s = scratch_probe_cv(train_x[tr], train_y[tr], num_classes, cfg, cv_seed=seed)
            proj.append(accuracy(p["predict"](test_x), test_y).item())
            scratch.append(accuracy(s["predict"](test_x), test_y).item())
            radii.append((p["delta_rel"], p["delta_b"]))
            decays.append(s["weight_decay"])
        rows.append({"k": k, "zeroshot": zs, "projected": _mean(proj), "projected_std": _std(proj),
                     "scratch": _mean(scratch), "scratch_std": _std(scratch),
                     "projected_per_seed": proj, "scratch_per_seed": scratch,
                     "chosen_radii": radii, "chosen_weight_decay": decays, "labels_per_class": k})
    return {"zeroshot": zs, "rows": rows, "seeds": list(cfg.seeds)}


def _mean(v):
    return sum(v) / len(v)


def _std(v):
    m = _mean(v)
    return math.sqrt(sum((a - m) ** 2 for a in v) / len(v))


def format_fewshot_table(result: dict, title: str = "") -> str:
    lines = [title] if title else []
    lines.append(f"{'k':>3}  {'zero-shot':>9}  {'projected':>15}  {'scratch':>15}   (top-1 %, "
                 f"mean +- std over {len(result['seeds'])} seeds)")
    for r in result["rows"]:
        lines.append(f"{r['k']:>3}  {100 * r['zeroshot']:>9.1f}  "
                     f"{100 * r['projected']:>8.1f} +- {100 * r['projected_std']:<4.1f}  "
                     f"{100 * r['scratch']:>8.1f} +- {100 * r['scratch_std']:<4.1f}")
    return "\n".join(lines)
