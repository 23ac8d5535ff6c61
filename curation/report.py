"""A self-contained HTML report of a curation output: ``OUTPUT/report.html``.

It shows the funnel, one histogram per filter (:attr:`curation.filters.Filter.histogram`:
complexity, actions and text overlap for CAT), a table of drop reasons and errors, and
thumbnails of example kept and dropped pairs per reason with their captions and recognised
text. Charts are inline SVG and thumbnails are ``data:`` URIs, so the file needs nothing else
(no scripts, no network). The thumbnails are read back from the input shards named in
``summary.json``; when the input is gone the examples are listed without images.

Memory stays bounded at any output size: the funnel adds up the per-shard summaries, the
histograms and the reasons table are DuckDB aggregates streamed over ``stats/*.parquet`` (local,
or in a bucket through the job's fsspec filesystem), and the examples come from a bounded sample
of shards (:data:`EXAMPLE_SHARDS` committed ones, chosen at random with a fixed seed).
"""

from __future__ import annotations

import base64
import html
import io
import json
import random
from collections import defaultdict
from typing import Sequence

import pyarrow as pa
import pyarrow.compute as pc

from curation.images import BadImage, decode_rgb
from curation.ingest import DROPPED, ERROR, KEPT, NOT_DOWNLOADED, IngestOptions, discover_shards, read_shard
from curation.filters import Filter, Histogram, default_filters, filters_from_sections
from curation.output import OutputFolder, aggregate, funnel_rows

EXAMPLE_SHARDS = 8  # examples are drawn from at most this many shards' stats
# the CAT filters' histograms: caps of the integer ones ("N+" bins), bins of the text overlap
INT_CAPS = {f.histogram.column: f.histogram.cap for f in default_filters() if f.histogram.cap}
OVERLAP_BINS = next(f.histogram.bins for f in default_filters() if f.histogram.column == "text_overlap")

CSS = """
body{font-family:system-ui,sans-serif;margin:24px;color:#222;max-width:1200px}
h1{font-size:22px}h2{font-size:18px;margin-top:28px;border-bottom:1px solid #ddd}
table{border-collapse:collapse}td,th{padding:3px 10px;text-align:left;border-bottom:1px solid #eee}
td.n{text-align:right;font-variant-numeric:tabular-nums}
.bar{background:#4c78a8;height:14px}
.charts{display:flex;flex-wrap:wrap;gap:24px}
.ex{display:flex;flex-wrap:wrap;gap:12px}
.card{width:190px;font-size:12px;border:1px solid #ddd;padding:6px;border-radius:4px}
.card img{max-width:178px;max-height:178px;display:block;margin-bottom:4px}
.ocr{color:#a33;white-space:pre-wrap}.meta{color:#666}
"""


# --- pure helpers ---------------------------------------------------------------------------------

def int_histogram(values: Sequence[int | None], cap: int) -> tuple[list[str], list[int]]:
    """Counts of 0..cap-1 and ``cap+`` (nulls ignored)."""
    counts = [0] * (cap + 1)
    for v in values:
        if v is not None:
            counts[min(int(v), cap)] += 1
    return [str(i) for i in range(cap)] + [f"{cap}+"], counts


def float_histogram(values: Sequence[float | None], bins: int = 10) -> tuple[list[str], list[int]]:
    """Counts over [0, 1] in ``bins`` equal bins (1.0 falls in the last one)."""
    counts = [0] * bins
    for v in values:
        if v is not None:
            counts[min(int(float(v) * bins), bins - 1)] += 1
    return [f"{i / bins:.1f}" for i in range(bins)], counts


SERIES_COLOURS = {"kept": "#54a24b", "dropped": "#bab0ac"}


