"""The CAT curation job on Ray Data: the only module that wires filters to Ray.

Stages (each one's parallelism and resources come from the config's ``stages`` section):

1. **read** (Ray tasks, one per pending input shard): stream the shard's samples as Arrow
   blocks, validating captions and image bytes; one marker row closes each shard. Ray Data fuses
   it into the caption actors.
2. **the filters** (:mod:`curation.filters`), one stage per filter of the config's ``filters:``
   in its order, adjacent filters with the same stage key sharing one (:class:`FilterStage`,
   an actor pool, or Ray tasks with ``actors: 0``). Each stage scores only the samples that no
   earlier filter dropped (every pending one with the filter's ``evaluate_all``) and drops the
   image bytes of the samples that cannot be kept any more, so only those travel on. The CAT
   filters make two: **caption** (spaCy loaded once per actor; one parse gives Complexity and
   Action) and **ocr** (the OCR reader built once per actor, on CPU or on ``num_gpus`` per
   actor): Text spotting, by default only for samples that passed C and A.
3. **write** (Ray tasks): each block of decided rows becomes a part of its shard under
   ``_tmp/parts/``; a small tracker actor counts each shard's rows against the reader's marker,
   and the task whose part completes a shard finalizes it (``shards/NAME.tar``, its summary,
   then the commit, ``stats/NAME.parquet``). See :mod:`curation.output`.

The driver only starts the stages and receives one small result row per finalized shard: no
per-sample data reaches it, and the end-of-job funnel and ``sizes.json`` add up per-shard
summaries. Output shard ``NAME`` matches input shard ``NAME``, so the brace range users gave
img2dataset's output also names the curated shards.
"""

from __future__ import annotations

import json
import time
from collections import defaultdict

import pyarrow as pa

from curation.filters import (Filter, TextSpottingFilter, build_filters, ocr_rows_per_call, ocr_threads,
                              stage_groups)
from curation.ingest import (ERROR, PENDING, SHARD_END, SHARD_FAILED, IngestOptions, InputError, InputShard,
                             discover_shards, read_shard)
from curation.ocr import TextSpotter, TextSpottingConfig, make_spotter
from curation.output import (EVALUATED, NOT_EVALUATED, OutputFolder, aggregate, finalize_shard,
                             format_funnel, write_part)
from curation.settings import CurationConfig, StageResources, curation_config, with_defaults
from curation.common.jobs import init_ray, versions, warn_local_paths_on_cluster
from curation.common.storage import Storage, absolute


class PipelineError(RuntimeError):
    pass


class SettingsError(PipelineError):
    """A user mistake found before any work (the job prints one line and exits 2)."""


# --- stage functions (run inside Ray workers) ------------------------------------------------------

def read_shards_batch(batch: pa.Table, opts: IngestOptions, storage: Storage | None = None):
    import ray

    if storage is not None:
        storage.apply()
    node = ray.get_runtime_context().get_node_id()
    for spec in batch.to_pylist():
        for table in read_shard(InputShard(**spec), opts):
            if table.num_rows == 1 and table["status"][0].as_py() in (SHARD_END, SHARD_FAILED):
                table = table.set_column(table.schema.get_field_index("node"), "node",
                                         pa.array([node], pa.string()))
            yield table


PAYLOAD = ("image", "meta_json")  # what only a sample that may still be kept needs


def still_alive(batch: pa.Table) -> list[bool]:
    """Rows that may still be kept: pending, and no filter scored so far said no."""
    status = batch["status"].to_pylist()
    verdicts = [batch[c].to_pylist() for c in batch.column_names if c.startswith("passed_")]
    return [s == PENDING and all(v[i] is not False for v in verdicts) for i, s in enumerate(status)]


def prune_payload(batch: pa.Table, keep: list[bool]) -> pa.Table:
    """Null the image bytes and metadata of rows that cannot be kept any more."""
    for name in PAYLOAD:
        if name in batch.column_names and not all(keep):
            col = batch[name].to_pylist()
            batch = batch.set_column(batch.schema.get_field_index(name), name,
                                     pa.array([v if k else None for v, k in zip(col, keep)],
                                              batch.schema.field(name).type))
    return batch


