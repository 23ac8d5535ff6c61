"""A self-contained HTML report of a curation output: ``OUTPUT/report.html``.

It shows the funnel, histograms of complexity, actions and text overlap, a table of drop
reasons and errors, and thumbnails of example kept and dropped pairs per reason with their
captions and recognised text. Charts are inline SVG and thumbnails are ``data:`` URIs, so the
file needs nothing else (no scripts, no network). The thumbnails are read back from the input
shards named in ``summary.json``; when the input is gone the examples are listed without images.

Memory stays bounded at any output size: the funnel adds up the per-shard summaries, the
histograms and the reasons table are DuckDB aggregates streamed over ``stats/*.parquet`` (local,
or in a bucket through the job's fsspec filesystem), and the examples come from a bounded sample
of shards (the first :data:`EXAMPLE_SHARDS` committed ones).
"""

from __future__ import annotations

import base64
import html
import io
import json
from collections import defaultdict
from typing import Sequence

import pyarrow as pa
import pyarrow.compute as pc

from curation.images import BadImage, decode_rgb
from curation.ingest import DROPPED, ERROR, KEPT, IngestOptions, discover_shards, read_shard
from curation.output import FILTERS, OutputFolder, aggregate

EXAMPLE_SHARDS = 8  # examples are drawn from at most this many shards' stats
INT_CAPS = {"complexity": 6, "num_actions": 5}  # histogram caps ("N+" bins)
OVERLAP_BINS = 10

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


def svg_bars(title: str, labels: Sequence[str], counts: Sequence[int], width: int = 360,
             height: int = 180) -> str:
    """A small vertical bar chart as inline SVG."""
    n, top = max(1, len(counts)), max(counts) if counts and max(counts) else 1
    pad_l, pad_b, pad_t = 30, 22, 22
    bw = (width - pad_l) / n
    parts = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" '
             f'role="img" aria-label="{html.escape(title)}">',
             f'<text x="{width / 2}" y="14" text-anchor="middle" font-size="13">{html.escape(title)}</text>',
             f'<text x="2" y="{pad_t + 8}" font-size="10">{top}</text>']
    for i, (lab, c) in enumerate(zip(labels, counts)):
        h = (height - pad_b - pad_t) * c / top
        x = pad_l + i * bw
        parts.append(f'<rect x="{x + 1:.1f}" y="{height - pad_b - h:.1f}" width="{bw - 2:.1f}" '
                     f'height="{h:.1f}" fill="#4c78a8"><title>{html.escape(lab)}: {c}</title></rect>')
        parts.append(f'<text x="{x + bw / 2:.1f}" y="{height - 8}" text-anchor="middle" '
                     f'font-size="10">{html.escape(lab)}</text>')
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


def pick_examples(stats: pa.Table, per_group: int) -> dict[str, list[dict]]:
    """Up to ``per_group`` rows (first by key) for: kept, each drop reason, errors."""
    groups = {"kept": pc.equal(stats["status"], KEPT)}
    for f in FILTERS:
        groups[f"dropped: {f}"] = pc.and_(pc.equal(stats["status"], DROPPED),
                                          pc.equal(stats["drop_reason"], f))
    groups["error"] = pc.equal(stats["status"], ERROR)
    out = {}
    for name, mask in groups.items():
        rows = stats.filter(pc.fill_null(mask, False))
        if rows.num_rows:
            rows = rows.sort_by("key").slice(0, per_group)
            out[name] = rows.to_pylist()
    return out


def load_images(input_url: str | None, wanted: dict[str, set[str]]) -> dict[tuple[str, str], bytes]:
    """(shard, key) -> image bytes for the wanted keys per shard, read from the input shards."""
    if not input_url or not wanted:
        return {}
    try:
        shards = {s.name: s for s in discover_shards(input_url)}
    except Exception:
        return {}
    found = {}
    opts = IngestOptions(decode_images=False)
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


def stats_aggregates(out: OutputFolder, any_committed: bool | None = None) -> dict:
    """Histograms (the same bins as :func:`int_histogram` / :func:`float_histogram`) of the
    evaluated samples and the drop-reason / error counts, streamed by DuckDB."""
    empty = {"complexity": int_histogram([], INT_CAPS["complexity"]),
             "num_actions": int_histogram([], INT_CAPS["num_actions"]),
             "text_overlap": float_histogram([], OVERLAP_BINS), "reasons": {}}
    if any_committed is None:
        any_committed = bool(out.committed())
    con, src = stats_connection(out, any_committed)
    if src is None:
        return empty
    evaluated = "status IN ('kept', 'dropped')"
    out_ = dict(empty)
    for col, cap in INT_CAPS.items():
        labels, counts = int_histogram([], cap)
        for v, n in con.execute(f"SELECT least({col}, {cap}) AS v, count(*) FROM {src} "
                                f"WHERE {evaluated} AND {col} IS NOT NULL GROUP BY 1").fetchall():
            counts[int(v)] = int(n)
        out_[col] = (labels, counts)
    labels, counts = float_histogram([], OVERLAP_BINS)
    for v, n in con.execute(
            f"SELECT least(CAST(floor(CAST(text_overlap AS DOUBLE) * {OVERLAP_BINS}) AS INTEGER), "
            f"{OVERLAP_BINS - 1}) AS v, count(*) FROM {src} "
            f"WHERE {evaluated} AND text_overlap IS NOT NULL GROUP BY 1").fetchall():
        counts[int(v)] = int(n)
    out_["text_overlap"] = (labels, counts)
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

