# Two commands on a fresh machine: `make demo` (main job on generated data) and `make test`.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: demo test lint bench clean-demo

$(STAMP): requirements.txt pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -r requirements.txt
	$(PY) -m pip install -q --no-deps -e .
	touch $(STAMP)

demo: $(STAMP)
	$(PY) src/00_make_demo_data.py --config configs/lumbar/demo.yaml
	$(PY) src/01_preprocess.py --config configs/lumbar/demo.yaml
	$(PY) src/02_localize.py --config configs/lumbar/demo.yaml
	$(PY) src/03_crop.py --config configs/lumbar/demo.yaml
	$(PY) src/plot_overlays.py --config configs/lumbar/demo.yaml --n 3
	$(PY) src/04_train.py --config configs/lumbar/demo.yaml
	$(PY) src/04_train.py --config configs/lumbar/demo_3d.yaml
	$(PY) src/00_make_demo_data.py --config configs/cervical/demo.yaml
	$(PY) src/01_preprocess.py --config configs/cervical/demo.yaml
	@echo
	@echo "Demo done. Data: input/<slug>/ (truth: input/<slug>_truth/). Cache: cache/<task>/ (series.parquet,"
	@echo "instances.parquet, failures.csv). Lumbar: folds/lumbar.csv, localize/lumbar/ (points.csv, report.json,"
	@echo "overlays/*.png), crops/lumbar/ (manifest.parquet, report.json, one .npy per study and view),"
	@echo "oof/lumbar/{demo,demo_3d}/ (oof.csv, report.json), models/lumbar/."

test: $(STAMP)
	$(PY) -m pytest -q

lint: $(STAMP)
	$(PY) -m ruff check src tests bench

bench: $(STAMP)
	$(PY) bench/preprocess.py

clean-demo:  # removes only generated data sets (those with a _truth folder) and the pipeline's outputs
	rm -rf cache folds localize crops models oof/*/ submissions/*.csv
	for t in input/*_truth; do [ -d "$$t" ] && rm -rf "$${t%_truth}" "$$t"; done; true
