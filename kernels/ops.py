"""Fused kernels for TransRec: attention pooling, CPC loss and catalogue cross-entropy.

Each op has a PyTorch reference (``kernels/pytorch/pt_<op>.py``), Triton kernels with forward and
backward (``kernels/triton/triton_<op>.py``) and one dispatcher (``kernels/<op>.py``). ``impl="auto"``
picks Triton for CUDA tensors and the reference otherwise; ``set_default_impl`` or the environment
variable ``TRANSREC_KERNELS`` flips every op at once.
"""

from transrec.kernels.attention_pool import attention_pool
from transrec.kernels.catalog_cross_entropy import catalog_cross_entropy
from transrec.kernels.cpc_loss import cpc_loss
from transrec.kernels.dispatch import get_default_impl, set_default_impl

__all__ = [
    "attention_pool",
    "catalog_cross_entropy",
    "cpc_loss",
    "get_default_impl",
    "set_default_impl",
]
