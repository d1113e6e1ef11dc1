# hf_rmsuon — two commands matter: `make demo` and `make test` (both set everything up).
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed
export OMP_NUM_THREADS ?= 1
export HF_HUB_DISABLE_TELEMETRY = 1
export TOKENIZERS_PARALLELISM = false

.PHONY: install test test-all demo bench bench-quick bench-scale bench-gpu lint clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	# torch first, pinned, so pip takes the local CPU wheel instead of several GB of CUDA packages
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e ".[dev,bench,trl]"
	touch $(STAMP)

install: $(STAMP)

test: $(STAMP)
	$(PY) -m pytest -q -n 2 --dist loadfile

test-all: $(STAMP)
	$(PY) -m pytest -q -n 2 --dist loadfile -m "not gpu"

demo: $(STAMP)
	$(PY) recipes/wikitext2.py --preset cpu --optim ars2_neo --output_dir runs/demo

bench: $(STAMP)
	$(PY) -m benchmarks.run --setting full

bench-quick: $(STAMP)
	$(PY) -m benchmarks.run --setting quick

# Qwen3-0.6B shapes, 2 layers, vs torch/pytorch-optimizer Muon (~15-30 min on 2 cores) → benchmarks/results/scale.json
bench-scale: $(STAMP)
	$(PY) -m pip install -q pytorch-optimizer || echo "pytorch-optimizer not installed: its rows are skipped"
	$(PY) -m benchmarks.scale --setting quick
	$(PY) -m benchmarks.run --setting full --only report

# on a CUDA machine (< 10 min): the scale benchmark in bf16 and fp32 NS, and pytest -m gpu
bench-gpu: $(STAMP)
	PY=$(PY) bash benchmarks/gpu.sh

lint: $(STAMP)
	$(PY) -m ruff check hf_rmsuon recipes tests benchmarks

clean:
	rm -rf $(VENV) runs .pytest_cache
