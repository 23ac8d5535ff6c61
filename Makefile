# One entry point per task; every target creates .venv and installs the project if needed.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

# Debian packages: offline thesauri for EDA text augmentation; chromium renders the curation report in a test.
SYSTEM_PACKAGES ?= wordnet-base mythes-en-us chromium

.PHONY: install sysdeps demo test bench compare clean

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e ".[dev]"
	touch $(STAMP)

install: $(STAMP)

# Installs the Debian packages above when missing (needs root or sudo; no-op when present).
sysdeps:
	@missing=$$(for p in $(SYSTEM_PACKAGES); do dpkg -s $$p >/dev/null 2>&1 || echo $$p; done); \
	if [ -n "$$missing" ]; then \
	  echo "installing Debian packages: $$missing"; \
	  SUDO=$$( [ "$$(id -u)" = 0 ] || echo sudo ); \
	  $$SUDO apt-get update -qq && $$SUDO apt-get install -y -qq $$missing; \
	fi

# Curate the 300-pair demo (prints the funnel, writes report.html), then train a tiny CLIP on its own
# 800-pair curated demo (made on first use) and evaluate it.
demo: $(STAMP)
	$(PY) pipelines/cat_filter.py output=outputs/demo/curated progress=false
	$(PY) training/train.py

test: $(STAMP) sysdeps
	$(PY) -m pytest -q $(PYTEST_ARGS)

bench: $(STAMP)
	$(PY) benchmarks/bench_caption_filters.py
	$(PY) benchmarks/bench_text_spotting.py
	$(PY) benchmarks/bench_train.py
	$(PY) benchmarks/bench_driver_scale.py

compare: $(STAMP) sysdeps
	$(PY) benchmarks/compare_recipes.py

clean:
	rm -rf outputs .pytest_cache
