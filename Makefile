# zq: the two commands a user needs are `make run` and `make test`.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
TOPOLOGY ?= topologies/local.toml

.PHONY: run test bench bench-compare sim clean

$(BIN)/python:
	$(PY) -m venv $(VENV)

$(STAMP): $(BIN)/python pyproject.toml
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[test]'
	touch $(STAMP)

run: $(STAMP)
	$(BIN)/zq up $(TOPOLOGY)

test: $(STAMP)
	$(BIN)/python -m pytest $(PYTEST_ARGS)

bench: $(STAMP)
	$(BIN)/python tools/bench.py

# zq's latency rows beside Redis Streams and NATS JetStream, in one run (servers: apt-get install
# redis-server nats-server; a missing one is skipped with a sentence saying so).
BENCH_STAMP := $(VENV)/.bench-installed
$(BENCH_STAMP): $(STAMP) pyproject.toml
	$(BIN)/pip install --quiet -e '.[test,bench]'
	touch $(BENCH_STAMP)

bench-compare: $(BENCH_STAMP)
	$(BIN)/python tools/bench.py --compare

# A long soak of the deterministic simulator: make sim SEEDS=100000
SEEDS ?= 20000
sim: $(STAMP)
	$(BIN)/python -m zq.sim --seeds $(SEEDS)

clean:
	rm -rf $(VENV) data .pytest_cache
