# The two commands a user needs: `make demo` and `make test`. Both set themselves up on a fresh machine.
PY      ?= python3
VENV    := .venv
PYBIN   := $(VENV)/bin/python
# torch is pinned for development: a bare `torch` pulls a multi-GB CUDA build; the package asks torch>=2.4.
DEV_DEPS := torch==2.13.0 triton==3.9.0 numpy ninja cmake setuptools wheel \
            pytest hypothesis
# Peers compared in the benchmarks; only open_clip's loss.py is loaded (benchmarks/peers.py).
PEERS   := open-clip-torch

.PHONY: setup demo test bench bench-contrastive bench-cross-entropy bench-similarity clean

setup: $(VENV)/.installed

$(VENV)/.installed: setup.py CMakeLists.txt pyproject.toml $(wildcard csrc/*)
	test -x $(PYBIN) || $(PY) -m venv $(VENV)
	$(PYBIN) -m pip install -q $(DEV_DEPS)
	$(PYBIN) -m pip install -q --no-deps $(PEERS)
	$(PYBIN) -m pip install -q --no-build-isolation -e .
	touch $@

# The main job: until the training demo lands, each op family's benchmark at one size.
demo: setup
	$(PYBIN) -m mmfast info
	$(PYBIN) benchmarks/bench_contrastive.py --sizes 4096 --repeats 3 --out build/demo
	$(PYBIN) benchmarks/bench_cross_entropy.py --shapes bert --impls cpu masked_torch floor --repeats 3 --out build/demo

test: setup
	$(PYBIN) -m pytest -q -ra tests

bench: bench-contrastive bench-cross-entropy bench-similarity

bench-contrastive: setup
	$(PYBIN) benchmarks/bench_contrastive.py

bench-cross-entropy: setup
	$(PYBIN) benchmarks/bench_cross_entropy.py

bench-similarity: setup
	$(PYBIN) benchmarks/bench_similarity.py

clean:
	rm -rf build *.egg-info mmfast/_C*.so $(VENV)
