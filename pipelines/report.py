"""Write OUTPUT/report.html for a curation output (the job also writes it at the end of a run).

    python pipelines/report.py OUTPUT [--examples N]

The page is self-contained (inline SVG charts, data: URI thumbnails read from the input shards
named in OUTPUT/summary.json): open it in any browser.
"""

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from curation.report import write_report  # noqa: E402


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("output", help="curation output folder (path or fsspec URL)")
    ap.add_argument("--examples", type=int, default=6, help="example pairs per kept/drop reason")
    args = ap.parse_args(argv)
    try:
        print(write_report(args.output, examples=args.examples))
    except FileNotFoundError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