def rows_to_score(batch: pa.Table, evaluate_all: bool) -> list[int]:
    """Rows a filter scores: the pending ones that no earlier filter dropped (all pending ones
    with ``evaluate_all``)."""
    if evaluate_all:
        return [i for i, s in enumerate(batch["status"].to_pylist()) if s == PENDING]
    return [i for i, alive in enumerate(still_alive(batch)) if alive]


def score_stage(batch: pa.Table, filters: list[Filter], shared: dict, keep_payload: bool = False) -> pa.Table:
    """One stage of the cascade on a block: each enabled filter scores the rows alive when the
    block entered the stage (:func:`rows_to_score`) and adds its columns; a row it could not
    score becomes a per-sample error. Then, unless ``keep_payload`` (a later filter scores every
    pending row), the image bytes of the rows that cannot be kept any more are dropped."""
    entry = {ev: rows_to_score(batch, ev) for ev in {f.evaluate_all for f in filters}}
    memo: dict = {}
    n = batch.num_rows
    status, error = batch["status"].to_pylist(), batch["error"].to_pylist()
    pending = [s == PENDING for s in status]
    new_cols = []
    for f in filters:
        if not f.enabled:
            continue
        idx = entry[f.evaluate_all]
        inputs = {c: batch[c].to_pylist() for c in f.inputs}
        rows = [{c: inputs[c][i] for c in f.inputs} for i in idx]
        scores = f.score(rows, shared, memo) if rows else {c: [] for c, _ in f.scores + f.details}
        errors = scores.get("error") or [None] * len(idx)
        ok = [j for j, e in enumerate(errors) if not e]
        passed = f.keep({k: [v[j] for j in ok] for k, v in scores.items()}, [rows[j] for j in ok])
        cols = {c: [None] * n for c, _ in f.scores + f.details}
        verdict = [None] * n
        state = [NOT_EVALUATED if p else None for p in pending]
        for j, i in enumerate(idx):
            if errors[j]:
                status[i], error[i], state[i] = ERROR, errors[j], None
                continue
            state[i] = EVALUATED
            for c in cols:
                cols[c][i] = scores[c][j]
        for j, p in zip(ok, passed):
            verdict[idx[j]] = p
        new_cols.append((f, cols, verdict, state))
    batch = batch.set_column(batch.schema.get_field_index("status"), "status", pa.array(status, pa.string()))
    batch = batch.set_column(batch.schema.get_field_index("error"), "error", pa.array(error, pa.string()))
    for f, cols, verdict, state in new_cols:
        for c, typ in f.scores:
            batch = batch.append_column(c, pa.array(cols[c], typ))
    for f, cols, verdict, state in new_cols:
        batch = batch.append_column(f.verdict, pa.array(verdict, pa.bool_()))
    for f, cols, verdict, state in new_cols:
        if f.status_column:
            batch = batch.append_column(f.status_column, pa.array(state, pa.string()))
    for f, cols, verdict, state in new_cols:
        for c, typ in f.details:
            batch = batch.append_column(c, pa.array(cols[c], typ))
    return batch if keep_payload else prune_payload(batch, still_alive(batch))


class FilterStage:
    """Ray Data actor for one stage of the cascade: its filters' :meth:`~Filter.setup` once
    (models loaded once per actor), then :func:`score_stage` on each block."""

    def __init__(self, filters: list[Filter], keep_payload: bool = False, storage: Storage | None = None):
        if storage is not None:
            storage.apply()
        self.filters, self.keep_payload, self.shared = filters, keep_payload, setup_filters(filters)

    def __call__(self, batch: pa.Table) -> pa.Table:
        return score_stage(batch, self.filters, self.shared, self.keep_payload)


def setup_filters(filters: list[Filter]) -> dict:
    """What the enabled filters of a stage share (models, ...), from their :meth:`~Filter.setup`."""
    shared: dict = {}
    for f in filters:
        if f.enabled:
            f.setup(shared)
    return shared


_TASK_SHARED: dict = {}  # a stage run as Ray tasks (``actors: 0``): set up once per worker process


def filter_stage_task(batch: pa.Table, filters: list[Filter], keep_payload: bool, key: str,
                      storage: Storage | None = None) -> pa.Table:
    if storage is not None:
        storage.apply()
    if key not in _TASK_SHARED:
        _TASK_SHARED[key] = setup_filters(filters)
    return score_stage(batch, filters, _TASK_SHARED[key], keep_payload)


