# Two entry points: `make run` serves the default model with the chat page; `make test` runs every test.
# Both create .venv on first use and reinstall when pyproject.toml changes.
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed
HOST   ?= 127.0.0.1
PORT   ?= 8000

.PHONY: run test lint bench clean

$(STAMP): pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[dev]'
	# Build the C++ kernels now rather than at the first model load (without them the engine
	# falls back to torch ops, so a failure here is not fatal).
	$(PY) -m pagoda.layers.native_build || echo "some C++ kernels not built; using torch for them"
	touch $(STAMP)

run: $(STAMP)
	$(VENV)/bin/pagoda serve --host $(HOST) --port $(PORT)

test: $(STAMP)
	$(VENV)/bin/ruff check src tests benchmarks
	$(VENV)/bin/pytest -q -ra

lint: $(STAMP)
	$(VENV)/bin/ruff check src tests benchmarks

bench: $(STAMP)
	$(VENV)/bin/pagoda bench offline

clean:
	rm -rf $(VENV) build *.egg-info src/*.egg-info
