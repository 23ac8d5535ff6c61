"""Concept labels for DiHT's concept distillation (SPEC section 2): the pure units.

Stage 1 of the distillation, computed once and offline:

1. parse each caption into *objects* (noun-phrase heads) and *attributes* (adjective and number
   modifiers of an object, predicate adjectives) with the definitions of the curation's
   scene-graph parser (:mod:`curation.common.nlp`), as lemmatised lowercase names;
2. build the object and attribute vocabularies (the most frequent names, by the number of
   captions that mention them, above a minimum count);
3. embed every image with a frozen teacher (an open_clip model from a local checkpoint, or a
   timm model from a local weights file; never a download);
4. fit one linear classifier per vocabulary on the teacher features. The labels are multi-label
   (a caption names several objects); the classifier is a **softmax** classifier trained with
   soft cross-entropy against the normalised multi-hot label vector (each of a caption's ``m``
   concepts gets target ``1/m``). Its output is a distribution over the vocabulary, so any
   top-k of it sums to at most 1, exactly what the student's soft cross-entropy consumes;
5. keep each image's top-k (concept id, probability), sorted by probability.

Everything here works without Ray; ``pipelines/label_concepts.py`` wires the batch stages
(:class:`CuratedShardReader`, :class:`ConceptParseStage`, :class:`TeacherEmbedStage`,
:func:`predict_top_k_batch`) into a Ray Data job.
"""

from __future__ import annotations

import hashlib
import io
import os
import posixpath
from collections import Counter
from dataclasses import dataclass, field, replace
from typing import Iterable, Iterator, Mapping, Sequence

import numpy as np
import pyarrow as pa

from curation.common.nlp import ATTRIBUTE_DEPS, is_object, subjects
from curation.common.config import ConfigError
from curation.images import IMAGE_EXTENSIONS, decode_rgb
from training.concept_settings import TeacherSettings, teacher_settings

# spaCy components the concept parser reads: POS, dependencies and lemmas.
CONCEPT_COMPONENTS = ("tok2vec", "tagger", "attribute_ruler", "parser", "lemmatizer")

# --- 1. captions -> concepts -------------------------------------------------------------------


def concept_name(tok) -> str:
    """Lemmatised lowercase name of a token ("Dogs" -> "dog"); the text when no lemma."""
    return (tok.lemma_ or tok.text).strip().lower()


def _valid(name: str) -> bool:
    return bool(name) and any(ch.isalnum() for ch in name)


def caption_concepts(doc) -> tuple[list[str], list[str]]:
    """``(objects, attributes)`` of one parsed caption, each unique, in order of appearance.

    The definitions are the curation parser's (:func:`curation.caption_filters.scene_graph_edges`):
    objects are noun-phrase heads (NOUN/PROPN that are not compound modifiers); attributes are
    ``amod``/``nummod`` children of an object, and predicate adjectives ("the car is red") of a
    copula whose subject is an object.
    """
    objects: list[str] = []
    attributes: list[str] = []
    for tok in doc:
        if is_object(tok):
            objects.append(concept_name(tok))
            attributes.extend(concept_name(c) for c in tok.children if c.dep_ in ATTRIBUTE_DEPS)
        if tok.dep_ == "acomp" and tok.pos_ == "ADJ" and subjects(tok.head):
            attributes.append(concept_name(tok))
    uniq = lambda names: [n for n in dict.fromkeys(names) if _valid(n)]  # noqa: E731
    return uniq(objects), uniq(attributes)


def parse_concepts(docs: Iterable) -> list[tuple[list[str], list[str]]]:
    """``(objects, attributes)`` per parsed caption (see :func:`caption_concepts`)."""
    return [caption_concepts(doc) for doc in docs]


class ConceptParser:
    """Parses lists of captions with one spaCy pipeline, loaded once (with the lemmatizer)."""

    def __init__(self, model: str = "en_core_web_sm", batch_size: int = 256, nlp=None):
        from curation.common.nlp import load_english

        self.batch_size = int(batch_size)
        self.nlp = nlp if nlp is not None else load_english(model, CONCEPT_COMPONENTS)

    def __call__(self, captions: Sequence[str | None]) -> list[tuple[list[str], list[str]]]:
        idx = [i for i, c in enumerate(captions) if c and c.strip()]
        out: list[tuple[list[str], list[str]]] = [([], []) for _ in captions]
        docs = self.nlp.pipe((captions[i] for i in idx), batch_size=self.batch_size)
        for i, concepts in zip(idx, parse_concepts(docs)):
            out[i] = concepts
        return out


# --- 2. vocabularies ---------------------------------------------------------------------------


def count_concepts(concept_lists: Iterable[Iterable[str]]) -> Counter:
    """Number of captions that mention each concept (each caption counts a concept once)."""
    counts: Counter = Counter()
    for names in concept_lists:
        counts.update(set(names))
    return counts