class CaptionFilterStage(FilterStage):
    """Ray Data actor: loads the spaCy pipeline once, then scores blocks of captions (C and A)."""

    def __init__(self, filters: dict, spacy_cfg: dict, ocr_all: bool = False,
                 storage: Storage | None = None):
        job = curation_config({**with_defaults({"spacy": spacy_cfg}), "filters": filters})
        cascade = [f for f in build_filters(job) if f.stage_key == "caption"]
        super().__init__(cascade, keep_payload=ocr_all, storage=storage)


def add_text_spotting(batch: pa.Table, spotter: TextSpotter) -> pa.Table:
    """OCR the rows that need it; record the others as not evaluated; drop the image bytes of
    the rows that cannot be kept (the T stage with a given spotter).

    An image that cannot be decoded for OCR turns its row into a per-sample error.
    """
    return score_stage(batch, [TextSpottingFilter(spotter.cfg)], {"spotter": spotter})


class TextSpottingStage:
    """Ray Data actor: builds the OCR reader once (torch threads set per actor), then spots text
    in blocks of images: the T stage with explicit settings, which the re-selection subclasses
    (the CAT filter job's own T stage is a :class:`FilterStage`)."""

    def __init__(self, ts_cfg: TextSpottingConfig, max_pixels: int, gpu: bool, torch_threads: int | None,
                 ocr_batch_size: int, storage: Storage | None = None):
        if storage is not None:
            storage.apply()
        if not isinstance(ts_cfg, TextSpottingConfig):  # the YAML section
            ts_cfg = TextSpottingConfig.from_config(ts_cfg)
        self.spotter = make_spotter(ts_cfg, max_pixels, gpu, torch_threads, ocr_batch_size)

    def __call__(self, batch: pa.Table) -> pa.Table:
        return add_text_spotting(batch, self.spotter)


# --- driver ---------------------------------------------------------------------------------------


def ocr_actor_count(ocr_stage: StageResources, caption_reserved: float) -> int:
    """``stages.ocr.actors`` (any stage's ``actors``), or when null as many as the cluster's CPUs
    (GPUs with num_gpus) hold next to the other stages' actors (``caption_reserved`` CPUs)."""
    import ray

    if ocr_stage.actors:
        return ocr_stage.actors
    res = ray.cluster_resources()
    if ocr_stage.num_gpus:
        return max(1, int(res.get("GPU", 0) / ocr_stage.num_gpus))
    return max(1, int((res.get("CPU", 1) - caption_reserved) / ocr_stage.num_cpus + 1e-9))


class ShardTracker:
    """Ray actor (0 CPUs): counts each shard's rows as its parts are written and names the one
    write call that completes it, so exactly one task finalizes each shard. It holds only the
    shards in flight (part names and counts), never rows. A part written twice (a retried task)
    counts once."""

    def __init__(self):
        self.parts = defaultdict(dict)   # shard -> {part name: rows}
        self.expected = {}               # shard -> rows announced by the reader's marker
        self.read_node = {}              # shard -> the node that read it
        self.closed = set()

    def add(self, shard: str, part: str | None, rows: int, expected: int | None,
            read_node: str | None = None, notes: str | None = None):
        """Record a part (and/or the marker); return ``(rows, reading node, notes)`` of the shard
        when this call completes it, else None."""
        if shard in self.closed:
            return None
        if part is not None:
            self.parts[shard][part] = rows
        if expected is not None:
            self.expected[shard] = expected
            self.read_node[shard] = (read_node, notes)
        if shard in self.expected and sum(self.parts[shard].values()) == self.expected[shard]:
            self.closed.add(shard)
            self.parts.pop(shard, None)
            node, notes = self.read_node.pop(shard, (None, None))
            return self.expected.pop(shard), node, notes
        return None

    def fail(self, shard: str) -> None:
        """The shard could not be read: it is never finalized (its parts are dropped)."""
        self.closed.add(shard)
        self.parts.pop(shard, None)
        self.expected.pop(shard, None)
        self.read_node.pop(shard, None)

    def open_shards(self) -> list[str]:
        return sorted((set(self.parts) | set(self.expected)) - self.closed)


