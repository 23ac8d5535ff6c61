"""Filters as plug-ins: one class per filter, a registry, the cascade built from the config.

A filter (NeMo Curator's ``score_document`` / ``keep_document``, Data-Juicer's ``compute_stats``
/ ``process``) is one subclass of :class:`Filter`, registered under the name of its section in
the config's ``filters:`` mapping::

    @register_filter
    class CaptionLength(Filter):
        name = "caption_length"
        scores = (("caption_words", pa.int32()),)
        histogram = Histogram("caption_words", "caption length", "words", cap=20)

        def score(self, rows, shared, memo):
            return {"caption_words": [len(r["caption"].split()) for r in rows]}

        def keep(self, scores, rows):
            return [n >= self.cfg.get("min", 1) for n in scores["caption_words"]]

Everything else follows from that class and its config section: the cascade order is the order
of ``filters:``; the pipeline (:mod:`curation.pipeline`) runs one Ray Data stage per filter, or
per run of adjacent filters with the same :attr:`Filter.stage` (Complexity and Action share one
spaCy parse), and each stage scores only the samples that no earlier filter dropped (every
pending sample when the filter's ``evaluate_all`` is set); the stats get the filter's columns,
the funnel its ``passed <name>`` row, ``summary.json`` its counts and the report its chart and
examples (:mod:`curation.output`, :mod:`curation.report`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import pyarrow as pa

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
    holds its config section (``self.cfg``) and the whole job config (``self.job``), and is
    shipped to the Ray workers, where :meth:`setup` runs once per actor (or worker process).
    """

    name: str = ""                          # its section under ``filters:``; the drop reason
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

    def __init__(self, cfg: dict | None = None, job: dict | None = None):
        self.cfg, self.job = dict(cfg or {}), job or {}
        self.check()

    # --- what the rest of the job reads ---------------------------------------------------------
    @property
    def enabled(self) -> bool:
        return bool(self.cfg.get("enabled", True))

    @property
    def evaluate_all(self) -> bool:
        """Score every pending sample, not only those that passed the filters before it."""
        return bool(self.cfg.get("evaluate_all", False))

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

    def batch_size(self, stage: dict) -> int | None:
        """Rows per call of the stage (``stages.<stage>.batch_size``; None: one block)."""
        return stage.get("batch_size")

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


def build_filters(job: dict, strict: bool = True) -> list[Filter]:
    """The cascade: one filter per section of ``job["filters"]``, in the config's order.
    Raises ValueError for an unknown filter (skipped when not ``strict``) or a setting out of
    its allowed values."""
    out = []
    for name, section in (job.get("filters") or {}).items():
        if name not in FILTER_TYPES and not strict:
            continue
        if name not in FILTER_TYPES:
            raise ValueError(f"filters.{name}: no such filter (registered: {', '.join(FILTER_TYPES)})")
        out.append(FILTER_TYPES[name](section or {}, job))
    return out


def default_filters() -> list[Filter]:
    """Every registered filter with its defaults, in registration order (CAT first)."""
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

    def check(self) -> None:
        self.caption_config()

    def caption_config(self):
        from curation.caption_filters import CaptionFilterConfig

        return CaptionFilterConfig.from_config({**(self.job.get("filters") or {}), self.name: self.cfg})

    def setup(self, shared: dict) -> None:
        if "caption_scorer" not in shared:
            from curation.caption_filters import CaptionScorer

            spacy = self.job.get("spacy") or {}
            shared["caption_scorer"] = CaptionScorer(self.caption_config(),
                                                     model=spacy.get("model", "en_core_web_sm"),
                                                     batch_size=int(spacy.get("batch_size", 256)))

    def threshold(self) -> float | None:
        if self.cfg.get("min") is None:
            return None
        return float(min(int(self.cfg["min"]), self.histogram.cap))

    def keep(self, scores, rows):
        return [v >= int(self.cfg.get("min", 1)) for v in scores[self.column]]

    def card(self, row: dict) -> str | None:
        return None if row.get(self.column) is None else f"{self.name[0].upper()}={row[self.column]}"


@register_filter
class ComplexityFilter(_CaptionFilter):
    """C: the caption's complexity (:mod:`curation.caption_filters`) at least ``min``."""

    name, column = "complexity", "complexity"
    scores = (("complexity", pa.int32()),)
    histogram = Histogram("complexity", "caption complexity (evaluated)", "complexity score", cap=6)

    def score(self, rows, shared, memo):
        return {"complexity": _caption_scores(shared, memo, rows).complexity}


@register_filter
class ActionFilter(_CaptionFilter):
    """A: the number of actions in the caption at least ``min``."""

    name, column = "action", "num_actions"
    scores = (("num_actions", pa.int32()),)
    histogram = Histogram("num_actions", "actions per caption (evaluated)", "actions in the caption", cap=5)

    def score(self, rows, shared, memo):
        return {"num_actions": _caption_scores(shared, memo, rows).num_actions}


CPU_OCR_ROWS, GPU_OCR_ROWS = 4, 64


def ocr_rows_per_call(ocr_stage: dict) -> int:
    """``stages.ocr.batch_size``, or when null: 4 images per call on CPU (EasyOCR reads them one
    by one there, and small calls let the actors share the tail of a run evenly: with 16 per call,
    24 images on 2 actors left one actor idle for a third of the run) and 64 on a GPU (batched
    inference)."""
    if ocr_stage.get("batch_size"):
        return int(ocr_stage["batch_size"])
    return GPU_OCR_ROWS if float(ocr_stage.get("num_gpus") or 0) > 0 else CPU_OCR_ROWS


@register_filter
class TextSpottingFilter(Filter):
    """T: OCR the image (:mod:`curation.ocr`); drop when its text overlaps the caption."""

    name, stage = "text_spotting", "ocr"
    inputs = ("image", "caption")
    scores = (("ocr_text", pa.string()), ("ocr_boxes", pa.int32()), ("text_overlap", pa.float32()))
    details = (("ocr_engine", pa.string()), ("ocr_side", pa.int32()), ("text_rule", pa.string()))
    status_column = "text_spotting_status"
    resources = {"actors": None, "num_cpus": 0.75, "num_gpus": 0, "batch_size": None}
    histogram = Histogram("text_overlap", "text overlap (OCR'd samples)",
                          "caption words found in the image text", bins=10)
    evaluated_note = "OCR ran on {n} samples."

    def check(self) -> None:
        self.ts = self.config()

    def config(self):
        from curation.ocr import TextSpottingConfig

        return TextSpottingConfig.from_config(self.cfg)

    def batch_size(self, stage: dict) -> int | None:
        return ocr_rows_per_call(stage)

    def threshold(self) -> float | None:
        if self.cfg.get("threshold") is None or self.ts.overlap.measure == "fondant":
            return None
        return float(self.cfg["threshold"]) * self.histogram.bins

    def setup(self, shared: dict) -> None:
        """The OCR reader, built once per actor (``stages.ocr`` sets threads, GPU, batch)."""
        if "spotter" in shared:
            return
        from curation.ingest import IngestOptions
        from curation.ocr import make_spotter

        os_ = (self.job.get("stages") or {}).get("ocr") or {}
        threads = os_.get("torch_threads") or max(1, round(float(os_.get("num_cpus", 1))))
        shared["spotter"] = make_spotter(
            self.ts, IngestOptions.from_config(self.job.get("ingest") or {}).max_image_pixels,
            gpu=float(os_.get("num_gpus") or 0) > 0, threads=threads,
            ocr_batch_size=int(os_.get("ocr_batch_size", 16)))

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