def build_vocab(counts: dict, size: int | None, min_count: int = 1) -> list[str]:
    """The ``size`` most frequent names with a count >= ``min_count``, most frequent first
    (ties by name); ``size`` None or 0 keeps every name that reaches ``min_count``."""
    if size is not None and size < 0:
        raise ValueError(f"vocabulary size must be >= 0 or null, not {size}")
    names = sorted((n for n, c in counts.items() if c >= min_count), key=lambda n: (-counts[n], n))
    return names[:size] if size else names


def label_ids(names: Iterable[str], index: dict[str, int]) -> list[int]:
    """Vocabulary ids of the names that are in the vocabulary (others are dropped)."""
    return [index[n] for n in names if n in index]


def soft_targets(label_sets: Sequence[Sequence[int]], num_classes: int) -> np.ndarray:
    """Normalised multi-hot rows: each of a sample's ``m`` labels gets ``1/m`` (rows sum to 1)."""
    t = np.zeros((len(label_sets), num_classes), np.float32)
    for i, ids in enumerate(label_sets):
        ids = sorted(set(int(j) for j in ids))
        if ids:
            t[i, ids] = 1.0 / len(ids)
    return t


# --- 3. linear classifiers on teacher features ---------------------------------------------------


@dataclass
class LinearClassifier:
    """Softmax classifier over standardised features: ``softmax(((x - mean) / scale) W^T + b)``."""

    weight: np.ndarray  # [V, D] float32
    bias: np.ndarray    # [V]
    mean: np.ndarray    # [D]
    scale: np.ndarray   # [D]
    info: dict = field(default_factory=dict)

    @property
    def num_classes(self) -> int:
        return int(self.weight.shape[0])

    def logits(self, features) -> "np.ndarray":
        x = (np.asarray(features, np.float32) - self.mean) / self.scale
        return x @ self.weight.T + self.bias

    def predict_proba(self, features) -> np.ndarray:
        z = self.logits(features)
        z = z - z.max(axis=1, keepdims=True)
        e = np.exp(z)
        return (e / e.sum(axis=1, keepdims=True)).astype(np.float32)

    def to_dict(self) -> dict:
        return {"weight": self.weight, "bias": self.bias, "mean": self.mean, "scale": self.scale,
                "info": self.info}

    @classmethod
    def from_dict(cls, d: dict) -> "LinearClassifier":
        return cls(**d)


def fit_linear_classifier(features, label_sets: Sequence[Sequence[int]], num_classes: int, *,
                          epochs: int = 100, lr: float = 0.01, weight_decay: float = 1e-4,
                          batch_size: int = 4096, seed: int = 0,
                          device: str = "cpu") -> LinearClassifier:
    """Fit a softmax linear classifier with soft cross-entropy against normalised multi-hot targets.

    ``features`` is [N, D]; ``label_sets[i]`` the vocabulary ids of sample i (samples without any
    label are left out of the fit). Features are standardised with the fit set's mean and standard
    deviation (kept in the classifier). AdamW on mini-batches (full batch when N <= batch_size),
    cosine learning rate, zero-initialised weights and a seeded shuffle, so the fit is
    deterministic on a given device. The problem is convex; ``epochs`` only bounds the work.
    """
    import torch

    x = np.asarray(features, np.float32)
    if x.ndim != 2 or len(x) != len(label_sets):
        raise ValueError(f"features must be [N, D] with one label set per row; got {x.shape} and "
                         f"{len(label_sets)} label sets")
    if num_classes < 1:
        raise ValueError("cannot fit a classifier over an empty vocabulary")
    keep = [i for i, ids in enumerate(label_sets) if len(ids)]
    if not keep:
        raise ValueError("no sample has a label in the vocabulary: nothing to fit")
    bad = [j for i in keep for j in label_sets[i] if not 0 <= int(j) < num_classes]
    if bad:
        raise ValueError(f"label ids out of range [0, {num_classes}): {sorted(set(bad))[:5]}")
    x = x[keep]
    targets = soft_targets([label_sets[i] for i in keep], num_classes)
    mean = x.mean(axis=0)
    scale = x.std(axis=0)
    scale = np.where(scale > 1e-6, scale, 1.0).astype(np.float32)

    dev = torch.device(device)
    xt = torch.from_numpy((x - mean) / scale).to(dev)
    tt = torch.from_numpy(targets).to(dev)
    n, d = xt.shape
    lin = torch.nn.Linear(d, num_classes).to(dev)
    torch.nn.init.zeros_(lin.weight)
    torch.nn.init.zeros_(lin.bias)
    opt = torch.optim.AdamW(lin.parameters(), lr=lr, weight_decay=weight_decay)
    bs = min(int(batch_size), n)
    steps_per_epoch = (n + bs - 1) // bs
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, max(1, epochs * steps_per_epoch))
    gen = torch.Generator().manual_seed(seed)
    first = last = None
    for _epoch in range(int(epochs)):
        order = torch.randperm(n, generator=gen).to(dev) if bs < n else torch.arange(n, device=dev)
        total = 0.0
        for s in range(0, n, bs):
            idx = order[s:s + bs]
            logp = torch.log_softmax(lin(xt[idx]), dim=1)
            loss = -(tt[idx] * logp).sum(dim=1).mean()
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            total += float(loss.detach()) * len(idx)
        last = total / n
        first = last if first is None else first
    with torch.no_grad():
        pred = lin(xt).argmax(dim=1).cpu().numpy()
    hit = float(np.mean(targets[np.arange(n), pred] > 0))
    info = {"fit_samples": int(n), "epochs": int(epochs), "first_epoch_loss": first,
            "final_loss": last, "train_top1_in_labels": hit}
    return LinearClassifier(lin.weight.detach().cpu().numpy().astype(np.float32),
                            lin.bias.detach().cpu().numpy().astype(np.float32),
                            mean.astype(np.float32), scale, info)