RESULT_SCHEMA = pa.schema([("shard", pa.string()), ("summary", pa.string()), ("error", pa.string())])


def write_blocks(batch: pa.Table, out_url: str, tracker, storage: Storage | None = None,
                 filters: list[Filter] | None = None) -> pa.Table:
    """Write stage (Ray task): one part per shard present in the block; finalize the shards this
    call completes. Returns one result row per finalized (or failed) shard, nothing per sample."""
    import json

    import ray

    if storage is not None:
        storage.apply()
    out = OutputFolder(out_url)
    by_shard = defaultdict(list)
    for r in batch.to_pylist():
        by_shard[r["shard"]].append(r)
    results = []
    for shard, records in by_shard.items():
        rows = [r for r in records if r["status"] not in (SHARD_END, SHARD_FAILED)]
        marker = next((r for r in records if r["status"] in (SHARD_END, SHARD_FAILED)), None)
        if marker is not None and marker["status"] == SHARD_FAILED:
            ray.get(tracker.fail.remote(shard))
            results.append({"shard": shard, "summary": None, "error": marker["error"]})
            continue
        expected, read_node, notes = ((marker["shard_rows"], marker.get("node"), marker.get("error"))
                                      if marker else (None, None, None))
        try:
            part = write_part(out, shard, rows, filters) if rows else None
            complete = ray.get(tracker.add.remote(shard, part, len(rows), expected, read_node, notes))
            if complete is not None:
                nodes = {"read": complete[1], "written": ray.get_runtime_context().get_node_id()}
                summary = finalize_shard(out, shard, complete[0], nodes=nodes, notes=complete[2],
                                         filters=filters)
                results.append({"shard": shard, "summary": json.dumps(summary), "error": None})
        except Exception as exc:  # noqa: BLE001 - the shard stays uncommitted; the job says so
            results.append({"shard": shard, "summary": None, "error": f"{type(exc).__name__}: {exc}"})
    return pa.Table.from_pylist(results, schema=RESULT_SCHEMA)


def stage_settings(group: list[Filter], cfg: CurationConfig) -> StageResources:
    """A stage's resources: the config's ``stages.<stage>`` (e.g. ``stages.caption``,
    ``stages.ocr``; a plug-in filter's over its :attr:`Filter.resources`)."""
    return cfg.stages.stage(group[0].stage_key)


def set_data_context(cfg: CurationConfig) -> None:
    """Ray Data's progress bars (``progress``) and actor start-up wait (``stages.wait_for_actors_s``)."""
    import ray

    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = cfg.progress
    if cfg.stages.wait_for_actors_s:
        ctx.wait_for_min_actors_s = int(cfg.stages.wait_for_actors_s)


def build_dataset(pending: list[InputShard], cfg: CurationConfig, out_url: str, tracker,
                  storage: Storage | None = None):
    """read -> one stage per run of filters sharing a stage key, in cascade order -> write."""
    import ray

    stages, opts = cfg.stages, cfg.ingest
    set_data_context(cfg)
    filters = build_filters(cfg)
    groups = [g for g in stage_groups(filters) if any(f.enabled for f in g)]
    settings = [stage_settings(g, cfg) for g in groups]
    # When the first stage is a fixed-size actor pool (the caption stage), the read runs inside
    # its actors: Ray Data fuses the two only when their resources are equal, and an unfused read
    # task could wait forever for a CPU that the actor pools hold.
    fused = bool(settings) and bool(settings[0].actors)
    read_res = ({"num_cpus": settings[0].num_cpus, "num_gpus": settings[0].num_gpus} if fused
                else {"num_cpus": stages.read.num_cpus})
    reserved = 0.0 if fused else stages.read.num_cpus
    reserved += sum(st.actors * st.num_cpus for st in settings if st.actors)
    ds = ray.data.from_items([s.to_dict() for s in pending], override_num_blocks=len(pending))
    ds = ds.map_batches(read_shards_batch, fn_kwargs={"opts": opts, "storage": storage},
                        batch_size=1, batch_format="pyarrow",
                        concurrency=stages.read.concurrency, **read_res)
    for k, (group, st) in enumerate(zip(groups, settings)):
        later = [f for g in groups[k + 1:] for f in g if f.enabled]
        keep_payload = any(f.evaluate_all for f in later)  # a later stage needs every pending image
        res = {"num_cpus": st.num_cpus, "num_gpus": st.num_gpus}
        if st.actors == 0:  # Ray tasks, set up once per worker process
            key = json.dumps([[f.name, f.cfg] for f in group], sort_keys=True, default=str)
            ds = ds.map_batches(filter_stage_task, fn_kwargs={"filters": group, "keep_payload": keep_payload,
                                                              "key": key, "storage": storage},
                                batch_size=group[0].batch_size(st), batch_format="pyarrow", **res)
            continue
        ds = ds.map_batches(FilterStage,
                            fn_constructor_kwargs={"filters": group, "keep_payload": keep_payload,
                                                   "storage": storage},
                            batch_size=group[0].batch_size(st), batch_format="pyarrow",
                            compute=ray.data.ActorPoolStrategy(
                                size=ocr_actor_count(st, reserved),
                                max_tasks_in_flight_per_actor=getattr(st, "tasks_in_flight_per_actor", None)),
                            **res)
    return add_write_stage(ds, cfg, out_url, tracker, storage)


