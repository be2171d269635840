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

test: setup
	$(PY) -m pytest -q

test-slow: setup
	$(PY) -m pytest -q -m slow

# the documentation site, offline, into site/; strict: any warning fails the build
docs: setup
	$(PY) tools/gen_docs.py --check
	$(PY) -m mkdocs build --strict --quiet

clean:
	rm -rf outputs multirun .pytest_cache site
