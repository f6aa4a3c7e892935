# Two commands on a fresh machine: `make demo` (main job on generated data) and `make test`.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: demo demo-full test lint bench clean-demo

$(STAMP): requirements.txt pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -r requirements.txt
	$(PY) -m pip install -q --no-deps -e .
	touch $(STAMP)

# Stages 00-06 of one pipeline config (the overlays script says so when a task has none); $(2): an
# environment prefix (the small spider and scoliosis models run fastest single-threaded on 2 cores).
define chain
	$(2) $(PY) src/00_make_demo_data.py --config $(1)
	$(2) $(PY) src/01_preprocess.py --config $(1)
	$(2) $(PY) src/02_localize.py --config $(1)
	$(2) $(PY) src/03_crop.py --config $(1)
	$(2) $(PY) src/plot_overlays.py --config $(1) --n 3
	$(2) $(PY) src/04_train.py --config $(1)
	$(2) $(PY) src/05_ensemble.py --config $(1)
	$(2) $(PY) src/06_predict.py --config $(1)
endef
ONE_THREAD := OMP_NUM_THREADS=1 MKL_NUM_THREADS=1

demo: $(STAMP)  # every task, small data and few epochs: minutes on 2 CPU cores
	$(call chain,configs/lumbar/demo.yaml)
	$(call chain,configs/cervical/demo.yaml)
	$(call chain,configs/spider/demo.yaml,$(ONE_THREAD))
	$(call chain,configs/scoliosis/demo.yaml,$(ONE_THREAD))
	$(PY) src/demo_summary.py --config configs/lumbar/demo.yaml --config configs/cervical/demo.yaml \
		--config configs/spider/demo.yaml --config configs/scoliosis/demo.yaml
	@echo
	@echo "Demo done. Data: input/<slug>/ (truth: input/<slug>_truth/). Cache: cache/<task>/. Per task:"
	@echo "folds/<task>.csv, localize/<task>/ (lumbar points.csv, cervical vertebrae.csv, spider masks/,"
	@echo "scoliosis landmarks.csv; overlays/*.png), crops/<task>/, models/<task>/, oof/<task>/,"
	@echo "submissions/<task>_demo.csv (+ .report.json); spider's test masks and overlays: predict/spider/demo/."
	@echo "Larger data and longer training: make demo-full."

demo-full: $(STAMP)  # the same chain with more studies, folds and epochs (about 80 minutes on 2 CPU cores)
	$(call chain,configs/lumbar/demo_full.yaml)
	$(call chain,configs/cervical/demo_full.yaml)
	$(call chain,configs/spider/demo_full.yaml,$(ONE_THREAD))
	$(call chain,configs/scoliosis/demo_full.yaml,$(ONE_THREAD))
	$(PY) src/demo_summary.py --config configs/lumbar/demo_full.yaml --config configs/cervical/demo_full.yaml \
		--config configs/spider/demo_full.yaml --config configs/scoliosis/demo_full.yaml
	@echo
	@echo "Full demo done: data in input/demo_full/, every output under output/demo_full/."

test: $(STAMP)
	$(PY) -m pytest -q

lint: $(STAMP)
	$(PY) -m ruff check src tests bench

bench: $(STAMP)
	$(PY) bench/preprocess.py

clean-demo:  # removes only generated data sets (those with a _truth folder) and the pipeline's outputs
	rm -rf cache folds localize crops models predict oof/*/ submissions/*.csv submissions/*.json output/demo_full
	for t in input/demo_full/*_truth; do [ -d "$$t" ] && rm -rf "$${t%_truth}" "$$t"; done; true
	for t in input/*_truth; do [ -d "$$t" ] && rm -rf "$${t%_truth}" "$$t"; done; true
