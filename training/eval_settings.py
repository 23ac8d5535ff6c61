"""Typed view of the evaluation config (the ``eval`` section of configs/eval/default.yaml, which the
training config also merges under its ``eval`` key).

The dataclasses declare names and types only: the defaults live in the YAML. Parse a job's merged
``eval`` section once with :func:`parse_eval_config`; :func:`eval_config` is the entry functions'
door (``training.evaluate.run_evaluation`` and ``evaluate_dataset``): it takes a view as it is, or a
plain ``eval`` mapping (the training loop's section, a test's few keys), merged strictly over the
YAML's ``eval`` section and parsed.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, Mapping

from curation.common.config import CONFIG_DIR, deep_merge, load_yaml, typed_view

DEFAULTS_FILE = CONFIG_DIR / "eval" / "default.yaml"  # its `eval` section


@dataclass(frozen=True)
class DemoEvalSet:
    num_train: int
    num_test: int
    seed: int


@dataclass(frozen=True)
class LinearProbeSettings:
    enabled: bool
    weight_decay: tuple[float, ...]
    val_fraction: float
    steps: int
    lr: float
    seed: int
    num_threads: int


@dataclass(frozen=True)
class FewshotSettings:
    enabled: bool
    shots: tuple[int, ...]
    seeds: tuple[int, ...]
    cv_folds: int
    logit_scale: float
    delta_rel: tuple[float, ...]
    delta_b: tuple[float, ...]
    weight_decay: tuple[float, ...]
    steps: int
    lr_projected: float
    lr_scratch: float
    num_threads: int


@dataclass(frozen=True)
class EvalConfig:
    datasets: tuple[str, ...]
    wds: dict
    suite: str | None
    wds_root: str | None
    cache_dir: str
    demo: DemoEvalSet
    split: str
    train_split: str
    batch_size: int
    max_samples: int | None
    max_train_samples: int | None
    device: Literal["auto", "cpu", "cuda"]
    templates: tuple[str, ...] | None
    zeroshot: bool
    retrieval: bool
    recall_at: tuple[int, ...]
    ensemble_weights: tuple[float, ...]
    linear_probe: LinearProbeSettings
    fewshot: FewshotSettings
    output: str | None


@dataclass(frozen=True)
class EvalJobConfig:
    """All of configs/eval/default.yaml (pipelines/evaluate.py): the job's storage options and
    its ``eval`` section."""
    storage_options: dict
    eval: EvalConfig


def parse_eval_job_config(cfg: Mapping) -> EvalJobConfig:
    """The evaluate job's merged config as an :class:`EvalJobConfig` (ConfigError naming the key)."""
    return typed_view(EvalJobConfig, cfg)


def parse_eval_config(section: Mapping, name: str = "eval") -> EvalConfig:
    """The merged ``eval`` section as an :class:`EvalConfig` (ConfigError naming the dotted key)."""
    return typed_view(EvalConfig, section, name)


def eval_defaults() -> dict:
    """The ``eval`` section of configs/eval/default.yaml (plain data; the one place its defaults live)."""
    return load_yaml(DEFAULTS_FILE)["eval"]


def eval_config(section: EvalConfig | Mapping | None = None, name: str = "eval") -> EvalConfig:
    """``section`` as an :class:`EvalConfig`: a view as it is; a mapping merged over
    :func:`eval_defaults` (unknown keys and wrong types are :class:`ConfigError` naming the key),
    then parsed; None: the YAML's defaults."""
    if isinstance(section, EvalConfig):
        return section
    return parse_eval_config(deep_merge(eval_defaults(), section or {}, _prefix=f"{name}." if name else ""), name)
