"""The training job's config as one typed view, parsed once (:func:`train_config`).

``configs/train/clip.yaml`` (with a recipe's ``configs/train/<recipe>.yaml`` merged over it and
``configs/eval/default.yaml`` under ``eval``) becomes a tree of frozen dataclasses: every key
present, no unknown key, each value of its type (``curation.common.config.typed_view``). The
dataclasses declare names and types only, never defaults: the YAML is the one place a default
lives. Each recipe types its own additions: its class names its config dataclass
(``Recipe.config_class``), a subclass of :class:`TrainConfig` whose sections are the recipe's
(e.g. :class:`DiHTConfig` with ``loss.hnnce`` / ``loss.distill``). Sections owned elsewhere stay
free-form mappings: ``eval`` (parsed by ``training.evaluate``), ``data.aug_cfg`` (open_clip's
``AugmentationCfg``), ``storage_options`` (fsspec). A changed config is derived with
``dataclasses.replace``; ``curation.common.config.as_dict`` gives the plain data back (what
``meta.json`` records).
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Literal, Mapping

from curation.common.config import as_dict, deep_merge, typed_view
from curation.common.jobs import RayConfig  # the one ``ray:`` section of every job

__all__ = ["TrainConfig", "DataConfig", "ModelConfig", "LossConfig", "TrainSection", "ScalingConfig",
           "RunConfig", "DebugConfig", "RayConfig", "DiHTConfig", "DiHTLossConfig", "HNNCEConfig",
           "DistillConfig", "ImprovedConfig", "ImprovedDataConfig", "ImprovedModelConfig",
           "ImprovedProjectors", "ImprovedLossConfig", "SSLConfig", "ViewsConfig", "train_config",
           "plain_config", "section_view", "as_dict", "SCHEDULE_KEYS"]

# clip.yaml's ``eval`` keys that are the training loop's schedule, not ``training.evaluate``'s
SCHEDULE_KEYS = ("enabled", "every_n_epochs")


# --- clip.yaml ------------------------------------------------------------------------------------

@dataclass(frozen=True)
class DataConfig:
    train: str | tuple[str, ...] | None
    demo_output: str
    demo_samples: int | None
    demo_shards: int | None
    num_samples: int | None
    map_batch_size: int
    num_cpus: float
    concurrency: int | None
    read_blocks: int | None
    op_resource_reservation: bool
    shuffle_buffer: int
    deterministic: bool
    prefetch_batches: int
    aug_cfg: dict                # open_clip AugmentationCfg fields (free-form)


@dataclass(frozen=True)
class ModelConfig:
    arch: str
    init_checkpoint: str | None
    grad_checkpointing: bool
    compile: bool


@dataclass(frozen=True)
class LossConfig:
    label_smoothing: float


@dataclass(frozen=True)
class TrainSection:
    epochs: float
    max_steps: int | None
    batch_size: int
    accum_steps: int
    lr: float
    min_lr_ratio: float
    warmup_steps: int | None
    weight_decay: float
    beta1: float
    beta2: float
    eps: float
    grad_clip_norm: float | None
    precision: Literal["auto", "fp32", "bf16", "fp16"]
    find_unused_parameters: bool
    seed: int
    torch_threads: int | None
    log_every_steps: int
    checkpoint_every_steps: int


@dataclass(frozen=True)
class ScalingConfig:
    num_workers: int
    use_gpu: Literal["auto"] | bool
    cpus_per_worker: float
    gpus_per_worker: float
    extra_resources: dict
    placement_strategy: Literal["PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD"]


@dataclass(frozen=True)
class RunConfig:
    storage_path: str
    name: str | None
    log_dir: str | None
    max_failures: int
    num_to_keep: int | None


@dataclass(frozen=True)
class DebugConfig:
    fail_at_step: int | None
    pause_at_step: int | None
    pause_s: float
    dir: str | None
    log_keys: bool


@dataclass(frozen=True)
class TrainConfig:
    """``configs/train/clip.yaml`` (recipe ``clip``); recipes subclass it for their sections."""
    recipe: str
    progress: bool
    storage_options: dict        # fsspec options (free-form)
    data: DataConfig
    model: ModelConfig
    loss: LossConfig
    train: TrainSection
    scaling: ScalingConfig
    run: RunConfig
    eval: dict                   # configs/eval/default.yaml + clip.yaml's eval (training.evaluate parses it)
    debug: DebugConfig
    ray: RayConfig


# --- diht.yaml ------------------------------------------------------------------------------------

@dataclass(frozen=True)
class HNNCEConfig:
    alpha: float
    beta: float


@dataclass(frozen=True)
class DistillConfig:
    enabled: bool
    concepts: str | None
    weight: float
    temperature: float


@dataclass(frozen=True)
class DiHTLossConfig(LossConfig):
    hnnce: HNNCEConfig
    distill: DistillConfig


@dataclass(frozen=True)
class DiHTConfig(TrainConfig):
    loss: DiHTLossConfig


# --- improved.yaml --------------------------------------------------------------------------------

Interpolation = Literal["bicubic", "bilinear", "nearest"]


@dataclass(frozen=True)
class WeakImageView:
    scale: tuple[float, ...]
    ratio: tuple[float, ...]
    interpolation: Interpolation
    hflip: float


@dataclass(frozen=True)
class ColorJitter:
    p: float
    brightness: float
    contrast: float
    saturation: float
    hue: float


@dataclass(frozen=True)
class Blur:
    p: float
    sigma: tuple[float, ...]
    kernel_size: int | None


@dataclass(frozen=True)
class StrongImageView:
    scale: tuple[float, ...]
    ratio: tuple[float, ...]
    interpolation: Interpolation
    color_jitter: ColorJitter
    grayscale_p: float
    blur: Blur
    hflip: float


@dataclass(frozen=True)
class ImageViewsConfig:
    weak: WeakImageView
    strong: StrongImageView


@dataclass(frozen=True)
class WeakTextView:
    stopwords_p: float


@dataclass(frozen=True)
class EdaOps:
    synonym: float
    swap: float
    delete: float


@dataclass(frozen=True)
class StrongTextView:
    stopwords_p: float
    ops: EdaOps
    synonym_n: int
    swap_n: int
    delete_p: float


@dataclass(frozen=True)
class SynonymsConfig:
    source: Literal["wordnet", "mythes"]
    path: str | None


@dataclass(frozen=True)
class TextViewsConfig:
    weak: WeakTextView
    strong: StrongTextView
    synonyms: SynonymsConfig


@dataclass(frozen=True)
class ViewsConfig:
    num_strong: int
    seed: int
    image: ImageViewsConfig
    text: TextViewsConfig


@dataclass(frozen=True)
class ImprovedDataConfig(DataConfig):
    views_seeding: Literal["worker", "sample"]


@dataclass(frozen=True)
class ImprovedProjectors:
    proj_dim: int
    weak_temperature: float
    strong_temperature: float
    mlp_hidden_dim: int
    mlp_layers: int
    text_residual_dropout: float
    drop_path: float
    max_logit_scale: float


@dataclass(frozen=True)
class ImprovedModelConfig(ModelConfig):
    text_cfg: dict               # open_clip text_cfg overrides (free-form)
    vision_cfg: dict             # open_clip vision_cfg overrides (free-form)
    sync_bn: Literal["auto"] | bool
    improved: ImprovedProjectors


@dataclass(frozen=True)
class BarLIPConfig:
    weight: float
    hidden_dim: int
    proj_dim: int
    lamb: float
    scale_loss: float


@dataclass(frozen=True)
class SiamLIPConfig:
    weight: float
    hidden_dim: int
    proj_dim: int


@dataclass(frozen=True)
class BYOLIPConfig:
    weight: float
    hidden_dim: int
    proj_dim: int
    momentum: float
    ema_model: bool


@dataclass(frozen=True)
class SwALIPConfig:
    weight: float
    epsilon: float
    sinkhorn_iters: int


@dataclass(frozen=True)
class SLIPConfig:
    weight: float
    hidden_dim: int
    proj_dim: int
    temperature: float


@dataclass(frozen=True)
class SSLConfig:
    name: str | None             # none | barlip | siamlip | byolip | swalip | slip (checked by the recipe)
    separate_projectors: bool
    barlip: BarLIPConfig
    siamlip: SiamLIPConfig
    byolip: BYOLIPConfig
    swalip: SwALIPConfig
    slip: SLIPConfig


@dataclass(frozen=True)
class ImprovedLossConfig(LossConfig):
    label_smoothing: float | None  # null: the recipe's default (0.1; 0 with SwALIP)
    reduction: Literal["mean", "sum"]
    ssl: SSLConfig


@dataclass(frozen=True)
class ImprovedConfig(TrainConfig):
    data: ImprovedDataConfig
    model: ImprovedModelConfig
    loss: ImprovedLossConfig
    views: ViewsConfig


# --- parsing --------------------------------------------------------------------------------------

def train_config(cfg: Mapping | TrainConfig) -> TrainConfig:
    """The typed view of a merged training config (``training.train.build_train_config``), of the
    class its recipe names (``Recipe.config_class``); a view is returned as it is. Mistakes raise
    ``ConfigError`` naming the dotted key."""
    if isinstance(cfg, TrainConfig):
        return cfg
    from curation.common.config import ConfigError
    from training.recipes import recipe_class

    if not isinstance(cfg, Mapping):
        raise ConfigError(f"a training config must be a mapping, got {cfg!r}")
    try:
        cls = recipe_class(cfg.get("recipe") or "clip").config_class or TrainConfig
    except ValueError as exc:
        raise ConfigError(f"recipe: {exc}") from None
    return typed_view(cls, cfg)


def section_view(cls: type, recipe: str, section: str, cfg=None):
    """The typed view (``cls``) of one section of recipe ``recipe``'s defaults (``section``, a
    dotted key) with a partial plain ``cfg`` merged strictly over it; a view of ``cls`` is
    returned as it is. For units used on their own (tests, benchmarks), e.g.
    ``section_view(ImprovedProjectors, "improved", "model.improved", {"proj_dim": 64})``."""
    if isinstance(cfg, cls):
        return cfg
    from training.train import default_config

    base = default_config(recipe)
    for part in section.split("."):
        base = base[part]
    return typed_view(cls, deep_merge(base, cfg or {}, _prefix=f"{section}."), section)


def plain_config(cfg: Mapping) -> dict:
    """A possibly partial plain config (a checkpoint's ``meta.json`` written before a key was
    added, a hand-made dict) merged over the defaults of its recipe: ready for :func:`train_config`."""
    from training.train import default_config

    base = default_config(cfg.get("recipe") or "clip")
    return deep_merge(base, copy.deepcopy(dict(cfg)), strict=False)
