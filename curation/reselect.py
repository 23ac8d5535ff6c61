"""Re-selection: new thresholds or filter switches over a pool that was already scored.

DataComp-style: score a pool once with the CAT filter job, then select from it again and again.
``pipelines/cat_select.py from=SCORED output=NEW filters.complexity.min=2`` re-reads the input
shards that ``SCORED`` was made from (the kept samples' original image bytes come from there),
re-decides every sample from the scores in ``SCORED/stats/NAME.parquet``, and writes a normal
curation output (shards, stats, shard summaries, ``summary.json``, ``sizes.json``, report) that
equals, row for row, what the CAT filter job would write with the new settings.

A stored score is used where it still means the same thing; otherwise it is computed again:

* ``complexity`` / ``num_actions``: kept when the spaCy model and the filter's ``measure`` (and
  ``entity_mode``) are unchanged; the new ``min`` decides. A changed measure or model, or a
  filter that was off in ``SCORED``, scores the captions with spaCy again.
* text spotting: the stored OCR text holds when the OCR settings are unchanged (``backend``,
  ``recogniser`` or ``languages``, ``max_side``, ``det_side``, ``min_confidence``), checked again
  per row against the stored ``ocr_engine`` and ``ocr_side``. The overlap is then recomputed from
  the stored text with the new ``measure`` and ``threshold`` (pure functions, no OCR; exact, where
  the stored 4-decimal ``text_overlap`` could flip a decision at the threshold). An image whose
  OCR failed keeps its stored error. OCR runs only for samples that reach the T filter under the
  new settings and have no valid stored result: those the cascade never sent to OCR (a looser C
  or A now admits them), every one when the OCR settings changed, or T newly turned on.

Which samples may need OCR is decided before the job starts from the two settings alone (a
stricter or equal C and A over a cascade run cannot admit a sample that was never OCR'd): when
none may, the OCR stage is not built at all, so no OCR model is loaded. The input and its
``ingest`` settings cannot change (they decide which rows exist); an input shard whose rows
differ from the stored ones is refused (left uncommitted, named) rather than scored anew.

Scale: one Ray task per input shard reads the shard and its stored stats and re-decides its rows
(spaCy, when needed, runs in that task; the model is loaded once per worker process); the OCR
actor pool and the writer are the CAT filter job's own (:mod:`curation.pipeline`), so shards
commit by the same rule and a re-run resumes the same way. The driver handles shard names only.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from typing import Callable, Iterator

import pyarrow as pa
import pyarrow.parquet as pq

from curation.caption_filters import CaptionFilterConfig, CaptionScorer
from curation.ingest import (ERROR, PENDING, ROW_SCHEMA, SHARD_END, SHARD_FAILED, IngestOptions, InputError,
                             InputShard, discover_shards, end_marker, read_shard)
from curation.ocr import TextSpottingConfig
from curation.output import EVALUATED, FILTERS, NOT_EVALUATED, STATS_SCHEMA, OutputFolder
from curation.pipeline import (SETTINGS_FILE, SettingsError, ShardProgress, ShardTracker, TextSpottingStage,
                               add_ocr_stage, add_write_stage, deciding_settings, finish_job, guard_settings,
                               parse_config, prepare_output, run_to_commit, set_data_context, settings_diff)
from curation.settings import CurationConfig, SpacyConfig, parse_filters, section_defaults
from curation.common.config import as_dict, deep_merge
from curation.common.jobs import init_ray, warn_local_paths_on_cluster
from curation.common.storage import Storage, absolute

SCORE_FIELDS = ("complexity", "num_actions", "passed_complexity", "passed_action", "ocr_text", "ocr_boxes",
                "text_overlap", "passed_text_spotting", "text_spotting_status", "ocr_engine", "ocr_side",
                "text_rule")
# the read stage's rows: the input row, its (re-)decided scores, and whether it still needs OCR
SELECT_SCHEMA = pa.schema(list(ROW_SCHEMA) + [STATS_SCHEMA.field(n) for n in SCORE_FIELDS]
                          + [pa.field("need_ocr", pa.bool_())])
STORED_COLUMNS = ("key", "status", "error", "complexity", "num_actions", "ocr_text", "ocr_boxes",
                  "text_spotting_status", "ocr_engine", "ocr_side")
# settings the kept samples and the row set come from: a re-selection reads the same input
FIXED_KEYS = ("input", "input_format", "ingest")


# --- what the scored output holds and what of it is still valid -----------------------------------

def scored_output(from_url: str | None) -> OutputFolder:
    """The output to select from, checked: a curation output with committed shards."""
    if not from_url:
        raise SettingsError("from=<curation output> is required: the scored output to select from")
    src = OutputFolder(absolute(from_url))
    if not src.fs.isdir(src.root):
        raise SettingsError(f"from={from_url}: no such folder")
    if not (src.fs.exists(src.path(SETTINGS_FILE)) or src.fs.exists(src.path("summary.json"))):
        raise SettingsError(f"from={from_url} is not a curation output (no {SETTINGS_FILE} or "
                            "summary.json): run pipelines/cat_filter.py first")
    return src


def recorded_settings(src: OutputFolder) -> dict:
    """The deciding settings ``src`` was made with: its ``job_settings.json``, or for outputs
    written before that file existed, the ones its ``summary.json`` implies."""
    recorded = src.read_json(SETTINGS_FILE)
    if recorded is None:
        summary = src.read_json("summary.json") or {}
        if not summary.get("config") or not summary.get("input"):
            raise SettingsError(f"from={src.url}: its summary.json names no config or input")
        recorded = deciding_settings(summary["config"], absolute(summary["input"]))
    return recorded


def recorded_filters(recorded: dict) -> dict:
    """The CAT filters a scored output was made with (name -> settings view), from its recorded
    settings; each section over the YAML defaults, since an older output's record may lack keys
    added since."""
    old = recorded.get("filters") or {}
    defaults = section_defaults("filters")
    return parse_filters({name: deep_merge(defaults[name], old.get(name) or {}, strict=False) for name in FILTERS})


def expected_engine(ts: TextSpottingConfig) -> str:
    """``ocr_engine`` as the backend records it (see :mod:`curation.ocr_ppocr`)."""
    if ts.backend == "ppocr" and ts.recogniser != "ppocr":
        return f"ppocr+{ts.recogniser}"
    return ts.backend


def ocr_settings(ts: TextSpottingConfig) -> dict:
    """What decides the OCR text itself (not the drop rule applied to it)."""
    keys = ["backend", "max_side", "side", "min_confidence"]
    keys.append("recogniser" if ts.backend == "ppocr" else "languages")
    return {k: getattr(ts, k) for k in keys}


@dataclass(frozen=True)
class SelectPlan:
    """What one re-selection job does, shipped to every read task."""

    from_url: str
    filters: dict                 # the new filters: name -> settings view (CurationConfig.filters)
    spacy: SpacyConfig            # the new spacy config (model, batch_size)
    reuse_complexity: bool        # stored complexity scores hold for the new settings
    reuse_actions: bool
    reuse_ocr: bool               # stored OCR text (and OCR failures) hold
    ocr_stage: bool               # the OCR actor pool runs: samples without a valid result go there

    @classmethod
    def make(cls, from_url: str, recorded: dict, cfg: CurationConfig) -> "SelectPlan":
        """``recorded``: the scored output's deciding settings (as written); ``cfg``: the new job."""
        old_f, new_f = recorded_filters(recorded), cfg.filters
        oc, nc = CaptionFilterConfig.from_config(old_f), CaptionFilterConfig.from_config(new_f)
        ot, nt = old_f["text_spotting"], new_f["text_spotting"]
        same_model = (recorded.get("spacy") or {}).get("model") == cfg.spacy.model
        reuse_c = same_model and oc.complexity_measure == nc.complexity_measure and (
            nc.complexity_measure != "entity_edges" or oc.entity_mode == nc.entity_mode)
        reuse_a = same_model and oc.action_measure == nc.action_measure
        reuse_t = ot.enabled and ocr_settings(ot) == ocr_settings(nt)
        return cls(from_url, new_f, cfg.spacy, reuse_c, reuse_a, reuse_t,
                   may_need_ocr(oc, nc, ot, nt, reuse_c, reuse_a, reuse_t))

    def describe(self) -> str:
        reused = [n for n, ok in (("complexity", self.reuse_complexity), ("actions", self.reuse_actions),
                                  ("OCR text", self.reuse_ocr)) if ok]
        return (f"stored scores reused: {', '.join(reused) or 'none'}; OCR stage: "
                + ("on (samples without a valid stored OCR result reach the T filter)" if self.ocr_stage
                   else "off (no sample can need OCR)"))


