# qsam2-jax developer commands. `make test` is what CI runs.
PYTHON ?= python3.11
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.setup-stamp
SAM2_VERSION := 1.1.0
# The local CPU wheel, installed before the package so pip never fetches a CUDA build here.
TORCH_PIN := torch==2.13.0+cpu

.PHONY: setup lint test test-all demo clean-venv

setup: $(STAMP)

# Rebuilt whenever pyproject.toml or this Makefile changes; seconds when up to date.
$(STAMP): pyproject.toml Makefile
	rm -rf $(VENV)
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip setuptools wheel
	$(PY) -m pip install -q '$(TORCH_PIN)'
	$(PY) -m pip install -q -e '.[torch,test]'
	# sam2 is source-only: no deps (no torchvision), no build isolation (no CUDA torch), no _C.
	SAM2_BUILD_CUDA=0 $(PY) -m pip install -q --no-deps --no-build-isolation sam2==$(SAM2_VERSION)
	$(PY) -c "import jax, flax, optax, orbax.checkpoint, torch, sam2; print('jax', jax.__version__, 'flax', flax.__version__, 'torch', torch.__version__)"
	touch $(STAMP)

# Lint (ruff: pyflakes, pycodestyle, import order) and the import contracts (import-linter:
# layers, the model never importing quant, no cycles); both configured in pyproject.toml.
lint: setup
	$(VENV)/bin/ruff check
	$(VENV)/bin/lint-imports

test: lint
	$(PY) -m pytest -q -m "not slow" -n 2 --dist loadfile --no-loadscope-reorder

test-all: lint
	$(PY) -m pytest -q -n 2 --dist loadfile --no-loadscope-reorder

# The main job on the embedded default: VRC -> W2A2 QAT -> evaluation -> save, then mIoU and
# overlays of the saved run (CPU, a few minutes).
demo: setup
	$(PY) -m train.qat --bits 2 --out demo_out/qat-w2a2 --overwrite
	$(PY) -m eval.image --ckpt demo_out/qat-w2a2 --max-images 8 --overlays 4

clean-venv:
	rm -rf $(VENV)
