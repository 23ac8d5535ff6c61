"""Typed view of the CAT filter job's config (``configs/curation/cat_filter.yaml``).

The job's merged config (defaults, ``--config FILE``, ``key=value`` overrides) is parsed once at
its entry (:func:`curation_config`, in :func:`curation.pipeline.curate` and
:func:`curation.reselect.select`) into frozen dataclasses that declare names and types only: the
YAML is the one place a default lives. A missing or unknown key, a value of the wrong type or a
choice the YAML's comments do not list is a one-line :class:`~curation.common.config.ConfigError`
naming the dotted key (``filters.complexity.measure must be one of 'scene_graph', ...``).

The ``filters:`` section is typed per filter: each filter class (:mod:`curation.filters`)
declares the dataclass of its section (``Filter.Settings``), and ``CurationConfig.filters`` maps
the section names, in the config's (cascade) order, to those views. A plug-in filter's stage
(``stages.<stage>``) is a :class:`StageResources` over the filter's ``resources`` defaults.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field, fields, replace
from functools import lru_cache
from typing import Any, Literal, Mapping

from curation.common.config import CONFIG_DIR, deep_merge, load_yaml, typed_view
from curation.common.jobs import RayConfig
from curation.ingest import IngestOptions

DEFAULTS_FILE = CONFIG_DIR / "curation" / "cat_filter.yaml"

IngestConfig = IngestOptions  # ``ingest:``: the reader's options (curation.ingest)


@dataclass(frozen=True)
class DemoConfig:
    """``demo:``: the embedded demo dataset built when ``input`` is null."""

    output: str
    num_samples: int
    num_shards: int
    seed: int


@dataclass(frozen=True)
class SpacyConfig:
    model: str
    batch_size: int


@dataclass(frozen=True)
class StageResources:
    """A filter stage's resources (``stages.<stage>``; ``actors: 0``: Ray tasks, not an actor
    pool; ``actors: null``: as many as the cluster holds)."""

    actors: int | None
    num_cpus: float
    num_gpus: float
    batch_size: int | None


@dataclass(frozen=True)
class CaptionStage(StageResources):
    tasks_in_flight_per_actor: int | None


@dataclass(frozen=True)
class OcrStage(StageResources):
    torch_threads: int | None
    ocr_batch_size: int


@dataclass(frozen=True)
class TaskStage:
    """``stages.read`` / ``stages.write``: Ray tasks."""

    num_cpus: float
    concurrency: int | None


@dataclass(frozen=True)
class StagesConfig:
    wait_for_actors_s: float | None
    read: TaskStage
    caption: CaptionStage
    ocr: OcrStage
    write: TaskStage
    # derived, not in the YAML: the stages of plug-in filters (stage key -> resources)
    extra: Mapping[str, StageResources] = field(default_factory=dict)

    def stage(self, key: str) -> StageResources:
        """The resources of the filter stage ``key`` (``caption``, ``ocr``, a plug-in's)."""
        if key in ("caption", "ocr"):
            return getattr(self, key)
        return self.extra[key]


@dataclass(frozen=True)
class CurationConfig:
    input: str | None
    input_format: Literal["auto", "webdataset", "parquet"]
    output: str
    overwrite: bool
    progress: bool
    report: bool
    storage_options: dict
    ray: RayConfig
    demo: DemoConfig
    ingest: IngestOptions
    filters: dict            # section name -> its filter's Settings view, in cascade order
    spacy: SpacyConfig
    stages: StagesConfig
    # derived, not in the YAML: the scored output a re-selection reads (cat_select's from=)
    from_url: str | None = None


@lru_cache(maxsize=1)
def _defaults() -> dict:
    return load_yaml(DEFAULTS_FILE)


def default_config() -> dict:
    """The job's defaults (the YAML), as a fresh plain dict."""
    return copy.deepcopy(_defaults())


def parse_filters(section: Mapping | None, strict: bool = True) -> dict[str, Any]:
    """``filters:`` as name -> the view of each filter's section (its class's ``Settings``), in
    order. A section no registered filter claims is a ValueError (left out when not
    ``strict``)."""
    from curation.filters import FILTER_TYPES

    out = {}
    for name, sub in (section or {}).items():
        if name not in FILTER_TYPES:
            if not strict:
                continue
            raise ValueError(f"filters.{name}: no such filter (registered: {', '.join(FILTER_TYPES)})")
        out[name] = FILTER_TYPES[name].parse_settings(sub, f"filters.{name}")
    return out


def curation_config(cfg: Mapping, strict: bool = True) -> CurationConfig:
    """The merged config as :class:`CurationConfig`, checked (``ConfigError`` / ``ValueError``
    naming the key). ``cfg`` may carry ``from`` (cat_select) and, for a plug-in filter, its
    ``stages.<stage>`` section; ``strict=False`` leaves out filters no class claims."""
    from curation.filters import FILTER_TYPES

    raw = dict(cfg)
    from_url = raw.pop("from", None)
    filters = {}
    if isinstance(raw.get("filters"), Mapping):
        filters, raw["filters"] = parse_filters(raw["filters"], strict), {}
    extra = {}
    if isinstance(raw.get("stages"), Mapping):
        stages = dict(raw["stages"])
        declared = {f.name for f in fields(StagesConfig)} - {"extra"}
        for name in filters:
            cls = FILTER_TYPES[name]
            key = cls.stage or cls.name
            if key not in declared and key not in extra:
                section = stages.pop(key, None) or {}
                extra[key] = typed_view(StageResources, {**cls.resources, **section}, f"stages.{key}")
        raw["stages"] = stages
    view = typed_view(CurationConfig, raw)
    return replace(view, filters=filters, stages=replace(view.stages, extra=extra), from_url=from_url)


def with_defaults(changes: Mapping | None = None) -> dict:
    """The YAML defaults with ``changes`` merged over them (nested; keys the defaults lack are
    allowed, e.g. a plug-in filter's section): for tests and tools that build a config in code."""
    return deep_merge(default_config(), changes or {}, strict=False)


def section_defaults(path: str) -> dict:
    """One section of the YAML defaults by its dotted name (``filters.text_spotting``)."""
    node: Any = _defaults()
    for part in path.split("."):
        node = node[part]
    return copy.deepcopy(node)
