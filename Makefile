# The two things a newcomer does: run a task locally, and run the tests. Each target sets up first.
TASK ?= examples/maths-by-code.yaml
PYTHON ?= python3

.PHONY: run test lint setup

setup:
	PYTHON=$(PYTHON) bash scripts/setup.sh

run: setup
	sandboxctl run $(TASK)

test: setup
	bash scripts/test.sh

lint: setup
	ruff check . && ruff format --check . && mypy
