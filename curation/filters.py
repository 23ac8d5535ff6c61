"""Filters as plug-ins: one class per filter, a registry, the cascade built from the config.

A filter (NeMo Curator's ``score_document`` / ``keep_document``, Data-Juicer's ``compute_stats``
/ ``process``) is one subclass of :class:`Filter`, registered under the name of its section in
the config's ``filters:`` mapping::

    @dataclass(frozen=True)
    class CaptionLengthSettings:     # its section's typed view: names and types, no defaults
        enabled: bool
        min: int

    @register_filter
    class CaptionLength(Filter):
        name = "caption_length"
        Settings = CaptionLengthSettings
        scores = (("caption_words", pa.int32()),)
        histogram = Histogram("caption_words", "caption length", "words", cap=20)

        def score(self, rows, shared, memo):
            return {"caption_words": [len(r["caption"].split()) for r in rows]}

        def keep(self, scores, rows):
            return [n >= self.cfg.min for n in scores["caption_words"]]

The registry parses the filter's section into its ``Settings`` (a missing, unknown or mistyped
key is a one-line error naming ``filters.caption_length.<key>``; the defaults live in the YAML;
a filter without ``Settings`` gets its section as a plain dict). Everything else follows from
that class and its config section: the cascade order is the order
of ``filters:``; the pipeline (:mod:`curation.pipeline`) runs one Ray Data stage per filter, or
per run of adjacent filters with the same :attr:`Filter.stage` (Complexity and Action share one
spaCy parse), and each stage scores only the samples that no earlier filter dropped (every
pending sample when the filter's ``evaluate_all`` is set); the stats get the filter's columns,
the funnel its ``passed <name>`` row, ``summary.json`` its counts and the report its chart and
examples (:mod:`curation.output`, :mod:`curation.report`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping, Sequence

import pyarrow as pa

from curation.caption_filters import ActionSettings, CaptionFilterConfig, ComplexitySettings
from curation.ocr import TextSpottingConfig

EVALUATED = "evaluated"          # a filter's status column: it scored the sample,
NOT_EVALUATED = "not_evaluated"  # the cascade skipped it (an earlier filter had dropped it),
OFF = "off"                      # or the filter is off


@dataclass(frozen=True)
class Histogram:
    """The report's chart of one score column over the evaluated samples: integer bins
    ``0 .. cap-1, cap+`` (``cap``) or ``bins`` equal bins over [0, 1]."""

    column: str
    title: str
    x_title: str
    cap: int | None = None
    bins: int | None = None


class Filter:
    """One filter: its stats columns, a batched ``score`` and a ``keep`` decision from the scores.

    Subclasses set the class attributes and implement :meth:`score` and :meth:`keep`; an instance
    holds its config section (``self.cfg``: its ``Settings`` view; None for a filter built
    without a config, which only describes its columns) and the whole job config (``self.job``:
    a :class:`curation.settings.CurationConfig`), and is shipped to the Ray workers, where
    :meth:`setup` runs once per actor (or worker process).
    """

    name: str = ""                          # its section under ``filters:``; the drop reason
    Settings: type | None = None            # the frozen dataclass of its section (None: a dict)
    inputs: tuple = ("caption",)            # the row columns :meth:`score` reads
    scores: tuple = ()                      # (column, pyarrow type): stats and the sample's json
    details: tuple = ()                     # (column, pyarrow type): stats only, after the verdict
                                            # and the status column
    status_column: str | None = None        # optional: evaluated / not_evaluated / off per sample
    stage: str | None = None                # adjacent filters with one stage key share a Ray stage
                                            # and its ``shared`` state (None: the filter's name)
    resources: dict = {"actors": 1, "num_cpus": 0.25, "num_gpus": 0, "batch_size": None}
                                            # defaults of ``stages.<stage>`` (actors: 0 = Ray tasks)
    histogram: Histogram | None = None      # the report's chart
    evaluated_note: str | None = None       # the report's line under the funnel ({n} samples)

    def __init__(self, cfg: Any = None, job: Any = None):
        if isinstance(cfg, Mapping) and self.Settings is not None:
            cfg = self.parse_settings(cfg, f"filters.{self.name}")
        self.cfg, self.job = cfg, job
        if cfg is not None:
            self.check()

    @classmethod
    def parse_settings(cls, section: Mapping | None, name: str) -> Any:
        """Its config section as its :attr:`Settings` view (a plain dict without one)."""
        if cls.Settings is None:
            return dict(section or {})
        from curation.common.config import typed_view

        return typed_view(cls.Settings, section, name)

    # --- what the rest of the job reads ---------------------------------------------------------
    def _switch(self, key: str) -> bool:
        """A yes/no setting of the section; one that it does not have is off (a filter without a
        config is on: it only describes its columns)."""
        if self.cfg is None:
            return key == "enabled"
        if isinstance(self.cfg, Mapping):
            return bool(self.cfg.get(key, key == "enabled"))
        return bool(getattr(self.cfg, key, key == "enabled"))

    @property
    def enabled(self) -> bool:
        return self._switch("enabled")

    @property
    def evaluate_all(self) -> bool:
        """Score every pending sample, not only those that passed the filters before it."""
        return self._switch("evaluate_all")

    @property
    def stage_key(self) -> str:
        return self.stage or self.name

    @property
    def verdict(self) -> str:
        return f"passed_{self.name}"

    @property
    def label(self) -> str:
        return self.name.replace("_", " ")

    def threshold(self) -> float | None:
        """Where the decision falls on :attr:`histogram`'s axis (None: no line)."""
        return None

    def batch_size(self, stage) -> int | None:
        """Rows per call of the stage (``stages.<stage>.batch_size``; None: one block)."""
        return stage.batch_size

    def card(self, row: dict) -> str | None:
        """Its scores on the report's example cards (``column=value``; None: nothing)."""
        return " ".join(f"{c}={row[c]}" for c, _ in self.scores if row.get(c) is not None) or None

    # --- what a subclass implements -------------------------------------------------------------
    def check(self) -> None:
        """Raise ValueError for a setting out of its allowed values (before any work)."""

    def setup(self, shared: dict) -> None:
        """Load models once per actor; ``shared`` is common to the filters of one stage."""

    def score(self, rows: list[dict], shared: dict, memo: dict) -> dict[str, list]:
        """Score column -> values (one per row) for ``rows`` (dicts of the :attr:`inputs`
        columns). ``memo`` is common to the filters of the stage for this batch. An ``"error"``
        list (str or None) turns those rows into per-sample errors; other keys starting with
        ``_`` reach :meth:`keep` but not the stats."""
        raise NotImplementedError

    def keep(self, scores: dict[str, list], rows: list[dict]) -> list[bool]:
        """Whether each scored row passes, from its scores (and the row) and ``self.cfg``."""
        raise NotImplementedError


