"""Test-wide set-up.

TRITON_INTERPRET must be set before any Triton kernel module is imported, so that ``impl="triton"``
on CPU tensors runs the kernels through the Triton interpreter (how CI proves them without a GPU).
On a machine with CUDA the variable is left unset so the same tests run the compiled kernels.
"""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