def may_need_ocr(oc: CaptionFilterConfig, nc: CaptionFilterConfig, ot: TextSpottingConfig,
                 nt: TextSpottingConfig, reuse_c: bool, reuse_a: bool, reuse_t: bool) -> bool:
    """Whether any sample can reach the new T filter without a valid stored OCR result."""
    if not nt.enabled:
        return False
    if not reuse_t or (nt.evaluate_all and not ot.evaluate_all):
        return True
    if ot.evaluate_all:  # every pending sample was OCR'd (or failed there)
        return False
    # A cascade: only samples that passed the old C and A were OCR'd. The new C and A admit no
    # other sample when each filter that was on stays on, on the same scores, at a min as high.
    for old_on, new_on, reuse, old_min, new_min in (
            (oc.complexity_enabled, nc.complexity_enabled, reuse_c, oc.complexity_min, nc.complexity_min),
            (oc.action_enabled, nc.action_enabled, reuse_a, oc.action_min, nc.action_min)):
        if old_on and (not new_on or not reuse or new_min < old_min):
            return True
    return False


# --- re-deciding one block of rows (pure; runs in the read tasks) ---------------------------------

def reselect_records(records: list[dict], stored: dict[str, dict], plan: SelectPlan,
                     score_captions: Callable) -> int:
    """Fill the score columns of a block of freshly read rows (in place) from the stored rows
    (key -> stats row) where they are valid; rows still without a valid T result get
    ``need_ocr``. ``score_captions(captions) -> CaptionScores`` runs spaCy on the rest.
    Returns how many captions went to spaCy."""
    cap = CaptionFilterConfig.from_config(plan.filters)
    ts = plan.filters["text_spotting"]
    for r in records:
        for name in SCORE_FIELDS:
            r[name] = None
        r["need_ocr"] = False
    pending = [r for r in records if r["status"] == PENDING]
    olds = [stored.get(r["key"]) or {} for r in pending]

    if cap.enabled:
        missing = [i for i, o in enumerate(olds)
                   if (cap.complexity_enabled and (not plan.reuse_complexity or o.get("complexity") is None))
                   or (cap.action_enabled and (not plan.reuse_actions or o.get("num_actions") is None))]
        fresh = score_captions([pending[i]["caption"] for i in missing]) if missing else None
        where = {i: j for j, i in enumerate(missing)}
        for i, (r, o) in enumerate(zip(pending, olds)):
            j = where.get(i)
            if cap.complexity_enabled:
                c = fresh.complexity[j] if j is not None else o["complexity"]
                r["complexity"], r["passed_complexity"] = c, c >= cap.complexity_min
            if cap.action_enabled:
                a = fresh.num_actions[j] if j is not None else o["num_actions"]
                r["num_actions"], r["passed_action"] = a, a >= cap.action_min
    else:
        missing = []

    if ts.enabled:
        engine = expected_engine(ts)
        for r, o in zip(pending, olds):
            if not (ts.evaluate_all or (r["passed_complexity"] is not False and r["passed_action"] is not False)):
                r["text_spotting_status"] = NOT_EVALUATED  # the cascade does not send it to OCR
            elif plan.reuse_ocr and o.get("status") == ERROR:
                r["status"], r["error"] = ERROR, o.get("error")  # OCR (decoding for it) failed
            elif (plan.reuse_ocr and o.get("text_spotting_status") == EVALUATED
                  and o.get("ocr_engine") in (None, engine) and o.get("ocr_side") in (None, ts.side)):
                text = o.get("ocr_text")
                score = ts.overlap.score(text.split("\n") if text else [], r["caption"])
                r.update(ocr_text=text, ocr_boxes=o.get("ocr_boxes"), text_overlap=round(score, 4),
                         passed_text_spotting=ts.overlap.passes(score), text_spotting_status=EVALUATED,
                         ocr_engine=o.get("ocr_engine") or engine, ocr_side=o.get("ocr_side"),
                         text_rule=ts.rule)
            else:
                r["need_ocr"], r["text_spotting_status"] = True, NOT_EVALUATED
    prune_records(records)
    return len(missing)


