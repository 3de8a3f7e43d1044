# Two commands do all set-up on a fresh machine with Python 3.11:
#   make run   - create .venv, install attnpipe, run the demo pipeline on a local Ray with a sample dataset
#   make test  - create/update .venv, install test deps, run the test suite
PYTHON ?= python3.11
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

.PHONY: run test lint bench clean

$(BIN)/python:
	@command -v $(PYTHON) >/dev/null 2>&1 || { echo "needs $(PYTHON) on PATH (or: make PYTHON=python3 ...)"; exit 1; }
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip

$(STAMP): pyproject.toml | $(BIN)/python
	$(BIN)/pip install -q -e ".[test]"
	touch $(STAMP)

run: $(STAMP)
	$(BIN)/attnpipe run

test: $(STAMP)
	@# The report's browser test needs a headless Chromium: install it where we can (root + apt-get); never fail here.
	@command -v chromium >/dev/null || command -v chromium-browser >/dev/null || command -v google-chrome >/dev/null \
		|| { [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null && apt-get update -qq \
		     && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null; } \
		|| echo "chromium not installed: the browser test will skip"
	$(BIN)/python -m pytest -q

lint: $(STAMP)
	$(BIN)/pip install -q ruff mypy
	$(BIN)/ruff check attnpipe jobs tests bench
	$(BIN)/ruff format --check attnpipe jobs tests bench
	$(BIN)/mypy attnpipe

bench: $(STAMP)
	$(BIN)/python bench/encode_throughput.py
	$(BIN)/python bench/index_build.py
	$(BIN)/python bench/lsh_minhash.py
	$(BIN)/python bench/index_update.py
	$(BIN)/python bench/train_heads.py
	$(BIN)/python bench/encode_s3.py
	$(BIN)/python bench/dedup_quality.py
	$(BIN)/python bench/scale.py
	@# the full GPU table on a CUDA machine; a --quick smoke run elsewhere
	$(BIN)/python bench/encode_gpu.py $$($(BIN)/python -c "import torch; print('' if torch.cuda.is_available() else '--quick')")

clean:
	rm -rf $(VENV) attnpipe-demo