def top_k(probs, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Per row, the ``min(k, V)`` largest probabilities (sorted descending) and their ids."""
    import torch

    p = torch.as_tensor(np.asarray(probs, np.float32))
    if p.ndim != 2:
        raise ValueError(f"probs must be [N, V], not {tuple(p.shape)}")
    if k < 1:
        raise ValueError(f"top_k must be >= 1, not {k}")
    values, ids = torch.topk(p, min(int(k), p.shape[1]), dim=1, largest=True, sorted=True)
    return ids.numpy().astype(np.int32), values.numpy().astype(np.float32)


def key_fraction_mask(keys: Sequence[str], fraction: float, seed: int = 0) -> np.ndarray:
    """A reproducible subsample: key kept when hash(seed, key) falls below ``fraction``.

    Independent of the order and partitioning of the data, so every Ray worker agrees.
    """
    if fraction >= 1.0:
        return np.ones(len(keys), bool)
    out = np.empty(len(keys), bool)
    for i, key in enumerate(keys):
        h = hashlib.blake2b(f"{seed}:{key}".encode(), digest_size=8).digest()
        out[i] = int.from_bytes(h, "big") / 2.0**64 < fraction
    return out


# --- 4. teachers -------------------------------------------------------------------------------


class TeacherError(ValueError):
    """A teacher config that cannot be loaded without a download."""


@dataclass
class Teacher:
    """A frozen image encoder: ``preprocess`` (PIL -> tensor) and ``encode`` (batch -> [B, D])."""

    model: object
    preprocess: object
    kind: str
    description: dict
    device: str = "cpu"

    def encode(self, images) -> np.ndarray:
        import torch

        with torch.no_grad():
            x = images.to(self.device, dtype=next(self.model.parameters()).dtype)
            if self.kind == "open_clip":
                f = self.model.encode_image(x, normalize=True)
            else:
                f = self.model(x)
        return f.float().cpu().numpy()


def _require_file(path, what: str) -> str:
    if not path:
        raise TeacherError(f"teacher.{what} is required: a local file (nothing is downloaded)")
    path = os.path.expanduser(str(path))
    if not os.path.isfile(path):
        raise TeacherError(f"teacher.{what} is not a local file: {path}")
    return path


def load_state_dict_file(path: str) -> dict:
    """A state_dict from a ``.safetensors``/``.pt``/``.pth``/``.bin`` file; unwraps the usual
    ``{"state_dict": ...}``/``{"model": ...}`` wrappers and a DDP ``module.`` prefix."""
    import torch

    if path.endswith(".safetensors"):
        from safetensors.torch import load_file

        sd = load_file(path, device="cpu")
    else:
        import pickle

        try:  # tensors and plain containers only: a crafted pickle is refused, never run
            sd = torch.load(path, map_location="cpu", weights_only=True)
        except pickle.UnpicklingError as exc:
            raise TeacherError(f"refusing to load {path}: it holds objects other than tensors and plain "
                               f"containers (read with weights_only=True): {str(exc).splitlines()[0]}") from None
    for wrapper in ("state_dict", "model", "state_dict_ema"):
        if isinstance(sd, dict) and isinstance(sd.get(wrapper), dict):
            sd = sd[wrapper]
            break
    if not isinstance(sd, dict) or not sd:
        raise TeacherError(f"{path} holds no state_dict")
    if all(k.startswith("module.") for k in sd):
        sd = {k[len("module."):]: v for k, v in sd.items()}
    return sd


def torchvision_kwargs(sd: dict) -> dict:
    """Constructor arguments of a torchvision classifier that fit the state dict ``sd``:
    ``num_classes`` from its classifier, and for a ViT ``image_size`` from its position
    embeddings (SWAG ViT-H/14: 37 x 37 patches of 14 px + the class token -> 518)."""
    import math

    kwargs = {}
    heads = [k for k, v in sd.items() if k.endswith(".weight") and getattr(v, "ndim", 0) == 2
             and k.split(".")[0] in ("heads", "fc", "classifier", "head")]
    if heads:
        kwargs["num_classes"] = int(sd[heads[-1]].shape[0])
    pos, patch = sd.get("encoder.pos_embedding"), sd.get("conv_proj.weight")
    if pos is not None and patch is not None:
        grid = math.isqrt(int(pos.shape[1]) - 1)
        kwargs["image_size"] = grid * int(patch.shape[-1])
    return kwargs


def torchvision_teacher(name: str, sd: dict, ckpt: str = "weights"):
    """``(model, preprocess, dropped head name)``: torchvision model ``name`` with the weights
    ``sd`` (strict), its last ``nn.Linear`` (the classifier) replaced by the identity, and
    torchvision's preprocessing for weights of its image size. Nothing is downloaded."""
    import torch.nn as nn
    import torchvision

    try:
        builder = torchvision.models.get_model_builder(name)
    except ValueError:
        raise TeacherError(f"teacher.name {name!r} is not a torchvision model "
                           f"(e.g. {', '.join(torchvision.models.list_models()[:5])}, ...)") from None
    kwargs = torchvision_kwargs(sd)
    try:
        model = builder(weights=None, **kwargs)
        model.load_state_dict(sd, strict=True)
    except (RuntimeError, TypeError, ValueError) as exc:
        raise TeacherError(f"{ckpt} does not fit torchvision model {name}: {str(exc)[:500]}") from exc
    linears = [n for n, m in model.named_modules() if isinstance(m, nn.Linear)]
    if not linears:
        raise TeacherError(f"torchvision model {name} has no linear classifier to drop")
    head = linears[-1]
    parent, _, child = head.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, child, nn.Identity())
    return model, torchvision_preprocess(name, kwargs.get("image_size")), head


