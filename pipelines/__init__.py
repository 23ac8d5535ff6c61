"""The jobs: run as scripts (python pipelines/cat_filter.py) or as installed commands (cat-filter)."""