FILTER_TYPES: dict[str, type[Filter]] = {}


def register_filter(cls: type[Filter]) -> type[Filter]:
    """Class decorator: make ``cls`` the filter of the config section ``cls.name``."""
    if not cls.name:
        raise ValueError(f"{cls.__name__} has no name")
    FILTER_TYPES[cls.name] = cls
    return cls


def build_filters(job, strict: bool = True) -> list[Filter]:
    """The cascade: one filter per section of the job's ``filters``, in the config's order.
    ``job`` is the job's :class:`~curation.settings.CurationConfig`, or the merged config dict
    (parsed here). Raises ValueError for an unknown filter (skipped when not ``strict``) or a
    setting out of its allowed values."""
    if isinstance(job, Mapping):
        from curation.settings import curation_config

        job = curation_config(job, strict=strict)
    return [FILTER_TYPES[name](settings, job) for name, settings in job.filters.items()]


def filters_from_sections(filters: Mapping, job: Any = None, strict: bool = True) -> list[Filter]:
    """The cascade from a ``filters`` mapping alone (name -> YAML section), e.g. a recorded one."""
    from curation.settings import parse_filters

    return [FILTER_TYPES[name](settings, job) for name, settings in parse_filters(filters, strict).items()]


def default_filters() -> list[Filter]:
    """Every registered filter, in registration order (CAT first), without a config: their
    columns, charts and cards."""
    return [cls() for cls in FILTER_TYPES.values()]