def torchvision_preprocess(name: str, image_size: int | None = None):
    """torchvision's own eval transform for ``name``'s weights of ``image_size`` (the first
    weights entry when None; SWAG E2E ViT-H/14 at 518: bicubic resize + centre crop to 518)."""
    import torchvision
    from torchvision.transforms._presets import ImageClassification

    try:
        entries = list(torchvision.models.get_model_weights(name))
    except ValueError:
        entries = []
    for entry in entries:
        if image_size is None or entry.transforms.keywords.get("crop_size") == image_size:
            return entry.transforms()
    return ImageClassification(crop_size=image_size or 224, resize_size=image_size or 256)


def trainer_checkpoint_arch(path) -> tuple[str, str] | None:
    """``(open_clip.pt file, architecture)`` when ``path`` is a checkpoint folder written by
    ``training/train.py`` (or its ``open_clip.pt``): the architecture comes from its
    ``meta.json`` (a CLIP 🚀 export's own model config is registered), as in
    ``pipelines/evaluate.py``. None for any other file."""
    if not path:
        return None
    from training.checkpoint import META_FILE, open_clip_arch, open_clip_file

    path = os.path.expanduser(str(path))
    if not os.path.exists(path):
        return None
    file = open_clip_file(path)
    if not os.path.isfile(os.path.join(os.path.dirname(os.path.abspath(file)), META_FILE)):
        return None
    return file, open_clip_arch(file)


