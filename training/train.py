"""CLIP training on curated webdataset shards with Ray Train (TorchTrainer).

    python training/train.py [--config FILE] [key.sub=value ...]
    ray job submit --working-dir . -- python training/train.py data.train=s3://bucket/cat/shards ...

With no arguments it trains the tiny CPU model on the demo curation output (curating the demo
dataset first when it is missing) and prints the evaluation. Re-running with the same
``run.name`` (and ``run.storage_path``) resumes from that run's last checkpoint.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import posixpath
import sys
import time
from dataclasses import replace
from pathlib import Path

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from curation.common.config import (CONFIG_DIR, ConfigError, apply_overrides, deep_merge, user_error,  # noqa: E402
                             load_yaml, parse_override)
from training.settings import SCHEDULE_KEYS, TrainConfig  # noqa: E402

DEFAULT_CONFIG = CONFIG_DIR / "train" / "clip.yaml"
EVAL_DEFAULTS = CONFIG_DIR / "eval" / "default.yaml"


class TrainError(RuntimeError):
    pass


# --- configuration -------------------------------------------------------------------------------------

def _recipe_name(user: dict, overrides: list[str]) -> str | None:
    name = user.get("recipe")
    for text in overrides:
        path, value = parse_override(text)
        if path == ["recipe"]:
            name = value
    return name


def merge_recipe_file(cfg: dict, path: Path, recipe: str) -> dict:
    """``cfg`` with the recipe's YAML merged over it strictly: the file may add the keys its
    recipe class declares (``Recipe.config_keys``); any other key ``cfg`` lacks is a
    :class:`ConfigError` naming the file and the key."""
    from training.recipes import recipe_class

    data = load_yaml(path)
    base = copy.deepcopy(cfg)
    adds = recipe_class(recipe).config_keys
    for dotted in adds:  # the recipe's own keys join the base with the file's values
        *parents, key = dotted.split(".")
        src, dst = data, base
        for p in parents:
            src, dst = (src.get(p) or {}), dst.setdefault(p, {})
        if key in src and key not in dst:
            dst[key] = copy.deepcopy(src[key])
    try:
        return deep_merge(base, data)
    except ConfigError as exc:
        raise ConfigError(f"{path}: {exc} (recipe {recipe} adds {', '.join(adds) or 'no keys'}; every "
                          f"other key must be one of {DEFAULT_CONFIG.name}'s)") from None


def default_config(recipe: str | None = None) -> dict:
    """``configs/train/clip.yaml``, the recipe's own YAML over it, eval defaults under ``eval``."""
    cfg = load_yaml(DEFAULT_CONFIG)
    if recipe and recipe != cfg.get("recipe"):
        extra = CONFIG_DIR / "train" / f"{recipe}.yaml"
        if extra.exists():
            cfg = merge_recipe_file(cfg, extra, recipe)
    if EVAL_DEFAULTS.exists():
        defaults = load_yaml(EVAL_DEFAULTS)
        own = dict(cfg.get("eval") or {})
        schedule = {k: own.pop(k) for k in SCHEDULE_KEYS if k in own}  # the loop's, not evaluate's
        cfg["eval"] = {**deep_merge(defaults.get("eval", defaults), own, _prefix="eval."), **schedule}
    return cfg


def build_train_config(user_file: str | None = None, overrides: list[str] = ()) -> dict:
    user = load_yaml(user_file) if user_file else {}
    cfg = default_config(_recipe_name(user, list(overrides)))
    if user:
        cfg = deep_merge(cfg, user)
    return apply_overrides(cfg, overrides)


def checked_config(cfg: dict) -> TrainConfig:
    """The typed view of a merged config (:mod:`training.settings`), its ``eval`` section checked
    by its owner (:func:`training.eval_settings.eval_config`) too, on the driver before any work:
    a wrong key or value is a :class:`ConfigError` naming it."""
    from training.eval_settings import eval_config
    from training.settings import train_config

    view = train_config(cfg)
    eval_config({k: v for k, v in view.eval.items() if k not in SCHEDULE_KEYS})
    return view


def parse_args(argv=None) -> TrainConfig:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", help=f"YAML merged over {DEFAULT_CONFIG.relative_to(CONFIG_DIR.parent)}")
    parser.add_argument("overrides", nargs="*", metavar="key.sub=value")
    args = parser.parse_args(argv)
    try:
        return checked_config(build_train_config(args.config, args.overrides))
    except ConfigError as exc:
        user_error(exc)
        raise


# --- planning ------------------------------------------------------------------------------------------