def add_ocr_stage(ds, cfg: CurationConfig, reserved: float, storage: Storage | None = None,
                  stage=TextSpottingStage, **stage_kwargs):
    """The OCR actor pool (``stages.ocr``) after ``ds``; ``stage`` is :class:`TextSpottingStage`
    or a subclass that takes ``stage_kwargs`` too (the re-selection's)."""
    import ray

    os_ = cfg.stages.ocr
    return ds.map_batches(stage,
                          fn_constructor_kwargs={"ts_cfg": cfg.filters["text_spotting"],
                                                 "max_pixels": cfg.ingest.max_image_pixels,
                                                 "gpu": os_.num_gpus > 0, "torch_threads": ocr_threads(os_),
                                                 "ocr_batch_size": os_.ocr_batch_size,
                                                 "storage": storage, **stage_kwargs},
                          batch_size=ocr_rows_per_call(os_), batch_format="pyarrow",
                          compute=ray.data.ActorPoolStrategy(size=ocr_actor_count(os_, reserved)),
                          num_cpus=os_.num_cpus, num_gpus=os_.num_gpus)


def add_write_stage(ds, cfg: CurationConfig, out_url: str, tracker, storage: Storage | None = None):
    """The writer tasks (``stages.write``): parts, then each completed shard finalized."""
    ws = cfg.stages.write
    return ds.map_batches(write_blocks, fn_kwargs={"out_url": out_url, "tracker": tracker,
                                                   "storage": storage, "filters": build_filters(cfg)},
                          batch_size=None, batch_format="pyarrow", num_cpus=ws.num_cpus,
                          concurrency=ws.concurrency)


class ShardProgress:
    """``[k/N shards, S samples/s, ETA ...]`` for the log line of each committed shard (the
    rate counts this run's shards only; the ETA assumes the remaining shards are alike)."""

    def __init__(self, total: int, done: int, clock=time.monotonic):
        self.total, self.done, self.clock = total, done, clock
        self.started, self.samples, self.shards = clock(), 0, 0

    def shard_done(self, samples: int) -> str:
        self.done, self.shards, self.samples = self.done + 1, self.shards + 1, self.samples + samples
        elapsed = max(self.clock() - self.started, 1e-9)
        left = self.total - self.done
        eta = elapsed / self.shards * left
        eta_text = (f"{eta / 3600:.1f} h" if eta >= 3600 else f"{eta / 60:.1f} min" if eta >= 60
                    else f"{eta:.0f} s")
        return (f"[{self.done}/{self.total} shards, {self.samples / elapsed:.1f} samples/s, "
                f"ETA {eta_text if left else 'done'}]")


SETTINGS_FILE = "job_settings.json"