def prune_records(records: list[dict]) -> None:
    """Drop the image bytes and metadata of rows that can be neither kept nor OCR'd."""
    for r in records:
        alive = r["status"] == PENDING and all(r.get(f"passed_{f}") is not False for f in FILTERS)
        if not (alive or r.get("need_ocr")):
            r["image"] = r["meta_json"] = None


# --- Ray stages --------------------------------------------------------------------------------------

_SCORERS: dict = {}


def caption_scorer(plan: SelectPlan) -> CaptionScorer:
    """One spaCy pipeline per worker process and settings, loaded on first need."""
    key = json.dumps(as_dict([plan.filters, plan.spacy]), sort_keys=True, default=str)
    if key not in _SCORERS:
        _SCORERS[key] = CaptionScorer(CaptionFilterConfig.from_config(plan.filters),
                                      model=plan.spacy.model, batch_size=plan.spacy.batch_size)
    return _SCORERS[key]


def read_stored(from_url: str, shard: str) -> dict[str, dict]:
    """key -> stored stats row of one committed shard of the scored output."""
    src = OutputFolder(from_url)
    with src.fs.open(src.path("stats", f"{shard}.parquet"), "rb") as f:
        table = pq.read_table(f)
    names = [c for c in STORED_COLUMNS if c in table.column_names]  # older stats lack some
    return {r["key"]: r for r in table.select(names).to_pylist()}