def stage_groups(filters: Sequence[Filter]) -> list[list[Filter]]:
    """Adjacent filters with the same stage key, in cascade order."""
    groups: list[list[Filter]] = []
    for f in filters:
        if groups and groups[-1][0].stage_key == f.stage_key:
            groups[-1].append(f)
        else:
            groups.append([f])
    return groups


def filter_columns(filters: Sequence[Filter]) -> list[tuple[str, pa.DataType]]:
    """The stats columns the filters add: per stage, its filters' scores, their verdicts, their
    status columns, then their details (``complexity, num_actions, passed_complexity,
    passed_action, ocr_text, ...``)."""
    cols = []
    for group in stage_groups(filters):
        cols += [c for f in group for c in f.scores]
        cols += [(f.verdict, pa.bool_()) for f in group]
        cols += [(f.status_column, pa.string()) for f in group if f.status_column]
        cols += [c for f in group for c in f.details]
    return cols


# --- the CAT filters -------------------------------------------------------------------------------

def _caption_scores(shared: dict, memo: dict, rows: list[dict]):
    """One spaCy parse of the rows' captions serves Complexity and Action (cached per batch)."""
    key = ("caption", tuple(r["caption"] for r in rows))
    if key not in memo:
        memo[key] = shared["caption_scorer"].score([r["caption"] for r in rows])
    return memo[key]


class _CaptionFilter(Filter):
    stage = "caption"
    resources = {"actors": 1, "num_cpus": 0.5, "num_gpus": 0, "batch_size": None}
    column: str = ""

    def caption_config(self) -> CaptionFilterConfig:
        """Complexity and Action of the cascade (one parse scores both)."""
        cascade = self.job.filters if self.job is not None else {}
        return CaptionFilterConfig.from_config({**cascade, self.name: self.cfg})

    def setup(self, shared: dict) -> None:
        if "caption_scorer" not in shared:
            from curation.caption_filters import CaptionScorer

            spacy = self.job.spacy
            shared["caption_scorer"] = CaptionScorer(self.caption_config(), model=spacy.model,
                                                     batch_size=spacy.batch_size)

    def threshold(self) -> float | None:
        return float(min(self.cfg.min, self.histogram.cap))

    def keep(self, scores, rows):
        return [v >= self.cfg.min for v in scores[self.column]]

    def card(self, row: dict) -> str | None:
        return None if row.get(self.column) is None else f"{self.name[0].upper()}={row[self.column]}"


@register_filter
class ComplexityFilter(_CaptionFilter):
    """C: the caption's complexity (:mod:`curation.caption_filters`) at least ``min``."""

    name, column = "complexity", "complexity"
    Settings = ComplexitySettings
    scores = (("complexity", pa.int32()),)
    histogram = Histogram("complexity", "caption complexity (evaluated)", "complexity score", cap=6)

    def score(self, rows, shared, memo):
        return {"complexity": _caption_scores(shared, memo, rows).complexity}


@register_filter
class ActionFilter(_CaptionFilter):
    """A: the number of actions in the caption at least ``min``."""

    name, column = "action", "num_actions"
    Settings = ActionSettings
    scores = (("num_actions", pa.int32()),)
    histogram = Histogram("num_actions", "actions per caption (evaluated)", "actions in the caption", cap=5)

    def score(self, rows, shared, memo):
        return {"num_actions": _caption_scores(shared, memo, rows).num_actions}


