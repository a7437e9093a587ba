"""The model's timing hook: `TransRec.spans`, a context-manager factory called with a span's name around each tower
call ("text tower"), each tower's frozen lower blocks while the feature cache is built ("text lower blocks"), the user
encoder ("user encoder") and the loss ("loss"). Unset (None, the default), a span is a shared no-op context: nothing
is recorded and nothing synchronises. The benches set it (bench/throughput.py, bench/catalogue_scale.py).
"""

from __future__ import annotations

from contextlib import AbstractContextManager, nullcontext

_NO_SPAN = nullcontext()


def span(model, name: str) -> AbstractContextManager:
    """The model's span `name`, or the no-op context when the model has no hook set (a test's stub included)."""
    spans = getattr(model, "spans", None)
    return _NO_SPAN if spans is None else spans(name)
