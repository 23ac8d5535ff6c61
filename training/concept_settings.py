"""Typed view of the concept-labelling config (configs/concepts/label_concepts.yaml).

The dataclasses declare names and types only: the defaults live in the YAML. Parse the merged
config once with :func:`parse_label_config` at the job's entry. :func:`teacher_settings` is
``training.concepts.load_teacher``'s door: a view as it is, or a plain ``teacher`` mapping merged
strictly over the YAML's ``teacher`` section and parsed.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, Mapping

from curation.common.config import CONFIG_DIR, deep_merge, load_yaml, typed_view
from curation.common.jobs import RayConfig

DEFAULTS_FILE = CONFIG_DIR / "concepts" / "label_concepts.yaml"


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
    ray: RayConfig
    vocab: VocabSettings
    top_k: int
    teacher: TeacherSettings
    classifier: ClassifierSettings
    spacy: SpacySettings
    stages: Stages


def parse_label_config(cfg: Mapping) -> LabelConceptsConfig:
    """The merged labelling config as a :class:`LabelConceptsConfig` (ConfigError naming the key)."""
    return typed_view(LabelConceptsConfig, cfg)


def teacher_settings(section: TeacherSettings | Mapping) -> TeacherSettings:
    """``section`` as :class:`TeacherSettings`: a view as it is; a mapping merged over the ``teacher``
    section of configs/concepts/label_concepts.yaml (unknown keys, wrong types and choices are
    :class:`~curation.common.config.ConfigError` naming ``teacher.<key>``), then parsed."""
    if isinstance(section, TeacherSettings):
        return section
    defaults = load_yaml(DEFAULTS_FILE)["teacher"]
    return typed_view(TeacherSettings, deep_merge(defaults, section, _prefix="teacher."), "teacher")
