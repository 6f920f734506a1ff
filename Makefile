# The two things a newcomer does: run a task locally, and run the tests. Each target sets up first.
TASK ?= examples/maths-by-code.yaml
PYTHON ?= python3

.PHONY: run test unit lint setup

setup:
	PYTHON=$(PYTHON) bash scripts/setup.sh

run: setup
	sandboxctl run $(TASK)

test: setup
	bash scripts/test.sh

# The edit-test loop: no containers, no emulated cluster, no setup (a few minutes, not eight).
unit:
	$(PYTHON) -m pytest -q -m "not container and not cluster and not emulator and not realmodel"

lint: setup
	ruff check . && ruff format --check . && mypy