def _funnel_table(f: dict) -> str:
    rows = [("input samples", f["input"]), ("not downloaded", f["not_downloaded"]),
            ("errors", f["errors"]), ("evaluated", f["evaluated"]),
            ("passed complexity", f["passed_complexity"]), ("passed action", f["passed_action"]),
            ("passed text spotting", f["passed_text_spotting"]), ("kept", f["kept"])]
    top = max(1, f["input"])
    out = ["<table><tr><th>stage</th><th>samples</th><th>% of input</th><th></th></tr>"]
    for name, n in rows:
        out.append(f'<tr><td>{name}</td><td class="n">{n}</td><td class="n">{100 * n / top:.1f}</td>'
                   f'<td><div class="bar" style="width:{300 * n / top:.0f}px"></div></td></tr>')
    out.append("</table>")
    if "text_spotting_evaluated" in f:
        out.append(f'<p class="meta">OCR ran on {f["text_spotting_evaluated"]} samples.</p>')
    return "".join(out)


def _reasons_table(counts: dict, total: int) -> str:
    total = max(1, total)
    out = ["<table><tr><th>status</th><th>reason</th><th>samples</th><th>% of input</th></tr>"]
    for (status, reason), n in sorted(counts.items(), key=lambda kv: (kv[0][0], -kv[1], str(kv[0][1]))):
        out.append(f"<tr><td>{status}</td><td>{html.escape(str(reason))}</td>"
                   f'<td class="n">{n}</td><td class="n">{100 * n / total:.1f}</td></tr>')
    return "".join(out) + "</table>"


def _card(row: dict, uri: str | None) -> str:
    img = f'<img src="{uri}" alt="{html.escape(row["key"] or "")}">' if uri else "<p class=meta>(no image)</p>"
    scores = []
    if row.get("complexity") is not None:
        scores.append(f"C={row['complexity']} A={row['num_actions']}")
    if row.get("text_overlap") is not None:
        scores.append(f"T overlap={row['text_overlap']:.2f}")
    elif row.get("text_spotting_status"):
        scores.append(f"T {row['text_spotting_status'].replace('_', ' ')}")
    ocr = row.get("ocr_text")
    parts = [img, f"<div>{html.escape(row.get('caption') or '')}</div>",
             f'<div class="meta">{html.escape(row["key"] or "")} {html.escape(" ".join(scores))}</div>']
    if ocr:
        parts.append(f'<div class="ocr">OCR: {html.escape(ocr.replace(chr(10), " | "))}</div>')
    if row.get("error"):
        parts.append(f'<div class="ocr">{html.escape(row["error"][:160])}</div>')
    return f'<div class="card">{"".join(parts)}</div>'


def build_report(funnel: dict, aggregates: dict, sample: pa.Table, summary: dict,
                 examples: int = 6) -> str:
    """The report's HTML from the funnel, the stats aggregates, a bounded sample of stats rows
    (for the examples) and the run's summary."""
    charts = [svg_bars("caption complexity (evaluated)", *aggregates["complexity"]),
              svg_bars("actions per caption (evaluated)", *aggregates["num_actions"]),
              svg_bars("text overlap (OCR'd samples)", *aggregates["text_overlap"])]
    picked = pick_examples(sample, examples)
    wanted = defaultdict(set)
    for rows in picked.values():
        for r in rows:
            wanted[r["shard"]].add(r["key"])
    images = load_images(summary.get("input"), wanted)
    sections = []
    for name, rows in picked.items():
        cards = "".join(_card(r, thumbnail_uri(images[(r["shard"], r["key"])])
                              if (r["shard"], r["key"]) in images else None) for r in rows)
        sections.append(f"<h3>{html.escape(name)}</h3><div class=ex>{cards}</div>")
    ts = (summary.get("config") or {}).get("filters", {}).get("text_spotting", {})
    settings = html.escape(json.dumps((summary.get("config") or {}).get("filters", {}), sort_keys=True))
    title = f"CAT filter report: {html.escape(str(summary.get('output', '')))}"
    shown = sorted(set(sample["shard"].to_pylist())) if sample.num_rows else []
    return f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>{title}</title><style>{CSS}</style></head>
<body><h1>{title}</h1>
<p class="meta">input {html.escape(str(summary.get('input', '')))} &middot; {funnel['input']} samples &middot;
elapsed {summary.get('elapsed_s', '?')} s &middot; text spotting
{'on' if ts.get('enabled') else 'off'}{' (every sample)' if ts.get('evaluate_all') else ''}</p>
<h2>Funnel</h2>{_funnel_table(funnel)}
<h2>Distributions</h2><div class="charts">{''.join(charts)}</div>
<h2>Drop reasons and errors</h2>{_reasons_table(aggregates["reasons"], funnel["input"])}
<h2>Examples</h2><p class="meta">from {len(shown)} shard(s): {html.escape(", ".join(shown[:EXAMPLE_SHARDS]))}</p>{''.join(sections)}
<h2>Filter settings</h2><pre style="white-space:pre-wrap;font-size:11px">{settings}</pre>
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
    if funnel is None:
        funnel, _, _ = aggregate(out, committed)
    sample = out.read_stats(names=committed[:EXAMPLE_SHARDS])
    page = build_report(funnel, stats_aggregates(out, bool(committed)), sample, summary, examples)
    out.fs.makedirs(out.path("_tmp"), exist_ok=True)
    out.put(page.encode("utf-8"), out.path("report.html"))
    return out.path("report.html")