CPU_OCR_ROWS, GPU_OCR_ROWS = 4, 64


def ocr_threads(ocr_stage) -> int:
    """``stages.ocr.torch_threads``, or when null round(num_cpus), at least 1."""
    return ocr_stage.torch_threads or max(1, round(ocr_stage.num_cpus))


def ocr_rows_per_call(ocr_stage) -> int:
    """``stages.ocr.batch_size``, or when null: 4 images per call on CPU (EasyOCR reads them one
    by one there, and small calls let the actors share the tail of a run evenly: with 16 per call,
    24 images on 2 actors left one actor idle for a third of the run) and 64 on a GPU (batched
    inference)."""
    if ocr_stage.batch_size:
        return ocr_stage.batch_size
    return GPU_OCR_ROWS if ocr_stage.num_gpus > 0 else CPU_OCR_ROWS


@register_filter
class TextSpottingFilter(Filter):
    """T: OCR the image (:mod:`curation.ocr`); drop when its text overlaps the caption."""

    name, stage = "text_spotting", "ocr"
    Settings = TextSpottingConfig
    inputs = ("image", "caption")
    scores = (("ocr_text", pa.string()), ("ocr_boxes", pa.int32()), ("text_overlap", pa.float32()))
    details = (("ocr_engine", pa.string()), ("ocr_side", pa.int32()), ("text_rule", pa.string()))
    status_column = "text_spotting_status"
    resources = {"actors": None, "num_cpus": 0.75, "num_gpus": 0, "batch_size": None}
    histogram = Histogram("text_overlap", "text overlap (OCR'd samples)",
                          "caption words found in the image text", bins=10)
    evaluated_note = "OCR ran on {n} samples."

    @property
    def ts(self) -> TextSpottingConfig:
        return self.cfg

    def batch_size(self, stage) -> int | None:
        return ocr_rows_per_call(stage)

    def threshold(self) -> float | None:
        if self.ts.overlap.measure == "fondant":
            return None
        return self.ts.threshold * self.histogram.bins

    def setup(self, shared: dict) -> None:
        """The OCR reader, built once per actor (``stages.ocr`` sets threads, GPU, batch)."""
        if "spotter" in shared:
            return
        from curation.ocr import make_spotter

        os_ = self.job.stages.ocr
        shared["spotter"] = make_spotter(self.ts, self.job.ingest.max_image_pixels, gpu=os_.num_gpus > 0,
                                         threads=ocr_threads(os_), ocr_batch_size=os_.ocr_batch_size)

    def score(self, rows, shared, memo):
        results = shared["spotter"].spot([r["image"] for r in rows], [r["caption"] for r in rows])
        ok = [not r.error for r in results]
        # "_passed": the spotter's decision on the exact overlap (the column is rounded)
        return {"ocr_text": [r.ocr_text for r in results], "ocr_boxes": [r.ocr_boxes for r in results],
                "text_overlap": [r.text_overlap for r in results],
                "ocr_engine": [r.engine for r in results], "ocr_side": [r.side for r in results],
                "text_rule": [r.rule for r in results], "error": [r.error for r in results],
                "_passed": [r.passed if k else None for r, k in zip(results, ok)]}

    def card(self, row: dict) -> str | None:
        if row.get("text_overlap") is not None:
            return f"T overlap={row['text_overlap']:.2f}"
        return f"T {row['text_spotting_status'].replace('_', ' ')}" if row.get("text_spotting_status") else None

    def keep(self, scores, rows):
        """From the stored OCR text and the caption (exact: the stored ``text_overlap`` is
        rounded to 4 decimals), as :mod:`curation.reselect` decides again."""
        if "_passed" in scores:  # just scored: the spotter's own decision
            return scores["_passed"]
        out = []
        for text, row in zip(scores["ocr_text"], rows):
            s = self.ts.overlap.score(text.split("\n") if text else [], row["caption"])
            out.append(self.ts.overlap.passes(s))
        return out
