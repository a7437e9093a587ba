"""PyTorch references, one module per op (``pt_<op>.py``): the specification of each kernel."""