def svg_bars(title: str, labels: Sequence[str], counts: Sequence[int], width: int = 380,
             height: int = 200, stacked: dict[str, Sequence[int]] | None = None,
             x_title: str = "", y_title: str = "samples", threshold: float | None = None) -> str:
    """A small vertical bar chart as inline SVG.

    ``stacked``: per-series counts drawn on top of each other (kept, then dropped) instead of
    one bar; ``threshold``: a dashed line at that position in bar units (``1.0`` = the left
    edge of the second bar), e.g. a filter's minimum or its overlap threshold.
    """
    n, top = max(1, len(counts)), max(counts) if counts and max(counts) else 1
    pad_l, pad_b, pad_t = 34, 36, 22
    bw = (width - pad_l) / n
    plot_h = height - pad_b - pad_t
    parts = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" '
             f'role="img" aria-label="{html.escape(title)}">',
             f'<text x="{width / 2}" y="14" text-anchor="middle" font-size="13">{html.escape(title)}</text>',
             f'<text x="{pad_l - 4}" y="{pad_t + 8}" font-size="10" text-anchor="end">{top}</text>',
             f'<text x="10" y="{pad_t + plot_h / 2:.0f}" font-size="10" text-anchor="middle" '
             f'transform="rotate(-90 10 {pad_t + plot_h / 2:.0f})">{html.escape(y_title)}</text>',
             f'<text x="{pad_l + (width - pad_l) / 2:.0f}" y="{height - 3}" font-size="10" '
             f'text-anchor="middle">{html.escape(x_title)}</text>']
    series = stacked or {"": counts}
    for i, lab in enumerate(labels):
        x, base = pad_l + i * bw, height - pad_b
        for name, values in series.items():
            c = values[i]
            h = plot_h * c / top
            base -= h
            fill = SERIES_COLOURS.get(name, "#4c78a8")
            what = f"{name} " if name else ""
            parts.append(f'<rect x="{x + 1:.1f}" y="{base:.1f}" width="{bw - 2:.1f}" height="{h:.1f}" '
                         f'fill="{fill}"><title>{html.escape(lab)}: {what}{c}</title></rect>')
        parts.append(f'<text x="{x + bw / 2:.1f}" y="{height - pad_b + 12}" text-anchor="middle" '
                     f'font-size="10">{html.escape(lab)}</text>')
    if threshold is not None:
        tx = pad_l + threshold * bw
        parts.append(f'<line x1="{tx:.1f}" y1="{pad_t}" x2="{tx:.1f}" y2="{height - pad_b}" stroke="#d62728" '
                     f'stroke-dasharray="4 3" stroke-width="1.5"><title>threshold</title></line>'
                     f'<text x="{tx + 3:.1f}" y="{pad_t + 10}" font-size="10" fill="#d62728">threshold</text>')
    if stacked:
        lx = width - 110
        for j, name in enumerate(stacked):
            parts.append(f'<rect x="{lx + j * 55}" y="20" width="9" height="9" fill="{SERIES_COLOURS.get(name, "#4c78a8")}"/>'
                         f'<text x="{lx + j * 55 + 12}" y="28" font-size="10">{html.escape(name)}</text>')
    parts.append("</svg>")
    return "".join(parts)


def thumbnail_uri(image: bytes, side: int = 176) -> str | None:
    """A small JPEG of the image as a ``data:`` URI (None when it cannot be decoded)."""
    try:
        img = decode_rgb(image, max_side=side)
    except BadImage:
        return None
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=80)
    return "data:image/jpeg;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


def pick_examples(stats: pa.Table, per_group: int, seed: int = 0,
                  filters: Sequence[Filter] | None = None) -> dict[str, list[dict]]:
    """Up to ``per_group`` rows drawn at random (seeded) for: kept, each drop reason, errors,
    failed downloads."""
    groups = {"kept": pc.equal(stats["status"], KEPT)}
    for f in (f.name for f in (default_filters() if filters is None else filters)):
        groups[f"dropped: {f}"] = pc.and_(pc.equal(stats["status"], DROPPED),
                                          pc.equal(stats["drop_reason"], f))
    groups["error"] = pc.equal(stats["status"], ERROR)
    groups["not downloaded"] = pc.equal(stats["status"], NOT_DOWNLOADED)
    rng = random.Random(seed)
    out = {}
    for name, mask in groups.items():
        rows = stats.filter(pc.fill_null(mask, False)).sort_by("key")
        if rows.num_rows:
            picked = sorted(rng.sample(range(rows.num_rows), min(per_group, rows.num_rows)))
            out[name] = rows.take(pa.array(picked, pa.int64())).to_pylist()
    return out


