# Two commands on a fresh machine with Python 3.11 and make:
#   make demo   runs `python -m dilated_ops`: converts a stock transformer to dilated attention,
#               trains it, exports it, reloads the .pt2 (about a minute on 2 CPU cores)
#   make test   runs the test suite
# Each creates .venv and installs what it needs. torch is pinned to the CPU build that
# installs from local disk here; override with `make TORCH_SPEC="torch==2.11.0" test`.
PYTHON ?= python3.11
TORCH_SPEC ?= torch==2.13.0
# Triton, for tests/test_triton_forward.py only: it compiles our Triton kernels for sm_80/sm_90
# without a GPU. The version torch 2.11's CUDA build pins (the GPU machine's); `TRITON_SPEC=`
# leaves it out (that test then skips).
TRITON_SPEC ?= triton==3.6.0
VENV := .venv
PY := $(VENV)/bin/python

.PHONY: demo test install clean

$(VENV)/.installed: pyproject.toml Makefile
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q "$(TORCH_SPEC)" $(TRITON_SPEC)
	$(PY) -m pip install -q -e ".[test]"
	touch $@

install: $(VENV)/.installed

demo: install
	$(PY) -m dilated_ops

# A fresh Inductor cache per run: a cached artifact of an earlier schema hid a lowering error once.
test: install
	TORCHINDUCTOR_CACHE_DIR=$$(mktemp -d) $(PY) -m pytest -q tests

clean:
	rm -rf $(VENV) build *.egg-info
