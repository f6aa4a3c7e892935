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

LUMBAR := --config configs/lumbar/demo.yaml
CERVICAL := --config configs/cervical/demo.yaml

demo: $(STAMP)
	$(PY) src/00_make_demo_data.py $(LUMBAR)
	$(PY) src/01_preprocess.py $(LUMBAR)
	$(PY) src/02_localize.py $(LUMBAR)
	$(PY) src/03_crop.py $(LUMBAR)
	$(PY) src/plot_overlays.py $(LUMBAR) --n 3
	$(PY) src/04_train.py $(LUMBAR)
	$(PY) src/05_ensemble.py $(LUMBAR)
	$(PY) src/06_predict.py $(LUMBAR)
	$(PY) src/00_make_demo_data.py $(CERVICAL)
	$(PY) src/01_preprocess.py $(CERVICAL)
	$(PY) src/02_localize.py $(CERVICAL)
	$(PY) src/03_crop.py $(CERVICAL)
	$(PY) src/04_train.py $(CERVICAL)
	$(PY) src/05_ensemble.py $(CERVICAL)
	$(PY) src/06_predict.py $(CERVICAL)
	$(PY) src/demo_summary.py $(LUMBAR) $(CERVICAL)
	@echo
	@echo "Demo done. Data: input/<slug>/ (truth: input/<slug>_truth/). Cache: cache/<task>/. Per task:"
	@echo "folds/<task>.csv, localize/<task>/ (lumbar points.csv + overlays/*.png; cervical vertebrae.csv),"
	@echo "crops/<task>/, models/<task>/, oof/<task>/{demo,demo_3d,ensemble_demo}/,"
	@echo "submissions/<task>_demo.csv (+ .report.json)."

test: $(STAMP)
	$(PY) -m pytest -q

lint: $(STAMP)
	$(PY) -m ruff check src tests bench

bench: $(STAMP)
	$(PY) bench/preprocess.py

clean-demo:  # removes only generated data sets (those with a _truth folder) and the pipeline's outputs
	rm -rf cache folds localize crops models predict oof/*/ submissions/*.csv submissions/*.json
	for t in input/*_truth; do [ -d "$$t" ] && rm -rf "$${t%_truth}" "$$t"; done; true