def load_teacher(cfg: TeacherSettings | Mapping, device: str = "cpu") -> Teacher:
    """Load the frozen teacher described by the ``teacher`` config section (a view, or a mapping
    merged over configs/concepts/label_concepts.yaml's, see
    :func:`training.concept_settings.teacher_settings`; a wrong key or value is a TeacherError).

    * ``kind: open_clip``: ``arch`` (an open_clip model name, or one defined by the JSON
      ``model_config`` file/folder registered with ``open_clip.add_model_config``) and
      ``checkpoint`` (a local open_clip checkpoint, ``{"state_dict": ...}`` or a bare
      state_dict). A checkpoint folder of this trainer (or its ``open_clip.pt``) brings its
      architecture from ``meta.json``: ``arch`` is then ignored. Features: ``encode_image``
      normalised.
    * ``kind: timm``: ``name`` (any timm model) built with ``pretrained=False, num_classes=0``
      and ``checkpoint`` (a local weights file); the classifier head's weights, if present, are
      ignored. Features: the pooled pre-logits.
    * ``kind: torchvision``: ``name`` (a torchvision classification model, e.g. ``vit_h_14``,
      ``resnet50``) built with ``weights=None`` and ``checkpoint`` (a local weights file, e.g.
      torchvision's own ``vit_h_14_swag-80465313.pth``, DiHT's SWAG ViT-H/14 teacher at 518 px).
      The architecture follows the file (number of classes; a ViT's image size from its
      position embeddings); preprocessing is torchvision's own for the weights of that image
      size (SWAG E2E: bicubic resize + centre crop to 518); features: the penultimate layer (the
      last ``nn.Linear``, the classifier, replaced by the identity).

    ``precision`` (fp32, fp16, bf16) casts the teacher's weights (half precision for large
    teachers on GPUs); features are returned as float32.
    """
    import torch

    try:
        cfg = teacher_settings(cfg)
    except ConfigError as exc:
        raise TeacherError(str(exc)) from None
    kind = cfg.kind
    trained = trainer_checkpoint_arch(cfg.checkpoint) if kind == "open_clip" else None
    if trained is not None:  # this trainer's checkpoint: its meta.json names the architecture
        cfg = replace(cfg, checkpoint=trained[0], arch=trained[1])
    ckpt = _require_file(cfg.checkpoint, "checkpoint")
    precision = cfg.precision
    dtypes = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
    if kind == "open_clip":
        import open_clip

        arch = cfg.arch
        if not arch or str(arch).startswith("hf-hub:"):
            raise TeacherError(f"teacher.arch must name a local open_clip architecture, not {arch!r}")
        if cfg.model_config:
            mc = os.path.expanduser(cfg.model_config)
            if not os.path.exists(mc):
                raise TeacherError(f"teacher.model_config does not exist: {mc}")
            open_clip.add_model_config(mc)
        if arch not in open_clip.list_models():
            raise TeacherError(f"unknown open_clip architecture {arch!r}; give its JSON config "
                               "with teacher.model_config")
        try:
            model, _, preprocess = open_clip.create_model_and_transforms(arch, pretrained=ckpt,
                                                                         device=device)
        except (RuntimeError, AssertionError, KeyError, ValueError) as exc:
            raise TeacherError(f"cannot load {ckpt} as open_clip {arch}: "
                               f"{type(exc).__name__}: {str(exc)[:500]}") from exc
        model = model.to(dtypes[precision])
        desc = {"kind": kind, "arch": arch, "checkpoint": os.path.basename(ckpt)}
    elif kind == "timm":
        import timm

        name = cfg.name
        if not name or str(name).startswith("hf-hub:"):
            raise TeacherError(f"teacher.name must name a timm model, not {name!r}")
        model = timm.create_model(name, pretrained=False, num_classes=0)
        try:
            sd = load_state_dict_file(ckpt)
        except (RuntimeError, ValueError, OSError) as exc:  # unreadable / not a weights file
            raise TeacherError(f"cannot read {ckpt}: {type(exc).__name__}: {str(exc)[:500]}") from exc
        missing, unexpected = model.load_state_dict(sd, strict=False)
        head = model.pretrained_cfg.get("classifier") or "head"
        heads = head if isinstance(head, (list, tuple)) else [head]
        unexpected = [k for k in unexpected if not any(k.startswith(h + ".") for h in heads)]
        if missing or unexpected:
            raise TeacherError(f"{ckpt} does not fit timm model {name}: missing {missing[:5]}, "
                               f"unexpected {unexpected[:5]}")
        data_cfg = timm.data.resolve_data_config({}, model=model)
        preprocess = timm.data.create_transform(**data_cfg, is_training=False)
        model = model.to(device, dtypes[precision])
        desc = {"kind": kind, "name": name, "checkpoint": os.path.basename(ckpt)}
    elif kind == "torchvision":
        name = cfg.name
        if not name:
            raise TeacherError("teacher.name must name a torchvision classification model (e.g. vit_h_14)")
        try:
            sd = load_state_dict_file(ckpt)
        except (RuntimeError, ValueError, OSError) as exc:
            raise TeacherError(f"cannot read {ckpt}: {type(exc).__name__}: {str(exc)[:500]}") from exc
        model, preprocess, head = torchvision_teacher(name, sd, ckpt)
        model = model.to(device, dtypes[precision])
        desc = {"kind": kind, "name": name, "checkpoint": os.path.basename(ckpt), "dropped_head": head}
    else:  # unreachable: the view admits these three kinds only
        raise TeacherError(f"teacher.kind must be open_clip, timm or torchvision, not {kind!r}")
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return Teacher(model, preprocess, kind, desc, device)


# --- 5. batch stages (called by the Ray Data job; plain callables on Arrow tables) ---------------

READ_SCHEMA = pa.schema([
    ("key", pa.string()),
    ("shard", pa.string()),
    ("caption", pa.string()),
    ("image", pa.binary()),
    ("error", pa.string()),
])

OUTPUT_SCHEMA = pa.schema([
    ("key", pa.string()),
    ("obj_ids", pa.list_(pa.int32())),
    ("obj_probs", pa.list_(pa.float32())),
    ("attr_ids", pa.list_(pa.int32())),
    ("attr_probs", pa.list_(pa.float32())),
    ("error", pa.string()),  # why a sample has no predictions (e.g. an undecodable image), else null
])


def shard_name(url: str) -> str:
    return posixpath.basename(url).split(".", 1)[0]