def _marker(table: pa.Table, node: str | None, status: str | None = None, error: str | None = None) -> pa.Table:
    row = table.to_pylist()[0]
    row["node"] = node
    if status:
        row["status"], row["error"] = status, error
    return pa.Table.from_pylist([row], schema=SELECT_SCHEMA)


def reselect_shard(shard: InputShard, plan: SelectPlan, opts: IngestOptions, node: str | None = None,
                   counter=None) -> Iterator[pa.Table]:
    """One input shard's rows re-decided, as :data:`SELECT_SCHEMA` blocks, then its end marker. A
    shard whose rows are not the stored ones ends with a failed marker (never committed)."""
    import ray

    stored = read_stored(plan.from_url, shard.name)
    seen, spacy = 0, 0
    for table in read_shard(shard, opts):
        status = table["status"][0].as_py() if table.num_rows == 1 else None
        if status in (SHARD_END, SHARD_FAILED):
            if status == SHARD_END and seen != len(stored):
                table = _marker(table, node, SHARD_FAILED,
                                f"shard {shard.name}: {seen} input rows, {len(stored)} in {plan.from_url}'s "
                                "stats: the input changed after it was scored (score it again with cat_filter)")
                yield table
            else:
                yield _marker(table, node)
            break
        records = table.to_pylist()
        unknown = [r["key"] for r in records if r["key"] not in stored]
        if unknown:
            yield _marker(end_marker(shard.name, seen), node, SHARD_FAILED,
                          f"shard {shard.name}: input sample {unknown[0]} is not in {plan.from_url}'s stats: "
                          "the input changed after it was scored (score it again with cat_filter)")
            break
        seen += len(records)
        spacy += reselect_records(records, stored, plan, lambda caps: caption_scorer(plan).score(caps))
        if not plan.ocr_stage and any(r["need_ocr"] for r in records):
            key = next(r["key"] for r in records if r["need_ocr"])
            yield _marker(end_marker(shard.name, seen), node, SHARD_FAILED,
                          f"shard {shard.name}: sample {key} has no valid stored OCR result in "
                          f"{plan.from_url}'s stats (score it again with cat_filter)")
            break
        yield pa.Table.from_pylist(records, schema=SELECT_SCHEMA)
    if spacy and counter is not None:
        ray.get(counter.add.remote("spacy", spacy))


def reselect_shards_batch(batch: pa.Table, plan: SelectPlan, opts: IngestOptions,
                          storage: Storage | None = None, counter=None):
    """Read stage (Ray task, one shard per call): :func:`reselect_shard`."""
    import ray

    if storage is not None:
        storage.apply()
    node = ray.get_runtime_context().get_node_id()
    for spec in batch.to_pylist():
        yield from reselect_shard(InputShard(**spec), plan, opts, node, counter)


