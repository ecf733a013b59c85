# The two commands a user needs: `make demo` and `make test`. Both set themselves up on a fresh machine.
PY      ?= python3
VENV    := .venv
PYBIN   := $(VENV)/bin/python
# torch is pinned for development: a bare `torch` pulls a multi-GB CUDA build; the package asks torch>=2.4.
# tqdm, matplotlib and Pillow are the package's optional extras (progress bars, plots, image files).
DEV_DEPS := torch==2.13.0 triton==3.9.0 numpy ninja cmake setuptools wheel build \
            pytest pytest-benchmark hypothesis tqdm matplotlib Pillow
# Peers compared in the benchmarks; only open_clip's loss.py is loaded (benchmarks/peers.py).
PEERS   := open-clip-torch
# The integrations' tests (tests/test_integrations_*.py): Hugging Face transformers, and what open_clip's
# trainer (open_clip_train, in open-clip-torch) imports: its data modules and tokenizer.
TEST_DEPS := transformers pandas ftfy regex braceexpand 'webdataset>=0.2.5,<=0.2.86'
# open_clip's image transforms need torchvision; the registry's wheel is a CUDA build that a CPU torch
# cannot import as is, so it goes off the venv's path (tests/open_clip_run.py says how it is loaded).
VISION  := torchvision==0.28.0

.PHONY: setup demo demo-all test wheel bench bench-contrastive bench-cross-entropy bench-similarity bench-accumulation \
        bench-plots bench-pytest clean

setup: $(VENV)/.installed

$(VENV)/.installed: setup.py CMakeLists.txt pyproject.toml $(wildcard csrc/*) $(wildcard kernels/*.cu kernels/*.cuh kernels/build.py)
	test -x $(PYBIN) || $(PY) -m venv $(VENV)
	$(PYBIN) -m pip install -q $(DEV_DEPS) $(TEST_DEPS)
	$(PYBIN) -m pip install -q --no-deps $(PEERS)
	$(PYBIN) -m pip install -q --upgrade --no-deps --target $(VENV)/vision $(VISION)
	$(PYBIN) -m pip install -q --no-build-isolation -e .
	touch $@

# The main job: pretrain a tiny CLIP + masked-LM model on the embedded `shapes` data (2.5 minutes of
# training), then the held-out table and the fused-vs-naive loss table; the run folder is runs/demo.
demo: setup
	$(PYBIN) -m mmfast demo

# The demo, then every fine-tuning task and text-to-image generation on its model (about 12 minutes).
demo-all: setup
	$(PYBIN) -m mmfast demo --all

test: setup
	$(PYBIN) -m pytest -q -ra tests

# A wheel for the torch in .venv, into dist/ (README.md: "Building wheels for a training stack").
wheel: setup
	PATH="$(CURDIR)/$(VENV)/bin:$$PATH" $(PYBIN) -m build --wheel --no-isolation

bench: bench-contrastive bench-cross-entropy bench-similarity bench-accumulation

bench-contrastive: setup
	$(PYBIN) benchmarks/bench_contrastive.py

bench-cross-entropy: setup
	$(PYBIN) benchmarks/bench_cross_entropy.py

bench-similarity: setup
	$(PYBIN) benchmarks/bench_similarity.py

bench-accumulation: setup
	$(PYBIN) benchmarks/bench_accumulation.py

# Every family over a sweep of sizes (about 12 minutes on 2 cores): JSON in benchmarks/results, the
# README's plots in docs/img/bench-FAMILY-cpu.png.
bench-plots: setup
	$(PYBIN) -m mmfast bench --plot --plot-dir docs/img

# The same steps under pytest-benchmark (one small size per family; --bench-size large: the scripts' sizes).
bench-pytest: setup
	$(PYBIN) -m pytest benchmarks --benchmark-only

clean:
	rm -rf runs build *.egg-info mmfast/_C*.so $(VENV)