def read_curated_shard(url: str, rows_per_block: int = 256) -> Iterator[pa.Table]:
    """Samples of one curated tar as :data:`READ_SCHEMA` tables (key, shard, caption, image).

    A sample without an image or with an undecodable caption keeps its row with ``error`` set; a
    repeated key keeps its first copy; a broken tar ends with an error row keyed
    ``SHARD/unreadable``.
    """
    from curation.ingest import decode_caption, iter_tar_samples

    name = shard_name(url)
    rows, seen, errors = [], set(), []
    for sample in iter_tar_samples(url, errors):
        key = posixpath.basename(sample["__key__"])
        if key in seen:
            continue
        seen.add(key)
        caption, err = decode_caption(sample.get("txt"), 1 << 30)
        image = next((sample[e] for e in IMAGE_EXTENSIONS if e in sample), None)
        if image is None:
            err = "sample has no image"
        rows.append({"key": key, "shard": name, "caption": caption, "image": image, "error": err})
        if len(rows) >= rows_per_block:
            yield pa.Table.from_pylist(rows, schema=READ_SCHEMA)
            rows = []
    if errors:
        rows.append({"key": f"{name}/unreadable", "shard": name, "caption": None, "image": None,
                     "error": f"{name}.tar unreadable: {errors[0]}"})
    if rows:
        yield pa.Table.from_pylist(rows, schema=READ_SCHEMA)


def read_curated_shards_batch(batch: pa.Table, rows_per_block: int = 256) -> Iterator[pa.Table]:
    for url in batch["url"].to_pylist():
        yield from read_curated_shard(url, rows_per_block)


class ConceptParseStage:
    """Adds ``objects`` and ``attributes`` (list<string>) parsed from ``caption``."""

    def __init__(self, model: str = "en_core_web_sm", batch_size: int = 256):
        self.parser = ConceptParser(model, batch_size)

    def __call__(self, batch: pa.Table) -> pa.Table:
        concepts = self.parser(batch["caption"].to_pylist())
        batch = batch.append_column("objects", pa.array([o for o, _ in concepts], pa.list_(pa.string())))
        return batch.append_column("attributes", pa.array([a for _, a in concepts],
                                                          pa.list_(pa.string())))


class TeacherEmbedStage:
    """Replaces ``image`` by the teacher's ``features`` (list<float32>, null on error)."""

    def __init__(self, teacher_cfg: TeacherSettings | Mapping, device: str | None = None, batch_size: int = 64):
        import torch

        if device is None:
            device = "cuda" if torch.cuda.is_available() else "cpu"
        self.teacher = load_teacher(teacher_cfg, device)
        self.batch_size = int(batch_size)

    def __call__(self, batch: pa.Table) -> pa.Table:
        import torch

        images = batch["image"].to_pylist()
        errors = batch["error"].to_pylist()
        tensors, idx = [], []
        for i, data in enumerate(images):
            if errors[i] is not None or data is None:
                continue
            try:
                tensors.append(self.teacher.preprocess(decode_rgb(data, flatten_alpha=False)))
                idx.append(i)
            except Exception as exc:  # a bad image is a per-sample error, never a failed job
                errors[i] = f"cannot decode image: {type(exc).__name__}: {exc}"
        feats: list = [None] * batch.num_rows
        for s in range(0, len(idx), self.batch_size):
            f = self.teacher.encode(torch.stack(tensors[s:s + self.batch_size]))
            for j, row in enumerate(idx[s:s + self.batch_size]):
                feats[row] = f[j]
        batch = batch.drop_columns(["image"])
        batch = batch.set_column(batch.schema.get_field_index("error"), "error",
                                 pa.array(errors, pa.string()))
        return batch.append_column("features", pa.array(feats, pa.list_(pa.float32())))


def features_matrix(column: pa.ChunkedArray | pa.Array) -> np.ndarray:
    """[N, D] float32 from a list<float32> column without nulls."""
    arr = column.combine_chunks() if isinstance(column, pa.ChunkedArray) else column
    if len(arr) == 0:
        return np.zeros((0, 0), np.float32)
    flat = arr.flatten().to_numpy(zero_copy_only=False).astype(np.float32, copy=False)
    return flat.reshape(len(arr), -1)


def predict_top_k_batch(batch: pa.Table, objects: dict, attributes: dict, k: int) -> pa.Table:
    """:data:`OUTPUT_SCHEMA` rows (plus ``shard``) with both classifiers' top-k for each sample;
    samples in error get empty lists and keep their error."""
    obj, attr = LinearClassifier.from_dict(objects), LinearClassifier.from_dict(attributes)
    n = batch.num_rows
    errors = batch["error"].to_pylist()
    ok = [i for i in range(n) if errors[i] is None]
    cols = {c: [[] for _ in range(n)] for c in ("obj_ids", "obj_probs", "attr_ids", "attr_probs")}
    if ok:
        feats = features_matrix(batch["features"].take(pa.array(ok)))
        for clf, prefix in ((obj, "obj"), (attr, "attr")):
            ids, probs = top_k(clf.predict_proba(feats), k)
            for j, i in enumerate(ok):
                cols[f"{prefix}_ids"][i] = ids[j].tolist()
                cols[f"{prefix}_probs"][i] = probs[j].tolist()
    out = {"key": batch["key"], **{c: pa.array(v, OUTPUT_SCHEMA.field(c).type) for c, v in cols.items()},
           "error": batch["error"], "shard": batch["shard"]}
    return pa.table(out)


