"""Evaluation datasets: CLIP_benchmark ``wds/`` folders and two built-in offline sets.

Every dataset is an :class:`EvalDataset`: class names and prompt templates (for zero-shot
classification; ``None`` for a retrieval-only set) and, per split, an iterator of samples
``{"key", "image" (PIL RGB), "label" (int or None), "captions" (list of str or None)}``.

* ``wds``: the CLIP_benchmark format (``{split}/nshards.txt``, ``{split}/0.tar`` ...,
  ``classnames.txt``, ``zeroshot_classification_templates.txt``; images with ``.cls`` labels,
  retrieval sets with multi-line ``.txt`` captions), on local disk or any fsspec URL, read with
  the project's one tar reader (:func:`curation.ingest.iter_tar_samples`) and image decoder
  (:func:`curation.images.decode_rgb`). A sample whose image does not decode (or that has
  neither label nor captions) is skipped and recorded in ``dataset.errors``, and so is a broken
  tar (what was read before the break is kept); neither stops the evaluation.
* ``digits``: scikit-learn's 1,797 real 8x8 handwritten digits (dark ink on white, upscaled);
  classes ``"0"`` .. ``"9"``; a fixed 60/40 ``train``/``test`` split (``all`` = every image).
* ``demo``: the held-out generated demo set (:func:`curation.demo_data.write_eval_dataset`),
  written once into a cache folder and then read as a ``wds`` dataset.

Benchmark suites (``configs/eval/suites/*.yaml``, :func:`load_suite`) list tasks by their
CLIP_benchmark dataset names; :func:`find_task_folder` finds a task's ``wds`` folder under a root
that holds many (``eval.wds_root``).
"""

from __future__ import annotations

import io
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator, Mapping

import fsspec
from PIL import Image

from curation.images import TRAINABLE_FORMATS, decode_rgb
from training.eval_settings import EvalConfig, eval_config

DIGITS_TEMPLATES = ["a photo of the number {}.", "a handwritten digit {}.", "the digit {}.",
                    "a black and white photo of the number {}."]


class EvalDataError(ValueError):
    """A dataset that cannot be read at all (missing folder or files, unknown kind)."""


@dataclass
class EvalDataset:
    name: str
    classnames: list[str] | None
    templates: list[str] | None
    split_reader: Callable[[str], Iterator[dict]]
    splits: list[str]
    errors: list[dict] = field(default_factory=list)

    def samples(self, split: str) -> Iterator[dict]:
        if split not in self.splits:
            raise EvalDataError(f"dataset {self.name!r} has no split {split!r} (has {self.splits})")
        return self.split_reader(split)


# -- CLIP_benchmark wds ------------------------------------------------------------------------

def _read_text(fs, path: str) -> str | None:
    if not fs.exists(path):
        return None
    with fs.open(path, "rb") as f:
        return f.read().decode("utf-8")


def _lines(text: str | None) -> list[str] | None:
    if text is None:
        return None
    return [line.strip() for line in text.splitlines() if line.strip()]


def parse_wds_sample(sample: dict) -> dict:
    """A webdataset sample (``__key__`` + raw bytes per extension) -> an evaluation sample.

    Raises ``ValueError`` with a clear message for an undecodable image or a sample without
    an image, a label or captions.
    """
    key = sample.get("__key__", "?")
    ext = next((e for e in TRAINABLE_FORMATS if e in sample), None)
    if ext is None:
        raise ValueError(f"sample {key}: no image (expected one of {', '.join(TRAINABLE_FORMATS)})")
    try:
        image = decode_rgb(sample[ext], flatten_alpha=False)
    except Exception as exc:  # BadImage, or a member that is not bytes
        raise ValueError(f"sample {key}: cannot decode {ext} image: {exc}") from None
    label = None
    if "cls" in sample:
        try:
            label = int(sample["cls"].decode("utf-8").strip())
        except (UnicodeDecodeError, ValueError):
            raise ValueError(f"sample {key}: .cls is not an integer label") from None
    captions = None
    if "txt" in sample:
        captions = _lines(sample["txt"].decode("utf-8", errors="replace")) or None
    if label is None and captions is None:
        raise ValueError(f"sample {key}: neither a .cls label nor .txt captions")
    out = {"key": key, "image": image, "label": label, "captions": captions}
    if "npy" in sample:  # per-sample metadata (DataComp's WILDS / fairness sets: group fields)
        import numpy as np

        try:
            out["metadata"] = np.load(io.BytesIO(sample["npy"]), allow_pickle=False).reshape(-1).tolist()
        except ValueError:  # only worst-group metrics read it; they refuse samples without it
            out["metadata"] = None
    return out


