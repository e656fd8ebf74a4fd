# oomwarden: two commands on a fresh machine: `make demo` and `make test`.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: demo test lint typecheck pytest vmtest bench clean bpf

# Debian's own python3 needs the python3-venv package for `-m venv`; install it
# only when venv creation fails (this machine kind's Python has it built in).
$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV) || { apt-get update && apt-get install -y python3-venv \
		&& rm -rf $(VENV) && $(PYTHON) -m venv $(VENV); }
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[dev]'
	touch $(STAMP)

demo: $(STAMP) bpf
	$(BIN)/python -m oomwarden.demo

lint: $(STAMP)
	$(BIN)/ruff check src tests bench

typecheck: $(STAMP)
	$(BIN)/mypy --strict src/oomwarden

pytest: $(STAMP) bpf
	$(BIN)/pytest -q

# The BPF task iterator (docs/bpf.md): installs clang and bpftool with apt when
# missing; where it cannot be built it says why in one line and the warden
# uses procfs.
bpf:
	@bash src/oomwarden/bpf/build.sh

# The cgroup v2 tests (tests/v2) in a small qemu guest, once per run; it builds
# the guest into .cache/vm on first use and installs qemu if it is missing
# (docs/vm-lane.md). It runs before the host's pytest, whose summary stays last.
vmtest: $(STAMP)
	$(BIN)/python tests/vm/lane.py

test: lint typecheck vmtest pytest

bench: $(STAMP) bpf
	$(BIN)/python bench/snapshot.py

clean:
	rm -rf $(VENV) .mypy_cache .ruff_cache .pytest_cache .hypothesis .cache/vm