# --- 6. reading the labels back (for the trainer's join by key) ----------------------------------


def read_concepts(url: str) -> tuple[dict, pa.Table]:
    """``(vocab, table)`` of a ``CURATED/concepts`` folder: ``vocab.json`` and every
    ``NNNNN.parquet`` concatenated (:data:`OUTPUT_SCHEMA`). Raises when ``vocab.json`` is
    missing (the job writes it last, so its absence means an incomplete run)."""
    import json

    import fsspec
    import pyarrow.parquet as pq

    fs, root = fsspec.core.url_to_fs(url)
    vocab_path = posixpath.join(root, "vocab.json")
    if not fs.exists(vocab_path):
        raise FileNotFoundError(f"{url} has no vocab.json: run pipelines/label_concepts.py "
                                "(an interrupted run leaves it out)")
    with fs.open(vocab_path, "r") as f:
        vocab = json.load(f)
    files = sorted(p for p in fs.ls(root, detail=False) if p.endswith(".parquet"))
    tables = []
    for p in files:
        with fs.open(p, "rb") as f:
            tables.append(pq.read_table(f).cast(OUTPUT_SCHEMA))
    return vocab, pa.concat_tables(tables) if tables else OUTPUT_SCHEMA.empty_table()


def padded_targets(ids: Sequence[Sequence[int]], probs: Sequence[Sequence[float]],
                   k: int) -> tuple[np.ndarray, np.ndarray]:
    """[N, k] int64 ids (-1 padded) and float32 probs (0 padded) from ragged top-k lists."""
    out_ids = np.full((len(ids), k), -1, np.int64)
    out_probs = np.zeros((len(ids), k), np.float32)
    for i, (a, p) in enumerate(zip(ids, probs)):
        n = min(k, len(a))
        out_ids[i, :n] = a[:n]
        out_probs[i, :n] = p[:n]
    return out_ids, out_probs


# --- 7. the streaming job's stages (pipelines/label_concepts.py) ---------------------------------
#
# Pass 1 (bounded): every caption is parsed for the vocabulary counts, but only a reproducible key
# subsample keeps its image, is embedded and reaches the driver (the classifiers' fit sample).
# Pass 2 (one streaming pass): each call of :class:`LabelShardStage` reads one curated shard,
# embeds and predicts it and writes that shard's label file itself; only a per-shard summary row
# comes back. ``storage`` arguments are :class:`curation.common.storage.Storage` values (applied first).

COUNTS_KEY = "__concept_counts__"
FIT_SCHEMA = pa.schema([
    ("key", pa.string()),
    ("error", pa.string()),
    ("objects", pa.list_(pa.string())),
    ("attributes", pa.list_(pa.string())),
    ("image", pa.binary()),
    ("obj_names", pa.list_(pa.string())),   # the counts row only: concept -> captions mentioning it
    ("obj_counts", pa.list_(pa.int64())),
    ("attr_names", pa.list_(pa.string())),
    ("attr_counts", pa.list_(pa.int64())),
    ("rows", pa.int64()),                   # the counts row only: samples parsed
])
SHARD_SUMMARY_SCHEMA = pa.schema([
    ("shard", pa.string()),
    ("rows", pa.int64()),
    ("errors", pa.int64()),
    ("shard_error", pa.string()),
])


def _apply_storage(storage) -> None:
    if storage is not None:
        storage.apply()


def _is_shard_error_key(key: str) -> bool:
    return key.endswith("/unreadable")


def read_shards_for_fit(batch: pa.Table, rows_per_block: int = 256, storage=None,
                        fraction: float = 1.0, seed: int = 0) -> Iterator[pa.Table]:
    """:func:`read_curated_shards_batch` in a process that first applies ``storage``; images
    outside the ``fraction`` key subsample are dropped right here (only captions travel on)."""
    _apply_storage(storage)
    for t in read_curated_shards_batch(batch, rows_per_block):
        if fraction < 1.0:
            keep = key_fraction_mask(t["key"].to_pylist(), fraction, seed)
            images = t["image"].to_pylist()
            t = t.set_column(t.schema.get_field_index("image"), "image",
                             pa.array([im if k else None for im, k in zip(images, keep)], pa.binary()))
        yield t


def count_shard_rows_batch(batch: pa.Table, storage=None) -> pa.Table:
    """``url``, ``rows``: the samples of each shard (when ``shards/sizes.json`` is missing)."""
    _apply_storage(storage)
    urls = batch["url"].to_pylist()
    rows = [sum(sum(1 for k in t["key"].to_pylist() if not _is_shard_error_key(k))
                for t in read_curated_shard(u)) for u in urls]
    return pa.table({"url": pa.array(urls, pa.string()), "rows": pa.array(rows, pa.int64())})