def plan_batches(num_samples: int, global_batch: int, num_workers: int, accum_steps: int,
                 epochs: float, max_steps: int | None = None) -> dict:
    """Per-worker batch, steps per epoch and total optimizer steps."""
    per_step = num_workers * accum_steps
    if global_batch % per_step:
        raise TrainError(f"train.batch_size={global_batch} must be divisible by scaling.num_workers"
                         f" x train.accum_steps = {per_step}")
    # samples are split equally over the workers; each worker drops its last partial batch
    steps_per_epoch = (num_samples // num_workers) // (global_batch // num_workers)
    if steps_per_epoch < 1:
        raise TrainError(f"only {num_samples} training samples: fewer than one global batch of "
                         f"{global_batch}; lower train.batch_size")
    total = int(max_steps) if max_steps else max(1, int(round(epochs * steps_per_epoch)))
    return {"local_batch_size": global_batch // per_step, "steps_per_epoch": steps_per_epoch,
            "total_steps": total}


def demo_curation_overrides(cfg: TrainConfig) -> list[str]:
    """Curation overrides that make the training demo: ``output`` = ``data.demo_output``, and
    ``demo.num_samples`` / ``demo.num_shards`` from ``data.demo_samples`` / ``data.demo_shards``
    (null: the curation defaults). A demo of another size is generated next to the curated
    output (``<demo_output>_input``) so it never overwrites ``make demo``'s input."""
    out = cfg.data.demo_output
    overrides = [f"output={out}", "progress=false"]
    sized = False
    for key, name in (("demo_samples", "num_samples"), ("demo_shards", "num_shards")):
        value = getattr(cfg.data, key)
        if value is not None:
            if value < 1:
                raise TrainError(f"data.{key} must be a positive integer or null, got {value!r}")
            overrides.append(f"demo.{name}={value}")
            sized = True
    if sized:
        overrides.append(f"demo.output={str(out).rstrip('/')}_input")
    return overrides


def ensure_demo_data(cfg: TrainConfig, log=print) -> str:
    """The demo curation output (``data.demo_output``), curated when missing from a generated demo
    of ``data.demo_samples`` pairs (see :func:`demo_curation_overrides`)."""
    out, want = cfg.data.demo_output, cfg.data.demo_samples
    if (Path(out) / "shards" / "sizes.json").exists():
        summary = Path(out) / "summary.json"
        try:
            have = json.loads(summary.read_text())["config"]["demo"]["num_samples"]
        except (OSError, ValueError, KeyError, TypeError):
            have = None
        if want is not None and have is not None and have != want:
            log(f"note: {out} was curated from a {have}-pair demo, not data.demo_samples={want}; "
                f"delete it (or set data.demo_output) to curate the larger demo")
        return out
    from curation.common.config import build_config
    from curation.pipeline import curate

    overrides = demo_curation_overrides(cfg)
    log(f"no data.train given and no demo curation output at {out}: curating the demo dataset "
        f"({' '.join(overrides[2:]) or 'curation defaults'})")
    ccfg = build_config(CONFIG_DIR / "curation" / "cat_filter.yaml", overrides=overrides)
    curate(ccfg, log=log)
    return out


def resolve_use_gpu(value: bool | str) -> bool:
    """``scaling.use_gpu`` (true | false | auto: whether the cluster has GPUs)."""
    if value in (True, False):
        return value
    import ray

    return ray.cluster_resources().get("GPU", 0) > 0


def storage_and_name(cfg: TrainConfig) -> tuple[str, str]:
    from curation.common.storage import absolute

    storage = absolute(cfg.run.storage_path).rstrip("/")
    name = cfg.run.name or f"{cfg.recipe}-{cfg.model.arch}-{time.strftime('%Y%m%d-%H%M%S')}"
    return storage, name


def log_dir_for(cfg: TrainConfig, storage: str, name: str) -> str:
    """``run.log_dir``, else ``<run.storage_path>/<name>``: a local folder or a URL (the logs
    then go to the bucket next to the checkpoints, see :class:`training.loop.MetricsLogger`)."""
    from curation.common.storage import absolute, url_join

    if cfg.run.log_dir:
        return absolute(cfg.run.log_dir)
    return url_join(storage, name)


def ray_train_storage(storage_path: str, storage) -> tuple[str, object | None]:
    """``(storage_path, storage_filesystem)`` for Ray Train's ``RunConfig``: a URL becomes a
    path in an explicit pyarrow filesystem over s3fs built with the captured settings
    (endpoint, credentials, ``storage_options``), so checkpoints work against any S3-compatible
    endpoint and the filesystem carries its settings to every worker."""
    from curation.common.storage import is_remote
    from training.data import pyarrow_filesystem, url_to_fs

    if not is_remote(storage_path):
        return storage_path, None
    fs, path = url_to_fs(storage_path, storage)
    return path, pyarrow_filesystem(fs)


def write_text(url: str, text: str, storage=None) -> None:
    from training.data import url_to_fs

    fs, path = url_to_fs(url, storage)
    fs.makedirs(posixpath.dirname(path), exist_ok=True)
    fs.pipe_file(path, text.encode())


def read_text(url: str, storage=None) -> str | None:
    from training.data import url_to_fs

    fs, path = url_to_fs(url, storage)
    if not fs.exists(path):
        return None
    return fs.cat_file(path).decode()


# --- the job ---------------------------------------------------------------------------------------

def build_trainer(cfg: TrainConfig, log=print, storage=None):
    """Everything up to ``TorchTrainer``; returns ``(trainer, info)``. ``storage``: the
    :class:`curation.common.storage.Storage` captured on the driver (every worker applies it)."""
    from ray.train import CheckpointConfig, DataConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    from curation.common.storage import Storage, url_join

    from training.data import build_dataset, count_samples, resolve_shards, start_error_counter
    from training.loop import train_loop_per_worker
    from training.recipes import get_recipe

    storage_settings = storage if storage is not None else Storage.capture(cfg.storage_options)
    train_data = cfg.data.train or ensure_demo_data(cfg, log=log)  # absolute: see absolute_paths
    cfg = replace(cfg, data=replace(cfg.data, train=train_data))
    paths, fs = resolve_shards(train_data, storage_settings)
    num_samples = cfg.data.num_samples or count_samples(paths, fs)
    recipe = get_recipe(cfg)
    cfg = recipe.cfg  # as the recipe resolved it (DiHT: the concepts folder, absolute)
    counter = start_error_counter()
    ds = build_dataset(cfg.data, recipe.sample_transform(is_train=True, counter=counter),
                       storage=storage_settings, seed=cfg.train.seed)
    if not num_samples:
        log("no sizes.json for these shards: counting samples (one pass over the data)")
        num_samples = ds.count()
    sc, tcfg = cfg.scaling, cfg.train
    plan = plan_batches(int(num_samples), tcfg.batch_size, sc.num_workers, tcfg.accum_steps, tcfg.epochs,
                        tcfg.max_steps)
    use_gpu = resolve_use_gpu(sc.use_gpu)
    resources = {"CPU": sc.cpus_per_worker}
    if use_gpu:
        resources["GPU"] = sc.gpus_per_worker or 1.0
    resources.update(sc.extra_resources)
    storage, name = storage_and_name(cfg)
    log_dir = log_dir_for(cfg, storage, name)
    from curation.common.jobs import warn_local_paths_on_cluster

    first = train_data[0] if isinstance(train_data, (list, tuple)) else train_data
    warn_local_paths_on_cluster({"data.train": first, "run.storage_path": storage, "run.log_dir": log_dir},
                                log=log)
    ray_storage_path, ray_fs = ray_train_storage(storage, storage_settings)
    info = {"num_samples": int(num_samples), "num_shards": len(paths), "use_gpu": use_gpu,
            "storage_path": storage, "name": name, "log_dir": log_dir, "counter": counter,
            "data": train_data, **plan}
    trainer = TorchTrainer(
        train_loop_per_worker,
        train_loop_config={"cfg": cfg, "log_dir": log_dir, "run_url": url_join(storage, name),
                           "storage": storage_settings, **plan},
        scaling_config=ScalingConfig(num_workers=sc.num_workers, use_gpu=use_gpu, resources_per_worker=resources,
                                     placement_strategy=sc.placement_strategy),
        run_config=RunConfig(name=name, storage_path=ray_storage_path, storage_filesystem=ray_fs,
                             failure_config=FailureConfig(max_failures=cfg.run.max_failures),
                             checkpoint_config=CheckpointConfig(num_to_keep=cfg.run.num_to_keep)),
        datasets={"train": ds},
        dataset_config=data_config(DataConfig, cfg.data.deterministic),
    )
    return trainer, info


def data_config(DataConfig, deterministic: bool):
    """How Ray Train splits the dataset over the workers. Deterministic (``data.deterministic``):
    ordered execution and no locality-driven assignment of blocks to workers (which depends on
    where and when blocks were produced), so each worker's rows are the same in every run."""
    if not deterministic:
        return DataConfig()
    options = DataConfig.default_ingest_options()
    options.preserve_order = True
    return DataConfig(execution_options=options, enable_shard_locality=False)


def absolute_paths(cfg: TrainConfig) -> TrainConfig:
    """The config with its local paths made absolute. Done before ``ray.init``: under
    ``ray job submit`` the driver runs in the job's unpacked working_dir, which Ray may unpack
    again when the first worker starts on the head node, leaving the driver in a deleted
    directory (``os.getcwd()`` fails; relative paths no longer resolve)."""
    from curation.common.storage import absolute

    def fixed(section, *keys):
        return replace(section, **{k: absolute(getattr(section, k)) for k in keys if getattr(section, k)})

    train_data = cfg.data.train
    if isinstance(train_data, str) and train_data:
        train_data = absolute(train_data)
    elif isinstance(train_data, (list, tuple)):
        train_data = tuple(absolute(t) for t in train_data)
    eval_cfg = dict(cfg.eval)
    if isinstance(eval_cfg.get("cache_dir"), str) and eval_cfg["cache_dir"]:
        eval_cfg["cache_dir"] = absolute(eval_cfg["cache_dir"])
    return replace(cfg, data=replace(fixed(cfg.data, "demo_output"), train=train_data),
                   run=fixed(cfg.run, "storage_path", "log_dir"), debug=fixed(cfg.debug, "dir"), eval=eval_cfg)


def train(cfg: TrainConfig | dict, log=print) -> dict:
    """Run the training job; returns a summary (checkpoint path, metrics, eval, skipped samples).
    ``cfg``: the typed view, or the merged plain config (parsed here, once)."""
    import ray
    # torch before ray.init: under ray job submit, Ray may unpack the working_dir again and leave
    # the driver in a deleted directory (see absolute_paths), where importing torch aborts the
    # process (oneMKL cannot load libtorch_cpu.so)
    import torch  # noqa: F401

    from curation.common.jobs import init_ray
    from curation.common.storage import Storage, is_remote

    cfg = checked_config(cfg) if not isinstance(cfg, TrainConfig) else cfg
    storage = Storage.capture(cfg.storage_options).apply()
    cfg = absolute_paths(cfg)
    init_ray(cfg.ray, storage=storage)
    data_context = ray.data.DataContext.get_current()
    data_context.enable_progress_bars = cfg.progress
    # Ray Data logs the dataset's execution plan at the start of every epoch: only with progress on
    data_context.print_on_execution_start = cfg.progress
    started = time.time()
    trainer, info = build_trainer(cfg, log=log, storage=storage)
    log(f"training {cfg.model.arch} ({cfg.recipe}) on {info['num_samples']} samples "
        f"in {info['num_shards']} shards: {info['total_steps']} steps of {cfg.train.batch_size} "
        f"({info['steps_per_epoch']} per epoch), {cfg.scaling.num_workers} worker(s), "
        f"gpu={info['use_gpu']}; run {info['name']} in {info['storage_path']}")
    result = trainer.fit()
    skipped = ray.get(info["counter"].summary.remote())
    checkpoint = result.checkpoint.path if result.checkpoint else None
    if checkpoint and is_remote(info["storage_path"]):  # a path in the bucket's filesystem
        checkpoint = info["storage_path"].split("://", 1)[0] + "://" + checkpoint.lstrip("/")
    summary = {
        "name": info["name"],
        "checkpoint": checkpoint,
        "metrics": result.metrics,
        "skipped_samples": skipped,
        "plan": {k: info[k] for k in ("num_samples", "steps_per_epoch", "total_steps", "local_batch_size")},
        "log_dir": info["log_dir"],
        "elapsed_s": round(time.time() - started, 1),
    }
    write_text(f"{info['log_dir']}/summary.json", json.dumps(summary, indent=2, default=str), storage)
    if result.error:
        raise TrainError(f"training failed: {result.error}")
    return summary


def format_eval(log_dir: str) -> str:
    text = read_text(f"{log_dir}/eval.json")
    if text is None:
        return "(no evaluation results)"
    results = json.loads(text)
    try:
        from training.evaluate import format_results
    except ImportError:
        return json.dumps(results, indent=2)
    return format_results(results)


def main(argv=None) -> int:
    cfg = parse_args(argv)
    try:
        summary = train(cfg)
    except TrainError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    m = summary["metrics"] or {}
    s = summary["skipped_samples"]
    print(f"\nrun {summary['name']}: {m.get('step')} steps in {summary['elapsed_s']}s, final loss "
          f"{m.get('train/loss', float('nan')):.4f}; skipped {s['skipped']} bad sample reads "
          f"({s['by_reason']})\ncheckpoint: {summary['checkpoint']}\nlogs: {summary['log_dir']}\n"
          f"evaluation ({summary['log_dir']}/eval.json):\n{format_eval(summary['log_dir'])}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