def example_shards(committed: Sequence[str], seed: int = 0) -> list[str]:
    """The (at most :data:`EXAMPLE_SHARDS`) shards the examples come from: a seeded random
    choice across the whole output, not its first shards."""
    committed = sorted(committed)
    return sorted(random.Random(seed).sample(committed, min(EXAMPLE_SHARDS, len(committed))))


def load_images(input_url: str | None, wanted: dict[str, set[str]]) -> dict[tuple[str, str], bytes]:
    """(shard, key) -> image bytes for the wanted keys per shard, read from the input shards."""
    if not input_url or not wanted:
        return {}
    try:
        shards = {s.name: s for s in discover_shards(input_url)}
    except Exception:
        return {}
    found = {}
    opts = IngestOptions.defaults(decode_images=False)
    for name, keys in wanted.items():
        if name not in shards:
            continue
        missing = set(keys)
        for table in read_shard(shards[name], opts):
            for key, image in zip(table["key"].to_pylist(), table["image"].to_pylist()):
                if key in missing and image is not None:
                    found[(name, key)] = image
                    missing.discard(key)
            if not missing:
                break  # stop reading this shard once its examples are found
    return found


# --- bounded-memory aggregates over the stats Parquet ------------------------------------------

def _sql_string(text: str) -> str:
    return "'" + text.replace("'", "''") + "'"


def stats_connection(out: OutputFolder, any_committed: bool):
    """A DuckDB connection and the SQL source of every committed stats file (None when there
    are none). Object storage is read through the output's own fsspec filesystem."""
    import duckdb

    con = duckdb.connect(config={"memory_limit": "1GB", "threads": 2})
    if not any_committed:
        return con, None
    root = out.path("stats")
    if out.remote:
        con.register_filesystem(out.fs)
        root = out.fs.unstrip_protocol(root)
    source = f"read_parquet({_sql_string(root + '/*.parquet')}, union_by_name=true)"
    return con, source


def _empty_histogram(h: Histogram) -> tuple[list[str], list[int]]:
    return int_histogram([], h.cap) if h.cap else float_histogram([], h.bins)


def _bin_sql(h: Histogram) -> str:
    """The DuckDB expression of :func:`int_histogram` / :func:`float_histogram`'s bin."""
    if h.cap:
        return f"least({h.column}, {h.cap})"
    return f"least(CAST(floor(CAST({h.column} AS DOUBLE) * {h.bins}) AS INTEGER), {h.bins - 1})"


def stats_aggregates(out: OutputFolder, any_committed: bool | None = None,
                     filters: Sequence[Filter] | None = None) -> dict:
    """Histograms (the same bins as :func:`int_histogram` / :func:`float_histogram`) of the
    evaluated samples, one per filter's :attr:`~curation.filters.Filter.histogram` under its
    column's name, the same split into kept and dropped (``split``), and the drop-reason /
    error counts, streamed by DuckDB."""
    hists = [f.histogram for f in (default_filters() if filters is None else filters) if f.histogram]
    empty = {h.column: _empty_histogram(h) for h in hists}
    empty.update(reasons={}, split={})
    if any_committed is None:
        any_committed = bool(out.committed())
    con, src = stats_connection(out, any_committed)
    if src is None:
        return empty
    evaluated = "status IN ('kept', 'dropped')"
    out_ = dict(empty)
    out_["split"] = {}
    for col, expr in ((h.column, _bin_sql(h)) for h in hists):
        labels, counts = out_[col]
        counts = [0] * len(counts)
        split = {KEPT: [0] * len(counts), DROPPED: [0] * len(counts)}
        for status, v, n in con.execute(f"SELECT status, {expr} AS v, count(*) FROM {src} "
                                        f"WHERE {evaluated} AND {col} IS NOT NULL GROUP BY 1, 2").fetchall():
            counts[int(v)] += int(n)
            split[status][int(v)] += int(n)
        out_[col] = (labels, counts)
        out_["split"][col] = split
    reasons = {}
    for status, reason, n in con.execute(
            f"SELECT status, CASE WHEN status = 'dropped' THEN drop_reason "
            f"ELSE left(split_part(coalesce(error, ''), ':', 1), 80) END, count(*) "
            f"FROM {src} WHERE status IN ('dropped', 'error') GROUP BY 1, 2").fetchall():
        reasons[(status, reason)] = int(n)
    out_["reasons"] = reasons
    con.close()
    return out_


