# Two commands are all the set-up: `make quickstart` and `make test`.
# Each creates .venv in the repository root when it is missing and installs minwm into it.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.minwm-installed

.PHONY: install quickstart test bench clean

$(STAMP): pyproject.toml
	@test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	# torch is pinned: on a CPU-only machine this is the CPU build, on a CUDA machine the CUDA build.
	$(BIN)/python -m pip install -q -e ".[test]"
	@touch $(STAMP)

install: $(STAMP)

quickstart: $(STAMP)
	$(BIN)/minwm quickstart

test: $(STAMP)
	bash scripts/install_browser.sh
	$(BIN)/python -m pytest tests

clean:
	rm -rf $(VENV) runs .pytest_cache