def wds_dataset(root: str, name: str | None = None) -> EvalDataset:
    """A CLIP_benchmark ``wds/`` dataset at ``root`` (local path or fsspec URL)."""
    from curation.ingest import ShardReadError, iter_tar_samples

    root = str(root).rstrip("/")
    fs, base = fsspec.core.url_to_fs(root)
    if not fs.exists(base):
        raise EvalDataError(f"wds dataset not found: {root}")
    splits = sorted(os.path.basename(p.rstrip("/")) for p in fs.ls(base, detail=False)
                    if fs.exists(f"{p.rstrip('/')}/nshards.txt"))
    if not splits:
        raise EvalDataError(f"{root} has no {{split}}/nshards.txt: not a CLIP_benchmark wds dataset")
    classnames = _lines(_read_text(fs, f"{base}/classnames.txt"))
    templates = _lines(_read_text(fs, f"{base}/zeroshot_classification_templates.txt"))
    dataset = EvalDataset(name or os.path.basename(base), classnames, templates, None, splits)

    def read(split: str) -> Iterator[dict]:
        try:
            nshards = int(_read_text(fs, f"{base}/{split}/nshards.txt").strip())
        except ValueError:
            raise EvalDataError(f"{root}/{split}/nshards.txt does not hold a number") from None
        for i in range(nshards):
            path = f"{base}/{split}/{i}.tar"
            if not fs.exists(path):
                dataset.errors.append({"key": f"{split}/{i}.tar", "error": "missing shard"})
                continue
            tar_errors: list[str] = []  # a broken tar stops its shard; what was read is kept
            try:
                for raw in iter_tar_samples(fs.unstrip_protocol(path), tar_errors):
                    try:
                        if raw.get("__duplicate__"):
                            raise ValueError(f"sample {raw['__key__']}: repeated member(s) "
                                             f"{', '.join(raw['__duplicate__'])}")
                        yield parse_wds_sample(raw)
                    except ValueError as exc:
                        dataset.errors.append({"key": raw.get("__key__"), "error": str(exc)})
            except ShardReadError as exc:  # the storage failed, not the bytes: the shard is lost too
                tar_errors.append(str(exc))
            if tar_errors:
                dataset.errors.append({"key": f"{split}/{i}.tar", "error": f"bad tar: {tar_errors[0]}"})

    dataset.split_reader = read
    return dataset


# -- built-in sets -----------------------------------------------------------------------------

def digit_image(pixels, image_size: int) -> Image.Image:
    """An 8x8 array of ink values 0..16 -> dark ink on white, upscaled to ``image_size``."""
    import numpy as np

    grey = (255 - np.clip(np.asarray(pixels, dtype=np.float64) * 16, 0, 255)).astype("uint8")
    return Image.fromarray(grey, mode="L").resize((image_size, image_size), Image.BILINEAR).convert("RGB")


def digits_split_indices(split: str, n: int = 1797, seed: int = 0) -> list[int]:
    """The fixed digits splits: a seeded permutation, first 60% ``train``, rest ``test``."""
    import numpy as np

    order = np.random.RandomState(seed).permutation(n)
    cut = int(round(n * 0.6))
    return {"train": order[:cut], "test": order[cut:], "all": np.arange(n)}[split].tolist()


def digits_dataset(image_size: int = 224) -> EvalDataset:
    from sklearn.datasets import load_digits

    digits = load_digits()

    def read(split: str) -> Iterator[dict]:
        for i in digits_split_indices(split, len(digits.target)):
            yield {"key": f"digit{i:04d}", "image": digit_image(digits.images[i], image_size),
                   "label": int(digits.target[i]), "captions": None}

    return EvalDataset("digits", [str(d) for d in range(10)], list(DIGITS_TEMPLATES), read,
                       ["train", "test", "all"])


def demo_dataset(cache_dir: str, num_train: int = 500, num_test: int = 500, seed: int = 1000) -> EvalDataset:
    """The held-out generated demo set (written into ``cache_dir`` once, then read as wds)."""
    from curation.demo_data import write_eval_dataset

    root = os.path.join(cache_dir, f"demo_eval_s{seed}_{num_train}_{num_test}")
    write_eval_dataset(root, {"train": num_train, "test": num_test}, seed=seed)
    return wds_dataset(root, name="demo")


def load_eval_dataset(name: str, cfg: EvalConfig | Mapping, image_size: int = 224) -> EvalDataset:
    """Dataset ``name`` from the ``eval`` config section (a view, or a mapping merged over
    configs/eval/default.yaml): ``digits``, ``demo``, or a key of ``eval.wds`` (name -> CLIP_benchmark
    folder or URL)."""
    cfg = eval_config(cfg)
    wds_roots = cfg.wds
    if name in wds_roots:
        return wds_dataset(wds_roots[name], name=name)
    if name == "digits":
        return digits_dataset(image_size)
    if name == "demo":
        demo = cfg.demo
        return demo_dataset(cfg.cache_dir, demo.num_train, demo.num_test, demo.seed)
    raise EvalDataError(f"unknown eval dataset {name!r}: use digits, demo or a name under eval.wds "
                        f"(known: {sorted(wds_roots)})")