def deciding_settings(cfg: dict, input_url: str) -> dict:
    """The settings that decide what an output holds: the input and how it is read, the filters
    (thresholds, switches, OCR engine and sizes) and the spaCy model. Not the resources, batch
    sizes, progress or report switches: changing those never changes a shard.

    ``cfg`` is a merged config as given or as recorded (a plain mapping: the running job's, or
    the ``config`` of an older output's summary.json, which may lack keys added since), so the
    recorded settings stay what earlier versions wrote and their outputs still resume."""
    import json

    ingest = cfg.get("ingest") or {}
    settings = {
        "input": str(input_url).rstrip("/"),
        "input_format": cfg.get("input_format", "auto"),
        "ingest": {k: ingest.get(k) for k in ("max_caption_chars", "max_image_pixels", "decode_images")},
        "filters": cfg.get("filters") or {},
        "spacy": {"model": (cfg.get("spacy") or {}).get("model")},
    }
    if not cfg.get("input"):  # the demo dataset: its recipe decides the input
        settings["demo"] = {k: v for k, v in (cfg.get("demo") or {}).items() if k != "output"}
    return json.loads(json.dumps(settings, default=str))


def _flatten(d, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict) and v:
            out.update(_flatten(v, key + "."))
        else:
            out[key] = v
    return out


def settings_diff(recorded: dict, current: dict) -> list[str]:
    """``key: old -> new`` for every deciding setting that differs (dotted keys)."""
    old, new = _flatten(recorded), _flatten(current)
    return [f"{k}: {old.get(k, '(unset)')!r} -> {new.get(k, '(unset)')!r}"
            for k in sorted(set(old) | set(new)) if old.get(k) != new.get(k)]


def guard_settings(out: OutputFolder, settings: dict, overwrite: bool, committed: set[str],
                   log=print) -> set[str]:
    """Resume only into an output made with the same deciding settings.

    The first run records them in ``job_settings.json``. A re-run with other settings is refused
    (its kept samples would mix two selections and ``summary.json`` would name only the new
    one), unless ``overwrite=true``, which deletes what the job wrote and starts again.
    ``committed`` is the output's committed shards, listed once by the caller; it is returned
    as it stands after the check (empty after an overwrite).
    """
    recorded = out.read_json(SETTINGS_FILE)
    if overwrite and (recorded is not None or committed):
        log(f"overwrite=true: deleting the curated output in {out.url}")
        out.clear()
        out.prepare()
        recorded, committed = None, set()
    if recorded is None:
        if committed:
            log(f"warning: {out.url} holds shards from a version that did not record its settings; "
                "they are kept as they are")
        out.write_json(SETTINGS_FILE, settings)
        return committed
    diff = settings_diff(recorded, settings)
    if not diff:
        return committed
    if not committed:  # nothing made with the old settings survives: record the new ones
        out.write_json(SETTINGS_FILE, settings)
        return committed
    raise SettingsError(
        f"{out.url} was made with other settings ({'; '.join(diff)}); resuming would mix two "
        "selections. Write to a new output folder, or pass overwrite=true to delete this one and "
        "start again")


def parse_config(cfg: dict) -> CurationConfig:
    """The merged config's typed view, once at a job's entry; a mistake (a missing, unknown or
    mistyped key, a value outside its choices, an unknown filter) is a :class:`SettingsError`."""
    try:
        view = curation_config(cfg)
        build_filters(view)  # each filter's own checks
    except (ValueError, TypeError) as exc:  # a setting out of its allowed values
        raise SettingsError(str(exc)) from None
    return view


def curate(cfg: dict, log=print) -> dict:
    """Run the CAT filter job described by ``cfg`` (the merged config, parsed here once into its
    typed view); returns the summary written to summary.json."""
    import ray

    started = time.time()
    raw, cfg = cfg, parse_config(cfg)
    storage = Storage.capture(cfg.storage_options).apply()
    input_url = cfg.input
    if not input_url:
        from curation.demo_data import build_demo_dataset

        demo = cfg.demo
        input_url = build_demo_dataset(demo.output, num_samples=demo.num_samples, num_shards=demo.num_shards,
                                       seed=demo.seed)
        log(f"no input given: using the embedded demo dataset at {input_url}")
    try:
        shards = discover_shards(input_url, cfg.input_format)
    except InputError as exc:
        raise SettingsError(str(exc)) from None
    out = prepare_output(cfg.output)
    # the recorded settings come from the merged config as given (outputs resume as before)
    done = guard_settings(out, deciding_settings(raw, absolute(input_url)), cfg.overwrite, out.committed(), log)
    out.clean_tmp()
    pending = [s for s in shards if s.name not in done]
    log(f"{len(shards)} input shards in {input_url}: {len(shards) - len(pending)} already done, "
        f"{len(pending)} to process")

    failures = {}
    if pending:
        init_ray(cfg.ray, storage)
        warn_local_paths_on_cluster({"input": input_url, "output": cfg.output}, log)
        tracker = ray.remote(ShardTracker).options(num_cpus=0).remote()
        ds = build_dataset(pending, cfg, out.url, tracker, storage)
        failures = run_to_commit(ds, tracker, out, pending,
                                 ShardProgress(len(shards), len(shards) - len(pending)), log)
    return finish_job(out, cfg, raw, input_url, len(shards), failures, started, log)


