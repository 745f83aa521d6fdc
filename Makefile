.PHONY: setup test test-fast test-dist test-gpu test-compat stress lint zoo

# Fresh machine -> .venv with torch 2.13.0 (CPU), mmengine 0.10.7, mmcv 2.1.0 (CPU ops), mmseg 1.2.2, mmdet 3.3.0.
setup:
	bash tools/setup_env.sh

# The whole suite: ruff, fast unit tests, multi-process gloo tests (each with a hard timeout).
test:
	bash tools/run_tests.sh

test-fast:
	.venv/bin/python -m pytest -m "not dist" -q

test-dist:
	.venv/bin/python -m pytest -m dist -q

# CUDA tier: NCCL world size 1 and two ranks sharing a GPU over gloo. Skipped (and shown as skipped)
# without CUDA. Exit code 5 ("no tests ran") cannot happen: the tests are collected, then skipped.
test-gpu:
	.venv/bin/python -m pytest -m gpu -v -rs tests/test_gpu.py

# Another torch (and mmengine, default 0.10.7) in a side venv (.venv-torch$(TORCH)[-mmengine$(MMENGINE)]):
# the whole suite; what needs torchvision, mmcv or a codebase is skipped, saying why. A torch above the
# machine's pip cap: PIP_CONFIG_FILE=/dev/null make test-compat TORCH=2.15.0
test-compat:
	bash tools/test_compat.sh $(or $(TORCH),$(error TORCH=version needed, e.g. make test-compat TORCH=2.1.2)) $(or $(MMENGINE),0.10.7)

# Rerun the multi-process tests N times (default 5): make stress N=30 [SELECT="-m dist"]
stress:
	bash tools/stress_dist.sh $(or $(N),5) $(SELECT)

lint:
	.venv/bin/python -m ruff check .

# The doctor over shipped mmseg/mmdet/mmpretrain/mmpose/mmaction2 configs (docs/zoo_configs.txt), one table:
# the README's zoo table. Not part of `make test` (about half an hour here). make zoo [ZOO=list]
zoo:
	.venv/bin/python tools/ddp_doctor.py --list $(or $(ZOO),docs/zoo_configs.txt) --size 64 64 \
		--iters 2 --cfg-options train_dataloader.batch_size=2 --out docs/zoo_table.md
