# Two commands do everything on a fresh machine:
#   make test   create .venv, install, run the unit tests and a smoke run of every notebook
#   make book   create .venv, install, fetch the sample slide, build the cohorts and cache the
#               features the notebooks share (make data), execute the notebooks with their
#               `book` preset and build book/_build/html
VENV ?= .venv
PY := $(VENV)/bin/python
export MINI_KD_DATA ?= $(CURDIR)/data

.PHONY: install test data book bench clean

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	python3 -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[dev]'
	$(PY) -m ipykernel install --sys-prefix --name python3 >/dev/null
	touch $@

test: install
	MINI_KD_QUIET=1 $(PY) -m pytest

data: install
	$(VENV)/bin/mini-kd fetch-sample
	$(PY) data_scripts/prepare_book.py --preset book

# Notebooks execute through jupyter-cache (book/_build/.jupyter_cache): a rebuild re-runs only a
# notebook whose code cells changed, and all of them when mini_kd/**/*.py or MINI_KD_DATA /
# MINI_KD_COHORT changed (book/_ext/execution_cache.py keeps the key in .jupyter_cache.key).
# A prose-only edit re-executes nothing; `make clean` forgets every result.
book: data
	$(VENV)/bin/jupyter-book build book
	@echo "open book/_build/html/index.html"

bench: install
	for script in benchmarks/*.py; do $(PY) $$script --preset book --out benchmarks/results/$$(basename $$script .py).json || exit 1; done

clean:
	rm -rf book/_build .pytest_cache