def spot_flagged(batch: pa.Table, spotter) -> tuple[pa.Table, int]:
    """OCR the rows flagged ``need_ocr`` (as the CAT filter job's T stage would); returns the block
    and how many images went to OCR."""
    records = batch.to_pylist()
    idx = [i for i, r in enumerate(records) if r["need_ocr"]]
    if not idx:
        return batch, 0
    results = spotter.spot([records[i]["image"] for i in idx], [records[i]["caption"] for i in idx])
    for i, res in zip(idx, results):
        r = records[i]
        r["need_ocr"] = False
        if res.error:
            r["status"], r["error"], r["text_spotting_status"] = ERROR, res.error, None
            continue
        r.update(ocr_text=res.ocr_text, ocr_boxes=res.ocr_boxes, text_overlap=res.text_overlap,
                 passed_text_spotting=res.passed, text_spotting_status=EVALUATED,
                 ocr_engine=res.engine, ocr_side=res.side, text_rule=res.rule)
    prune_records(records)
    return pa.Table.from_pylist(records, schema=SELECT_SCHEMA), len(idx)


class RescoreTextStage(TextSpottingStage):
    """The OCR actor of the CAT filter job, for the flagged rows only; it counts the images it
    OCRs on the job's counter (``summary.json``: ``selection.scored_now.ocr``)."""

    def __init__(self, *args, counter=None, **kwargs):
        super().__init__(*args, **kwargs)
        self.counter = counter

    def __call__(self, batch: pa.Table) -> pa.Table:
        import ray

        batch, n = spot_flagged(batch, self.spotter)
        if n and self.counter is not None:
            ray.get(self.counter.add.remote("ocr", n))
        return batch


class ScoreCounter:
    """Ray actor (0 CPUs): how many captions and images this run scored anew (one call per block)."""

    def __init__(self):
        self.counts = {"spacy": 0, "ocr": 0}

    def add(self, kind: str, n: int) -> None:
        self.counts[kind] = self.counts.get(kind, 0) + int(n)

    def totals(self) -> dict:
        return dict(self.counts)


def build_select_dataset(pending: list[InputShard], cfg: CurationConfig, plan: SelectPlan, out_url: str,
                         tracker, counter, storage: Storage | None = None):
    import ray

    read = cfg.stages.read
    set_data_context(cfg)
    ds = ray.data.from_items([s.to_dict() for s in pending], override_num_blocks=len(pending))
    ds = ds.map_batches(reselect_shards_batch,
                        fn_kwargs={"plan": plan, "opts": cfg.ingest, "storage": storage, "counter": counter},
                        batch_size=1, batch_format="pyarrow", num_cpus=read.num_cpus,
                        concurrency=read.concurrency)
    if plan.ocr_stage:
        ds = add_ocr_stage(ds, cfg, read.num_cpus, storage,
                           stage=RescoreTextStage, counter=counter)
    return add_write_stage(ds, cfg, out_url, tracker, storage)


# --- the job ---------------------------------------------------------------------------------------

def build_select_config(from_url: str | None, user_file: str | None = None, overrides=()) -> dict:
    """cat_filter's config for a re-selection: its defaults, then what ``from`` was scored with
    (input, input format, ingest limits, filters, spaCy model), then the user's YAML and
    ``key=value`` overrides; ``from`` is set. The merged dict, as :func:`select` records it (it
    parses it into the typed view). Raises ``ConfigError`` / :class:`SettingsError`."""
    from curation.common.config import CONFIG_DIR, apply_overrides, load_yaml

    defaults = CONFIG_DIR / "curation" / "cat_filter.yaml"
    user = load_yaml(user_file) if user_file else {}
    from_url = from_url or user.pop("from", None)
    user.pop("from", None)
    first = apply_overrides(deep_merge(load_yaml(defaults), user), overrides)  # storage_options
    Storage.capture(first["storage_options"]).apply()
    recorded = recorded_settings(scored_output(from_url))
    base = load_yaml(defaults)
    base["input"], base["input_format"] = recorded["input"], recorded.get("input_format", "auto")
    base["ingest"].update({k: v for k, v in (recorded.get("ingest") or {}).items() if v is not None})
    base["filters"] = deep_merge(base["filters"], recorded.get("filters") or {}, strict=False)
    if (recorded.get("spacy") or {}).get("model"):
        base["spacy"]["model"] = recorded["spacy"]["model"]
    cfg = apply_overrides(deep_merge(base, user), overrides)
    now, then = deciding_settings(cfg, absolute(cfg["input"])), deciding_settings(base, recorded["input"])
    changed = settings_diff({k: then[k] for k in FIXED_KEYS}, {k: now[k] for k in FIXED_KEYS})
    if changed:
        raise SettingsError(f"a re-selection reads the input {from_url} was scored from, as it was read "
                            f"then; these cannot change: {'; '.join(changed)}")
    cfg["from"] = from_url
    return cfg


