"""Re-select a scored curation output with new thresholds or filter switches (no OCR where stored).

    python pipelines/cat_select.py from=SCORED output=NEW [--config FILE] [key=value ...]
    python pipelines/cat_select.py from=outputs/cat_filter output=outputs/cat_c2 filters.complexity.min=2

``from`` is an output of pipelines/cat_filter.py (or of this job). The input, input format,
ingest limits, filters and spaCy model it was made with are the defaults; the ``filters.*``,
``spacy.*``, ``stages.*``, ``ray.*`` keys of cat_filter's config override them. The new output
equals what cat_filter would write with those settings; spaCy and OCR run only for samples whose
stored score does not hold (README: Re-selecting with new thresholds). (Not ``select.py``: a
script of that name would hide Python's ``select`` module from everything it imports.)
"""

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from curation.common.config import ConfigError, user_error  # noqa: E402
from curation.pipeline import PipelineError, SettingsError  # noqa: E402
from curation.reselect import build_select_config, select  # noqa: E402


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config", help="YAML file merged over cat_filter's defaults and the scored settings")
    ap.add_argument("overrides", nargs="*", metavar="key.sub=value",
                    help="from=SCORED output=NEW, then cat_filter's keys, e.g. filters.complexity.min=2")
    args = ap.parse_args(argv)
    from_url = next((o.split("=", 1)[1] for o in reversed(args.overrides) if o.startswith("from=")), None)
    overrides = [o for o in args.overrides if not o.startswith("from=")]
    if not any(o.startswith("output=") for o in overrides) and not _file_sets_output(args.config):
        user_error("output=<new folder> is required: where the re-selected shards go")

    try:
        cfg = build_select_config(from_url, args.config, overrides)
        summary = select(cfg)
    except (ConfigError, SettingsError) as exc:  # a user mistake, found before any work
        user_error(exc)
    except PipelineError as exc:  # shards that failed: a re-run retries them
        print(f"error: {exc}", file=sys.stderr)
        return 1
    print(f"wrote {summary['output']} ({summary['funnel']['kept']} kept of {summary['funnel']['input']} input "
          f"samples, selected from {summary['selection']['from']}) in {summary['elapsed_s']:.1f}s")
    return 0


def _file_sets_output(path) -> bool:
    if not path:
        return False
    from curation.common.config import load_yaml

    try:
        return bool(load_yaml(path).get("output"))
    except ConfigError as exc:
        user_error(exc)


if __name__ == "__main__":
    sys.exit(main())
