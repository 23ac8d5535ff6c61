"""CAT filter job: img2dataset output -> curated webdataset shards + per-sample stats.

    python pipelines/cat_filter.py [--config FILE] [key=value ...]
    ray job submit --working-dir . -- python pipelines/cat_filter.py input=... output=...

With no ``input`` it builds the embedded demo dataset and curates it.
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from curation.common.config import CONFIG_DIR, parse_cli  # noqa: E402
from curation.pipeline import PipelineError, SettingsError, curate  # noqa: E402


def main(argv=None) -> int:
    cfg = parse_cli(argv, CONFIG_DIR / "curation" / "cat_filter.yaml", __doc__.splitlines()[0])
    try:
        summary = curate(cfg)  # parses cfg into its typed view first: a wrong value stops it there
    except SettingsError as exc:  # a user mistake, found before any work
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except PipelineError as exc:  # shards that failed: a re-run retries them
        print(f"error: {exc}", file=sys.stderr)
        return 1
    print(f"wrote {summary['output']} ({summary['funnel']['kept']} kept of {summary['funnel']['input']}"
          f" input samples) in {summary['elapsed_s']:.1f}s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
