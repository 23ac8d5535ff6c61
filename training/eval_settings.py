"""Typed view of the evaluation config (the ``eval`` section of configs/eval/default.yaml, which the
training config also merges under its ``eval`` key).

The dataclasses declare names and types only: the defaults live in the YAML. Parse a job's merged
``eval`` section once with :func:`parse_eval_config`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, Mapping

from curation.common.config import typed_view


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


def parse_eval_config(section: Mapping, name: str = "eval") -> EvalConfig:
    """The merged ``eval`` section as an :class:`EvalConfig` (ConfigError naming the dotted key)."""
    return typed_view(EvalConfig, section, name)