# -- benchmark suites --------------------------------------------------------------------------

SUITE_TASK_TYPES = ("zeroshot_classification", "zeroshot_retrieval", "winogavil")


def suites_dir():
    from curation.common.config import CONFIG_DIR

    return CONFIG_DIR / "eval" / "suites"


def load_suite(suite: str) -> dict:
    """A suite by name (``configs/eval/suites/<name>.yaml``) or YAML path, checked: ``name``,
    ``tasks`` (each ``key``, ``name``, ``dataset``, ``task``, ``main_metric``, optional
    ``metadata``) and optional ``groups`` (group name -> task keys)."""
    import yaml

    path = suites_dir() / f"{suite}.yaml"
    if not path.is_file():
        path = suite if os.path.isfile(str(suite)) else None
    if path is None:
        known = sorted(p.stem for p in suites_dir().glob("*.yaml"))
        raise EvalDataError(f"unknown eval suite {suite!r}: a name in configs/eval/suites ({known}) or a YAML file")
    with open(path) as f:
        spec = yaml.safe_load(f) or {}
    tasks = spec.get("tasks")
    if not isinstance(tasks, list) or not tasks:
        raise EvalDataError(f"suite {path}: no tasks")
    keys = set()
    for t in tasks:
        missing = [k for k in ("key", "name", "dataset", "task", "main_metric") if not t.get(k)]
        if missing:
            raise EvalDataError(f"suite {path}: task {t} lacks {missing}")
        if t["task"] not in SUITE_TASK_TYPES:
            raise EvalDataError(f"suite {path}: task {t['key']}: unknown type {t['task']!r} ({SUITE_TASK_TYPES})")
        if t["key"] in keys:
            raise EvalDataError(f"suite {path}: task {t['key']} listed twice")
        keys.add(t["key"])
    groups = spec.get("groups") or {}
    for g, members in groups.items():
        unknown = [k for k in members if k not in keys]
        if unknown:
            raise EvalDataError(f"suite {path}: group {g!r} names unknown tasks {unknown}")
    return {"name": spec.get("name") or Path(path).stem, "description": spec.get("description", ""),
            "tasks": tasks, "groups": groups}


def task_folder_candidates(task: dict) -> list[str]:
    """Folder names a task may have under a root of CLIP_benchmark ``wds`` datasets: CLIP_benchmark's
    ``wds_<dataset>``, DataComp's ``wds_<dataset>_test`` / ``wds_<key>_test``, or ``<dataset>``
    ('/' written as '-')."""
    dataset, key = task["dataset"].replace("/", "-"), task["key"].replace("/", "-")
    names = [f"wds_{dataset}", f"wds_{dataset}_test", f"wds_{key}_test", f"wds_{key}", dataset]
    return list(dict.fromkeys(names))


def find_task_folder(root: str, task: dict, split: str = "test") -> str | None:
    """The first candidate folder under ``root`` (path or fsspec URL) with ``{split}/nshards.txt``."""
    root = str(root).rstrip("/")
    fs, base = fsspec.core.url_to_fs(root)
    for name in task_folder_candidates(task):
        if fs.exists(f"{base}/{name}/{split}/nshards.txt"):
            return f"{root}/{name}"
    return None


def open_clip_imagenet() -> tuple[list[str], list[str]]:
    """open_clip's ImageNet class names and OpenAI prompt templates (as ``{c}`` strings)."""
    from open_clip.zero_shot_metadata import IMAGENET_CLASSNAMES, OPENAI_IMAGENET_TEMPLATES

    return list(IMAGENET_CLASSNAMES), [t("{c}") for t in OPENAI_IMAGENET_TEMPLATES]


def suite_task_dataset(folder: str, task: dict) -> EvalDataset:
    """The ``wds`` dataset of a suite task, with the class names and templates the task asks for."""
    dataset = wds_dataset(folder, name=task["key"])
    if task.get("metadata") == "open_clip_imagenet":
        classnames, templates = open_clip_imagenet()
        if dataset.classnames is not None and len(dataset.classnames) != len(classnames):
            raise EvalDataError(f"{folder}: {len(dataset.classnames)} classes in classnames.txt, but "
                                f"open_clip's ImageNet metadata has {len(classnames)}")
        dataset.classnames, dataset.templates = classnames, templates
    elif task.get("metadata"):
        raise EvalDataError(f"task {task['key']}: unknown metadata {task['metadata']!r} (open_clip_imagenet)")
    return dataset
