"""The demo is learnable: the default tiny model, trained briefly on curated-like demo pairs with
the default hyperparameters, classifies the held-out demo objects well above chance.

No Ray: the pairs come from :mod:`curation.demo_data` filtered by the real C and A scorer (the
T filter is approximated by dropping the pairs whose caption is drawn on the image), and the
model, loss, optimizer, transforms and zero-shot evaluation are the project's own units.
"""

from __future__ import annotations

import io
import random

import torch
from PIL import Image

from curation.caption_filters import CaptionFilterConfig, CaptionScorer
from curation.demo_data import OBJECTS, caption_objects, demo_samples
from training.embedder import ClipEmbedder
from training.eval_data import demo_dataset
from training.evaluate import evaluate_dataset
from training.losses.clip import clip_loss
from training.model import ClipModel, create_clip, image_transform, preprocess_config, tokenizer
from training.optim import build_optimizer, build_scheduler
from training.train import build_train_config

NUM_PAIRS = 1000  # generated demo pairs before filtering (~460 pass C, A and the caption-on-image check)
STEPS = 200
EVAL_CFG = {"batch_size": 100, "zeroshot": True, "retrieval": False,
            "linear_probe": {"enabled": False}, "fewshot": {"enabled": False}}


def curated_like_pairs(num: int, seed: int = 0) -> list[tuple[bytes, str]]:
    """(image bytes, caption) of the generated demo pairs that pass the default C and A filters,
    minus the ones whose own caption is written on the image (what the T filter drops)."""
    samples = [s for s in demo_samples(num, seed) if s["kind"] in ("no_text", "unrelated_text")]
    captions = [s["caption"] for s in samples]
    scores = CaptionScorer(CaptionFilterConfig.defaults()).score(captions)
    return [(s["image"], c) for s, c, pc, pa in zip(samples, captions, scores.passed_complexity,
                                                   scores.passed_action) if pc and pa]


def zeroshot_acc1(model: ClipModel, arch: str, cache_dir) -> float:
    embedder = ClipEmbedder(model, arch)
    dataset = demo_dataset(str(cache_dir), num_train=10, num_test=200)
    return evaluate_dataset(embedder, dataset, EVAL_CFG, log=lambda *_: None)["zeroshot"]["clip"]["acc1"]


def test_curated_demo_pairs_mostly_name_an_object():
    pairs = curated_like_pairs(200)
    with_object = [c for _, c in pairs if caption_objects(c)]
    assert len(pairs) >= 60
    assert len(with_object) >= 0.8 * len(pairs)
    assert {caption_objects(c)[0][0] for c in with_object} == set(OBJECTS)


def train_and_evaluate(tmp_path) -> dict:
    """Train the default model briefly in this process; the numbers the test checks."""
    cfg = build_train_config()
    torch.manual_seed(0)
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        arch, tcfg = cfg["model"]["arch"], cfg["train"]
        pairs = curated_like_pairs(NUM_PAIRS)
        assert len(pairs) >= 300
        train_tf = image_transform(arch, is_train=True, aug_cfg=cfg["data"].get("aug_cfg") or None)
        side = preprocess_config(arch)["image_size"]
        side = max(side) if isinstance(side, (tuple, list)) else int(side)
        images = []
        for data, _ in pairs:  # decode once, at twice the model's size (as the data path's draft mode)
            im = Image.open(io.BytesIO(data)).convert("RGB")
            f = 2 * side / min(im.size)
            images.append(im.resize((max(1, round(im.width * f)), max(1, round(im.height * f))), Image.BICUBIC))
        tokens = tokenizer(arch)([c for _, c in pairs])

        model = ClipModel(create_clip(arch), arch)
        before = zeroshot_acc1(model, arch, tmp_path)
        batch = min(int(tcfg["batch_size"]), len(pairs))
        optimizer = build_optimizer(model, tcfg)
        warmup = tcfg["warmup_steps"] if tcfg.get("warmup_steps") is not None else max(1, STEPS // 20)
        scheduler = build_scheduler(optimizer, min(int(warmup), STEPS), STEPS, float(tcfg["min_lr_ratio"]))
        order, rng = [], random.Random(0)
        model.train()
        losses = []
        for _ in range(STEPS):
            if len(order) < batch:
                order = list(range(len(pairs)))
                rng.shuffle(order)
            idx, order = order[:batch], order[batch:]
            out = model({"image": torch.stack([train_tf(images[i]) for i in idx]), "text": tokens[idx]})
            loss = clip_loss(out["image"], out["text"], out["logit_scale"],
                             float(cfg["loss"]["label_smoothing"]))
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            if tcfg.get("grad_clip_norm"):
                torch.nn.utils.clip_grad_norm_(model.parameters(), float(tcfg["grad_clip_norm"]))
            optimizer.step()
            scheduler.step()
            model.clamp_logit_scale()
            losses.append(float(loss))
        after = zeroshot_acc1(model, arch, tmp_path)
    finally:
        torch.set_num_threads(threads)
    return {"before": before, "after": after, "first_losses": losses[:10], "last_losses": losses[-10:]}


def test_default_tiny_model_learns_the_demo(tmp_path):
    """Run in a fresh interpreter: the suite's process carries torch thread settings and a live
    Ray from earlier tests, which made this CPU-bound loop many times slower."""
    import json
    import subprocess
    import sys
    from pathlib import Path

    code = ("import json, sys; sys.path.insert(0, sys.argv[1]); import test_demo_learns as t; "
            "print('RESULT ' + json.dumps(t.train_and_evaluate(sys.argv[2])))")
    here = Path(__file__).resolve().parent
    proc = subprocess.run([sys.executable, "-c", code, str(here), str(tmp_path)], cwd=here.parent,
                          capture_output=True, text=True, timeout=800)
    assert proc.returncode == 0, proc.stderr[-3000:]
    line = next(ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT "))
    r = json.loads(line[len("RESULT "):])
    chance = 1 / len(OBJECTS)
    print(f"demo zero-shot acc1: {r['before']:.3f} untrained -> {r['after']:.3f} trained")
    assert sum(r["last_losses"]) < sum(r["first_losses"])
    assert r["after"] >= 2 * chance, r  # 10 classes: chance is 0.10
    assert r["after"] >= r["before"] + 0.08, r