# --- the page -----------------------------------------------------------------------------------

def _funnel_table(f: dict, filters: Sequence[Filter] = ()) -> str:
    rows = funnel_rows(f)
    top = max(1, f["input"])
    out = ["<table><tr><th>stage</th><th>samples</th><th>% of input</th><th></th></tr>"]
    for name, n in rows:
        out.append(f'<tr><td>{name}</td><td class="n">{n}</td><td class="n">{100 * n / top:.1f}</td>'
                   f'<td><div class="bar" style="width:{300 * n / top:.0f}px"></div></td></tr>')
    out.append("</table>")
    for flt in filters:  # e.g. "OCR ran on 120 samples."
        n = f.get(f"{flt.name}_evaluated")
        if flt.evaluated_note and n is not None:
            out.append(f'<p class="meta">{html.escape(flt.evaluated_note.format(n=n))}</p>')
    return "".join(out)


def _reasons_table(counts: dict, total: int) -> str:
    total = max(1, total)
    out = ["<table><tr><th>status</th><th>reason</th><th>samples</th><th>% of input</th></tr>"]
    for (status, reason), n in sorted(counts.items(), key=lambda kv: (kv[0][0], -kv[1], str(kv[0][1]))):
        out.append(f"<tr><td>{status}</td><td>{html.escape(str(reason))}</td>"
                   f'<td class="n">{n}</td><td class="n">{100 * n / total:.1f}</td></tr>')
    return "".join(out) + "</table>"


def _card(row: dict, uri: str | None, filters: Sequence[Filter] = ()) -> str:
    img = f'<img src="{uri}" alt="{html.escape(row["key"] or "")}">' if uri else "<p class=meta>(no image)</p>"
    scores = [text for text in (f.card(row) for f in filters) if text]
    ocr = row.get("ocr_text")
    parts = [img, f"<div>{html.escape(row.get('caption') or '')}</div>",
             f'<div class="meta">{html.escape(row["key"] or "")} {html.escape(" ".join(scores))}</div>']
    if ocr:
        parts.append(f'<div class="ocr">OCR: {html.escape(ocr.replace(chr(10), " | "))}</div>')
    if row.get("error"):
        parts.append(f'<div class="ocr">{html.escape(row["error"][:160])}</div>')
    return f'<div class="card">{"".join(parts)}</div>'


def chart_thresholds(filters: Sequence[Filter]) -> dict[str, float]:
    """Where each enabled filter's threshold falls on its chart, in bar units."""
    return {f.histogram.column: f.threshold() for f in filters
            if f.enabled and f.histogram and f.threshold() is not None}


def settings_table(filters: dict) -> str:
    """The filter settings as a two-column table (``complexity.min`` | ``1``)."""
    rows = []

    def walk(d, prefix):
        for k, v in d.items():
            if isinstance(v, dict) and v:
                walk(v, f"{prefix}{k}.")
            else:
                rows.append((f"{prefix}{k}", json.dumps(v) if not isinstance(v, str) else v))

    walk(filters, "")
    body = "".join(f"<tr><td><code>{html.escape(k)}</code></td><td>{html.escape(v)}</td></tr>" for k, v in rows)
    return f"<table><tr><th>setting</th><th>value</th></tr>{body}</table>"


