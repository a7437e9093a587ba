"""Triton kernels, one module per op (``triton_<op>.py``), each wrapped in a torch.autograd.Function."""