def select(cfg: dict, log=print) -> dict:
    """Re-select ``cfg["from"]`` (a scored curation output) into ``cfg["output"]`` with
    ``cfg["filters"]`` (the merged config of :func:`build_select_config`, parsed here once into
    its typed view); returns the summary written to ``summary.json``."""
    import ray

    started = time.time()
    others = [name for name in (cfg.get("filters") or {}) if name not in FILTERS]
    if others:  # a plug-in filter (curation.filters) has no re-decision from stored scores here
        raise SettingsError(f"re-selection knows the CAT filters ({', '.join(FILTERS)}), not "
                            f"{', '.join(others)}: run cat_filter with the new settings instead")
    raw, cfg = cfg, parse_config(cfg)
    storage = Storage.capture(cfg.storage_options).apply()
    src = scored_output(cfg.from_url)
    recorded = recorded_settings(src)
    input_url = cfg.input
    if absolute(cfg.output).rstrip("/") == src.url.rstrip("/"):
        raise SettingsError(f"output={cfg.output} is the output selected from: write to a new folder")
    plan = SelectPlan.make(src.url, recorded, cfg)
    try:
        shards = discover_shards(input_url, cfg.input_format)
    except InputError as exc:
        raise SettingsError(f"the input {cfg.from_url} was scored from: {exc}") from None
    scored = src.committed()
    if not scored:
        raise SettingsError(f"from={cfg.from_url} has no committed shards: nothing to select from")
    out = prepare_output(cfg.output)
    # the recorded settings come from the merged config as given (outputs resume as before)
    settings = {**deciding_settings(raw, absolute(input_url)), "selected_from": src.url}
    done = guard_settings(out, settings, cfg.overwrite, out.committed(), log)
    out.clean_tmp()
    usable = [s for s in shards if s.name in scored]
    unscored = [s.name for s in shards if s.name not in scored]
    if unscored:
        log(f"warning: {len(unscored)} input shard(s) not committed in {cfg.from_url} are skipped "
            f"(finish that run first): {', '.join(unscored[:5])}{' ...' if len(unscored) > 5 else ''}")
    pending = [s for s in usable if s.name not in done]
    log(f"{len(usable)} scored shards in {cfg.from_url}: {len(usable) - len(pending)} already done, "
        f"{len(pending)} to process; {plan.describe()}")

    failures, counts = {}, {"spacy": 0, "ocr": 0}
    if pending:
        init_ray(cfg.ray, storage)
        warn_local_paths_on_cluster({"from": cfg.from_url, "input": input_url, "output": cfg.output}, log)
        tracker = ray.remote(ShardTracker).options(num_cpus=0).remote()
        counter = ray.remote(ScoreCounter).options(num_cpus=0).remote()
        ds = build_select_dataset(pending, cfg, plan, out.url, tracker, counter, storage)
        failures = run_to_commit(ds, tracker, out, pending,
                                 ShardProgress(len(usable), len(usable) - len(pending)), log)
        counts = ray.get(counter.totals.remote())
        ray.kill(counter)
    log(f"scored anew in this run: {counts['spacy']} captions (spaCy), {counts['ocr']} images (OCR)")
    old = {"filters": recorded.get("filters") or {}, "spacy": recorded.get("spacy") or {}}
    new = {"filters": raw["filters"], "spacy": {"model": cfg.spacy.model}}
    selection = {"from": cfg.from_url, "changed": settings_diff(json.loads(json.dumps(old, default=str)),
                                                                json.loads(json.dumps(new, default=str))),
                 "reused": {"complexity": plan.reuse_complexity, "actions": plan.reuse_actions,
                            "ocr_text": plan.reuse_ocr},
                 "ocr_stage": plan.ocr_stage, "scored_now": counts, "unscored_shards": len(unscored)}
    return finish_job(out, cfg, raw, input_url, len(shards), failures, started, log, {"selection": selection})
