# The README's commands. Each creates .venv if it is missing and installs everything into it.
PYTHON ?= python3
export PYTHONHASHSEED := 0
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed

.PHONY: book test notebooks weights weights-retinanet clean venv

venv: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade "pip>=23.2"
	$(PY) -m pip install --quiet "torch==2.14.1" "torchvision==0.29.1"
	$(PY) -m pip install --quiet -e ".[book,test]"
	touch $(STAMP)

## make book: build the Jupyter Book into _build/html (notebooks are shown with their validated outputs)
book: $(STAMP)
	$(VENV)/bin/jupyter-book build -W --keep-going --path-output . .

## make test: unit/property/CLI tests and every notebook against its stored outputs (nbval), in one pytest run;
## the 25 slowest tests are listed at the end (CI must stay under 35 minutes)
test: $(STAMP)
	$(PY) -m pytest --durations=25

## make notebooks: re-execute every notebook in place, then strip volatile metadata
notebooks: $(STAMP)
	$(PY) tools/run_notebooks.py notebooks/*.ipynb

## make weights: retrain the shipped FP detector (about 30 CPU minutes) and write it into the package
weights: $(STAMP)
	$(VENV)/bin/detptq-mini train --progress

## make weights-retinanet: train RetinaNet-ResNet18-FPN from scratch (about 1.5-2 hours, one torch thread on a free core)
## and write its float16 weights into the package; resumes from runs/retinanet-r18/ when an earlier run saved its state
RETINA_STATE := runs/retinanet-r18/retinanet-r18.state.pt
weights-retinanet: $(STAMP)
	OMP_NUM_THREADS=1 $(VENV)/bin/detptq-mini train --model retinanet-r18 --threads 1 --progress \
	    $(if $(wildcard $(RETINA_STATE)),--resume,)

clean:
	rm -rf _build
