.PHONY: setup test test-fast test-dist lint

# Fresh machine -> .venv with torch 2.13.0 (CPU), mmengine 0.10.7, mmcv 2.1.0 (CPU ops), mmseg 1.2.2.
setup:
	bash tools/setup_env.sh

# The whole suite: ruff, fast unit tests, multi-process gloo tests (each with a hard timeout).
test:
	bash tools/run_tests.sh

test-fast:
	.venv/bin/python -m pytest -m "not dist" -q

test-dist:
	.venv/bin/python -m pytest -m dist -q

lint:
	.venv/bin/python -m ruff check .