def run_to_commit(ds, tracker, out: OutputFolder, pending: list[InputShard], progress: ShardProgress,
                  log=print) -> dict[str, str]:
    """Run the dataset (its last stage the writer) and log each shard as it commits; returns the
    shards that failed (name -> why). Kills the tracker and clears ``_tmp/`` at the end."""
    import json

    import ray

    failures = {}
    for batch in ds.iter_batches(batch_size=None, batch_format="pyarrow"):
        for r in batch.to_pylist():  # one row per finalized shard
            if r["error"]:
                failures[r["shard"]] = r["error"]
                log(f"shard {r['shard']}: FAILED to write: {r['error']}")
                continue
            f = json.loads(r["summary"])["funnel"]
            log(f"shard {r['shard']}: {f['input']} samples, {f['kept']} kept, "
                f"{f['evaluated'] - f['kept']} dropped, {f['errors']} errors, "
                f"{f['not_downloaded']} not downloaded  {progress.shard_done(f['input'])}")
    committed_now = out.committed()
    for name in ray.get(tracker.open_shards.remote()):
        if name not in committed_now and name not in failures:
            failures[name] = "pipeline ended before all of the shard's rows arrived"
    for s in pending:
        if s.name not in committed_now and s.name not in failures:
            failures[s.name] = "no rows of the shard reached the writer"
    ray.kill(tracker)
    out.clean_tmp()  # every writer has finished: parts of failed shards are redone on re-run
    return failures


def finish_job(out: OutputFolder, cfg: CurationConfig, raw: dict, input_url: str, input_shards: int,
               failures: dict, started: float, log=print, extra: dict | None = None) -> dict:
    """Add up the committed shards' summaries into ``shards/sizes.json`` and ``summary.json``
    (plus ``extra``; its ``config`` is ``raw``, the merged config as given), log the funnel,
    write the report; raise :class:`PipelineError` naming the failed shards. Returns the summary."""
    committed = out.committed()
    total, sizes_, totals = aggregate(out, committed, build_filters(cfg))
    summary = {
        "funnel": total,
        "shards": {"input": input_shards, "committed": len(committed), "failed": failures},
        "bytes": totals,
        "input": input_url,
        "output": cfg.output,
        "config": raw,
        **(extra or {}),
        "versions": versions(),
        "elapsed_s": round(time.time() - started, 2),
    }
    out.write_json("shards/sizes.json", sizes_)
    out.write_json("summary.json", summary)
    log("CAT filter funnel (all committed shards):\n" + format_funnel(summary["funnel"]))
    if cfg.report:
        from curation.report import write_report

        try:
            log(f"report: {write_report(out.url, committed=sorted(committed), funnel=total)}")
        except Exception as exc:  # the report is a convenience: never fail the job for it
            log(f"report not written: {type(exc).__name__}: {exc}")
    if failures:
        raise PipelineError(f"{len(failures)} shard(s) failed and stay uncommitted; re-run to retry: "
                            + ", ".join(sorted(failures)))
    return summary


def prepare_output(output: str) -> OutputFolder:
    """The job's output folder, created, after a write check: a user mistake (a file, a
    read-only place) is a :class:`SettingsError` now rather than a failure after the first shard."""
    out_url = absolute(output)  # workers may run in another directory
    out = OutputFolder(out_url)
    try:
        if out.fs.isfile(out.root):
            raise FileExistsError(f"{out_url} is a file, not a folder")
        out.prepare()
        out.write_json("_tmp/.write_check", {})  # fails now, not after the first shard, when read-only
    except (PermissionError, FileExistsError, NotADirectoryError, FileNotFoundError) as exc:
        raise SettingsError(f"cannot write the output to {output}: {exc}") from None
    return out

