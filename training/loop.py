"""``train_loop_per_worker``: what every Ray Train worker runs.

The loop knows nothing about recipes beyond :mod:`training.recipes`' three seams: it builds the
recipe's model and loss, streams its dataset shard, steps AdamW + cosine schedule, logs, reports
checkpoints through ``ray.train.report`` and resumes from ``ray.train.get_checkpoint()``.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import re
import sys
import tempfile
import time
from collections.abc import Mapping
from pathlib import Path

import torch
from torch import nn

from training.checkpoint import (checkpoint_dir_name, fetch_dir, load_train_state, mark_complete,
                                 newest_complete, read_meta, save_checkpoint, unwrap)
from training.settings import (SCHEDULE_KEYS, DebugConfig, TrainConfig, TrainSection, section_view,
                               train_config)


class TrainModule(nn.Module):
    """Model wrapper + loss in one module: DDP, the optimizer and checkpoints see both."""

    def __init__(self, model: nn.Module, loss):
        super().__init__()
        self.model = model
        if isinstance(loss, nn.Module):
            self.loss = loss
        else:
            self._loss_fn = loss

    def compute_loss(self, out: dict, batch: dict) -> dict:
        fn = self.loss if "loss" in self._modules else self._loss_fn
        return fn(out, batch)

    def forward(self, batch: dict) -> dict:
        return self.compute_loss(self.model(batch), batch)


def resolve_precision(precision: str, device: torch.device) -> torch.dtype | None:
    """Autocast dtype: ``auto`` is bf16 on GPU and full fp32 on CPU."""
    if precision == "auto":
        return torch.bfloat16 if device.type == "cuda" else None
    return {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}[precision]


def to_device(batch: dict, device: torch.device) -> dict:
    return {k: (v.to(device, non_blocking=True) if torch.is_tensor(v) else v) for k, v in batch.items()}


class MetricsLogger:
    """JSON lines + TensorBoard (tensorboardX) + a progress line; rank 0 only.

    ``log_dir`` is a local folder or a URL (``s3://...``). Object stores cannot append, so for a
    URL the files are written to a local staging folder (``metrics.jsonl`` first downloaded from
    the URL, so a resumed run continues it) and uploaded whole by :meth:`sync`: at every
    checkpoint, at the end, and at most every ``sync_every_s`` seconds in between.
    """

    def __init__(self, log_dir: str | None, enabled: bool, print_fn=print, storage=None,
                 sync_every_s: float = 60.0):
        self.enabled = enabled and log_dir is not None
        self.print = print_fn
        self.jsonl = self.tb = None
        self.remote = self.fs = None
        self.sync_every_s, self.last_sync = sync_every_s, time.time()
        if not self.enabled:
            return
        from curation.common.storage import is_remote

        local = log_dir
        if is_remote(log_dir):
            from training.data import url_to_fs

            self.fs, self.remote = url_to_fs(log_dir, storage)
            self.staging = tempfile.TemporaryDirectory(prefix="train_logs_")
            local = self.staging.name
            src = f"{self.remote}/metrics.jsonl"
            if self.fs.exists(src):
                self.fs.get_file(src, str(Path(local) / "metrics.jsonl"))
        self.local = Path(local)
        self.local.mkdir(parents=True, exist_ok=True)
        self.jsonl = open(self.local / "metrics.jsonl", "a", encoding="utf-8")
        try:
            from tensorboardX import SummaryWriter

            self.tb = SummaryWriter(str(self.local / "tensorboard"))
        except ImportError:
            self.tb = None

    def log(self, step: int, metrics: dict, progress: bool = True) -> None:
        if not self.enabled:
            return
        row = {"step": step, **{k: (float(v) if isinstance(v, (int, float)) else v) for k, v in metrics.items()}}
        self.jsonl.write(json.dumps(row) + "\n")
        self.jsonl.flush()
        if self.tb is not None:
            for k, v in metrics.items():
                if isinstance(v, (int, float)) and math.isfinite(v):
                    # TensorBoard tag names allow [A-Za-z0-9_./-]: recall@1 becomes recall_1 (as
                    # tensorboardX would, with a warning line per tag)
                    self.tb.add_scalar(re.sub(r"[^A-Za-z0-9_./-]", "_", k), v, step)
            self.tb.flush()
        if progress and "train/loss" in metrics:
            self.print(f"step {step}/{metrics.get('total_steps', '?')} epoch {metrics.get('epoch', 0)} "
                       f"loss {metrics['train/loss']:.4f} lr {metrics['train/lr']:.3g} "
                       f"samples/s {metrics['train/samples_per_s']:.1f} "
                       f"(data wait {100 * metrics.get('train/data_wait_frac', 0):.0f}%)", flush=True)
        if self.remote is not None and time.time() - self.last_sync > self.sync_every_s:
            self.sync()

    def write_json(self, name: str, obj) -> None:
        """A whole JSON file (``eval.json``) in the log folder, local or URL."""
        if not self.enabled:
            return
        text = json.dumps(obj, indent=2, default=str)
        if self.remote is not None:
            self.fs.pipe_file(f"{self.remote}/{name}", text.encode())
        else:
            (self.local / name).write_text(text)

    def sync(self) -> None:
        """Upload the staged files to the log URL (no-op for a local folder)."""
        if not self.enabled or self.remote is None:
            return
        if self.jsonl:
            self.jsonl.flush()
        if self.tb is not None:
            self.tb.flush()
        for path in sorted(self.local.rglob("*")):
            if path.is_file():
                self.fs.put_file(str(path), f"{self.remote}/{path.relative_to(self.local).as_posix()}")
        self.last_sync = time.time()

    def close(self):
        if self.jsonl:
            self.jsonl.close()
        if self.tb is not None:
            self.tb.close()
        if self.remote is not None:
            self.jsonl = self.tb = None
            self.sync()
            self.staging.cleanup()
            self.remote = None


class DebugHooks:
    """Test hooks (``debug.*``), all off by default.

    ``debug.dir`` (a local folder): each worker writes ``worker-<rank>.pid``; one-shot markers go
    there; with ``debug.log_keys`` each worker appends ``keys-rank<rank>.jsonl`` rows (pid, step,
    epoch, the sample keys of each micro-batch, ``skipped`` for batches replayed without
    training on a mid-epoch resume). ``debug.pause_at_step``: at that step (after its logging and
    checkpoint), once per run, every worker writes ``paused-at-<step>-rank<rank>`` (its pid) and
    waits, so a test can SIGKILL a worker process there; after ``debug.pause_s`` it raises.
    ``debug.fail_at_step``: rank 0 raises once at that step (marker in ``debug.dir``, else in a
    local ``log_dir``).
    """

    def __init__(self, dcfg: DebugConfig | Mapping, rank: int, log_dir: str | None = None):
        from curation.common.storage import is_remote

        dcfg = section_view(DebugConfig, "clip", "debug", dcfg)  # a partial mapping: over the YAML's
        self.dir = dcfg.dir or (log_dir if log_dir and not is_remote(log_dir) else None)
        self.rank = rank
        self.log_keys = dcfg.log_keys and bool(dcfg.dir)
        self.pause_at = dcfg.pause_at_step
        self.fail_at = dcfg.fail_at_step if rank == 0 else None
        self.pause_s = dcfg.pause_s
        if dcfg.dir:
            Path(self.dir).mkdir(parents=True, exist_ok=True)
            (Path(self.dir) / f"worker-{rank}.pid").write_text(str(os.getpid()))

    def keys(self, step: int, epoch: int, batch, skipped: bool = False) -> None:
        keys = batch.get("key") if self.log_keys and isinstance(batch, dict) else None
        if keys is None:
            return
        row = {"pid": os.getpid(), "step": step, "epoch": epoch, "keys": [str(k) for k in keys],
               "skipped": skipped}
        with open(Path(self.dir) / f"keys-rank{self.rank}.jsonl", "a", encoding="utf-8") as f:
            f.write(json.dumps(row) + "\n")

    def _once(self, name: str) -> bool:
        if not self.dir:
            return False
        marker = Path(self.dir) / name
        if marker.exists():
            return False
        marker.parent.mkdir(parents=True, exist_ok=True)
        marker.write_text(str(os.getpid()))
        return True

    def fail_once(self, step: int) -> None:
        if self._once(f".injected_failure_at_{step}"):
            raise RuntimeError(f"injected failure at step {step} (debug.fail_at_step)")

    def maybe_fail(self, step: int) -> None:
        """``debug.fail_at_step``: rank 0 raises at that step, once per run."""
        if self.fail_at is not None and step == int(self.fail_at):
            self.fail_once(step)

    def maybe_pause(self, step: int) -> None:
        if self.pause_at is None or step != int(self.pause_at):
            return
        if not self._once(f"paused-at-{step}-rank{self.rank}"):
            return
        deadline = time.time() + self.pause_s
        while time.time() < deadline:
            time.sleep(0.05)
        raise RuntimeError(f"debug.pause_at_step={step}: nobody killed this worker in {self.pause_s:.0f}s")


def run_eval(recipe, module: nn.Module, eval_cfg: dict, device, log=None) -> dict | None:
    """``training.evaluate.run_evaluation`` on the recipe's embedder; None when unavailable.
    Its progress lines go to :func:`worker_print` (once each) unless ``log`` is given."""
    log = log or worker_print
    try:
        from training.evaluate import run_evaluation
    except ImportError as exc:
        log(f"evaluation skipped: training.evaluate is not available ({exc})")
        return None
    cfg = {k: v for k, v in eval_cfg.items() if k not in SCHEDULE_KEYS}
    model = unwrap(module).model
    return run_evaluation(recipe.embedder(model, device=device), cfg, log=log)


def headline(results: dict) -> dict:
    """Flat headline metrics of an evaluation (zero-shot acc1, R@1, linear probe)."""
    from training.evaluate import summary_metrics

    return {k: float(v) for k, v in summary_metrics(results).items() if isinstance(v, (int, float))}


def logit_scale_metric(model: nn.Module) -> dict:
    scale = getattr(model, "logit_scale", None)
    if callable(scale) and not isinstance(scale, torch.Tensor):  # the wrapper's own (exp'd, clamped) scale
        with torch.no_grad():
            return {"train/logit_scale": float(scale().detach().float())}
    scale = getattr(getattr(model, "clip", model), "logit_scale", None)
    if isinstance(scale, torch.Tensor):
        return {"train/logit_scale": float(scale.detach().float().exp())}
    return {}


@contextlib.contextmanager
def resume_dir(ray_checkpoint, run_url: str | None, storage=None):
    """A local folder holding the checkpoint to resume from, or None for a fresh start.

    The newer of Ray Train's latest recorded checkpoint and the newest *complete* checkpoint
    folder of the run (:func:`training.checkpoint.newest_complete`): a worker killed after a
    checkpoint was uploaded but before Ray Train's controller recorded it resumes from that
    checkpoint, not from the one before.
    """
    found = newest_complete(run_url, storage) if run_url else None
    if ray_checkpoint is not None:
        with ray_checkpoint.as_directory() as d:
            if found is None or int(read_meta(d)["step"]) >= found[1]:
                yield d
                return
    if found is None:
        yield None
        return
    with tempfile.TemporaryDirectory() as tmp:
        yield str(fetch_dir(found[0], tmp, storage))


def worker_print(text: str, **_) -> None:
    """One line on this worker's stdout (Ray forwards it to the driver). Ray Train replaces
    ``print`` on its workers with one that logs the message and, when stdout is wrapped (as it
    is in a Ray worker), also prints it: every line appeared twice."""
    sys.stdout.write(f"{text}\n")
    sys.stdout.flush()


# --- the pieces of a training step and of its schedule --------------------------------------------------

def autocast(amp_dtype: torch.dtype | None, device: torch.device):
    """``torch.autocast`` to ``amp_dtype``, or nothing for full precision."""
    if amp_dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=amp_dtype)


class TrainStep:
    """One optimizer step over a list of micro-batches: forward + backward of each (gradients
    averaged over them, DDP synchronising only on the last), gradient clipping, optimizer, grad
    scaler and scheduler steps, then the per-step updates (logit-scale clamp, the loss's
    ``after_step``: EMA targets). Returns the loss terms averaged over the micro-batches."""

    def __init__(self, net: nn.Module, module: TrainModule, optimizer, scheduler, scaler,
                 device: torch.device, amp_dtype: torch.dtype | None = None, grad_clip_norm=None):
        self.net, self.module = net, module
        self.optimizer, self.scheduler, self.scaler = optimizer, scheduler, scaler
        self.device, self.amp_dtype, self.grad_clip_norm = device, amp_dtype, grad_clip_norm

    def __call__(self, micro: list[dict]) -> dict:
        self.optimizer.zero_grad(set_to_none=True)
        terms_sum: dict = {}
        for i, b in enumerate(micro):
            defer_sync = i < len(micro) - 1 and hasattr(self.net, "no_sync")
            with self.net.no_sync() if defer_sync else contextlib.nullcontext():
                with autocast(self.amp_dtype, self.device):
                    terms = self.net(to_device(b, self.device))
                self.scaler.scale(terms["loss"] / len(micro)).backward()
            for k, v in terms.items():
                terms_sum[k] = terms_sum.get(k, 0.0) + float(v.detach()) / len(micro)
        if self.grad_clip_norm:
            self.scaler.unscale_(self.optimizer)
            torch.nn.utils.clip_grad_norm_(self.module.parameters(), float(self.grad_clip_norm))
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.scheduler.step()
        after_optimizer_step(self.module)
        return terms_sum


def after_optimizer_step(module: TrainModule) -> None:
    """The model's logit-scale clamp and the loss's per-step update (e.g. BYOLIP's EMA targets)."""
    if hasattr(module.model, "clamp_logit_scale"):
        module.model.clamp_logit_scale()
    loss_module = getattr(module, "loss", None)
    if hasattr(loss_module, "after_step"):
        loss_module.after_step()


class LogWindow:
    """Loss, throughput and data-wait share since the last logged step."""

    def __init__(self):
        self.reset()

    def reset(self) -> None:
        self.t0, self.samples, self.data_wait, self.losses = time.perf_counter(), 0, 0.0, []

    def add(self, samples: int, loss: float) -> None:
        self.samples += samples
        self.losses.append(loss)

    def metrics(self) -> dict:
        dt = max(time.perf_counter() - self.t0, 1e-9)
        return {"train/loss": sum(self.losses) / len(self.losses),
                "train/samples_per_s": self.samples / dt, "train/data_wait_frac": self.data_wait / dt}


def step_metrics(window: LogWindow, terms: dict, optimizer, model: nn.Module, epoch: int,
                 total_steps: int) -> dict:
    """The row logged at a logging step (``metrics.jsonl``, TensorBoard, the progress line)."""
    w = window.metrics()
    return {"train/loss": w["train/loss"], "train/lr": optimizer.param_groups[0]["lr"],
            "train/samples_per_s": w["train/samples_per_s"], "train/data_wait_frac": w["train/data_wait_frac"],
            **logit_scale_metric(model), **{f"train/{k}": v for k, v in terms.items() if k != "loss"},
            "epoch": epoch, "total_steps": total_steps}


class EvalSchedule:
    """When to evaluate: after every ``eval.every_n_epochs``-th epoch that ends before the last
    step (0: never), and once at the end; nothing when ``eval.enabled`` is false."""

    def __init__(self, enabled: bool, every_n_epochs: int):
        self.enabled, self.every = bool(enabled), int(every_n_epochs)

    def after_epoch(self, epoch: int, step: int, total_steps: int) -> bool:
        return bool(self.every) and self.enabled and epoch % self.every == 0 and step < total_steps

    def at_end(self) -> bool:
        return self.enabled


class CheckpointReporter:
    """``ray.train.report`` of metrics, with a checkpoint every ``train.checkpoint_every_steps``
    and at the end: rank 0 saves the folder (:func:`training.checkpoint.save_checkpoint`), every
    rank reports (into ``checkpoint_step_<step>``), then rank 0 writes the completeness marker.
    ``report_fn`` / ``checkpoint_fn`` are ``ray.train.report`` / ``ray.train.Checkpoint.from_directory``
    (replaceable in tests)."""

    def __init__(self, *, module: TrainModule, optimizer, scheduler, scaler, arch: str, recipe: str,
                 every: int, total_steps: int, is_main: bool, run_url: str | None, storage=None,
                 logger: MetricsLogger | None = None, last_saved: int = -1, report_fn=None,
                 checkpoint_fn=None):
        self.module, self.optimizer, self.scheduler, self.scaler = module, optimizer, scheduler, scaler
        self.arch, self.recipe, self.total_steps, self.is_main = arch, recipe, total_steps, is_main
        self.run_url, self.storage, self.logger = run_url, storage, logger
        self.every = every  # train.checkpoint_every_steps (0: only at the end)
        self.last_saved = last_saved
        if report_fn is None or checkpoint_fn is None:
            import ray.train

            report_fn = report_fn or ray.train.report
            checkpoint_fn = checkpoint_fn or ray.train.Checkpoint.from_directory
        self.report_fn, self.checkpoint_fn = report_fn, checkpoint_fn

    def due(self, step: int) -> bool:
        """A periodic checkpoint at this step (the last step's is the final report's)."""
        return bool(self.every) and step % self.every == 0 and step < self.total_steps

    def report(self, metrics: dict, *, step: int, epoch: int, epoch_step: int, with_checkpoint: bool) -> None:
        if not with_checkpoint:
            self.report_fn(metrics)
            return
        if self.logger is not None:
            self.logger.sync()
        with tempfile.TemporaryDirectory() as tmp:
            if self.is_main:
                save_checkpoint(tmp, module=self.module, clip=getattr(self.module.model, "clip", None),
                                arch=self.arch, recipe=self.recipe,
                                step=step, epoch=epoch, optimizer=self.optimizer, scheduler=self.scheduler,
                                scaler=self.scaler,
                                extra={"epoch_step": epoch_step, "total_steps": self.total_steps})
            self.report_fn(metrics, checkpoint=self.checkpoint_fn(tmp) if self.is_main else None,
                           checkpoint_dir_name=checkpoint_dir_name(step))
        # report() returns once the folder is uploaded; Ray Train records it only when its
        # controller next polls the workers. The marker makes it resumable from now on.
        if self.is_main and self.run_url:
            mark_complete(self.run_url, step, epoch, self.storage)
        self.last_saved = step


def resume(module: TrainModule, optimizer, scheduler, scaler, device, ray_checkpoint, run_url: str | None,
           storage=None, log=None) -> tuple[int, int, int] | None:
    """``(step, epoch, epoch_step)`` of the checkpoint :func:`resume_dir` picks, with its state
    loaded into ``module``, ``optimizer``, ``scheduler`` and ``scaler``; None for a fresh start."""
    with resume_dir(ray_checkpoint, run_url, storage) as d:
        if d is None:
            return None
        state = load_train_state(d, module=module, optimizer=optimizer, scheduler=scheduler,
                                 scaler=scaler, map_location=device)
        meta = json.loads((Path(d) / "meta.json").read_text())
    if log is not None:
        log(f"resumed from checkpoint at step {state['step']} (epoch {state['epoch']})")
    return state["step"], state["epoch"], int(meta.get("epoch_step", 0))


def take_batches(it, n: int, debug: DebugHooks, step: int, epoch: int) -> list:
    """Up to ``n`` batches of ``it`` (fewer when it runs out), logged as those of ``step``."""
    out = []
    for _ in range(n):
        b = next(it, None)
        if b is None:
            break
        out.append(b)
        debug.keys(step, epoch, b)
    return out


def replay(it, n: int, debug: DebugHooks, first_step: int, epoch: int, accum: int) -> None:
    """Skip ``n`` micro-batches of a resumed epoch without training on them (logged ``skipped``)."""
    for i in range(n):
        b = next(it, None)
        if b is None:
            break
        debug.keys(first_step + i // accum, epoch, b, skipped=True)


def evaluate_and_log(recipe, module: nn.Module, eval_cfg: dict, device, logger: MetricsLogger,
                     step: int, save_as: str | None = None) -> dict:
    """:func:`run_eval`, its results written to the log folder as ``save_as`` (if given) and its
    headline metrics logged at ``step``; returns those metrics as ``eval/*`` ({} when unavailable)."""
    res = run_eval(recipe, module, eval_cfg, device)
    if res is None:
        return {}
    if save_as:
        logger.write_json(save_as, res)
    flat = {f"eval/{k}": v for k, v in headline(res).items()}
    logger.log(step, flat, progress=False)
    return flat


def worker_node_ids(world: int) -> list:
    """The Ray node of every rank (in the final metrics and summary.json: where the workers ran)."""
    import ray

    nodes = [ray.get_runtime_context().get_node_id()]
    if world > 1 and torch.distributed.is_available() and torch.distributed.is_initialized():
        nodes = [None] * world
        torch.distributed.all_gather_object(nodes, ray.get_runtime_context().get_node_id())
    return nodes


def wrap_for_training(module: nn.Module, world: int, device: torch.device, cfg: TrainConfig) -> nn.Module:
    """DDP with several workers, then ``torch.compile`` when ``model.compile``."""
    net = module
    if world > 1:
        net = nn.parallel.DistributedDataParallel(
            module, device_ids=[device.index] if device.type == "cuda" else None,
            find_unused_parameters=cfg.train.find_unused_parameters)
    if cfg.model.compile:
        net = torch.compile(net)
    return net


def warmup_steps(tcfg: TrainSection, total_steps: int) -> int:
    """``train.warmup_steps`` (null: 5% of the steps, at least 1), at most ``total_steps``."""
    warmup = tcfg.warmup_steps if tcfg.warmup_steps is not None else max(1, total_steps // 20)
    return min(warmup, total_steps)


def without_total(metrics: dict) -> dict:
    return {k: v for k, v in metrics.items() if k != "total_steps"}


# --- the loop -----------------------------------------------------------------------------------------------

def train_loop_per_worker(config: dict) -> None:
    import ray.train
    import ray.train.torch

    from training.data import iter_batches
    from training.optim import build_optimizer, build_scheduler
    from training.recipes import get_recipe

    cfg, storage = train_config(config["cfg"]), config.get("storage")  # the driver's typed view
    if storage is not None:  # this process opens URLs (s3://) as the driver does
        storage.apply()
    tcfg, dcfg = cfg.train, cfg.data
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    is_main = rank == 0
    device = ray.train.torch.get_device()
    steps_per_epoch, total_steps = int(config["steps_per_epoch"]), int(config["total_steps"])
    local_bs, accum = int(config["local_batch_size"]), tcfg.accum_steps
    global_bs = local_bs * accum * world
    log_dir, run_url = config.get("log_dir"), config.get("run_url")

    # model + loss (the recipe's), optimizer, schedule, precision
    if tcfg.torch_threads:
        torch.set_num_threads(tcfg.torch_threads)  # Ray sets OMP threads = worker CPUs
    torch.manual_seed(tcfg.seed)
    recipe = get_recipe(cfg)
    model = recipe.build_model()
    if cfg.model.grad_checkpointing:
        model.set_grad_checkpointing(True)
    module = TrainModule(model, recipe.build_loss(model)).to(device)
    optimizer = build_optimizer(module, tcfg)
    scheduler = build_scheduler(optimizer, warmup_steps(tcfg, total_steps), total_steps,
                                tcfg.min_lr_ratio)
    amp_dtype = resolve_precision(tcfg.precision, device)
    scaler = torch.amp.GradScaler(device.type, enabled=amp_dtype == torch.float16)

    # resume: the newest complete checkpoint of this run
    resumed = resume(module, optimizer, scheduler, scaler, device, ray.train.get_checkpoint(), run_url,
                     storage, log=worker_print if is_main else None)
    step, epoch, epoch_step = resumed or (0, 0, 0)

    net = wrap_for_training(module, world, device, cfg)
    worker_nodes = worker_node_ids(world)
    logger = MetricsLogger(log_dir, is_main, print_fn=worker_print, storage=storage)
    debug = DebugHooks(cfg.debug, rank, log_dir)
    checkpoints = CheckpointReporter(module=module, optimizer=optimizer, scheduler=scheduler, scaler=scaler,
                                     arch=cfg.model.arch, recipe=cfg.recipe, every=tcfg.checkpoint_every_steps,
                                     total_steps=total_steps, is_main=is_main, run_url=run_url,
                                     storage=storage, logger=logger, last_saved=step if resumed else -1)
    evals = EvalSchedule(cfg.eval["enabled"], cfg.eval["every_n_epochs"])  # clip.yaml's schedule keys
    train_step = TrainStep(net, module, optimizer, scheduler, scaler, device, amp_dtype, tcfg.grad_clip_norm)
    log_every = max(1, tcfg.log_every_steps)
    shard = ray.train.get_dataset_shard("train")

    net.train()
    window, last = LogWindow(), {}
    # resumed mid-epoch: replay the epoch's (deterministic, data.deterministic) order up to where
    # the checkpoint was taken, without training on it
    skip = epoch_step * accum if (epoch_step and dcfg.deterministic) else 0
    while step < total_steps:
        budget = min(steps_per_epoch - epoch_step, total_steps - step)
        done_this_epoch = 0
        it = iter(iter_batches(shard, local_bs, collate_fn=recipe.collate,
                               shuffle_buffer=dcfg.shuffle_buffer, prefetch_batches=dcfg.prefetch_batches,
                               seed=tcfg.seed + epoch))
        replay(it, skip if budget > 0 else 0, debug, step - epoch_step + 1, epoch, accum)
        skip = 0
        while done_this_epoch < budget:
            t0 = time.perf_counter()
            micro = take_batches(it, accum, debug, step + 1, epoch)
            window.data_wait += time.perf_counter() - t0
            if len(micro) < accum:
                break  # the shard ran out (bad samples were skipped): next epoch
            terms = train_step(micro)
            step, epoch_step, done_this_epoch = step + 1, epoch_step + 1, done_this_epoch + 1
            window.add(global_bs, terms["loss"])
            debug.maybe_fail(step)
            if step % log_every == 0 or step == total_steps:
                last = step_metrics(window, terms, optimizer, module.model, epoch, total_steps)
                logger.log(step, last)
                window.reset()
            if checkpoints.due(step):
                checkpoints.report({"step": step, "epoch": epoch, **without_total(last)}, step=step,
                                   epoch=epoch, epoch_step=epoch_step, with_checkpoint=True)
            debug.maybe_pause(step)
        if done_this_epoch == 0 and epoch_step == 0:
            raise RuntimeError("the training data yielded no full batch: fewer usable samples than "
                               f"the per-worker batch size {local_bs}")
        if epoch_step >= steps_per_epoch or done_this_epoch < budget:
            epoch, epoch_step = epoch + 1, 0
            if is_main and evals.after_epoch(epoch, step, total_steps):
                evaluate_and_log(recipe, module, cfg.eval, device, logger, step)

    final = {"step": step, "epoch": epoch, **without_total(last), "worker_nodes": worker_nodes}
    if is_main and evals.at_end():
        final.update(evaluate_and_log(recipe, module, cfg.eval, device, logger, step, save_as="eval.json"))
    logger.close()
    checkpoints.report(final, step=step, epoch=epoch, epoch_step=epoch_step,
                       with_checkpoint=checkpoints.last_saved != step)