class ConceptCountSampleStage:
    """Parses every caption of a batch; returns the fit-sample rows (key subsample of the rows
    without errors, with their concepts and image) plus one ``COUNTS_KEY`` row with the batch's
    concept counts. Images outside the sample are dropped here."""

    def __init__(self, model: str = "en_core_web_sm", batch_size: int = 256, fraction: float = 1.0,
                 seed: int = 0):
        self.parser = ConceptParser(model, batch_size)
        self.fraction, self.seed = float(fraction), int(seed)

    def __call__(self, batch: pa.Table) -> pa.Table:
        keys, errors = batch["key"].to_pylist(), batch["error"].to_pylist()
        real = [i for i, k in enumerate(keys) if not _is_shard_error_key(k)]
        captions = batch["caption"].to_pylist()
        concepts = self.parser([captions[i] for i in real])
        objs = count_concepts(o for o, _ in concepts)
        attrs = count_concepts(a for _, a in concepts)
        ok = [j for j, i in enumerate(real) if errors[i] is None]
        mask = key_fraction_mask([keys[real[j]] for j in ok], self.fraction, self.seed)
        images = batch["image"]
        rows = [{"key": keys[real[j]], "error": None, "objects": concepts[j][0],
                 "attributes": concepts[j][1], "image": images[real[j]].as_py(), "obj_names": [],
                 "obj_counts": [], "attr_names": [], "attr_counts": [], "rows": 0}
                for j, keep in zip(ok, mask) if keep]
        rows.append({"key": COUNTS_KEY, "error": None, "objects": [], "attributes": [], "image": None,
                     "obj_names": list(objs), "obj_counts": list(objs.values()),
                     "attr_names": list(attrs), "attr_counts": list(attrs.values()), "rows": len(real)})
        return pa.Table.from_pylist(rows, schema=FIT_SCHEMA)


class TeacherEmbedStageWithStorage(TeacherEmbedStage):
    """:class:`TeacherEmbedStage` in a process that first applies ``storage``."""

    def __init__(self, teacher_cfg: TeacherSettings | Mapping, device: str | None = None, batch_size: int = 64,
                 storage=None):
        _apply_storage(storage)
        super().__init__(teacher_cfg, device, batch_size)


def write_label_file(out_url: str, name: str, table: pa.Table) -> None:
    """``<out_url>/<name>.parquet``: an object store's PUT is atomic; a local file is written
    next to its place and renamed."""
    import fsspec
    import pyarrow.parquet as pq

    buf = io.BytesIO()
    pq.write_table(table, buf)
    fs, root = fsspec.core.url_to_fs(out_url)
    path = posixpath.join(root, f"{name}.parquet")
    protocol = fs.protocol if isinstance(fs.protocol, str) else fs.protocol[0]
    if protocol in ("file", "local"):
        fs.pipe_file(path + ".tmp", buf.getvalue())
        fs.mv(path + ".tmp", path)
    else:
        fs.pipe_file(path, buf.getvalue())


class LabelShardStage:
    """One curated shard per row of ``url``: read, embed with the teacher, predict both
    vocabularies' top-k and write ``<out_url>/<shard>.parquet`` (:data:`OUTPUT_SCHEMA`, one row
    per sample, sorted by key). Returns :data:`SHARD_SUMMARY_SCHEMA` rows."""

    def __init__(self, teacher_cfg: TeacherSettings | Mapping, objects: dict, attributes: dict, k: int, out_url: str,
                 device: str | None = None, batch_size: int = 64, rows_per_block: int = 256,
                 storage=None):
        _apply_storage(storage)
        self.storage = storage
        self.embed = TeacherEmbedStage(teacher_cfg, device, batch_size)
        self.objects, self.attributes, self.k = objects, attributes, int(k)
        self.out_url, self.rows_per_block = out_url, int(rows_per_block)

    def label_shard(self, url: str) -> dict:
        name = shard_name(url)
        parts, rows, errors, shard_error = [], 0, 0, None
        for t in read_curated_shard(url, self.rows_per_block):
            keys = t["key"].to_pylist()
            broken = [i for i, k in enumerate(keys) if _is_shard_error_key(k)]
            if broken:
                shard_error = t["error"][broken[0]].as_py()
                t = t.filter(pa.array([not _is_shard_error_key(k) for k in keys]))
            if not t.num_rows:
                continue
            pred = predict_top_k_batch(self.embed(t), self.objects, self.attributes, self.k)
            errs = pred["error"].to_pylist()
            rows += len(errs)
            errors += sum(e is not None for e in errs)
            parts.append(pred.select(OUTPUT_SCHEMA.names).cast(OUTPUT_SCHEMA))
        table = pa.concat_tables(parts) if parts else OUTPUT_SCHEMA.empty_table()
        write_label_file(self.out_url, name, table.sort_by("key"))
        return {"shard": name, "rows": rows, "errors": errors, "shard_error": shard_error}

    def __call__(self, batch: pa.Table) -> pa.Table:
        _apply_storage(self.storage)
        return pa.Table.from_pylist([self.label_shard(u) for u in batch["url"].to_pylist()],
                                    schema=SHARD_SUMMARY_SCHEMA)