def report_filters(summary: dict) -> list[Filter]:
    """The run's cascade from the ``config`` its ``summary.json`` recorded (the YAML's filters for
    an output without one; a filter that is not registered here is left out). Each recorded
    section is read over the YAML's defaults: an older output's record may lack keys added since."""
    from curation.common.config import deep_merge
    from curation.settings import section_defaults

    defaults = section_defaults("filters")
    recorded = (summary.get("config") or {}).get("filters") or defaults
    return filters_from_sections({name: deep_merge(defaults.get(name) or {}, section or {}, strict=False)
                                  for name, section in recorded.items()}, strict=False)


def build_report(funnel: dict, aggregates: dict, sample: pa.Table, summary: dict,
                 examples: int = 6) -> str:
    """The report's HTML from the funnel, the stats aggregates, a bounded sample of stats rows
    (for the examples) and the run's summary."""
    filters = (summary.get("config") or {}).get("filters") or {}
    cascade = report_filters(summary)
    lines = chart_thresholds(cascade)
    split = aggregates.get("split") or {}
    charts = [svg_bars(h.title, *aggregates[h.column], stacked=split.get(h.column), x_title=h.x_title,
                       threshold=lines.get(h.column))
              for h in (f.histogram for f in cascade) if h and h.column in aggregates]
    picked = pick_examples(sample, examples, filters=cascade)
    wanted = defaultdict(set)
    for rows in picked.values():
        for r in rows:
            wanted[r["shard"]].add(r["key"])
    images = load_images(summary.get("input"), wanted)
    sections = []
    for name, rows in picked.items():
        cards = "".join(_card(r, thumbnail_uri(images[(r["shard"], r["key"])])
                              if (r["shard"], r["key"]) in images else None, cascade) for r in rows)
        sections.append(f"<h3>{html.escape(name)}</h3><div class=ex>{cards}</div>")
    ts = next((f for f in cascade if f.name == "text_spotting"), None) if filters else None
    settings = settings_table(filters)
    title = f"CAT filter report: {html.escape(str(summary.get('output', '')))}"
    shown = sorted(set(sample["shard"].to_pylist())) if sample.num_rows else []
    return f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>{title}</title><style>{CSS}</style></head>
<body><h1>{title}</h1>
<p class="meta">input {html.escape(str(summary.get('input', '')))} &middot; {funnel['input']} samples &middot;
elapsed {summary.get('elapsed_s', '?')} s &middot; text spotting
{'on' if ts and ts.enabled else 'off'}{' (every sample)' if ts and ts.evaluate_all else ''}</p>
<h2>Funnel</h2>{_funnel_table(funnel, cascade)}
<h2>Distributions</h2><div class="charts">{''.join(charts)}</div>
<h2>Drop reasons and errors</h2>{_reasons_table(aggregates["reasons"], funnel["input"])}
<h2>Examples</h2><p class="meta">from {len(shown)} shard(s): {html.escape(", ".join(shown[:EXAMPLE_SHARDS]))}</p>{''.join(sections)}
<h2>Filter settings</h2>{settings}
</body></html>
"""


def write_report(output_url: str, examples: int = 6, committed: list[str] | None = None,
                 funnel: dict | None = None) -> str:
    """Build ``OUTPUT/report.html`` from the committed stats and ``summary.json``; returns its path.

    The job passes the committed shards and the funnel it has just added up, so the report
    neither lists ``stats/`` again nor re-reads every shard summary."""
    out = OutputFolder(output_url)
    if not out.fs.exists(out.root):
        raise FileNotFoundError(f"no curation output at {output_url}")
    summary = out.read_json("summary.json", {}) or {}
    committed = sorted(out.committed() if committed is None else committed)
    cascade = report_filters(summary)
    if funnel is None:
        funnel, _, _ = aggregate(out, committed, cascade)
    sample = out.read_stats(names=example_shards(committed))
    page = build_report(funnel, stats_aggregates(out, bool(committed), cascade), sample, summary, examples)
    out.fs.makedirs(out.path("_tmp"), exist_ok=True)
    out.put(page.encode("utf-8"), out.path("report.html"))
    return out.path("report.html")
