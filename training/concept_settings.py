"""Typed view of the concept-labelling config (configs/concepts/label_concepts.yaml).

The dataclasses declare names and types only: the defaults live in the YAML. Parse the merged
config once with :func:`parse_label_config` at the job's entry.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, Mapping

from curation.common.config import typed_view


@dataclass(frozen=True)
class RaySettings:
    address: str | None
    num_cpus: int | None
    dashboard: bool


@dataclass(frozen=True)
class VocabSize:
    size: int | None
    min_count: int


@dataclass(frozen=True)
class VocabSettings:
    objects: VocabSize
    attributes: VocabSize


@dataclass(frozen=True)
class TeacherSettings:
    kind: Literal["open_clip", "timm", "torchvision"]
    arch: str | None
    model_config: str | None
    name: str | None
    checkpoint: str | None
    precision: Literal["fp32", "fp16", "bf16"]


@dataclass(frozen=True)
class ClassifierSettings:
    max_samples: int | None
    epochs: int
    lr: float
    weight_decay: float
    batch_size: int
    seed: int
    device: Literal["auto", "cpu", "cuda"]


@dataclass(frozen=True)
class SpacySettings:
    model: str
    batch_size: int


@dataclass(frozen=True)
class ReadStage:
    num_cpus: float
    rows_per_block: int


@dataclass(frozen=True)
class ParseStage:
    actors: int
    num_cpus: float
    batch_size: int


@dataclass(frozen=True)
class EmbedStage:
    actors: int
    num_cpus: float
    num_gpus: float
    batch_size: int
    forward_batch_size: int


@dataclass(frozen=True)
class LabelStage:
    actors: int
    num_cpus: float


@dataclass(frozen=True)
class Stages:
    read: ReadStage
    parse: ParseStage
    embed: EmbedStage
    label: LabelStage


@dataclass(frozen=True)
class LabelConceptsConfig:
    input: str | None
    output: str | None
    progress: bool
    storage_options: dict
    ray: RaySettings
    vocab: VocabSettings
    top_k: int
    teacher: TeacherSettings
    classifier: ClassifierSettings
    spacy: SpacySettings
    stages: Stages


def parse_label_config(cfg: Mapping) -> LabelConceptsConfig:
    """The merged labelling config as a :class:`LabelConceptsConfig` (ConfigError naming the key)."""
    return typed_view(LabelConceptsConfig, cfg)
