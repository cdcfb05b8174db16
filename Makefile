PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
PROTO_OUT := services/proto_gen
PROTO_SRC := $(wildcard proto/pdserve/v1/*.proto)
PROTO_GEN := $(patsubst proto/%.proto,$(PROTO_OUT)/%_pb2.py,$(PROTO_SRC))

.PHONY: setup proto native serve test test-fast bench chaos lint clean

setup: $(VENV)/.installed $(PROTO_GEN) .tools/promtool .tools/prometheus native

# The KV hand-off's data path (C on the libucx wheel's UCX); rebuilt only when its sources change.
native: $(VENV)/.installed
	$(BIN)/python -m services.transfer.native >/dev/null
	$(BIN)/python -m kernels.cpu_native >/dev/null

$(VENV)/.installed: pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e '.[dev]'
	touch $@

proto: $(VENV)/.installed
	rm -rf $(PROTO_OUT)/pdserve
	$(MAKE) $(PROTO_GEN)

$(PROTO_OUT)/%_pb2.py: proto/%.proto $(VENV)/.installed
	mkdir -p $(dir $@)
	$(BIN)/python -m grpc_tools.protoc -Iproto --python_out=$(PROTO_OUT) --pyi_out=$(PROTO_OUT) \
		--grpc_python_out=$(PROTO_OUT) $<

.tools/promtool .tools/prometheus:
	bash scripts/install_promtool.sh .tools

serve: setup
	$(BIN)/pdserve serve

test: setup
	$(BIN)/python -m pytest -q -ra

test-fast: setup
	$(BIN)/python -m pytest -q -ra tests/unit

bench: setup
	$(BIN)/python -m services.bench.suite

# The chaos soak (tests/chaos/soak.py): every scenario at full size, on one host and on the netns test hosts
# (as root), with a real Prometheus watching; prints the table and writes bench/results/chaos/.
chaos: setup
	$(BIN)/python -m tests.chaos.soak --out bench/results/chaos

# pdserve beside llama.cpp's llama-server (built from the llama-cpp-python sdist into .tools/ on first use, about
# 12 minutes on 2 cores); results in bench/results/peers/. A benchmark, not a test.
.PHONY: bench-peers
bench-peers: setup
	$(BIN)/python -m services.cli bench compare

lint: setup
	$(BIN)/ruff check services kernels tests
	$(BIN)/mypy services

clean:
	rm -rf $(VENV) $(PROTO_OUT)/pdserve .tools services/transfer/native/_build kernels/_build
