# The README's two commands, `make demo` and `make test`, each set up .venv first,
# so either works alone on a fresh clone.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed

.PHONY: setup demo test test-fast test-slow docs clean

setup: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	-$(PY) -m pip install --quiet --upgrade pip  # best effort: an old pip still installs us
	$(PY) -m pip install --quiet -e '.[dev]'
	touch $(STAMP)

demo: setup
	$(PY) tools/demo.py

# The test tiers (pyproject's markers): the whole suite but `slow` (CI), the inner loop, the
# long runs. xdist runs one worker per core; --dist loadgroup keeps a module whose fixture is
# expensive on one worker (xdist_group), so it runs once.
XDIST := -n auto --dist loadgroup

test: setup
	$(PY) -m pytest -q $(XDIST)

test-fast: setup
	$(PY) -m pytest -q $(XDIST) -m "fast and not slow"

test-slow: setup
	$(PY) -m pytest -q $(XDIST) -m slow

# the documentation site, offline, into site/; strict: any warning fails the build.
# NO_MKDOCS_2_WARNING silences Material's end-of-life banner (not a build warning)
docs: setup
	$(PY) tools/gen_docs.py --check
	NO_MKDOCS_2_WARNING=1 $(PY) -m mkdocs build --strict --quiet

clean:
	rm -rf outputs multirun .pytest_cache site
